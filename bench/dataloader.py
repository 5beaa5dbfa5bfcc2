"""Training-data throughput: crops per second from the processed layout with 1, 2, 4 and 8
DataLoader workers (``--workers``), set against the training step rate, to show the GPU is never waiting.

Uses the training dataset itself (``pipeline.dataset.CTWindowSparseDataset`` with its
``StepSampler`` and ``sparse_collate``): the window of a random 8-aligned crop with at most
``--max-points`` support voxels (decoded from the compact layout's chunks and windowed, or read
from the guide layout's memory-mapped window), collate, and (on CUDA) the copy to the GPU. Crops
are dense grids (``grid_crops``, what training with the shipped ``grid_training`` reads) or, with
``--crops sparse``, coordinates and features.

    python bench/dataloader.py --nifti scan.nii.gz [--layout compact|guide] --train-json bench/results/train_step.json
    python bench/dataloader.py --data-dir processed_dataset --step-rate 15.6
    python bench/dataloader.py --case processed_dataset/<name>/processed/<case_id> --step-rate 2.5
    python bench/dataloader.py --small --device cpu      # smoke run (writes $TMPDIR/ctvq_bench/dataloader.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from bench.scan import add_scan_args, parse_window, prepare_case  # noqa: E402
from bench.timing import Budget, run_guarded  # noqa: E402
from pipeline.dataset import shipped_max_points  # noqa: E402

COLUMNS = [
    ("workers", "workers"), ("crop_form", "crops"), ("crops_per_s", "crops/s"), ("points", "support voxels/crop (mean)"),
    ("first", "first batch"), ("n", "crops timed"), ("ratio", "crops/s / train steps/s"), ("status", "status"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, "dataloader")
    add_scan_args(p, case_help="processed case folder <dataset>/processed/<case_id>, either layout (compact: "
                               "hu.chunks, body_mask.chunks; guide: windows/, body_mask_512.npy); the whole dataset "
                               "holding it (<dataset>, two folders up) is benchmarked, not the case alone")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="root of processed datasets (searched recursively); default: the dataset holding --case "
                        "(or the case built from --nifti / the phantom)")
    p.add_argument("--layout", choices=["compact", "guide"], default="compact",
                   help="layout of the case built from --nifti or the phantom: compact (default, ./run.sh preprocess "
                        "on the scan) or guide")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="DataLoader worker counts (default 1 2 4 8: training uses at most 8, "
                        "pipeline.distributed.default_num_workers)")
    p.add_argument("--crops", choices=["grid", "sparse"], default="grid",
                   help="grid: dense crops (CTWindowSparseDataset grid_crops, what training reads with grid_training, "
                        "the shipped default); sparse: coordinates and features (grid_training false, or validation)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per batch (default 1, as train_step)")
    p.add_argument("--max-points", type=int, default=None,
                   help="crop budget in support voxels (default: the shipped training crop, dataset#args#max_points of "
                        "bundles/ct_vqvae/stage0.json; 4096 with --small)")
    p.add_argument("--num-crops", type=int, default=None,
                   help="crops timed per worker count after the first batch (default 200, or 8 with --small)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time cap per worker count (default 10)")
    p.add_argument("--no-gpu-copy", action="store_true",
                   help="on CUDA, leave out pinning and the copy to the GPU: the crops/s the workers hand to the "
                        "main process alone (compare with a run without it to see which of the two limits)")
    rate = p.add_argument_group("training step rate for the ratio (optional)")
    rate.add_argument("--step-rate", type=float, default=None, help="training steps per second")
    rate.add_argument("--train-json", type=Path, default=None,
                      help="train_step JSON: uses the ctvq fp16 row whose crop support is closest to --max-points "
                           "(default: bench/results/train_step.json when it exists)")
    p.set_defaults(default_budget=90.0)
    return p.parse_args(argv)


def step_rate_from_json(path: Path, max_points: int) -> tuple[float | None, str]:
    """Steps/s of the ctvq fp16 row closest in support voxels to the training crop budget."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return None, f"could not read {path}: {exc}"
    rows = [r for r in data.get("rows", []) if r.get("key") == "ours-fp16" and r.get("status") == "ok"]
    if not rows:
        return None, f"{path}: no successful ctvq fp16 row"
    best = min(rows, key=lambda r: abs(int(r.get("support_voxels", 0)) - max_points))
    return 1.0 / float(best["median_s"]), (f"{path.name}: ctvq fp16 at crop {best['crop']} "
                                          f"({best.get('support_voxels')} support voxels), "
                                          f"median step {C.fmt_seconds(best['median_s'])}")


def compact_dataset(args) -> Path:
    """A compact processed dataset of ``--nifti`` (or a phantom scan) made by ``pipeline.preprocess``
    once under ``--cache`` (a rerun finds it complete and skips it)."""
    from pipeline import preprocess

    res = args.resolution or (64 if args.small else 512)
    if args.nifti is not None:
        stem = Path(args.nifti).name.split(".")[0]
        raw = Path(args.cache) / f"raw_{stem}" / stem
        raw.mkdir(parents=True, exist_ok=True)
        link = raw / Path(args.nifti).name
        if not link.exists():
            link.symlink_to(Path(args.nifti).resolve())
    else:
        from pipeline.phantom import write_phantom_dataset

        stem, raw = "phantom", Path(args.cache) / "raw_phantom"
        if not raw.is_dir():
            write_phantom_dataset(raw, seeds=[0], shape=(96, 96, 72), spacing=4.0)
    out = Path(args.cache) / f"compact_{stem}_{res}"
    print(f"preprocessing {raw} into {out} (compact layout, {res}^3; skipped when complete) ...", flush=True)
    s = preprocess.run(raw.parent, out, None, 0, res, [args.window], progress=False, log=lambda *a, **k: None)
    if not s["ok"] + s["skipped"]:
        raise SystemExit(f"preprocessing {raw} failed; see {out}/*/metadata.csv")
    return out


def bench_workers(ds, sampler_cls, collate, workers: int, args, device, cap: float) -> dict[str, Any]:
    """Crops per second through a DataLoader with ``workers`` workers (first batch timed apart)."""
    from torch.utils.data import DataLoader

    sampler = sampler_cls(ds, batch_size=args.batch_size, seed=args.seed)
    copy = device.type == "cuda" and not args.no_gpu_copy
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        pin_memory=copy, persistent_workers=False)
    it = iter(loader)
    t0 = time.perf_counter()
    first = next(it)
    first_s = time.perf_counter() - t0
    n, points = 0, 0
    start = time.perf_counter()
    try:
        while n < args.num_crops and time.perf_counter() - start < cap:
            batch = next(it)
            if copy:
                for key in ("values", "active") if ds.grid_crops else ("indices", "features"):
                    batch[key].to(device, non_blocking=True)
                torch.cuda.synchronize(device)
            n += int(batch["batch_size"])
            points += sum(batch["num_points"])
        elapsed = time.perf_counter() - start
    finally:
        del it
    del first
    return {"crops": n, "seconds": elapsed, "crops_per_s_value": n / elapsed if elapsed > 0 else None,
            "mean_points": points / max(n, 1), "first_batch_s": first_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = C.seeded_device(args)
    args.max_points = args.max_points or (4096 if args.small else shipped_max_points())
    args.num_crops = args.num_crops or (8 if args.small else 200)
    cap = args.max_seconds if args.max_seconds is not None else 10.0
    window = parse_window(args.window).name

    data_dir = args.data_dir
    if data_dir is None and args.case is not None:
        data_dir = Path(args.case).parent.parent  # <dataset>/processed/<case_id> -> <dataset>, either layout
    elif data_dir is None and args.layout == "compact":
        data_dir = compact_dataset(args)
    elif data_dir is None:
        data_dir = prepare_case(args).parent.parent
    print(f"data: {data_dir}; window {window}; max_points {args.max_points}; {args.crops} crops; device {device}", flush=True)

    step_rate, rate_src = args.step_rate, "--step-rate" if args.step_rate else ""
    if step_rate is None:
        path = args.train_json or (C.RESULTS_DIR / "train_step.json")
        if args.train_json is not None or path.exists():
            step_rate, rate_src = step_rate_from_json(path, args.max_points)

    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"crop_form": args.crops, "step_rate": step_rate, "step_rate_source": rate_src}
    try:
        from pipeline.dataset import CTWindowSparseDataset, StepSampler, sparse_collate
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        rows.append({"workers": "-", "status": f"skipped: pipeline.dataset not importable ({type(exc).__name__}: {exc})"})
        ds = None
    else:
        t0 = time.perf_counter()
        ds = CTWindowSparseDataset(str(data_dir), window_type=window, split="all", max_points=args.max_points,
                                   seed=args.seed, grid_crops=args.crops == "grid")
        extra.update(index_seconds=round(time.perf_counter() - t0, 3), cases=len(ds))
        print(f"dataset: {len(ds)} case(s), indexed in {extra['index_seconds']:.2f} s", flush=True)
        if len(ds) == 0:
            rows.append({"workers": "-", "status": f"skipped: no usable case with window '{window}' under {data_dir}"})
            ds = None
    budget = Budget(C.default_budget(args))  # after indexing: the budget is for the loaders
    for w in args.workers if ds is not None else []:
        row: dict[str, Any] = {"workers": w, "crop_form": args.crops}
        if budget.exhausted():
            row["status"] = "skipped: time budget"
        else:
            print(f"[{budget.elapsed():6.1f}s] {w} worker(s) ...", flush=True)
            row.update(run_guarded(lambda: bench_workers(ds, StepSampler, sparse_collate, w, args, device,
                                                           budget.per_config(cap)), device))
        if row.get("crops_per_s_value"):
            cps = row["crops_per_s_value"]
            row.update(crops_per_s=f"{cps:.1f}", points=f"{row['mean_points']:.0f}", n=row["crops"],
                       first=C.fmt_seconds(row["first_batch_s"]))
            if step_rate:
                row["ratio_value"] = cps / (step_rate * args.batch_size)
                row["ratio"] = f"{row['ratio_value']:.1f}x"
        print(f"    -> {row.get('status')} {row.get('crops_per_s', '')} crops/s", flush=True)
        rows.append(row)
        C.write_partial("dataloader", args, rows)

    notes = [
        f"data: {data_dir}, window {window}; CTWindowSparseDataset(split='all', max_points={args.max_points}, "
        f"grid_crops={args.crops == 'grid'}) + StepSampler + sparse_collate, batch {args.batch_size}"
        + ("; each batch pinned and copied to the GPU" if device.type == "cuda" and not args.no_gpu_copy else
           "; batches not copied to the GPU (--no-gpu-copy)" if device.type == "cuda" else ""),
        "crops/s counts batches after the first one (worker start-up shown apart as 'first batch'); memory maps "
        "are read through the page cache, so a one-case dataset is a best case for disk reads",
    ]
    if step_rate:
        notes.append(f"training step rate {step_rate:.2f} steps/s ({rate_src}); ratio > 1 means the loader "
                     "keeps ahead of the GPU")
    else:
        notes.append("no training step rate given (--step-rate or --train-json): ratio column empty")
    if args.small:
        notes.append("--small: tiny volume, a smoke run; these numbers mean nothing")
    return C.finish("dataloader", args, device, rows, C.markdown_table(rows, COLUMNS), notes, extra)


if __name__ == "__main__":
    main()
