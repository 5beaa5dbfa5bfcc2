"""Training dataset over processed CT datasets: one window, sparse support, 8-aligned crops.

``CTWindowSparseDataset`` finds every processed dataset (a folder holding ``metadata.csv``,
``dataset_config.json`` and ``processed/``) under one or more roots, reads the chosen window
of each usable case (``pipeline.processed``: either layout, the one usable-case rule) and
returns sparse samples::

    {"coords": int32 [N, 3] (i, j, k) in the full grid, "feats": float32 [N, 1],
     "case_id": str, "box": int [6] (lo, hi) of the crop, "support": int [6] (lo, hi) of the
     case's support (a crop face inside it cuts the scan), "spatial_shape": [R, R, R]}

or, with ``grid_crops`` (for ``grid_training``: the model takes the crop as a dense grid, so the
sparse round trip is skipped), the dense crop: ``"values"`` float32 [D, H, W] (window, 0 off the
support), ``"active"`` bool [D, H, W] (the support) and ``"num_points"`` instead of coords/feats.

Support = body mask AND window > 0. Cases above ``max_points`` support voxels are cropped to
a random box aligned to ``block`` (8) holding at most ``max_points`` voxels
(``transforms.RandSparseCrop``), chosen from a per-case count of support voxels per 8^3 block
(computed once, cached in the case's ``.cache/`` folder or in memory); smaller cases get the
box of their blocks that hold support. Either way both ends of every box are multiples of ``block``, so a grid crop is the
model's grid of that box as it stands. Only the box is read (a memory map, or the compressed
chunks it touches). ``sparse_collate`` batches either kind of sample; ``to_sparse_tensor`` and
``to_grid_batch`` make the model's input of either kind of batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.config_data import config_flag
from pipeline.io_utils import DataFileError, load_npy, save_npy
from pipeline.processed import GUIDE_FILES, ProcessedCase, find_datasets, usable_cases
from transforms import HU_MAX, HU_MIN, BodyMask, Sparsify, support_box, support_mask
from transforms.geometry import memory_order

__all__ = [
    "find_datasets",
    "split_cases",
    "block_counts",
    "CTWindowSparseDataset",
    "StepSampler",
    "sparse_collate",
    "batch_split",
    "to_sparse_tensor",
    "to_grid_batch",
]

logger = logging.getLogger("ctvq.dataset")

CACHE_VERSION = 1
#: cases whose crop tables (summed-area table and draw probabilities, ~4 MB at 512^3) a process keeps
TABLES_KEPT = 16


def shipped_max_points() -> int:
    """The training crop budget the stage configs ship (``dataset#args#max_points`` of stage 0)."""
    cfg = json.loads((Path(__file__).resolve().parents[1] / "bundles" / "ct_vqvae" / "stage0.json").read_text())
    return int(cfg["dataset"]["args"]["max_points"])


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
        grid_crops: samples are dense crops (values, active) rather than coords/feats (see the module
            docstring); the training bundles set it to ``grid_training``.
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
        grid_crops: bool = False,
    ) -> None:
        self.window_type = window_type
        self.split = split
        self.min_points = int(min_points)
        self.max_points = int(max_points)
        self.seed = int(seed)
        self.block = int(block)
        self.random_crop = (split == "train") if random_crop is None else bool(random_crop)
        self.cache = cache
        self.grid_crops = config_flag("grid_crops", grid_crops, "grid_training")  # the bundles set it from grid_training
        self.epoch = 0
        self._counts: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}

        self.datasets = find_datasets(data_dir)
        if not self.datasets:
            raise FileNotFoundError(
                f"no processed dataset (metadata.csv + dataset_config.json) under '{data_dir}'; run ./run.sh preprocess first"
            )
        self.failed: list[dict] = []
        self.missing: list[dict] = []
        self.skipped: list[dict] = []
        cases = []
        resolutions = {}
        for ds in self.datasets:
            found = usable_cases(ds, window_type)
            resolutions[int(found.config.get("resolution", 512))] = ds
            self.failed += found.failed
            self.missing += found.missing
            hu = (float(found.config.get("hu_min", HU_MIN)), float(found.config.get("hu_max", HU_MAX)))
            for c in found.cases:
                cases.append({**c, "dir": str(c["dir"]), "dataset": str(ds), "window": found.window,
                              "window_file": str(c["dir"] / found.window_file), "hu_min": hu[0], "hu_max": hu[1]})
        if len(resolutions) > 1:
            (r1, d1), (r2, d2) = list(resolutions.items())[:2]
            raise ValueError(f"{d1} was preprocessed at {r1}^3 and {d2} at {r2}^3; train on datasets of one --resolution")
        #: cube side the cases were preprocessed at (the model must work on it)
        self.resolution = next(iter(resolutions), None)
        if self.failed:
            logger.info(f"skipping {len(self.failed)} failed case(s) listed in metadata.csv")
        if self.missing:
            logger.warning(f"skipping {len(self.missing)} incomplete case(s) or case(s) without the '{window_type}' "
                           f"window file, e.g. {self.missing[0]['file']}")
        keys = split_cases([c["key"] for c in cases], split, val_fraction, num_val, self.seed)
        wanted = set(keys)
        self.cases = []
        started = shown = time.perf_counter()
        for n, c in enumerate(cases):
            if time.perf_counter() - shown > 10:  # the first use reads every case once (then cached)
                shown = time.perf_counter()
                logger.info(f"CTWindowSparseDataset[{split}]: counting support voxels, {n} of {len(cases)} cases "
                            f"({shown - started:.0f} s; once, then cached)")
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
    def _case(self, c: dict) -> ProcessedCase:
        """The case's reader, opened once per process (DataLoader workers open their own)."""
        opened = self.__dict__.setdefault("_opened", {})
        key = (os.getpid(), c["key"])
        if key not in opened:
            opened[key] = ProcessedCase(c["dir"], c["hu_min"], c["hu_max"])
        return opened[key]

    def _cache_path(self, c: dict) -> Path | None:
        if self.cache == "memory":
            return None
        name = f"support_blocks{self.block}_{c['window'].stem}.npy"
        if self.cache == "auto":
            return Path(c["dir"]) / ".cache" / name
        digest = hashlib.sha1(c["dir"].encode()).hexdigest()[:12]
        return Path(self.cache) / f"{digest}_{name}"

    def _mask(self, c: dict, box=None) -> np.ndarray | None:
        """Body mask of ``box``; a guide case without one gets it computed from its HU once (cached)."""
        case = self._case(c)
        mask = case.body_mask(box)
        if mask is not None or case.layout != "guide":
            return mask
        sl = (slice(None),) * 3 if box is None else tuple(slice(int(a), int(b)) for a, b in box)
        cached = Path(c["dir"]) / ".cache" / GUIDE_FILES["body_mask"]
        if self.cache != "memory" and cached.is_file():
            return np.asarray(load_npy(cached, mmap_mode="r")[sl])
        masks = self.__dict__.setdefault("_masks", {})
        if c["key"] not in masks:
            try:
                hu = case.hu()
            except FileNotFoundError:
                return None
            logger.warning(f"{c['key']}: no body mask stored, computing it from ct_normalized_512.npy")
            mask = np.asarray(BodyMask()(hu[None]))[0].astype(bool)
            if self.cache != "memory":
                try:
                    save_npy(cached, mask)
                    return mask[sl]
                except OSError:
                    pass  # read-only dataset: keep it in memory
            masks[c["key"]] = mask
        return masks[c["key"]][sl]

    def _block_counts(self, c: dict) -> np.ndarray:
        """Support voxels per block of one case: from the disk cache, else computed once (and cached)."""
        mem = self.__dict__.setdefault("_counts", {})
        if c["key"] in mem:
            return mem[c["key"]]
        path = self._cache_path(c)
        case = self._case(c)
        if path is not None and path.is_file() and path.stat().st_mtime >= case.stamp():
            try:
                return np.load(path)  # 512 KB for a 512^3 case: read per item, not kept in memory
            except (OSError, ValueError):
                pass
        box = case.content_box(self.block)  # support is empty outside it
        counts = np.zeros([case.resolution // self.block] * 3, dtype=np.uint16 if self.block**3 < 65536 else np.uint32)
        counts[tuple(slice(a // self.block, b // self.block) for a, b in box)] = block_counts(
            case.window(c["window"], box, c["window_file"]), self._mask(c, box), self.block)
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

    def _crop_tables(self, c: dict) -> dict:
        """``transforms.crop_tables`` of a case's block counts, kept for the last ``TABLES_KEPT`` cases."""
        kept = self.__dict__.setdefault("_tables", {})
        tables = kept.pop(c["key"], None)
        if tables is None:
            from transforms import crop_tables

            tables = crop_tables(self._block_counts(c))
            if len(kept) >= TABLES_KEPT:
                kept.pop(next(iter(kept)))  # least recently used
        kept[c["key"]] = tables
        return tables

    def support_box(self, index: int) -> np.ndarray:
        """(lo, hi) voxels of the blocks of case ``index`` that hold support: where a crop face cuts the scan."""
        tables = self._crop_tables(self.cases[index])
        start, stop = support_box(tables, self.block, [s * self.block for s in tables["shape"]])
        return np.array([*start, *stop], dtype=np.int64)

    def crop_box(self, index: int, draw: int | None = None) -> np.ndarray:
        """The crop box (lo, hi) in voxels of case ``index`` for draw id ``draw`` (``transforms.RandSparseCrop``)."""
        from transforms import RandSparseCrop

        c = self.cases[index]
        tables = self._crop_tables(c)
        shape = [s * self.block for s in tables["shape"]]
        if c["num_points"] <= self.max_points:
            return self.support_box(index)
        if self.random_crop:
            draw = self.epoch * len(self) + index if draw is None else draw
            key = [self.seed, int(draw), index]
        else:
            key = [self.seed, index]
        crop = RandSparseCrop(self.max_points, block=self.block)
        crop.set_random_state(seed=int(np.random.SeedSequence(key).generate_state(1)[0]))
        crop.randomize(tables, shape)
        start, stop = crop.box
        return np.array([*start, *stop], dtype=np.int64)

    def load_region(self, index: int, box: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Dense window values and body mask inside ``box`` (only that region is read)."""
        c = self.cases[index]
        region = [(int(box[i]), int(box[i + 3])) for i in range(3)]
        return self._case(c).window(c["window"], region, c["window_file"]), self._mask(c, region)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, draw = (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), None)
        c = self.cases[index]
        box = self.crop_box(index, draw)
        win, mask = self.load_region(index, box)
        if self.grid_crops:
            active = support_mask(win, mask)  # the voxels Sparsify keeps
            num_points = int(np.count_nonzero(active.numpy()))  # 40x torch's sum of a bool tensor
            sample = {"values": torch.from_numpy(np.multiply(win, active.numpy(), dtype=np.float32)),
                      "active": active, "num_points": num_points}
        else:
            coords, feats = Sparsify()(win, mask, offset=box[:3])
            num_points = len(coords)
            sample = {"coords": coords, "feats": feats}
        if num_points > self.max_points:  # block counts are exact, so this only guards cache corruption
            raise RuntimeError(f"{c['key']}: crop holds {num_points} > max_points voxels; delete its .cache folder")
        r = self.resolution
        return {
            **sample,
            "case_id": c["key"],
            "box": torch.as_tensor(box),
            "support": torch.as_tensor(self.support_box(index)),
            "spatial_shape": [r, r, r],
            "window": (c["window"].width, c["window"].level),  # (width, level): what validation reads
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
            window = getattr(dataset, "window_type", None)
            which = f" for window '{window}'" if window else ""
            raise ValueError(f"the training dataset is empty{which}; run ./run.sh check-data DATA_DIR"
                             f"{f' --window {window}' if window else ''} to see why (a window_type the data was "
                             "not preprocessed with? set window_type to one it has)")
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


def _batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised CPU tensor of ``shape``; in a DataLoader worker in shared memory (as torch's
    ``default_collate`` does), so handing the batch to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(*shape, dtype=dtype)
    like = torch.empty(0, dtype=dtype)
    return like.new(like._typed_storage()._new_shared(math.prod(shape))).view(*shape)


def _is_grid(batch: dict[str, Any]) -> bool:
    """Whether a sample or collated batch holds grid crops (``grid_crops``) rather than sparse points."""
    return "values" in batch


def sparse_collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks samples into one sparse batch with a leading batch column.

    Returns:
        {"indices": int16 [N, 4] (b, i, j, k), "features": float32 [N, 1], "batch_size": B,
         "spatial_shape": [R, R, R], "case_id": [B], "box": int64 [B, 6], "num_points": [B], "window": [B]}

    The indices travel as int16 (int32 past 32767): 12 instead of 20 bytes a point to hand from the
    worker to the main process, pin and copy to the GPU, where ``to_sparse_tensor`` widens them.

    Grid samples (``grid_crops``) are stacked instead into ``"values"`` float32 [B, D, H, W, 1] and
    ``"active"`` bool [B, D, H, W], zero / False past a sample's box up to the batch's largest one,
    with ``"memory_order"`` [B] (each window's axes, outermost first in memory: the order a sparse
    sample lists its points in, which ``to_sparse_tensor`` keeps; the other keys as above).
    """
    if batch and _is_grid(batch[0]):
        return _grid_collate(batch)
    sizes = [int(s["coords"].shape[0]) for s in batch]
    spatial = list(batch[0]["spatial_shape"]) if batch else [0, 0, 0]
    narrow = max([*spatial, len(batch)]) <= torch.iinfo(torch.int16).max
    indices = _batch_tensor((sum(sizes), 4), torch.int16 if narrow else torch.int32)
    features = _batch_tensor((sum(sizes), 1), torch.float32)
    start = 0
    for b, (s, n) in enumerate(zip(batch, sizes)):  # each sample written once, into its rows
        indices[start:start + n, 0] = b
        indices[start:start + n, 1:] = torch.as_tensor(s["coords"])
        features[start:start + n] = torch.as_tensor(s["feats"]).reshape(-1, 1)
        start += n
    return {"indices": indices, "features": features, **_batch_info(batch, sizes)}


def _grid_collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``sparse_collate`` of grid samples.

    The batch's grids are laid out in memory as the first sample's window is (compact windows are
    F-ordered): the samples are copied without a transpose (which takes 5x as long on the CPU), and
    the tensors handed on are views in (b, i, j, k) order that ``to_grid_batch`` makes contiguous on
    the device.
    """
    shapes = [tuple(s["values"].shape) for s in batch]
    extent = [max(e) for e in zip(*shapes)]
    order = memory_order(batch[0]["values"])
    axes = [1 + order.index(a) for a in range(3)]  # logical axis -> stored dim
    stored = [len(batch), *(extent[a] for a in order)]
    values = _batch_tensor((*stored, 1), torch.float32).permute(0, *axes, 4)
    active = _batch_tensor(stored, torch.bool).permute(0, *axes)
    for b, (s, (sd, sh, sw)) in enumerate(zip(batch, shapes)):  # each voxel written once
        for out, x in ((values[b, ..., 0], s["values"]), (active[b], s["active"])):
            out[:sd, :sh, :sw] = x
            out[sd:] = 0
            out[:sd, sh:] = 0
            out[:sd, :sh, sw:] = 0
    return {"values": values, "active": active, "memory_order": [memory_order(s["values"]) for s in batch],
            **_batch_info(batch, [int(s["num_points"]) for s in batch])}


def _batch_info(batch: Sequence[dict[str, Any]], num_points: list[int]) -> dict[str, Any]:
    """What a collated batch of either kind holds besides its points."""
    return {
        "batch_size": len(batch),
        "spatial_shape": list(batch[0]["spatial_shape"]) if batch else [0, 0, 0],
        "case_id": [s["case_id"] for s in batch],
        "box": torch.stack([torch.as_tensor(s["box"], dtype=torch.int64) for s in batch]) if batch else torch.zeros(0, 6),
        **({"support": torch.stack([torch.as_tensor(s["support"], dtype=torch.int64) for s in batch])}
           if batch and all("support" in s for s in batch) else {}),
        "num_points": num_points,
        "window": [s.get("window") for s in batch],
    }


def batch_split(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Splits a collated batch by sample into ``n`` micro-batches (gradient accumulation).

    Args:
        batch: output of ``sparse_collate`` (sparse or grid).
        n: number of parts (``batch_split``); parts get ceil(B / n) samples, empty parts are dropped.
    """
    bsz = int(batch["batch_size"])
    n = max(1, min(int(n), bsz))
    if n == 1:
        return [batch]
    per = math.ceil(bsz / n)
    bcol = None if _is_grid(batch) else batch["indices"][:, 0].long()
    out = []
    for start in range(0, bsz, per):
        stop = min(bsz, start + per)
        part = {k: v for k, v in batch.items()}
        part.update(
            batch_size=stop - start, case_id=batch["case_id"][start:stop], box=batch["box"][start:stop],
            num_points=batch["num_points"][start:stop], window=batch["window"][start:stop],
        )
        if "support" in batch:
            part["support"] = batch["support"][start:stop]
        if bcol is None:  # the part's grid: its samples, up to their largest box
            d, h, w = (int(v) for v in (part["box"][:, 3:] - part["box"][:, :3]).amax(0))
            part.update(values=batch["values"][start:stop, :d, :h, :w], active=batch["active"][start:stop, :d, :h, :w],
                        memory_order=batch["memory_order"][start:stop])
        else:
            keep = (bcol >= start) & (bcol < stop)
            ind = batch["indices"][keep].clone()
            ind[:, 0] -= start
            part.update(indices=ind, features=batch["features"][keep])
        out.append(part)
    return out


def to_sparse_tensor(batch: dict[str, Any], device: torch.device | str | None = None):
    """spconv ``SparseConvTensor`` of a collated batch on ``device``.

    A grid batch gives the points of its active sites in the order the sparse batch of the same crops
    lists them (by sample, each in its window's memory order): the same tensor.
    """
    import networks  # noqa: F401  (installs the spconv backend: CPU algo, stream stub)
    import spconv.pytorch as spconv

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if _is_grid(batch):
        active = batch["active"].to(dev, non_blocking=True)
        values = batch["values"].to(dev, non_blocking=True)
        feats, ijk = [], []
        for b, order in enumerate(batch["memory_order"]):
            a = active[b].permute(*order)
            feats.append(values[b, ..., 0].permute(*order)[a].reshape(-1, 1))
            at = a.nonzero()[:, [order.index(k) for k in range(3)]] + batch["box"][b, :3].to(dev)
            ijk.append(torch.cat([torch.full_like(at[:, :1], b), at], 1))
        features, indices = torch.cat(feats), torch.cat(ijk).int()
    else:
        features = batch["features"].to(dev, non_blocking=True)
        indices = batch["indices"].to(dev, non_blocking=True).int()
    return spconv.SparseConvTensor(features, indices, list(batch["spatial_shape"]), int(batch["batch_size"]))


def to_grid_batch(batch: dict[str, Any], device: torch.device | str | None = None, factor: int = 8):
    """``networks.grid.GridBatch`` of a collated batch on ``device`` for a model whose total
    downsampling is ``factor``: a grid batch as it stands, a sparse one through ``grid_from_sparse``
    (the same grid: origins at the box corners rounded down to ``factor``, the largest extent)."""
    from networks.grid import GridBatch, grid_from_sparse

    faces = batch_crop_faces(batch, factor, device)
    if not _is_grid(batch):
        return dataclasses.replace(grid_from_sparse(to_sparse_tensor(batch, device), batch["box"], factor), crop_faces=faces)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    box = batch["box"]
    lo = box[:, :3] // factor * factor
    extent = (-(-box[:, 3:] // factor) * factor - lo).amax(0).tolist()
    values, active = (batch[k].to(dev, non_blocking=True) for k in ("values", "active"))
    if bool((lo != box[:, :3]).any()) or list(active.shape[1:]) != extent:
        # crops aligned to a block below the model's factor: each goes into the model's grid
        placed = values.new_zeros(len(box), *extent, 1), active.new_zeros(len(box), *extent)
        for b, (start, size) in enumerate(zip((box[:, :3] - lo).tolist(), (box[:, 3:] - box[:, :3]).tolist())):
            at = (b, *(slice(a, a + n) for a, n in zip(start, size)))
            crop = (b, *(slice(0, n) for n in size))
            placed[0][at], placed[1][at] = values[crop], active[crop]
        values, active = placed
    # the collated grid is stored in its windows' memory order (and a batch_split part is a view of
    # it): the model takes it contiguous in (b, i, j, k, c) order, transposed here (on the GPU)
    return GridBatch(values.contiguous(), active.contiguous(), lo.to(dev), list(batch["spatial_shape"]), faces)


def batch_crop_faces(batch: dict[str, Any], factor: int, device: torch.device | str | None = None) -> torch.Tensor | None:
    """``networks.grid.crop_faces`` of a collated batch (its ``box`` and ``support``) on ``device``;
    None for a batch without ``support``."""
    from networks.grid import crop_faces

    if "support" not in batch:
        return None
    return crop_faces(batch["box"], batch["support"], factor).to(device if device is not None else "cpu")
