"""A whole preprocessing run: discover the cases, plan (process, skip, refuse, other shard),
then process them in workers while ``metadata.csv`` and the progress follow."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from pipeline import discovery
from pipeline.io_utils import FolderLock, load_json, save_json
from pipeline.preprocess.case import process_case
from pipeline.preprocess.config import PreprocessConfig, dataset_config, load_organ_mapping, parse_windows
from pipeline.preprocess.markers import MetadataFile, case_key, parse_shard, remove_own_tmp, shard_of
from pipeline.preprocess.pool import run_pool
from pipeline.processed import CASE_JSON, DATASET_CONFIG, layout_files, marker_is_valid

__all__ = ["run"]


class Progress:
    """Cases done, cases/s and ETA: a tqdm bar on a terminal, else a line every 30 s (and at
    the end) for batch-job logs."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.ok, self.failed = total, 0, 0, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread in a process that forks workers
            self.bar = tqdm(total=total, desc="preprocess", unit="case", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def line(self) -> str:
        dt = time.perf_counter() - self.t0
        rate = self.done / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        return (f"preprocess: {self.done}/{self.total} cases ({self.ok} ok, {self.failed} failed), "
                f"{rate:.3g} cases/s, ETA {eta_text}")

    def update(self, ok: bool) -> None:
        self.done += 1
        self.ok += ok
        self.failed += not ok
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(ok=self.ok, failed=self.failed, refresh=False)
            self.bar.update(1)
        elif self.done == self.total or time.perf_counter() - self.last >= 30:
            self.last = time.perf_counter()
            self.write(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _already_done(cfg: PreprocessConfig, case, case_dir: Path, key: str) -> bool:
    """The case folder holds a complete case of these settings; for the compact layout also one whose
    marker was written while its key still held the windows (they do not change compact files)."""
    if marker_is_valid(case_dir, key):
        return True
    return cfg.layout == "compact" and marker_is_valid(case_dir, case_key(cfg, case, with_windows=True))


def run(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    organ_mapping: str | os.PathLike | None = None,
    num_workers: int = 1,
    resolution: int = 512,
    windows: Sequence[str] | None = None,
    max_depth: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    layout: str = "compact",
    shard: str | tuple[int, int] | None = None,
    dry_run: bool = False,
) -> dict:
    """Preprocess every case under ``raw_dir`` into ``out_dir`` (see module docstring).

    Args:
        raw_dir: raw data folder (first-level folders are datasets).
        out_dir: output folder (``processed_dataset``).
        organ_mapping: ORGAN_MAPPING_JSON path or None.
        num_workers: worker processes (0: run in this process, for debugging).
        resolution: cube side R.
        windows: window specs (None: the four presets).
        max_depth: deepest folder level searched below ``raw_dir``.
        overwrite: reprocess complete cases.
        progress: show progress (cases/s, ETA).
        log: function used for messages.
        layout: "compact" or "guide" (``pipeline.processed``).
        shard: "K/N" or (K, N): process only the cases of shard K of N (``markers.shard_of``).
        dry_run: list what would be processed, skipped and refused; write nothing.

    Returns:
        summary ``{"ok", "failed", "skipped", "total", "datasets", "seconds", "failed_cases"}`` (``failed_cases``:
        ``"dataset/case_id: reason"``)
        (dry run: ``{"process", "skip", "refuse", "other_shards", "total", "datasets"}``).
    """
    t0 = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    k, n = shard if isinstance(shard, tuple) else parse_shard(shard)
    mapping, extra_windows = load_organ_mapping(organ_mapping)
    wins = parse_windows(windows)
    names = {w.name for w in wins}
    for w in extra_windows:
        if w.name in names:
            raise ValueError(f"window {w.name!r} given both in --windows and in {organ_mapping}; keep one")
        wins.append(w)
    if resolution < 8 or resolution > 2048:
        raise ValueError(f"--resolution {resolution} out of range; use 8..2048 (default 512)")
    layout_files(layout)  # checks the name
    cfg = PreprocessConfig(resolution=int(resolution), windows=wins, organ_mapping=mapping, overwrite=overwrite,
                           layout=layout)
    datasets = discovery.discover(raw_dir, max_depth=max_depth, exclude=[out_dir])
    if not datasets:
        log(f"preprocess: no CT cases found under {raw_dir} (volumes .nii/.nii.gz/.nrrd/.mha/.mhd, DICOM folders, DICOM .zip)")
    plan = []  # (dataset, case, case_dir, key, action)
    shards = shard_of([(ds.name, c.case_id) for ds in datasets for c in ds.cases], n)
    for ds in datasets:
        for case in ds.cases:
            case_dir = out_dir / ds.name / "processed" / case.case_id
            key = case_key(cfg, case)
            if shards[(ds.name, case.case_id)] != k:
                action = "other_shard"
            elif not overwrite and _already_done(cfg, case, case_dir, key):
                action = "skip"
            else:
                action = "refuse" if case.error else "process"
            plan.append((ds, case, case_dir, key, action))
    if n > 1:
        for ds in datasets:
            _check_shard_settings(out_dir / ds.name / DATASET_CONFIG, dataset_config(cfg, ds))
    if dry_run:
        return _dry_run(plan, datasets, (k, n), log)

    summary = {"ok": 0, "failed": 0, "skipped": 0, "total": 0, "datasets": len(datasets), "failed_cases": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_name = ".preprocess.lock" if n == 1 else f".preprocess-shard-{k}-of-{n}.lock"
    busy = (f"another preprocess run{'' if n == 1 else f' of shard {k}/{n}'} is writing into {out_dir}; "
            "wait for it to finish or use another OUT_DIR")
    with FolderLock(out_dir, lock_name, busy):
        meta: dict[str, MetadataFile] = {}
        tasks: list[dict] = []
        for ds in datasets:
            ds_dir = out_dir / ds.name
            (ds_dir / "processed").mkdir(parents=True, exist_ok=True)
            own = {c.case_id for d, c, *_, a in plan if d is ds and a != "other_shard"}
            meta[ds.name] = MetadataFile(ds_dir, {c.case_id for c in ds.cases}, own)
            with meta[ds.name].lock():
                remove_own_tmp(ds_dir, own)
                save_json(ds_dir / DATASET_CONFIG, dataset_config(cfg, ds))
            for p in ds.unpaired_labels:
                log(f"preprocess: warning: label map {p} was not paired with an image (see --help: label pairing)")
            if ds.ignored:
                log(f"preprocess: {ds.name}: {len(ds.ignored)} file(s) or folder(s) are not cases, e.g. {ds.ignored[0]} "
                    f"(all in {ds_dir / DATASET_CONFIG}, 'ignored')")
        for ds, case, case_dir, key, action in plan:
            if action == "other_shard":
                continue
            summary["total"] += 1
            if action == "skip":
                with contextlib.suppress(Exception):
                    meta[ds.name].rows[case.case_id] = load_json(case_dir / CASE_JSON)["metadata"]
                    summary["skipped"] += 1
                    continue
            tasks.append({"case": case, "cfg": cfg, "case_dir": str(case_dir), "key": key,
                          "log_dir": str(out_dir / ds.name / "logs")})
        for m in meta.values():
            m.write()

        bar = Progress(len(tasks), progress)

        def record(result: dict) -> None:
            row = result["row"]
            meta[result["dataset"]].rows[row["case_id"]] = row
            if row.get("warning"):
                msg = f"preprocess: warning: {result['dataset']}/{row['case_id']}: {row['warning']}"
                bar.write(msg) if bar.enabled else log(msg)
            ok = row["status"] == "ok"
            if ok:
                summary["ok"] += 1
            else:
                summary["failed"] += 1
                summary["failed_cases"].append(f"{result['dataset']}/{row['case_id']}: {row['error']}")
                msg = f"preprocess: FAILED {summary['failed_cases'][-1]}"
                bar.write(msg) if bar.enabled else log(msg)
            meta[result["dataset"]].write()
            bar.update(ok)

        try:
            if num_workers <= 0:
                for task in tasks:
                    record(process_case(task))
            else:
                run_pool(tasks, num_workers, record)
        finally:
            bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _check_shard_settings(path: Path, ours: dict) -> None:
    """A shard must use the settings its OUT_DIR was preprocessed with: it rewrites only its own cases,
    so other settings would leave one dataset with cases of two kinds (another cube size, layout or HU
    range) under a ``dataset_config.json`` that describes only the last shard."""
    try:
        theirs = load_json(path)
    except Exception:  # unreadable: the run rewrites it
        return
    for key, option in (("resolution", "--resolution"), ("layout", "--layout"), ("hu_min", None), ("hu_max", None)):
        if theirs.get(key) != ours.get(key):
            fix = f"pass {option} {theirs.get(key)}" if option else "use the same settings"
            raise ValueError(f"{path} says {key} {theirs.get(key)} but this shard would write {ours.get(key)}; "
                             f"every shard of one OUT_DIR uses the same settings: {fix}, or rerun without --shard "
                             "(it redoes every case) or into another OUT_DIR")


def _dry_run(plan: list, datasets: list, shard: tuple[int, int], log) -> dict:
    """Prints one line per case of this shard (process / skip / refuse) and the counts."""
    counts = {"process": 0, "skip": 0, "refuse": 0, "other_shard": 0}
    words = {"process": "would process", "skip": "would skip (complete)", "refuse": "would refuse"}
    for ds, case, _case_dir, _key, action in plan:
        counts[action] += 1
        if action != "other_shard":
            why = f": {case.error}" if action == "refuse" else ""
            labels = f"  (labels: {case.label})" if case.label else ""
            log(f"{words[action]:<22} {ds.name}/{case.case_id}  <- {case.source}{labels}{why}")
    for ds in datasets:
        for p in ds.unpaired_labels:
            log(f"label map {p} would not be paired with an image (see --help: label pairing)")
    k, n = shard
    log(f"preprocess --dry-run{'' if n == 1 else f' (shard {k}/{n})'}: {counts['process']} to process, "
        f"{counts['skip']} to skip, {counts['refuse']} to refuse"
        + (f", {counts['other_shard']} in other shards" if n > 1 else "")
        + f"; {len(datasets)} datasets; nothing written")
    return {"process": counts["process"], "skip": counts["skip"], "refuse": counts["refuse"],
            "other_shards": counts["other_shard"], "total": counts["process"] + counts["skip"] + counts["refuse"],
            "datasets": len(datasets)}
