"""What the training dataset finds, skips and loads: ``./run.sh check-data DATA_DIR --window lung``.

Prints the processed datasets and cases found, failed cases (from metadata.csv), cases without
the window file, cases skipped below ``min_points``, support voxels per case, the train/val split,
and loads one sample (timed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["check_data", "main"]


def check_data(data_dir: str, window: str = "lung", min_points: int = 100, max_points: int | None = None,
               seed: int = 42, val_fraction: float = 0.05, out=print) -> dict:
    """Runs the checks and prints a report; returns the numbers.

    Args:
        data_dir: processed dataset root(s), comma-separated.
        window: window_type.
        min_points: skip threshold (as in the config's dataset#args#min_points).
        max_points: crop budget (dataset#args#max_points; default: the one training ships).
        seed: split seed (the config's seed).
        val_fraction: held-out share.
        out: line printer.
    """
    from pipeline.dataset import CTWindowSparseDataset, shipped_max_points, split_cases

    max_points = max_points or shipped_max_points()
    t0 = time.perf_counter()
    ds = CTWindowSparseDataset(data_dir, window, split="all", min_points=min_points, max_points=max_points,
                               seed=seed, val_fraction=val_fraction)
    scan_s = time.perf_counter() - t0
    out(f"Datasets found under {data_dir}: {len(ds.datasets)}")
    for d in ds.datasets:
        out(f"  {d}")
    usable = len(ds.cases)
    total = usable + len(ds.failed) + len(ds.missing) + len(ds.skipped)
    out(f"Cases listed: {total}  usable: {usable}  failed: {len(ds.failed)}  "
        f"incomplete or without the '{window}' window: {len(ds.missing)}  below min_points={min_points}: {len(ds.skipped)}")
    for f in ds.failed:
        out(f"  failed   {f['case']}: {f['error']}")
    for m in ds.missing:
        out(f"  missing  {m['case']}: {m['file']}")
    for s in ds.skipped:
        out(f"  skipped  {s['case']}: {s['num_points']} support voxels")
    out(f"Support voxels per case (body mask & {window} > 0; crops above max_points={max_points}):")
    out(f"  {'case':<48}{'voxels':>14}  crop")
    for c in ds.cases:
        out(f"  {c['key']:<48}{c['num_points']:>14,}  {'yes' if c['num_points'] > max_points else 'no'}")
    keys = [c["key"] for c in ds.cases]
    val = split_cases(keys, "val", val_fraction, None, seed) if len(keys) >= 2 else []
    out(f"Split (seed {seed}): {len(keys) - len(val)} train, {len(val)} val")
    out(f"Scan time (block counts, cached after the first run): {scan_s:.2f} s")
    result = {"datasets": len(ds.datasets), "usable": usable, "failed": len(ds.failed), "missing": len(ds.missing),
              "skipped": len(ds.skipped), "voxels": {c["key"]: c["num_points"] for c in ds.cases}}
    if usable:
        t1 = time.perf_counter()
        sample = ds[(0, 0)]
        dt = time.perf_counter() - t1
        box = sample["box"].tolist()
        out(f"Sample {sample['case_id']}: {len(sample['coords']):,} voxels, box {box[:3]}..{box[3:]}, "
            f"values {float(sample['feats'].min()):.3f}..{float(sample['feats'].max()):.3f}, loaded in {dt * 1000:.0f} ms")
        result["sample_seconds"] = dt
        result["sample_points"] = int(len(sample["coords"]))
    else:
        out("No usable case: check the preprocessing log and the window name (--window).")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run.sh check-data", description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="processed dataset root(s), comma-separated")
    p.add_argument("--window", "--window_type", dest="window", default="lung",
                   help="lung | bone | soft_tissue | brain | custom name from dataset_config.json")
    p.add_argument("--min_points", "--min-points", type=int, default=100,
                   help="cases with fewer support voxels are skipped (default 100, dataset#args#min_points of the stage configs)")
    p.add_argument("--max_points", "--max-points", type=int, default=None,
                   help="crop budget in support voxels (default: dataset#args#max_points of the stage configs, 2,000,000)")
    p.add_argument("--seed", type=int, default=42, help="split seed, as the stage configs' seed (default 42)")
    p.add_argument("--val_fraction", "--val-fraction", type=float, default=0.05,
                   help="share of cases held out for validation (default 0.05, as the stage configs)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        res = check_data(a.data_dir, a.window, a.min_points, a.max_points, a.seed, a.val_fraction)
    except (FileNotFoundError, KeyError) as e:
        print(f"check-data: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)  # no KeyError quotes
        return 2
    return 0 if res["usable"] else 1


if __name__ == "__main__":
    sys.exit(main())
