"""Training dataset over processed CT datasets: one window, sparse support, 8-aligned crops.

``CTWindowSparseDataset`` finds every processed dataset (a folder holding ``metadata.csv``,
``dataset_config.json`` and ``processed/``) under one or more roots, memory-maps the chosen
window of each usable case and returns sparse samples::

    {"coords": int32 [N, 3] (i, j, k) in the full grid, "feats": float32 [N, 1],
     "case_id": str, "box": int [6] (lo, hi) of the crop, "spatial_shape": [R, R, R]}

Support = body mask AND window > 0. Cases above ``max_points`` support voxels are cropped to
a random box aligned to ``block`` (8) holding at most ``max_points`` voxels
(``transforms.RandSparseCrop``), chosen from a per-case count of support voxels per 8^3 block
(computed once, cached in the case's ``.cache/`` folder or in memory). Only the box is read
from the memory map. ``sparse_collate`` adds the batch column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.io_utils import DataFileError, load_npy

__all__ = [
    "WINDOW_FILES",
    "find_datasets",
    "resolve_window_file",
    "split_cases",
    "block_counts",
    "CTWindowSparseDataset",
    "StepSampler",
    "sparse_collate",
    "batch_split",
    "to_sparse_tensor",
]

logger = logging.getLogger("ctvq.dataset")

#: standard window files (``transforms.WINDOW_PRESETS`` names), used when dataset_config.json
#: does not list the window.
WINDOW_FILES = {
    "lung": "windows/lung_w1500_l-600.npy",
    "bone": "windows/bone_w1500_l300.npy",
    "soft_tissue": "windows/soft_tissue_w400_l50.npy",
    "brain": "windows/brain_w80_l35.npy",
}
WINDOW_WL = {"lung": (1500.0, -600.0), "bone": (1500.0, 300.0), "soft_tissue": (400.0, 50.0), "brain": (80.0, 35.0)}
CACHE_VERSION = 1


def _roots(data_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(data_dir, (str, os.PathLike)):
        parts = [p.strip() for p in os.fspath(data_dir).split(",") if p.strip()]
    else:
        parts = [os.fspath(p) for p in data_dir]
    return [Path(p).expanduser() for p in parts]


def find_datasets(data_dir: str | os.PathLike | Sequence[str]) -> list[Path]:
    """Processed dataset folders under one or more roots (searched recursively).

    Args:
        data_dir: a folder, a comma-separated list of folders, or a list of folders.
    """
    found: list[Path] = []
    for root in _roots(data_dir):
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir '{root}' is not a folder; pass the output folder of ./run.sh preprocess")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if "metadata.csv" in filenames and "dataset_config.json" in filenames:
                found.append(Path(dirpath))
                dirnames[:] = [d for d in dirnames if d != "processed"]
    return sorted(set(found))


def resolve_window_file(dataset_config: dict, window_type: str) -> tuple[str, float, float]:
    """Relative window file, width and level of ``window_type`` in one dataset.

    Args:
        dataset_config: content of dataset_config.json.
        window_type: lung | bone | soft_tissue | brain | a custom name listed in the config.
    """
    windows = dataset_config.get("windows") or {}
    if window_type in windows:
        w = windows[window_type]
        width, level = float(w["width"]), float(w["level"])
        rel = w.get("file") or f"windows/{window_type}_w{width:g}_l{level:g}.npy"
        return rel, width, level
    if window_type in WINDOW_FILES:
        width, level = WINDOW_WL[window_type]
        return WINDOW_FILES[window_type], width, level
    raise KeyError(
        f"window_type '{window_type}' is neither a preset ({', '.join(WINDOW_FILES)}) nor listed in "
        f"dataset_config.json windows ({', '.join(windows) or 'none'}); preprocess with that window or pick another"
    )


def split_cases(keys: Sequence[str], split: str, val_fraction: float = 0.05, num_val: int | None = None, seed: int = 0):
    """Deterministic train/val split by case.

    Args:
        keys: unique case keys (``dataset/case_id``).
        split: "train", "val" or "all".
        val_fraction: share of cases held out when ``num_val`` is None (at least 1 when there are 2+ cases).
        num_val: exact number of held-out cases.
        seed: split seed.
    """
    keys = sorted(keys)
    if split == "all" or not keys:
        return keys
    n = len(keys)
    if num_val is None:
        num_val = max(1, int(round(val_fraction * n))) if n >= 2 else 0
    num_val = min(num_val, n - 1) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(keys[i] for i in order[:num_val])
    if split == "val":
        if not val:  # one case or num_val=0: validate on the training cases rather than on nothing
            logger.warning("no held-out case (num_val=0 or a single usable case): validation uses the training cases")
            return keys
        return val
    if split == "train":
        vs = set(val)
        return [k for k in keys if k not in vs]
    raise ValueError(f"split must be 'train', 'val' or 'all', got '{split}'")


def _support_block(window: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    sup = window > 0
    if mask is not None:
        sup &= mask
    return sup


def block_counts(window: np.ndarray, mask: np.ndarray | None, block: int = 8, slab: int = 64) -> np.ndarray:
    """Support voxels per ``block``^3 cell (uint16 for block 8), read slab by slab.

    Args:
        window: (R, R, R) window values (a memory map is fine).
        mask: (R, R, R) bool body mask or None.
        block: cell size.
        slab: slices per read along the first axis (multiple of ``block``).
    """
    shape = window.shape
    if any(s % block for s in shape):
        raise ValueError(f"volume shape {shape} is not a multiple of block {block}; preprocess to a multiple of 8")
    g = [s // block for s in shape]
    dtype = np.uint16 if block**3 < 65536 else np.uint32
    out = np.zeros(g, dtype=dtype)
    slab = max(block, slab - slab % block)
    for x0 in range(0, shape[0], slab):
        x1 = min(shape[0], x0 + slab)
        sup = _support_block(np.asarray(window[x0:x1]), None if mask is None else np.asarray(mask[x0:x1]))
        c = sup.reshape((x1 - x0) // block, block, g[1], block, g[2], block).sum(axis=(1, 3, 5))
        out[x0 // block : x1 // block] = c
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _load_body_mask_from_ct(case_dir: Path, hu_min: float, hu_max: float) -> np.ndarray:
    """Body mask from ct_normalized when body_mask_512.npy is absent (largest CC above -500 HU, filled)."""
    ct = np.load(case_dir / "ct_normalized_512.npy", mmap_mode="r")
    hu = np.asarray(ct, dtype=np.float32) * (hu_max - hu_min) + hu_min
    try:
        from transforms import BodyMask

        return np.asarray(BodyMask()(hu[None]))[0].astype(bool)
    except ImportError:
        from scipy import ndimage

        fg = hu > -500
        lab, n = ndimage.label(fg)
        if n == 0:
            return fg
        sizes = ndimage.sum(fg, lab, index=np.arange(1, n + 1))
        return ndimage.binary_fill_holes(lab == (1 + int(np.argmax(sizes))))


class CTWindowSparseDataset(Dataset):
    """Sparse samples of one CT window from processed datasets.

    Args:
        data_dir: root(s) holding processed datasets (comma-separated string or list), searched recursively.
        window_type: lung | bone | soft_tissue | brain | custom window name from dataset_config.json.
        split: "train", "val" or "all" (split by case, deterministic from ``seed``).
        min_points: cases with fewer support voxels are skipped (and counted).
        max_points: larger cases are cropped to a random 8-aligned box with at most this many voxels.
        val_fraction: share of held-out cases (at least one when there are two or more).
        num_val: exact number of held-out cases (overrides ``val_fraction``).
        seed: split and crop seed.
        block: crop alignment (the encoder's total downsampling, 8).
        random_crop: False gives one fixed crop per case (validation).
        cache: "auto" caches block counts next to the case (or only in memory when not writable),
            "memory" never writes, a folder path writes the cache there.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | Sequence[str],
        window_type: str = "lung",
        split: str = "train",
        min_points: int = 100,
        max_points: int = 300000,
        val_fraction: float = 0.05,
        num_val: int | None = None,
        seed: int = 0,
        block: int = 8,
        random_crop: bool | None = None,
        cache: str = "auto",
    ) -> None:
        self.window_type = window_type
        self.split = split
        self.min_points = int(min_points)
        self.max_points = int(max_points)
        self.seed = int(seed)
        self.block = int(block)
        self.random_crop = (split == "train") if random_crop is None else bool(random_crop)
        self.cache = cache
        self.epoch = 0
        self._counts: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}
        import transforms  # noqa: F401  (import cost paid here, not in the first __getitem__)

        self.datasets = find_datasets(data_dir)
        if not self.datasets:
            raise FileNotFoundError(
                f"no processed dataset (metadata.csv + dataset_config.json) under '{data_dir}'; run ./run.sh preprocess first"
            )
        self.failed: list[dict] = []
        self.missing: list[dict] = []
        self.skipped: list[dict] = []
        cases = []
        for ds in self.datasets:
            cfg = json.loads((ds / "dataset_config.json").read_text())
            rel, width, level = resolve_window_file(cfg, window_type)
            hu = (float(cfg.get("hu_min", -1024)), float(cfg.get("hu_max", 3071)))
            for row in _read_csv(ds / "metadata.csv"):
                cid = str(row.get("case_id", "")).strip()
                key = f"{ds.name}/{cid}"
                if str(row.get("status", "ok")).strip().lower() != "ok":
                    self.failed.append({"case": key, "error": row.get("error", "")})
                    continue
                case_dir = ds / "processed" / cid
                wfile = case_dir / rel
                if not wfile.is_file():
                    self.missing.append({"case": key, "file": str(wfile)})
                    continue
                cases.append(
                    {"key": key, "dataset": str(ds), "case_id": cid, "dir": str(case_dir), "window_file": str(wfile),
                     "width": width, "level": level, "hu_min": hu[0], "hu_max": hu[1],
                     "resolution": int(cfg.get("resolution", 512))}
                )
        if self.failed:
            logger.info(f"skipping {len(self.failed)} failed case(s) listed in metadata.csv")
        if self.missing:
            logger.warning(f"skipping {len(self.missing)} case(s) without the '{window_type}' window file, e.g. {self.missing[0]['file']}")
        keys = split_cases([c["key"] for c in cases], split, val_fraction, num_val, self.seed)
        wanted = set(keys)
        self.cases = []
        for c in cases:
            if c["key"] not in wanted:
                continue
            try:
                counts = self._block_counts(c)
            except DataFileError as e:  # a damaged case is left out, with its file named
                logger.warning(f"skipping {c['key']}: {e}")
                self.failed.append({"case": c["key"], "error": str(e)})
                continue
            c["num_points"] = int(counts.sum(dtype=np.int64))
            if c["num_points"] < self.min_points:
                self.skipped.append({"case": c["key"], "num_points": c["num_points"]})
                continue
            self.cases.append(c)
        if self.skipped:
            logger.info(f"skipped {len(self.skipped)} case(s) with fewer than min_points={self.min_points} support voxels")
        logger.info(
            f"CTWindowSparseDataset[{split}]: {len(self.cases)} case(s) from {len(self.datasets)} dataset(s), window '{window_type}'"
        )

    # -- per-case helpers -------------------------------------------------------------------
    def _cache_path(self, c: dict) -> Path | None:
        if self.cache == "memory":
            return None
        name = f"support_blocks{self.block}_{Path(c['window_file']).stem}.npy"
        if self.cache == "auto":
            return Path(c["dir"]) / ".cache" / name
        digest = hashlib.sha1(c["dir"].encode()).hexdigest()[:12]
        return Path(self.cache) / f"{digest}_{name}"

    def _mask(self, c: dict) -> np.ndarray | None:
        path = Path(c["dir"]) / "body_mask_512.npy"
        if path.is_file():
            return load_npy(path, mmap_mode="r")
        cached = Path(c["dir"]) / ".cache" / "body_mask_512.npy"
        if self.cache != "memory" and cached.is_file():
            return np.load(cached, mmap_mode="r")
        masks = self.__dict__.setdefault("_masks", {})
        if c["key"] not in masks:
            if not (Path(c["dir"]) / "ct_normalized_512.npy").is_file():
                return None
            logger.warning(f"{c['key']}: body_mask_512.npy missing, computing the body mask from ct_normalized_512.npy")
            mask = _load_body_mask_from_ct(Path(c["dir"]), c["hu_min"], c["hu_max"])
            if self.cache != "memory":
                try:
                    from pipeline.io_utils import save_npy

                    save_npy(cached, mask)
                    return np.load(cached, mmap_mode="r")
                except OSError:
                    pass  # read-only dataset: keep it in memory
            masks[c["key"]] = mask
        return masks[c["key"]]

    def _window(self, c: dict) -> np.ndarray:
        return load_npy(c["window_file"], mmap_mode="r")

    def _block_counts(self, c: dict) -> np.ndarray:
        """Support voxels per block of one case: from the disk cache, else computed once (and cached)."""
        mem = self.__dict__.setdefault("_counts", {})
        if c["key"] in mem:
            return mem[c["key"]]
        path = self._cache_path(c)
        wfile = Path(c["window_file"])
        if path is not None and path.is_file() and path.stat().st_mtime >= wfile.stat().st_mtime:
            try:
                return np.load(path)  # 512 KB for a 512^3 case: read per item, not kept in memory
            except (OSError, ValueError):
                pass
        counts = block_counts(self._window(c), self._mask(c), self.block)
        if path is not None:
            try:
                from pipeline.io_utils import save_npy

                save_npy(path, counts)
                return counts
            except OSError:
                pass  # read-only dataset: keep it in memory only
        mem[c["key"]] = counts
        return counts

    # -- Dataset API ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Changes the crops drawn for integer indices (sampler draws carry their own id)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases)

    def crop_box(self, index: int, draw: int | None = None) -> np.ndarray:
        """The crop box (lo, hi) in voxels of case ``index`` for draw id ``draw`` (``transforms.RandSparseCrop``)."""
        from transforms import RandSparseCrop

        c = self.cases[index]
        counts = self._block_counts(c)
        shape = [s * self.block for s in counts.shape]
        if c["num_points"] <= self.max_points:
            return np.array([0, 0, 0, *shape], dtype=np.int64)
        if self.random_crop:
            draw = self.epoch * len(self) + index if draw is None else draw
            key = [self.seed, int(draw), index]
        else:
            key = [self.seed, index]
        crop = RandSparseCrop(self.max_points, block=self.block)
        crop.set_random_state(seed=int(np.random.SeedSequence(key).generate_state(1)[0]))
        crop.randomize(torch.from_numpy(counts.astype(np.int64)), shape)
        start, stop = crop.box
        return np.array([*start, *stop], dtype=np.int64)

    def load_region(self, index: int, box: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Dense window values and body mask inside ``box`` (only that region is read)."""
        c = self.cases[index]
        sl = tuple(slice(int(box[i]), int(box[i + 3])) for i in range(3))
        win = np.asarray(self._window(c)[sl], dtype=np.float32)
        mask = self._mask(c)
        return win, (None if mask is None else np.asarray(mask[sl], dtype=bool))

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, draw = (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), None)
        c = self.cases[index]
        box = self.crop_box(index, draw)
        win, mask = self.load_region(index, box)
        sup = _support_block(win, mask)
        local = np.argwhere(sup)
        feats = win[sup].reshape(-1, 1).astype(np.float32)
        coords = (local + box[:3]).astype(np.int32)
        if len(coords) > self.max_points:  # block counts are exact, so this only guards cache corruption
            raise RuntimeError(f"{c['key']}: crop holds {len(coords)} > max_points voxels; delete its .cache folder")
        r = self._block_counts(c).shape[0] * self.block
        return {
            "coords": torch.from_numpy(coords),
            "feats": torch.from_numpy(feats),
            "case_id": c["key"],
            "box": torch.as_tensor(box),
            "spatial_shape": [r, r, r],
            "window": (c["width"], c["level"]),
        }


class StepSampler(Sampler):
    """Endless, resumable, rank-aware sampler yielding ``(index, draw_id)`` pairs.

    Global draw ``g`` (one per sample across all ranks) maps to epoch ``g // n`` and a
    seeded permutation of that epoch, so the sequence depends only on the seed, never on
    workers, and ``start_step`` restarts it at an exact training step.

    Args:
        dataset: the dataset (only its length is used).
        batch_size: samples per step per rank.
        seed: permutation seed.
        start_step: first step to draw (set on resume).
        num_replicas: ranks (default: the process group's world size, else 1).
        rank: this rank (default: from the process group, else 0).
        shuffle: permute each epoch.
    """

    def __init__(self, dataset, batch_size: int = 1, seed: int = 0, start_step: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, shuffle: bool = True) -> None:
        import torch.distributed as dist

        self.n = len(dataset)
        if self.n == 0:
            raise ValueError("the training dataset is empty; run ./run.sh check-data on data_dir to see why")
        dist_on = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if dist_on else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if dist_on else 0)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm = None

    def _index(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def position(self, step: int) -> int:
        """Per-rank sample position at ``step`` (what a checkpoint stores)."""
        return int(step) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        q = self.position(self.start_step)
        while True:
            g = q * self.num_replicas + self.rank
            yield (self._index(g), g)
            q += 1

    def __len__(self) -> int:  # nominal; the trainer sets epoch_length = max_steps
        return 2**62


def sparse_collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks samples into one sparse batch with a leading batch column.

    Returns:
        {"indices": int32 [N, 4] (b, i, j, k), "features": float32 [N, 1], "batch_size": B,
         "spatial_shape": [R, R, R], "case_id": [B], "box": int64 [B, 6], "num_points": [B], "window": [B]}
    """
    idx, feats = [], []
    for b, s in enumerate(batch):
        c = torch.as_tensor(s["coords"], dtype=torch.int32)
        idx.append(torch.cat([torch.full((c.shape[0], 1), b, dtype=torch.int32), c], dim=1))
        feats.append(torch.as_tensor(s["feats"], dtype=torch.float32).reshape(-1, 1))
    return {
        "indices": torch.cat(idx) if idx else torch.zeros(0, 4, dtype=torch.int32),
        "features": torch.cat(feats) if feats else torch.zeros(0, 1),
        "batch_size": len(batch),
        "spatial_shape": list(batch[0]["spatial_shape"]) if batch else [0, 0, 0],
        "case_id": [s["case_id"] for s in batch],
        "box": torch.stack([torch.as_tensor(s["box"], dtype=torch.int64) for s in batch]) if batch else torch.zeros(0, 6),
        "num_points": [int(s["coords"].shape[0]) for s in batch],
        "window": [s.get("window") for s in batch],
    }


def batch_split(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Splits a collated batch by sample into ``n`` micro-batches (gradient accumulation).

    Args:
        batch: output of ``sparse_collate``.
        n: number of parts (``batch_split``); parts get ceil(B / n) samples, empty parts are dropped.
    """
    bsz = int(batch["batch_size"])
    n = max(1, min(int(n), bsz))
    if n == 1:
        return [batch]
    per = math.ceil(bsz / n)
    bcol = batch["indices"][:, 0].long()
    out = []
    for start in range(0, bsz, per):
        stop = min(bsz, start + per)
        keep = (bcol >= start) & (bcol < stop)
        ind = batch["indices"][keep].clone()
        ind[:, 0] -= start
        part = {k: v for k, v in batch.items()}
        part.update(
            indices=ind, features=batch["features"][keep], batch_size=stop - start,
            case_id=batch["case_id"][start:stop], box=batch["box"][start:stop],
            num_points=batch["num_points"][start:stop], window=batch["window"][start:stop],
        )
        out.append(part)
    return out


def to_sparse_tensor(batch: dict[str, Any], device: torch.device | str | None = None):
    """spconv ``SparseConvTensor`` of a collated batch on ``device``."""
    import networks  # noqa: F401  (installs the spconv backend: CPU algo, stream stub)
    import spconv.pytorch as spconv

    dev = torch.device(device) if device is not None else torch.device("cpu")
    return spconv.SparseConvTensor(
        batch["features"].to(dev, non_blocking=True),
        batch["indices"].to(dev, non_blocking=True).int(),
        list(batch["spatial_shape"]),
        int(batch["batch_size"]),
    )
