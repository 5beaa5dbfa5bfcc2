"""Where one training step of the sparse VQ-VAE spends its time: per layer, per op, per host sync.

Runs the same step as ``train_step.py`` (forward, loss, backward, AdamW; batch 1, a crop of a
real scan centred on the body) under ``torch.profiler`` and prints three tables:

- per layer: CPU wall time and GPU kernel time of each encoder/decoder block, the quantizer,
  the loss, backward and the optimizer (forward hooks open a profiler range per module);
- per op: the ops with the most GPU time and the most CPU time;
- host syncs: where the step waits for the GPU (``torch.cuda.set_sync_debug_mode``), by line.

The GPU-busy fraction (kernel time / wall time) tells a launch- or sync-bound step (low) from a
compute-bound one (near 100 %).

    python bench/profile_step.py --nifti scan.nii.gz --crops 64 128
    python bench/profile_step.py --small --device cpu          # smoke run
    python bench/profile_step.py --nifti scan.nii.gz --trace   # + Chrome traces next to --out
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench import common as C  # noqa: E402
from bench.scan import add_scan_args, grid_input, load_scan, make_crop, sparse_input  # noqa: E402
from bench.train_step import _ours_graph_step, _ours_step  # noqa: E402

PROJECT = str(Path(__file__).resolve().parents[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, "profile_step")
    add_scan_args(p)
    p.add_argument("--crops", type=int, nargs="+", default=None, help="crop edges (default 64 128; 16 with --small)")
    p.add_argument("--fp32", action="store_true", help="profile the fp32 step instead of fp16 autocast")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3) after 5 warm-up steps")
    p.add_argument("--rows", type=int, default=20, help="rows of the per-op tables (default 20)")
    p.add_argument("--grid", action="store_true", help="profile the trainer's grid path (networks.grid) instead of the sparse one")
    p.add_argument("--all-cells", action="store_true",
                   help="profile the grid step with every latent cell a token, eagerly: what graph_training replays as a CUDA graph")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per crop next to --out")
    return p.parse_args(argv)


def layer_ranges(model: torch.nn.Module) -> list:
    """Forward hooks that open a profiler range named after each block while it runs."""
    names = ["vq"] + (["Encoder.input_layer1", "Decoder.out_layer"] if getattr(model, "layout", "") == "direct3d" else [])
    for part in ("Encoder", "Decoder"):
        sub = getattr(model, part)
        names += [f"{part}.{kind}.{i}" for kind in ("downsample", "blocks", "upsample")
                  for i in range(len(getattr(sub, kind, [])))]
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        ctx: dict[int, Any] = {}

        def pre(m, args, _name=name, _ctx=ctx):
            _ctx[id(m)] = record_function(f"## {_name}").__enter__()

        def post(m, args, out, _ctx=ctx):
            _ctx.pop(id(m)).__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def count_syncs(step) -> list[tuple[str, int]]:
    """Run ``step`` once with CUDA sync warnings on; (project source line, count), most first."""
    seen: collections.Counter = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(PROJECT) and "bench" not in f.filename]
        where = f"{Path(frames[-1].filename).relative_to(PROJECT)}:{frames[-1].lineno}" if frames else "(library)"
        seen[f"{where}  [{str(message).split('.')[0][:60]}]"] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return seen.most_common()


def region_rows(prof, steps: int) -> list[dict[str, Any]]:
    rows = []
    for ev in prof.key_averages():
        if ev.key.startswith("## "):
            rows.append({"region": ev.key[3:], "cpu_ms": ev.cpu_time_total / 1e3 / steps,
                         "gpu_ms": ev.device_time_total / 1e3 / steps, "calls": ev.count // steps})
    return rows


def op_rows(prof, steps: int, sort_key: str, limit: int) -> list[dict[str, Any]]:
    evs = [e for e in prof.key_averages() if not e.key.startswith("## ")]
    evs.sort(key=lambda e: getattr(e, sort_key), reverse=True)
    return [{"op": e.key[:70], "self_gpu_ms": e.self_device_time_total / 1e3 / steps,
             "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps} for e in evs[:limit]]


def fmt_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """:func:`bench.common.markdown_table` with floats to two decimals; headers are the keys."""
    shown = [{k: f"{v:.2f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    return C.markdown_table(shown, [(c, c) for c in cols])


def profile_crop(scan, size: int, args, device) -> dict[str, Any]:
    crop = make_crop(scan, size, device)
    torch.manual_seed(args.seed)
    model = C.build_ours(args.small, crop.resolution, device).train()
    opt = C.adamw(model.parameters(), 1e-4, device)
    amp = not args.fp32 and device.type == "cuda"
    x = grid_input(crop, model.factor) if args.grid or args.all_cells else sparse_input(crop)
    if args.all_cells:
        step = _ours_graph_step(model, x, opt, C.grad_scaler(device, amp), device)
        step.graphs.enabled = False  # the kernels of one replay, launched one by one
    else:
        step = _ours_step(model, x, opt, C.grad_scaler(device, amp), device, amp)
    for _ in range(5):
        step()
    C.sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    C.sync(device)
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3

    syncs = count_syncs(step) if device.type == "cuda" else []
    handles = layer_ranges(model)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        C.sync(device)
    for h in handles:
        h.remove()
    if args.trace:
        prof.export_chrome_trace(str(args.out.with_name(f"{args.out.stem}_{size}.trace.json")))
    kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / args.steps
    return {
        "crop": size, "support_voxels": int(crop.coords.shape[0]), "occupancy": crop.occupancy,
        "precision": "fp16 amp" if amp else "fp32", "wall_ms": wall_ms, "gpu_kernel_ms": kernel_ms,
        "gpu_busy": kernel_ms / wall_ms if device.type == "cuda" else None,
        "syncs_per_step": sum(n for _, n in syncs), "syncs": syncs,
        "regions": region_rows(prof, args.steps),
        "ops_by_gpu": op_rows(prof, args.steps, "self_device_time_total", args.rows),
        "ops_by_cpu": op_rows(prof, args.steps, "self_cpu_time_total", args.rows),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = C.seeded_device(args)
    scan = load_scan(args)
    crops = args.crops or ([16] if args.small else [64, 128])
    results, text = [], []
    for size in crops:
        r = profile_crop(scan, size, args, device)
        results.append(r)
        busy = f", GPU busy {r['gpu_busy']:.0%}" if r["gpu_busy"] is not None else ""
        text.append(f"\n### {size}^3 crop, {r['support_voxels']} support voxels ({r['occupancy']:.0%}), "
                    f"{r['precision']}: {r['wall_ms']:.1f} ms/step, GPU kernels {r['gpu_kernel_ms']:.1f} ms{busy}, "
                    f"{r['syncs_per_step']} host syncs/step\n")
        text.append(fmt_table(r["regions"], ["region", "cpu_ms", "gpu_ms", "calls"]))
        if device.type == "cuda":
            text.append("\nops by GPU time\n" + fmt_table(r["ops_by_gpu"], ["op", "self_gpu_ms", "self_cpu_ms", "calls"]))
        text.append("\nops by CPU time\n" + fmt_table(r["ops_by_cpu"], ["op", "self_cpu_ms", "self_gpu_ms", "calls"]))
        if r["syncs"]:
            text.append("\nhost syncs per step\n" + fmt_table([{"where": w, "n": n} for w, n in r["syncs"]], ["where", "n"]))
        C.free_memory(device)
    table = "\n".join(text)
    notes = [f"scan: {scan.source}, window {scan.window_name}; times per step (mean of {args.steps} profiled steps); "
             "per-layer rows are inclusive (a block's row holds its children)"]
    return C.finish("profile_step", args, device, results, table, notes)


if __name__ == "__main__":
    main()
