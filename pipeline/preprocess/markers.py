"""What a run records about cases: the key that makes a ``.complete`` marker valid, the shard
of each case, and ``metadata.csv`` shared by shards."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from pipeline.discovery import Case
from pipeline.io_utils import TMP_TAG, FolderLock, save_csv
from pipeline.preprocess.config import PreprocessConfig
from pipeline.processed import METADATA_CSV, marker_is_valid

__all__ = ["METADATA_COLUMNS", "case_key", "parse_shard", "shard_of", "MetadataFile", "remove_own_tmp"]

METADATA_COLUMNS = [
    "case_id", "status", "error", "source_path", "rel_path", "source_kind", "label_path",
    "original_shape", "original_spacing", "spacing_512", "resolution",
    "body_voxels", "label_ids", "label_coverage", "warning", "seconds",
]


def _fingerprint(path: Path | None) -> Any:
    """Cheap identity of a source (sizes and mtimes) so that a changed input is reprocessed."""
    if path is None:
        return None
    try:
        if path.is_dir():
            h = hashlib.sha1()
            for root, _dirs, files in os.walk(path):
                for name in sorted(files):
                    st = os.stat(os.path.join(root, name))
                    h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns};".encode())
            return h.hexdigest()
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def case_key(cfg: PreprocessConfig, case: Case, with_windows: bool | None = None) -> str:
    """Hash of everything a case's outputs depend on (settings, source and label identity).

    Args:
        cfg: run settings.
        case: the case.
        with_windows: see :meth:`PreprocessConfig.key_dict`.
    """
    blob = {
        **cfg.key_dict(with_windows),
        "source": str(case.source.resolve()),
        "source_fp": _fingerprint(case.source),
        "label": str(case.label.resolve()) if case.label else None,
        "label_fp": _fingerprint(case.label),
    }
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N; None -> (1, 1).

    Raises:
        ValueError: not of that form.
    """
    if text is None:
        return 1, 1
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text!r} must be K/N with 1 <= K <= N, e.g. --shard 3/8 "
                         "(in a SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=1-N)")
    return k, n


def shard_of(keys: Sequence[tuple[str, str]], num_shards: int) -> dict[tuple[str, str], int]:
    """The shard (1..N) of every (dataset, case id): round robin over them sorted, so shards
    get equal shares; every shard must see the same RAW_DIR."""
    return {key: n % num_shards + 1 for n, key in enumerate(sorted(keys))}


class MetadataFile:
    """``metadata.csv`` of one dataset, shared by shards running at once.

    Each write takes ``<dataset>/.metadata.lock``, reads the file, keeps the rows of the other
    shards' cases (only those still found), puts this shard's rows in, and replaces the file
    atomically. A case of this shard without a new row keeps its old one while its earlier output
    is still complete on disk (an interrupted ``--overwrite`` run loses no row); once its folder
    is cleared for processing it has none.
    """

    def __init__(self, ds_dir: Path, all_ids: set[str], own_ids: set[str]):
        self.ds_dir, self.all_ids, self.own_ids = ds_dir, all_ids, own_ids
        self.rows: dict[str, dict] = {}

    def lock(self) -> FolderLock:
        return FolderLock(self.ds_dir, ".metadata.lock", wait=True)

    def write(self) -> None:
        path = self.ds_dir / METADATA_CSV
        with self.lock():
            merged = {}
            if path.is_file():
                with open(path, newline="", encoding="utf-8") as f:
                    for row in csv.DictReader(f):
                        cid = row.get("case_id", "")
                        if cid in self.all_ids and (cid not in self.own_ids
                                                    or marker_is_valid(self.ds_dir / "processed" / cid)):
                            merged[cid] = row
            merged.update(self.rows)
            save_csv(path, [merged[k] for k in sorted(merged)], METADATA_COLUMNS)


def remove_own_tmp(ds_dir: Path, own_ids: set[str]) -> None:
    """Temporary files left by a killed run, in the folders this run alone writes: the
    dataset folder (written under the metadata lock, held here) and its own cases' logs."""
    for folder, owned in ((ds_dir, None), (ds_dir / "logs", own_ids)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            name = p.name
            if p.is_file() and name.startswith(".") and TMP_TAG in name:
                if owned is None or name[1:].split(".log" + TMP_TAG)[0] in owned:
                    with contextlib.suppress(OSError):
                        p.unlink()


