"""Shared pieces of the benchmark scripts: arguments, timing, memory, the test scan, tables, JSON.

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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.io_utils import save_npy, save_text  # noqa: E402
from pipeline.processed import CASE_JSON, GUIDE_FILES, MARKER  # noqa: E402
from transforms import HU_MAX, HU_MIN, WindowSpec, apply_window, normalize_hu  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
CACHE_DIR = Path(tempfile.gettempdir()) / "ctvq_bench_cache"  # 512^3 cases are ~0.7 GB: never in the tree


# --------------------------------------------------------------------------------------------
# arguments and device
# --------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """Add the options every bench script shares.

    Args:
        parser: the script's parser.
        name: the script name; the default JSON output is ``bench/results/<name>.json``.
    """
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to benchmark on (default: cuda when available)")
    parser.add_argument("--small", action="store_true",
                        help="tiny volume and tiny models, for a CPU smoke run in seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help=f"JSON results file (default: bench/results/{name}.json)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and crops")
    parser.add_argument("--budget", type=float, default=None,
                        help="wall-clock seconds for the whole script; configurations that would start "
                             "after it are recorded as skipped (default on cuda: train_step 150, inference 100, "
                             "dataloader 30, counted after the scan is loaded; 60 with --small or on cpu)")
    return parser


def add_scan_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options that choose the real (or synthetic) scan."""
    src = parser.add_argument_group("scan (one of --case, --nifti; a synthetic phantom otherwise)")
    src.add_argument("--case", type=Path, default=None,
                     help="processed case folder (ct_normalized_512.npy, windows/, body_mask_512.npy)")
    src.add_argument("--nifti", type=Path, default=None,
                     help="raw CT (NIfTI or any LoadCT input) processed on the fly through transforms; "
                          "the result is cached under --cache and reused")
    src.add_argument("--cache", type=Path, default=CACHE_DIR,
                     help="folder for scans built from --nifti or the synthetic phantom (default: <tmp>/ctvq_bench_cache)")
    src.add_argument("--window", default="lung",
                     help="window whose support the sparse model sees: a preset name (lung, bone, soft_tissue, "
                          "brain) or name:W:L (default: lung)")
    src.add_argument("--resolution", type=int, default=None,
                     help="cube size for --nifti and the phantom (default 512, or 64 with --small)")
    return parser


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``; a clear error when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; run on a GPU machine or pass --device cpu")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # dense convs: pick the fastest cuDNN algorithm (TF32 left at defaults)
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


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak`; None on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


@dataclass
class Timing:
    """Wall-clock statistics of a repeated, device-synchronised call."""

    median_s: float
    mean_s: float
    min_s: float
    max_s: float
    n: int
    warmup: int
    peak_bytes: int | None
    times_s: list[float] = field(default_factory=list)
    capped: bool = False  # fewer than the asked repeats because of the per-configuration time cap
    warmup_only: bool = False  # one call outlasted the cap: the (untuned) warm-up calls are the sample

    @property
    def label(self) -> str:
        """The ``n`` column: timed calls, flagged when the cap cut them short."""
        if self.warmup_only:
            return f"{self.n} (warm-up only)"
        return f"{self.n}" + (" (capped)" if self.capped else "")


def measure(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 20,
            max_seconds: float | None = None, min_repeats: int = 3) -> Timing:
    """Time ``fn`` after warm-up: each call is bracketed by device synchronisation.

    Peak memory is ``max_memory_allocated`` over warm-up and timed calls (weights, optimizer state
    and activations included). When ``max_seconds`` is given and the calls are slow, fewer than
    ``repeats`` calls are timed (never fewer than ``min_repeats``) and ``capped`` is set.

    Args:
        fn: the call to time (one training step, one encode, ...).
        device: where it runs; CUDA is synchronised before and after every call.
        warmup: untimed calls first (cuDNN autotuning, allocator, rulebooks).
        repeats: timed calls wanted; the median is reported.
        max_seconds: soft time cap for this configuration (warm-up included); when one warm-up
            call already outlasts it, that call is the sample (``warmup_only``, an upper bound).
        min_repeats: the fewest timed calls kept when the cap shortens the run.
    """
    reset_peak(device)
    start = time.perf_counter()
    last = 0.0
    done = 0
    warm_times = []
    for _ in range(max(0, warmup)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        last = time.perf_counter() - t0
        warm_times.append(last)
        done += 1
        if max_seconds is not None and time.perf_counter() - start > max_seconds / 3:
            break  # slow configuration: one warm-up call is enough to compile, tune and allocate
    if max_seconds is not None and warm_times and time.perf_counter() - start > max_seconds:
        # one call is longer than the cap: report the warm-up call itself (an upper bound) and stop
        return Timing(median_s=statistics.median(warm_times), mean_s=statistics.fmean(warm_times),
                      min_s=min(warm_times), max_s=max(warm_times), n=len(warm_times), warmup=0,
                      peak_bytes=peak_bytes(device), times_s=[round(t, 6) for t in warm_times], capped=True,
                      warmup_only=True)
    n = repeats
    capped = False
    if max_seconds is not None and last > 0:
        left = max_seconds - (time.perf_counter() - start)
        fit = int(left // last)
        if fit < repeats:
            n = min(repeats, max(min_repeats, fit))
            capped = n < repeats
    times = []
    for _ in range(max(1, n)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times),
                  max_s=max(times), n=len(times), warmup=done, peak_bytes=peak_bytes(device),
                  times_s=[round(t, 6) for t in times], capped=capped)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA (or spconv) out-of-memory errors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cudaerrormemoryallocation" in text


def describe_failure(exc: BaseException) -> str:
    """Short status text for a failed configuration: ``OOM`` or ``error: Type: message``."""
    if is_oom(exc):
        return "OOM"
    if type(exc).__name__ == "SparseInt32LimitError":
        return "int32 limit: " + " ".join(str(exc).split())[:160]
    msg = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {msg[:160]}"


def run_guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one configuration; an exception becomes ``{"status": "OOM" | "error: ..."}``.

    Memory is released afterwards either way, so the next configuration starts clean.
    """
    try:
        out = fn()
        out.setdefault("status", "ok")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a result row
        out = {"status": describe_failure(exc)}
        del exc
    free_memory(device)
    return out


class Budget:
    """Wall-clock budget of a whole script: later configurations are skipped, not started."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def exhausted(self) -> bool:
        return self.left() <= 0

    def per_config(self, cap: float) -> float:
        """Time cap for the next configuration: ``cap``, less when the budget is nearly spent."""
        return max(1.0, min(cap, self.left()))


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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, Timing):
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temporary name, then ``os.replace``)."""
    return save_text(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def write_partial(name: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Rows so far to ``--out`` (marked partial), so a run stopped from outside still leaves numbers."""
    keep = [{k: v for k, v in r.items() if not isinstance(v, Timing)} for r in rows]
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
# the test scan: a processed case folder (CONTRACT layout), built from NIfTI or a phantom if needed
# --------------------------------------------------------------------------------------------


def parse_window(spec: str) -> WindowSpec:
    """``--window``: ``transforms.parse_window``; a bad value ends the script with one line."""
    import transforms

    try:
        return transforms.parse_window(spec)
    except ValueError as e:
        raise SystemExit(f"--window: {e}") from None


@dataclass
class Scan:
    """One processed scan in memory (memory-mapped): window values, body mask and where it came from."""

    window: np.ndarray  # (R, R, R) float16/float32 in [0, 1]
    body: np.ndarray  # (R, R, R) bool
    window_name: str
    source: str
    case_dir: Path

    @property
    def resolution(self) -> int:
        return int(self.window.shape[0])


def write_case(case_dir: Path, hu: np.ndarray, windows: dict[str, np.ndarray], body: np.ndarray,
               case_info: dict[str, Any]) -> Path:
    """Write one case folder in the guide layout (``pipeline.processed``: the subset the benchmarks and
    dataset read); ``windows`` maps window file names to window values.

    A dataset root two levels up gets ``dataset_config.json`` and ``metadata.csv`` so the training
    dataset can discover it.
    """
    case_dir = Path(case_dir)
    (case_dir / "windows").mkdir(parents=True, exist_ok=True)
    res = int(body.shape[0])
    save_npy(case_dir / GUIDE_FILES["ct_normalized"], normalize_hu(hu).astype(np.float16))
    for fname, arr in windows.items():
        save_npy(case_dir / "windows" / fname, arr.astype(np.float16, copy=False))
    save_npy(case_dir / GUIDE_FILES["body_mask"], body.astype(bool, copy=False))
    info = {"case_id": case_dir.name, "resolution": res, **case_info}
    (case_dir / CASE_JSON).write_text(json.dumps(info, indent=2, default=_jsonable))
    dataset_root = case_dir.parent.parent
    win_cfg = {}
    for fname in windows:
        name, w, l = Path(fname).stem.rsplit("_", 2)  # e.g. soft_tissue, w400, l50
        win_cfg[name] = {"width": float(w[1:]), "level": float(l[1:]), "file": f"windows/{fname}"}
    cfg = {"resolution": res, "hu_min": HU_MIN, "hu_max": HU_MAX, "windows": win_cfg, "organ_mapping": None,
           "versions": {"numpy": np.__version__, "torch": torch.__version__}}
    (dataset_root / "dataset_config.json").write_text(json.dumps(cfg, indent=2))
    meta = dataset_root / "metadata.csv"
    meta.write_text(
        "case_id,source_path,label_path,status,error,original_shape,original_spacing,spacing_512,body_voxels,seconds\n"
        f"{case_dir.name},{case_info.get('source', '')},,ok,,\"{case_info.get('source_shape', '')}\",,,"
        f"{int(body.sum())},0\n")
    (case_dir / MARKER).write_text("ok\n")  # no manifest: taken on its files, as the older guide's tools wrote it
    return case_dir


def phantom_hu(resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like phantom in HU: ellipsoid body (soft tissue), two lungs, a spine; air outside.

    Returns (hu float32 (R,R,R), body bool (R,R,R)); the body fills about 40% of the cube like a
    resampled chest scan.
    """
    rng = np.random.default_rng(seed)
    r = resolution
    g = (np.arange(r, dtype=np.float32) + 0.5) / r * 2 - 1
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2 + (z / 0.98) ** 8 <= 1.0
    hu = np.full((r, r, r), -1000.0, np.float32)
    hu[body] = 40.0
    lungs = (((x - 0.38) / 0.3) ** 2 + (y / 0.38) ** 2 + (z / 0.8) ** 2 <= 1) | (
        ((x + 0.38) / 0.3) ** 2 + (y / 0.38) ** 2 + (z / 0.8) ** 2 <= 1)
    hu[lungs & body] = -850.0
    spine = ((x / 0.09) ** 2 + ((y + 0.45) / 0.09) ** 2 <= 1) & body
    hu[spine] = 700.0
    fat = body & ~lungs & ((x / 0.8) ** 2 + (y / 0.57) ** 2 > 1)
    hu[fat] = -100.0
    hu += rng.normal(0, 15, size=hu.shape).astype(np.float32) * body
    return hu, body


def _find_window_file(case_dir: Path, name: str) -> Path | None:
    hits = sorted((case_dir / "windows").glob(f"{name}_w*_l*.npy"))
    return hits[0] if hits else None


def _build_from_nifti(path: Path, resolution: int, win: WindowSpec, case_dir: Path) -> None:
    """Run the project's preprocessing chain (``transforms.cube_transforms``) on a raw scan and write a case folder."""
    from monai.transforms import Compose

    from transforms import cube_transforms

    t0 = time.perf_counter()
    d = Compose(cube_transforms("image", resolution))({"image": str(path)})
    hu = np.asarray(d["image"][0].numpy(), dtype=np.float32).clip(HU_MIN, HU_MAX)
    write_case(case_dir, hu, {win.filename: apply_window(hu, win.width, win.level)}, d["body_mask"][0].numpy(),
               {"source": str(path.name), "source_shape": list(d["image"].meta["source_shape"]),
                "timings": {"build_s": round(time.perf_counter() - t0, 2)}})


def prepare_case(args: argparse.Namespace) -> Path:
    """The case folder to benchmark on: ``--case``, or one built (once, cached) from ``--nifti`` or a phantom."""
    win = parse_window(args.window)
    if args.case is not None:
        case = Path(args.case)
        if not (case / GUIDE_FILES["body_mask"]).exists():
            raise SystemExit(f"--case {case}: no {GUIDE_FILES['body_mask']} there; pass a processed case folder "
                             "(processed_dataset/<name>/processed/<case_id>)")
        return case
    res = args.resolution or (64 if args.small else 512)
    if args.nifti is not None:
        stem = Path(args.nifti).name.split(".")[0]
        case = Path(args.cache) / f"{stem}_{res}" / "processed" / stem
        if not (case / MARKER).exists() or _find_window_file(case, win.name) is None:
            print(f"building {res}^3 case from {args.nifti} through transforms (cached in {case}) ...", flush=True)
            _build_from_nifti(Path(args.nifti), res, win, case)
        return case
    case = Path(args.cache) / f"phantom_{res}" / "processed" / "phantom"
    if not (case / MARKER).exists() or _find_window_file(case, win.name) is None:
        hu, body = phantom_hu(res, seed=0)
        write_case(case, hu, {win.filename: apply_window(hu, win.width, win.level)}, body,
                   {"source": "synthetic phantom", "source_shape": [res] * 3})
    return case


def load_scan(args: argparse.Namespace) -> Scan:
    """Memory-map the chosen window and body mask of the benchmark case."""
    case = prepare_case(args)
    win = parse_window(args.window)
    wfile = case / "windows" / win.filename
    if not wfile.exists():
        wfile = _find_window_file(case, win.name)
    if wfile is None or not wfile.exists():
        raise SystemExit(f"{case}: no windows/{win.name}_w*_l*.npy; preprocess that window or pass --window with one "
                         f"of {[p.name for p in (case / 'windows').glob('*.npy')]}")
    window = np.load(wfile, mmap_mode="r")
    body = np.load(case / GUIDE_FILES["body_mask"], mmap_mode="r")
    if window.shape != body.shape or window.ndim != 3:
        raise SystemExit(f"{case}: window {window.shape} and body mask {body.shape} differ; re-run preprocessing")
    info = {}
    with contextlib.suppress(Exception):
        info = json.loads((case / CASE_JSON).read_text())
    return Scan(window=window, body=body, window_name=wfile.stem, source=str(info.get("source", case.name)),
                case_dir=case)


def body_center(body: np.ndarray) -> tuple[int, int, int]:
    """Centre of mass of the body mask, from its three axis projections (cheap on a memory map)."""
    r = body.shape
    center = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        prof = np.asarray(body, dtype=bool).sum(axis=others, dtype=np.int64)
        tot = prof.sum()
        center.append(int(round(float((prof * np.arange(r[axis])).sum() / tot))) if tot else r[axis] // 2)
    return tuple(center)  # type: ignore[return-value]


def crop_box(center: Sequence[int], size: int, resolution: int, align: int = 8) -> tuple[slice, slice, slice]:
    """A cube of ``size`` centred on ``center``, start aligned to ``align``, kept inside the grid."""
    if size > resolution:
        raise ValueError(f"crop {size} is larger than the {resolution}^3 scan; use crops <= {resolution}")
    box = []
    for c in center:
        start = int(c) - size // 2
        start = max(0, min(resolution - size, start))
        start -= start % align
        box.append(slice(start, start + size))
    return tuple(box)  # type: ignore[return-value]


@dataclass
class Crop:
    """Dense and sparse views of one crop (on the benchmark device)."""

    size: int
    box: tuple[slice, slice, slice]
    dense: torch.Tensor  # (1, 1, s, s, s) float32 window values, 0 outside the support
    coords: torch.Tensor  # (N, 4) int32 (batch, i, j, k) in full-grid coordinates
    feats: torch.Tensor  # (N, 1) float32
    resolution: int

    @property
    def voxels(self) -> int:
        return self.size**3

    @property
    def occupancy(self) -> float:
        return self.coords.shape[0] / self.voxels


def make_crop(scan: Scan, size: int, device: torch.device) -> Crop:
    """The crop of ``size``^3 centred on the body; support = body mask & window > 0.

    The dense input holds the window values (what a dense model sees: the full crop); the sparse
    input holds only support voxels, with coordinates in the full grid.
    """
    box = crop_box(body_center(scan.body), size, scan.resolution)
    win = torch.from_numpy(np.array(scan.window[box], dtype=np.float32)).to(device)  # copies off the memory map
    body = torch.from_numpy(np.array(scan.body[box], dtype=bool)).to(device)
    support = body & (win > 0)
    dense = torch.where(support, win, torch.zeros((), device=device))
    ijk = torch.nonzero(support).to(torch.int32)
    offset = torch.tensor([s.start for s in box], dtype=torch.int32, device=device)
    coords = torch.cat([torch.zeros_like(ijk[:, :1]), ijk + offset], dim=1).contiguous()
    feats = win[support].unsqueeze(1).contiguous()
    return Crop(size=size, box=box, dense=dense[None, None].contiguous(), coords=coords, feats=feats,
                resolution=scan.resolution)


@contextlib.contextmanager
def only_on_device(vol: Crop, keep: tuple[str, ...], device: torch.device):
    """Park the input views a model does not read on the CPU, so its peak memory is its own."""
    parked = {}
    for name in ("dense", "coords", "feats"):
        if name not in keep:
            parked[name] = getattr(vol, name).device
            setattr(vol, name, getattr(vol, name).cpu())
    free_memory(device)
    try:
        yield vol
    finally:
        for name, dev in parked.items():
            setattr(vol, name, getattr(vol, name).to(dev))


def whole_scan(scan: Scan, device: torch.device) -> Crop:
    """The whole cube as one 'crop' (for whole-scan inference)."""
    return make_crop(scan, scan.resolution, device)


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
               layout: str = "patch") -> torch.nn.Module:
    """The sparse model; ``use_checkpoint`` recomputes its blocks in backward (the config key of that name)."""
    from networks import SparseVQVAE

    return SparseVQVAE(**ours_kwargs(small, resolution, layout), use_checkpoint=use_checkpoint).to(device)


def sparse_input(crop: Crop, batch_size: int = 1):
    """The crop as an spconv SparseConvTensor on the full grid."""
    from networks import make_sparse  # its backend installs the CPU stream stub and picks the algorithm

    return make_sparse(crop.feats, crop.coords, [crop.resolution] * 3, batch_size)


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
