"""Shared pieces of the benchmark scripts: arguments, device and environment, the training-step
helpers, the models under test, tables and JSON output (timing: ``bench/timing.py``; the test scan
and its crops: ``bench/scan.py``).

Every bench script runs as ``python bench/<name>.py`` from the project root (or through
``./run.sh bench <name>``); this module puts the project root on ``sys.path`` so the
project packages (``networks``, ``transforms``, ``pipeline``) import without installing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.io_utils import save_text  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"


# --------------------------------------------------------------------------------------------
# arguments and device
# --------------------------------------------------------------------------------------------


# Default ``--budget`` seconds (on CUDA, full runs) of the scripts that honour it; the others run
# every configuration. ``default_budget`` falls back to 150 s for a script that sets none.
BUDGETS = {"train_step": 150.0, "inference": 100.0, "dataloader": 90.0}


def scratch_dir() -> Path:
    """Where ``--small`` runs write by default: ``$TMPDIR/ctvq_bench`` (outside the repository)."""
    return Path(tempfile.gettempdir()) / "ctvq_bench"


class _SmallAction(argparse.Action):
    """``--small``: also moves ``--out``'s default to :func:`scratch_dir` (a smoke run's numbers
    mean nothing and must not overwrite ``bench/results/``); an explicit ``--out`` still wins."""

    def __init__(self, option_strings, dest, out_default=None, scratch_out=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)
        self.out_default, self.scratch_out = out_default, scratch_out

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        if self.scratch_out is not None and getattr(namespace, "out", None) is self.out_default:
            namespace.out = self.scratch_out


def add_common_args(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """Add the options every bench script shares.

    Args:
        parser: the script's parser.
        name: the script name; the default JSON output is ``bench/results/<name>.json``, or
            ``$TMPDIR/ctvq_bench/<name>.json`` with ``--small``.
    """
    out_default = RESULTS_DIR / f"{name}.json"
    scratch_out = scratch_dir() / f"{name}.json"
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to benchmark on (default: cuda when available)")
    parser.add_argument("--small", action=_SmallAction, out_default=out_default, scratch_out=scratch_out,
                        help="tiny volume and tiny models, for a CPU smoke run in seconds (writes to "
                             f"{scratch_out} unless --out is given)")
    parser.add_argument("--out", type=Path, default=out_default,
                        help=f"JSON results file (default: bench/results/{name}.json; with --small "
                             f"{scratch_out}, outside the repository)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and crops (default 0)")
    if name in BUDGETS:
        parser.set_defaults(default_budget=BUDGETS[name])
        budget_help = (f"wall-clock seconds for the whole script; configurations that would start after it are "
                       f"recorded as skipped (default: {BUDGETS[name]:g} on cuda, counted after the "
                       f"{'dataset is indexed' if name == 'dataloader' else 'scan is loaded'}; 60 with --small or on cpu)")
    else:
        budget_help = "accepted for a common command line; this script has no time budget and runs every configuration"
    parser.add_argument("--budget", type=float, default=None, help=budget_help)
    return parser


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device`` (``pipeline.tokenizer.resolve_device``, whose one-line error
    for a device this machine lacks ends the script)."""
    from pipeline.io_utils import TokenizerError
    from pipeline.tokenizer import resolve_device as pipeline_device

    try:
        device = pipeline_device(name)
    except TokenizerError as e:
        raise SystemExit(str(e)) from None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # dense convs: pick the fastest cuDNN algorithm (TF32 left at defaults)
    return device


def seeded_device(args: argparse.Namespace) -> torch.device:
    """``--device`` resolved (:func:`resolve_device`), with the random state seeded from ``--seed``."""
    device = resolve_device(args.device)
    seed_all(args.seed)
    return device


def default_budget(args: argparse.Namespace) -> float:
    if args.budget is not None:
        return float(args.budget)
    if args.small or args.device == "cpu":
        return 60.0
    return float(getattr(args, "default_budget", 150.0))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def env_info(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, stored with every result file."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "host_cpus": os.cpu_count(),
    }
    for mod in ("monai", "spconv", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


# --------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA; a no-op elsewhere (CPU runs are smoke runs in fp32)."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        yield


def conv_policy(variant: str):
    """ctvq's convs as shipped (``auto``), through spconv only (``spconv``) or dense wherever
    the level fills a quarter of its bounding box, training included (``dense``)."""
    from networks.dense import DEFAULT_MIN_OCCUPANCY, dense_conv_policy

    if variant == "auto":
        return contextlib.nullcontext()
    return dense_conv_policy({"spconv": float("inf"), "dense": DEFAULT_MIN_OCCUPANCY}[variant])


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=enabled and device.type == "cuda")


def adamw(params, lr: float, device: torch.device) -> torch.optim.AdamW:
    """The optimizer of every model's step: AdamW, fused into one kernel on CUDA (as the bundles)."""
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# formatting and output
# --------------------------------------------------------------------------------------------


def fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    gib = b / 2**30
    return f"{gib:.2f} GiB" if gib >= 1 else f"{b / 2**20:.0f} MiB"


def fmt_rate(r: float | None, unit: str = "") -> str:
    if r is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(r) >= div:
            return f"{r / div:.2f} {suffix}{unit}"
    return f"{r:.2f} {unit}".rstrip()


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table: ``columns`` is ``[(key, header), ...]``; missing keys print as ``-``."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "-")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):  # a Timing
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temporary name, then ``os.replace``)."""
    return save_text(path, json.dumps(payload, indent=2, default=jsonable) + "\n")


def write_partial(name: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Rows so far to ``--out`` (marked partial), so a run stopped from outside still leaves numbers."""
    keep = [{k: v for k, v in r.items() if not is_dataclass(v)} for r in rows]  # Timing objects stay out
    write_json(args.out, {"benchmark": name, "partial": True, "rows": keep})


def finish(name: str, args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]],
           table: str, notes: Sequence[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print the table and notes, write the JSON file; returns the payload."""
    payload = {
        "benchmark": name,
        "env": env_info(device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": list(notes),
        "rows": rows,
        "table_markdown": table,
    }
    if extra:
        payload.update(extra)
    print(table)
    for note in notes:
        print(f"- {note}")
    out = write_json(args.out, payload)
    print(f"\nresults: {out}")
    return payload


# --------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------


def networks_available() -> tuple[bool, str]:
    """Whether ``from networks import SparseVQVAE`` works, with the reason when it does not."""
    try:
        from networks import SparseVQVAE  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def shipped_network_def() -> dict[str, Any]:
    """The literal arguments of the shipped ``network_def`` (``bundles/ct_vqvae/stage2.json``)."""
    cfg = json.loads((Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae" / "stage2.json").read_text())
    return {k: v for k, v in cfg["network_def"].items() if k != "_target_" and not str(v).startswith(("@", "$"))}


def ours_kwargs(small: bool, resolution: int, layout: str = "patch") -> dict[str, Any]:
    """SparseVQVAE arguments: the shipped ones, or tiny ones for ``--small``, in ``layout`` (the
    Direct3D-S2 layout with its own widths and depth)."""
    if not small:
        if layout != "patch":
            return {"resolution": resolution // 8, "layout": layout}
        return {**shipped_network_def(), "resolution": resolution // 8}
    return {"resolution": resolution // 8, "model_channels": 32, "latent_channels": 8, "num_embeddings": 64,
            "channels": (8, 16, 32) if layout == "patch" else (8, 8, 16, 32), "num_blocks": 1, "num_heads": 2,
            "window_size": 4, "layout": layout}


def build_ours(small: bool, resolution: int, device: torch.device, use_checkpoint: bool = False,
               layout: str = "patch", **overrides) -> torch.nn.Module:
    """The sparse model (``overrides`` replace its arguments); ``use_checkpoint`` recomputes its blocks
    in backward (the config key of that name)."""
    from networks import SparseVQVAE

    kwargs = {**ours_kwargs(small, resolution, layout), "use_checkpoint": use_checkpoint, **overrides}
    return SparseVQVAE(**kwargs).to(device)


def vqvae_kwargs(small: bool) -> dict[str, Any]:
    """MONAI VQVAE at the same 8x compression (three stride-2 levels) with an 8192 x 32 codebook.

    Widths per level follow ours after each downsample (64, 128, 512), one residual layer per
    level: 41 M parameters against ctvq's 38 M.
    """
    if small:
        ch = (8, 16, 16)
        return {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": ch, "num_res_channels": ch,
                "num_res_layers": 1, "num_embeddings": 64, "embedding_dim": 8, "ddp_sync": False}
    ch = (64, 128, 512)
    return {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": ch, "num_res_channels": ch,
            "num_res_layers": 1, "downsample_parameters": ((2, 4, 1, 1),) * 3,
            "upsample_parameters": ((2, 4, 1, 1, 0),) * 3, "num_embeddings": 8192, "embedding_dim": 32,
            "ddp_sync": False}


def maisi_kwargs(small: bool, device: torch.device, num_splits: int | None = None) -> dict[str, Any]:
    """MAISI's published CT autoencoder (``autoencoder_def`` of MAISI's configs), 4x compression.

    ``num_splits`` only changes how each conv is chunked along ``dim_split`` (memory), not the
    maths; MAISI's configs use 16, 8 or 2 depending on the GPU, 8 here.
    """
    kw: dict[str, Any] = {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4,
        "num_channels": [64, 128, 256], "num_res_blocks": [2, 2, 2], "norm_num_groups": 32, "norm_eps": 1e-6,
        "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False, "use_checkpointing": False, "use_convtranspose": False,
        "norm_float16": True, "num_splits": 8 if num_splits is None else num_splits, "dim_split": 1,
    }
    if small:  # num_splits 1: MAISI's split path needs edges of >= 2 * num_splits at every level
        kw.update(num_channels=[8, 16, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4,
                  num_splits=1 if num_splits is None else num_splits)
    if device.type != "cuda":
        kw["norm_float16"] = False  # half GroupNorm output would meet fp32 convs on CPU
    return kw


def build_vqvae(small: bool, device: torch.device) -> torch.nn.Module:
    from monai.networks.nets import VQVAE

    return VQVAE(**vqvae_kwargs(small)).to(device)


def fit_num_splits(num_splits: int, min_edge: int) -> int:
    """The largest split count <= ``num_splits`` that MAISI's split convs accept for ``min_edge``.

    Each split must keep at least 4 voxels along the split axis (its halo is 3), at every level.
    """
    return max(1, min(int(num_splits), int(min_edge) // 4))


def build_maisi(small: bool, device: torch.device, num_splits: int | None = None,
                min_edge: int | None = None) -> torch.nn.Module:
    """MAISI's autoencoder; ``min_edge`` (the smallest edge any level sees) lowers ``num_splits`` to fit."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    kw = maisi_kwargs(small, device, num_splits)
    if min_edge is not None:
        kw["num_splits"] = fit_num_splits(kw["num_splits"], min_edge)
    model = AutoencoderKlMaisi(**kw).to(device)
    model.bench_num_splits = kw["num_splits"]
    return model
