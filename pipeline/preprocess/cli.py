"""The command line of ``./run.sh preprocess`` (``python -m pipeline.preprocess``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence


__all__ = ["build_parser", "main", "summary_line"]


_EPILOG = """\
examples:
  ./run.sh preprocess raw_ct/ processed_dataset/
  ./run.sh preprocess raw_ct/ processed_dataset/ organ_mapping.json 4 --resolution 256
  ./run.sh preprocess raw_ct/ processed_dataset/ - 2 --windows lung,soft_tissue,liver:150:60

what is found (RAW_DIR):
  Each first-level folder of RAW_DIR is a dataset; loose files in RAW_DIR form a dataset named
  after RAW_DIR. Inside a dataset (recursively, down to --max-depth levels below RAW_DIR):
  volume files (.nii, .nii.gz, .nrrd, .mha, .mhd), DICOM folders (found by file headers, any
  file names), .zip files holding a DICOM series. An empty folder becomes a failed case.

label pairing:
  imagesTr/<id>_0000.nii.gz <-> labelsTr/<id>.nii.gz (nnU-Net/MSD). A volume whose name holds
  the word seg, segmentation, label(s), labelmap, mask(s) or gt (between start/end, '_', '-', '.':
  seg_total.nii.gz, case1_seg.nii.gz, ct_label.nrrd) is a label map; it pairs with the image of its folder
  (volumes and zips there, DICOM series in or directly below it): volumes of the label's header
  size are kept (none: the DICOM series/zips); one left -> paired; several -> the one whose name stem equals the label's
  stem without the label word (case1_seg -> case1[_ct]); otherwise a warning, no pairing.
  Labels are resampled (nearest) onto the cube in world space, so a flipped label grid is fine.

output (OUT_DIR/<dataset>/):
  metadata.csv (one row per case, status ok|failed and a one-line error), dataset_config.json,
  logs/<case_id>.log (traceback of a failed case), processed/<case_id>/ with case.json, .complete and
    --layout compact (default): hu.chunks (int16 HU), body_mask.chunks, labels.chunks, cropped to
      the body's box (offset in case.json), Blosc-compressed 32^3 chunks; windows are computed when
      training or evaluation reads them
    --layout guide: ct_normalized_512.npy, windows/<name>_w<W>_l<L>.npy (float16), body_mask_512.npy,
      labels_512.npy, the whole (R,R,R) cube (the "_512" names stay the same for any R)
  Case ids come from the path relative to the dataset folder (folders joined by "__").

rerun / resume:
  Every file is written under a temporary name then renamed; .complete is written last and
  records the settings and the source's size/mtime. A rerun skips cases with a valid marker and
  redoes the rest (a changed source or setting makes the marker invalid). Safe to kill.

several machines (--shard K/N):
  Each of N commands processes every N-th case (all cases sorted by dataset/case id), into
  the same OUT_DIR (a shared file system with flock: NFSv4, Lustre mounted with -o flock, local
  disks). metadata.csv is rewritten under a lock with every shard's rows; rerun a shard to resume it.
  SLURM:  sbatch --array=1-16 --wrap './run.sh preprocess raw_ct/ processed_dataset/ - 4 --shard $SLURM_ARRAY_TASK_ID/16'

exit status: 0 all cases ok or skipped, 1 some case failed, 2 bad arguments."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m pipeline.preprocess``."""
    p = argparse.ArgumentParser(
        prog="./run.sh preprocess",
        description="Turn raw CT collections into processed cube datasets: RAS orientation, isotropic "
        "resampling into an R^3 cube (air padding), body mask, and integer HU, mask and labels cropped to the "
        "body in compressed chunks (or the older guide's float16 .npy volumes), with parallel workers, resumable "
        "runs and shards for several machines.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("raw_dir", metavar="RAW_DIR", help="folder of raw CT collections (each first-level folder is a dataset)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder, e.g. processed_dataset/")
    p.add_argument("organ_mapping", metavar="ORGAN_MAPPING_JSON", nargs="?", default=None,
                   help="optional JSON {\"label id\": \"organ name\"} (or {\"labels\": {...}, \"windows\": [\"name:W:L\"]}) "
                   "copied into dataset_config.json; '-' or 'none' for none. A bare integer here is taken as NUM_WORKERS")
    p.add_argument("num_workers", metavar="NUM_WORKERS", nargs="?", default=None,
                   help="worker processes (default: --workers; each needs about 1.5 GB at R=512; 0 = in-process)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="same as NUM_WORKERS (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=512, help="cube side R in voxels (default: %(default)s)")
    p.add_argument("--windows", nargs="+", default=None, metavar="WINDOW",
                   help="windows of the dataset (the guide layout writes their files; compact cases compute any "
                   "window when read, these are listed in dataset_config.json): preset names (lung bone soft_tissue "
                   "brain) or custom 'name:WIDTH:LEVEL', "
                   "space- or comma-separated (default: the four presets: lung 1500/-600, bone 1500/300, "
                   "soft_tissue 400/50, brain 80/35)")
    p.add_argument("--max-depth", type=int, default=None,
                   help="deepest folder level searched, RAW_DIR = 0, dataset folders = 1 (default: no limit)")
    p.add_argument("--layout", choices=["compact", "guide"], default="compact",
                   help="compact (default): int16 HU, body mask and labels cropped to the body, compressed chunks, "
                   "windows computed when read; guide: the older guide's float16 ct_normalized_512.npy and "
                   "windows/*.npy of the whole cube (17-290x the bytes on the shared scans)")
    p.add_argument("--shard", metavar="K/N", default=None,
                   help="process only shard K of N (every N-th case, sorted by dataset/case id): one command per node "
                   "into one shared OUT_DIR, e.g. a SLURM array --shard $SLURM_ARRAY_TASK_ID/N with --array=1-N")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be processed (with each scan's label map), skipped (complete) and "
                   "refused; write nothing. It reads no image data: a file that is damaged inside is listed "
                   "to process and fails, in one line, only in the real run")
    p.add_argument("--overwrite", action="store_true", help="reprocess cases that are already complete")
    p.add_argument("--no-progress", action="store_true", help="no progress (default: a bar with cases/s and ETA on a "
                   "terminal, a line every 30 s otherwise)")
    return p


def _resolve_positionals(args, parser) -> tuple[str | None, int]:
    mapping, workers = args.organ_mapping, args.num_workers
    if mapping is not None and workers is None and mapping.isdigit() and not Path(mapping).exists():
        mapping, workers = None, mapping
    if mapping is not None and mapping.strip().lower() in ("", "-", "none", "null"):
        mapping = None
    if workers is None:
        n = args.workers
    else:
        try:
            n = int(workers)
        except ValueError:
            parser.error(f"NUM_WORKERS must be an integer, got {workers!r}")
    if n < 0:
        parser.error(f"NUM_WORKERS must be >= 0, got {n}")
    return mapping, n


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry (see ``--help``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # after the arguments: --help and usage mistakes answer without importing torch and MONAI
    from pipeline.preprocess.config import load_organ_mapping, parse_windows
    from pipeline.preprocess.job import run
    from pipeline.preprocess.markers import parse_shard

    mapping, workers = _resolve_positionals(args, parser)
    try:
        parse_windows(args.windows)
        load_organ_mapping(mapping)
        parse_shard(args.shard)
    except ValueError as e:
        parser.error(str(e))
    path_error = None  # a wrong path is not a usage mistake: one line, no usage block
    if not Path(args.raw_dir).is_dir():
        path_error = f"RAW_DIR {args.raw_dir} is not a folder; pass the folder of your raw CT collections"
    elif Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        path_error = f"OUT_DIR {args.out_dir} is a file; pass a folder for the processed datasets"
    if path_error:
        print(f"preprocess: error: {path_error}", file=sys.stderr)
        return 2

    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        s = run(args.raw_dir, args.out_dir, mapping, workers, args.resolution, args.windows, args.max_depth,
                args.overwrite, progress=not args.no_progress, layout=args.layout, shard=args.shard,
                dry_run=args.dry_run)
    except KeyboardInterrupt:
        print("preprocess: interrupted; rerun the same command to finish (complete cases are kept)", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    for failure in s["failed_cases"][:20]:  # again at the end, where a long run's log is read first
        print(f"preprocess: failed: {failure}", file=sys.stderr)
    if len(s["failed_cases"]) > 20:
        print(f"preprocess: ... {len(s['failed_cases']) - 20} more failed cases in each dataset's metadata.csv",
              file=sys.stderr)
    print(summary_line(s, args.out_dir, args.shard))
    if not s["datasets"]:  # a wrong RAW_DIR must not look like success to a batch job
        return 2
    return 1 if s["failed"] else 0


def summary_line(s: dict, out_dir: str | os.PathLike, shard: str | None = None) -> str:
    """The last line of a preprocessing run: cases ok / failed / skipped, time and where they went."""
    where = f" (shard {shard})" if shard else ""
    cases, datasets = (f"{n} {word}{'' if n == 1 else 's'}" for n, word in ((s["total"], "case"), (s["datasets"], "dataset")))
    return (f"preprocess: {cases} in {datasets}{where}: {s['ok']} ok, {s['failed']} failed, "
            f"{s['skipped']} skipped in {s['seconds']:.1f} s -> {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
