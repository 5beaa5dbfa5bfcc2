"""One training step (forward, backward, optimizer) at batch 1 on crops of a real scan.

Compares the sparse VQ-VAE (fp16 autocast + GradScaler, and fp32) with MONAI's dense
``VQVAE`` (same 8x compression, 8192 x 32 codebook) and MAISI's ``AutoencoderKlMaisi``
(both fp16 autocast + GradScaler), on the same crops centred on the body. Dense models see
the whole crop; the sparse model sees its support (body mask & window > 0).

    python bench/train_step.py --case processed_dataset/<name>/processed/<case_id>
    python bench/train_step.py --small --device cpu      # smoke run, tiny models
    python bench/train_step.py ... --models ours-fp16-graph --variant w4:window_size=4   # + a variant row

Each ``--variant NAME:KEY=VALUE`` (KEY a ``SparseVQVAE`` argument, VALUE JSON; repeat NAME for
several) adds a row per ctvq model of ``--models``, that model with the override, named
``MODEL[NAME]``.

Weights are random: the step time does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common as C  # noqa: E402
from bench.scan import Crop, add_scan_args, grid_input, load_scan_and_budget, make_crop, only_on_device, sparse_input  # noqa: E402
from bench.timing import measure, peak_bytes, reset_peak, run_guarded  # noqa: E402

MODELS = ("ours-fp16", "ours-fp16-grid", "ours-fp16-graph", "ours-fp16-graph-compiled", "ours-fp16-dense", "ours-fp16-ckpt", "ours-fp32", "ours-fp16-direct3d", "monai-vqvae", "maisi-ae")
MODEL_LABELS = {
    "ours-fp16": ("ctvq SparseVQVAE", "fp16 amp"),
    "ours-fp16-grid": ("ctvq SparseVQVAE, grid training path", "fp16 amp"),
    "ours-fp16-graph": ("ctvq SparseVQVAE, grid path replayed as a CUDA graph (graph_training)", "fp16 amp"),
    "ours-fp16-graph-compiled": ("ctvq SparseVQVAE, as -graph with the conv levels compiled (compile_grid)", "fp16 amp"),
    "ours-fp16-dense": ("ctvq SparseVQVAE, dense convs", "fp16 amp"),
    "ours-fp16-ckpt": ("ctvq SparseVQVAE, use_checkpoint", "fp16 amp"),
    "ours-fp32": ("ctvq SparseVQVAE", "fp32"),
    "ours-fp16-direct3d": ("ctvq SparseVQVAE, Direct3D-S2 layout", "fp16 amp"),
    "monai-vqvae": ("MONAI VQVAE (8x, 8192x32)", "fp16 amp"),
    "maisi-ae": ("MAISI AutoencoderKlMaisi (4x)", "fp16 amp"),
}
COLUMNS = [
    ("model", "model"), ("params_fmt", "params"), ("precision", "precision"), ("crop", "crop"), ("occupancy", "occupancy"),
    ("step", "time/step (median)"), ("n", "n"), ("rate", "dense-equiv. voxels/s"), ("peak", "peak GPU mem"),
    ("status", "status"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, "train_step")
    add_scan_args(p)
    p.add_argument("--crops", type=int, nargs="+", default=None,
                   help="crop edge lengths (default: 64 128 256 512, or 16 32 with --small; 64^3 is about the training crop budget of 300k support voxels)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps; the median is reported (default 20)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="soft time cap per configuration; slow ones time fewer steps (>= 3), flagged in n "
                        "(default 20, or 10 with --small)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--try-all", action="store_true",
                   help="also run configurations known not to fit (MAISI at crops >= 500: ~0.5 TB of activations)")
    p.add_argument("--maisi-num-splits", type=int, default=None,
                   help="MAISI conv split count (memory only; default 8, lowered where a crop is too small "
                        "for it; 1 with --small)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="one more row per ctvq model with this SparseVQVAE argument (VALUE as JSON; repeat NAME for several)")
    p.set_defaults(default_budget=150.0)
    args = p.parse_args(argv)
    args.variants = {}
    for item in args.variant:
        name, _, override = item.partition(":")
        key, eq, value = override.partition("=")
        try:
            args.variants.setdefault(name, {})[key] = json.loads(value)
        except ValueError:
            eq = ""
        if not (name and key and eq):
            p.error(f"--variant {item!r} is not NAME:KEY=VALUE with a JSON VALUE, e.g. w4:window_size=4")
    return args


# --------------------------------------------------------------------------------------------
# one step per model family
# --------------------------------------------------------------------------------------------


def _optimizer_step(loss_of, opt, scaler):
    """One step: zero the gradients, ``loss_of()`` (forward and loss), scaled backward, optimizer step."""

    def step():
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss_of()).backward()
        scaler.step(opt)
        scaler.update()

    return step


def _ours_loss():
    """``(model, x, recon, losses) -> loss`` as the trainer: L1 on the reconstructed cells + the
    model's weighted VQ terms."""
    from pipeline.trainer import SparseReconLoss

    recon_loss = SparseReconLoss("l1")
    return lambda model, x, recon, losses: recon_loss(recon, x) + model.weighted_vq_loss(
        {k: v.float() for k, v in losses.items()})


def _ours_step(model, x, opt, scaler, device, amp: bool):
    loss_of = _ours_loss()

    def loss():
        with C.autocast(device, amp):
            recon, losses = model(x)
        return loss_of(model, x, recon, losses)

    return _optimizer_step(loss, opt, scaler)


def _ours_graph_step(model, x, opt, scaler, device):
    """As the trainer with ``graph_training: true``: ``pipeline.graph_step.GraphedSteps`` runs forward,
    loss and backward (eagerly for the first step, then from the CUDA graph it captures)."""
    from pipeline.graph_step import GraphedSteps

    loss_of = _ours_loss()

    def terms(grid):
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda", cache_enabled=False):
            recon, losses = model(grid, all_cells=True)
        return {"loss": loss_of(model, grid, recon, losses)}

    params = [p for p in model.parameters() if p.requires_grad]
    steps = GraphedSteps(model, params, terms, scaler, enabled=device.type == "cuda")

    def step():
        steps(x)
        scaler.step(opt)
        scaler.update()

    step.graphs = steps
    return step


def _vqvae_step(model, x, opt, scaler, device):
    def loss():
        with C.autocast(device, True):
            recon, q_loss = model(x)
            return F.l1_loss(recon.float(), x) + q_loss.float()

    return _optimizer_step(loss, opt, scaler)


def _maisi_step(model, x, opt, scaler, device):
    def loss():
        with C.autocast(device, True):
            recon, z_mu, z_sigma = model(x)
            mu, sigma = z_mu.float(), z_sigma.float()
            kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).sum(dim=(1, 2, 3, 4)).mean()
            return F.l1_loss(recon.float(), x) + 1e-7 * kl  # MAISI's VAE recipe: L1 + kl_weight 1e-7

    return _optimizer_step(loss, opt, scaler)


def run_config(key: str, crop: Crop, args: argparse.Namespace, device: torch.device, cap: float,
               overrides: dict | None = None) -> dict[str, Any]:
    """Build the model (ctvq with ``overrides`` of its arguments) and its optimizer, time ``--repeats``
    steps; returns the row's numbers."""
    small = args.small
    torch.manual_seed(args.seed)
    reset_peak(device)
    if key.startswith("ours"):
        amp = key.startswith("ours-fp16")
        layout = "direct3d" if key.endswith("-direct3d") else "patch"
        model = C.build_ours(small, crop.resolution, device, use_checkpoint=key.endswith("-ckpt"), layout=layout,
                             **(overrides or {})).train()
        if key.endswith("-compiled"):
            model.compile_grid()
        x = grid_input(crop, model.factor) if ("-grid" in key or "-graph" in key) else sparse_input(crop)
        opt = C.adamw([p for p in model.parameters() if p.requires_grad], args.lr, device)
        scaler = C.grad_scaler(device, amp)
        if "-graph" in key:
            step = _ours_graph_step(model, x, opt, scaler, device)
        else:
            step = _ours_step(model, x, opt, scaler, device, amp)
    elif key == "monai-vqvae":
        model = C.build_vqvae(small, device).train()
        opt = C.adamw(model.parameters(), args.lr, device)
        step = _vqvae_step(model, crop.dense, opt, C.grad_scaler(device, True), device)
    elif key == "maisi-ae":
        # two stride-2 levels: the deepest level sees crop / 4
        model = C.build_maisi(small, device, args.maisi_num_splits, min_edge=crop.size // 4).train()
        opt = C.adamw(model.parameters(), args.lr, device)
        step = _maisi_step(model, crop.dense, opt, C.grad_scaler(device, True), device)
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(f"unknown model {key!r}; choose from {MODELS}")
    params = C.count_params(model)
    extra = {"maisi_num_splits": model.bench_num_splits} if hasattr(model, "bench_num_splits") else {}
    first_peak = None
    if "-graph" in key:  # the shape's eager step (which compiles, for -compiled) and the capture, untimed
        for _ in range(2):
            step()
        first_peak = peak_bytes(device)
    with C.conv_policy("dense" if key.endswith("-dense") else "auto"):
        t = measure(step, device, warmup=args.warmup, repeats=args.repeats, max_seconds=cap)
    if hasattr(step, "graphs"):
        extra["graph_replays"] = step.graphs.replays
    if first_peak is not None and t.peak_bytes is not None:
        # replays allocate nothing: the graph's pool holds what the eager step and the capture took
        extra["replay_peak_bytes"] = t.peak_bytes
    peak = max(t.peak_bytes, first_peak) if first_peak is not None and t.peak_bytes is not None else t.peak_bytes
    return {"params": params, "timing": t, "median_s": t.median_s, "peak_bytes": peak,
            "voxels_per_s": crop.voxels / t.median_s, **extra}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = C.seeded_device(args)
    cap = args.max_seconds if args.max_seconds is not None else (10.0 if args.small else 20.0)
    crops = args.crops or ([16, 32] if args.small else [64, 128, 256, 512])
    scan, budget = load_scan_and_budget(args, device)
    ok_ours, why = C.networks_available()

    rows: list[dict[str, Any]] = []
    for size in crops:
        crop, crop_status = None, "ok"
        runs = [(key, None, {}) for key in args.models]
        runs += [(key, vname, overrides) for key in args.models if key.startswith("ours")
                 for vname, overrides in args.variants.items()]
        for key, vname, overrides in runs:
            name, prec = MODEL_LABELS[key]
            if vname:
                name += f", {vname}: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
            if device.type != "cuda" and prec == "fp16 amp":
                prec = "fp32 (cpu)"
            row: dict[str, Any] = {"key": f"{key}[{vname}]" if vname else key, "model": name, "precision": prec, "crop": f"{size}^3",
                                   "crop_size": size}
            if size > scan.resolution:
                row["status"] = f"skipped: crop > scan ({scan.resolution}^3)"
            elif key.startswith("ours") and not ok_ours:
                row["status"] = f"skipped: networks not importable ({why[:80]})"
            elif budget.exhausted():
                row["status"] = "skipped: time budget"
            elif key == "maisi-ae" and size >= 500 and not args.try_all:
                # MAISI moves tensors with an edge >= 500 to the CPU to concatenate them (minutes per
                # step), and its full-resolution activations alone need about 30 x 64 channels x 2 bytes
                # per voxel: 0.5 TB at 512^3
                row["status"] = f"skipped: about {30 * 64 * 2 * size**3 / 2**30:.0f} GiB of activations (--try-all runs it)"
            else:
                if crop is None and crop_status == "ok":
                    built = run_guarded(lambda: {"crop": make_crop(scan, size, device)}, device)
                    crop, crop_status = built.get("crop"), built["status"]
                if crop is None:
                    row["status"] = f"crop not built: {crop_status}"
                else:
                    row["occupancy_frac"] = crop.occupancy
                    row["support_voxels"] = int(crop.coords.shape[0])
                    print(f"[{budget.elapsed():6.1f}s] {row['key']} {size}^3 ...", flush=True)
                    keep = ("coords", "feats") if key.startswith("ours") else ("dense",)
                    with only_on_device(crop, keep, device):  # peak memory: the model's own input only
                        row.update(run_guarded(
                            lambda: run_config(key, crop, args, device, budget.per_config(cap), overrides), device))
            t = row.pop("timing", None)
            if t is not None:
                row["n"] = t.label
                row["times_s"] = t.times_s
                row["step"] = C.fmt_seconds(t.median_s)
                row["rate"] = C.fmt_rate(row["voxels_per_s"], "vox/s")
                row["peak"] = C.fmt_bytes(row["peak_bytes"])
                row["params_fmt"] = C.fmt_rate(row["params"])
            row["occupancy"] = C.fmt_pct(row.get("occupancy_frac"))
            print(f"    -> {row.get('status')} {row.get('step', '')} {row.get('peak', '')}", flush=True)
            rows.append(row)
            C.write_partial("train_step", args, rows)
        crop = None  # freed before the next size
        C.free_memory(device)

    notes = [
        f"scan: {scan.source}, {scan.resolution}^3, window {scan.window_name}; crops centred on the body "
        "(8-aligned); occupancy = support voxels (body mask & window > 0) / crop voxels",
        "batch 1; one step = forward + loss + backward + AdamW step; dense models get the whole crop, "
        "ctvq gets the crop's support only",
        f"time/step = median of n timed steps after up to {args.warmup} warm-up steps (one for slow "
        "configurations; CUDA-synchronised); "
        "'capped' = fewer than the asked repeats because of the per-configuration time cap; 'warm-up only' = "
        "one step outlasted the cap, so the first (untuned) step is reported, an upper bound",
        "dense-equiv. voxels/s = crop voxels / step time; peak GPU mem = torch.cuda.max_memory_allocated "
        "(weights, optimizer state and activations)",
        "-graph models: the shape's first (eager) step and the capture run before the timed steps, so these "
        "time replays; their peak includes those two steps (replays allocate nothing: the graph's memory pool "
        "holds what the capture took; replay_peak_bytes in the JSON counts the replays alone)",
        "random weights (timing does not depend on them); MAISI keeps its shipped save_mem=True "
        "(torch.cuda.empty_cache in its layers)",
    ]
    splits = sorted({(r["crop"], r["maisi_num_splits"]) for r in rows if "maisi_num_splits" in r})
    if splits:
        notes.append("MAISI num_splits (memory only, lowered where a crop is too small for 8): "
                     + ", ".join(f"{c}: {n}" for c, n in splits))
    if args.small:
        notes.append("--small: tiny models and a tiny volume, a smoke run; these numbers mean nothing")
    return C.finish("train_step", args, device, rows, C.markdown_table(rows, COLUMNS), notes)


if __name__ == "__main__":
    main()
