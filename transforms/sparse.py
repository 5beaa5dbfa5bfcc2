"""Dense <-> sparse conversion and block-aligned random crops that keep full-grid coordinates.

Support of a window = body mask AND window value > threshold (0). Sparse form: ``coords`` [N, 3]
int32 (i, j, k in the full grid) and ``feats`` [N, C] float32. Crops are boxes aligned to
``block`` (8) voxels, never random point dropping.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

from .geometry import in_memory_order, memory_order

__all__ = [
    "support_mask",
    "block_counts",
    "Sparsify",
    "Sparsifyd",
    "Densify",
    "Densifyd",
    "RandSparseCrop",
    "RandSparseCropd",
    "choose_crop_box",
    "crop_tables",
]


def _t(x) -> torch.Tensor:
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    if isinstance(x, np.ndarray):
        if all(st >= 0 for st in x.strides):  # any memory layout (F-order files too), no copy
            with warnings.catch_warnings():  # read-only memory maps are only read here
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.asarray(x))
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x)


def _spatial(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected one channel (1, X, Y, Z), got shape {tuple(x.shape)}")
        return x[0]
    if x.ndim != 3:
        raise ValueError(f"expected a (1, X, Y, Z) or (X, Y, Z) volume, got shape {tuple(x.shape)}")
    return x


def _flat_support(s: torch.Tensor) -> torch.Tensor:
    """int64 positions of the True values of a contiguous bool tensor, in memory order.

    On the CPU through numpy's ``flatnonzero``: about 10x faster there than ``torch.nonzero``
    (2 ms against 25 ms for 1.8 M of 6 M voxels), which counts in every training crop.
    """
    if s.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(s.reshape(-1).numpy()))
    return torch.nonzero(s.reshape(-1)).squeeze(1)


def _unravel(flat: torch.Tensor, shape: Sequence[int], axes: Sequence[int] = (0, 1, 2),
             offset: Sequence[int] | None = None) -> torch.Tensor:
    """int32 [N, 3] coordinates of C-order positions ``flat`` in ``shape``, the coordinate along
    ``shape``'s axis m in column ``axes[m]``, plus ``offset`` (per column: a crop's start)."""
    off = [int(o) for o in offset] if offset is not None else [0, 0, 0]
    y, z = int(shape[1]), int(shape[2])
    if flat.device.type == "cpu" and int(np.prod(shape)) < 2**31:
        # in-place int32 numpy arithmetic: about 3x np.divmod (and 10x torch) on the CPU
        k = flat.numpy().astype(np.int32)
        j = k // z
        tmp = j * z
        k -= tmp
        i = j // y
        np.multiply(i, y, out=tmp)
        j -= tmp
        out = np.empty((k.size, 3), dtype=np.int32)
        for m, a in enumerate((i, j, k)):
            np.add(a, off[axes[m]], out=out[:, axes[m]])
        return torch.from_numpy(out)
    q = torch.div(flat, z, rounding_mode="floor")
    cols = [torch.div(q, y, rounding_mode="floor"), q % y, flat % z]
    return _full_grid_coords(torch.stack([cols[axes.index(c)] for c in range(3)], 1), off)


def _sparse_from_dense(x: torch.Tensor, s: torch.Tensor, extra: Sequence[torch.Tensor] = (),
                       offset: Sequence[int] | None = None):
    """int32 coords [N, 3] (logical i, j, k, plus ``offset``: a crop's start in the full grid)
    and values of ``x`` (and ``extra``) where ``s``.

    Runs in ``x``'s memory order (no transposing copies for F-ordered volumes); points come in
    memory order.
    """
    perm = memory_order(x)
    xm = in_memory_order(x, perm)
    sm = in_memory_order(s, perm).contiguous()
    flat = _flat_support(sm)
    coords = _unravel(flat, sm.shape, list(perm), offset)  # memory axis m is logical axis perm[m]
    vals = [xm.reshape(-1).index_select(0, flat)]
    for e in extra:
        vals.append(in_memory_order(e, perm).reshape(-1).index_select(0, flat))
    return coords, vals


def _full_grid_coords(coords: torch.Tensor, offset: Sequence[int] | None) -> torch.Tensor:
    """int32 coordinates shifted by a crop's ``offset`` (its start in the full grid)."""
    coords = coords.to(torch.int32)
    if offset is not None and any(int(o) for o in offset):
        coords += torch.as_tensor([int(o) for o in offset], dtype=torch.int32)
    return coords


def support_mask(img, mask=None, threshold: float = 0.0) -> torch.Tensor:
    """(X, Y, Z) bool support: ``img > threshold`` and ``mask`` (when given)."""
    s = _spatial(_t(img)) > threshold
    if mask is not None:
        s &= _spatial(_t(mask)).bool()
    return s


def block_counts(support, block: int = 8) -> torch.Tensor:
    """Number of support voxels in each ``block``^3 cell, shape ceil(shape / block), int64."""
    s = _spatial(_t(support)).bool()
    perm = memory_order(s)
    s = in_memory_order(s, perm)
    shape = np.asarray(s.shape)
    pad = (-shape) % block
    if pad.any():
        s = torch.nn.functional.pad(s, (0, int(pad[2]), 0, int(pad[1]), 0, int(pad[0])))
    nb = (np.asarray(s.shape) // block).tolist()
    v = s.view(nb[0], block, nb[1], block, nb[2], block).view(torch.uint8)
    c = v.sum(dim=5, dtype=torch.int32).sum(dim=3).sum(dim=1).long()
    return c.permute(*[perm.index(d) for d in range(3)]).contiguous()


def _crop_meta(img, start: Sequence[int], stop: Sequence[int]):
    """Crops the spatial axes of a tensor/array; MetaTensors get a shifted affine and crop meta."""
    sl = (..., *(slice(int(a), int(b)) for a, b in zip(start, stop)))
    if isinstance(img, MetaTensor):
        data = img.as_tensor()[sl]
        aff = img.affine.clone().double()
        aff[:3, 3] = aff[:3, 3] + aff[:3, :3] @ torch.as_tensor(np.asarray(start, dtype=np.float64))
        meta = {k: v for k, v in img.meta.items() if k != "affine"}
        prev = np.asarray(meta.get("crop_start", [0, 0, 0]), dtype=np.int64)
        meta.setdefault("full_shape", list(img.shape[-3:]))
        meta["crop_start"] = (prev + np.asarray(start, dtype=np.int64)).tolist()
        meta["spatial_shape"] = np.asarray(data.shape[-3:])
        return MetaTensor(data, affine=aff, meta=meta, applied_operations=list(img.applied_operations))
    return img[sl]


def crop_tables(counts) -> dict:
    """What :func:`choose_crop_box` derives from a count grid (summed-area table, draw
    probabilities); computed once per case, it makes every later draw cheap."""
    c = counts.numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    sat = np.zeros(tuple(np.asarray(c.shape) + 1), dtype=np.int64)
    sat[1:, 1:, 1:] = c.cumsum(0).cumsum(1).cumsum(2)
    flat = c.ravel().astype(np.float64)
    filled = np.argwhere(c > 0)
    support = (filled.min(0), filled.max(0) + 1) if len(filled) else (np.zeros(3, int), np.asarray(c.shape))
    return {"shape": c.shape, "total": int(sat[-1, -1, -1]), "sat": sat, "p": flat / max(flat.sum(), 1.0),
            "support_blocks": support}


def support_box(tables: dict, block: int, shape: Sequence[int]) -> tuple[list, list]:
    """(start, stop) voxels of the blocks that hold support (the whole grid when none does): the
    training dataset's crop of a case within its budget, so a dense crop never spans the empty
    cube around a body."""
    lo, hi = tables["support_blocks"]
    return (np.asarray(lo) * block).tolist(), np.minimum(np.asarray(hi) * block, np.asarray(shape[-3:])).tolist()


def choose_crop_box(counts, max_points: int, block: int, shape: Sequence[int], rng: np.random.RandomState):
    """Random block-aligned box holding at most ``max_points`` support voxels.

    The box is a cube of blocks centred on a block drawn with probability proportional to its
    support count, as large as possible under the budget (binary search on its side).

    Args:
        counts: support voxels per block, or its :func:`crop_tables`.

    Returns:
        (start, stop) voxel indices in the full grid (stop clipped to ``shape``).
    """
    t = counts if isinstance(counts, dict) else crop_tables(counts)
    nb = np.asarray(t["shape"])
    shape = np.asarray(shape[-3:])
    if t["total"] <= max_points:
        return [0, 0, 0], shape.tolist()
    sat = t["sat"]

    def box_sum(lo, hi):
        x0, y0, z0 = lo
        x1, y1, z1 = hi
        return int(sat[x1, y1, z1] - sat[x0, y1, z1] - sat[x1, y0, z1] - sat[x1, y1, z0]
                   + sat[x0, y0, z1] + sat[x0, y1, z0] + sat[x1, y0, z0] - sat[x0, y0, z0])

    centre = np.asarray(np.unravel_index(rng.choice(t["p"].size, p=t["p"]), t["shape"]))

    def box(side):
        side_v = np.minimum(side, nb)
        lo = np.clip(centre - side_v // 2, 0, nb - side_v)
        return lo, lo + side_v

    lo_s, hi_s = 1, int(nb.max())
    while lo_s < hi_s:  # largest side whose box fits the budget
        mid = (lo_s + hi_s + 1) // 2
        if box_sum(*box(mid)) <= max_points:
            lo_s = mid
        else:
            hi_s = mid - 1
    lo, hi = box(lo_s)
    if box_sum(lo, hi) > max_points:
        raise ValueError(f"one {block}^3 block holds more than max_points={max_points} voxels; raise max_points")
    start = lo * block
    stop = np.minimum(hi * block, shape)
    return start.tolist(), stop.tolist()


def _optional(d: Mapping[Hashable, object], key: Hashable | None):
    """``d[key]``; None when there is no such key or ``key`` is None."""
    return d.get(key) if key is not None else None


class _OnPresentKeys(MapTransform):
    """A dictionary transform that works on all its present keys at once (nothing to do when none is)."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        return self.apply(d, keys) if keys else d

    def apply(self, d: dict, keys: list) -> dict:
        """Transform ``d`` (a copy of the data) given its present ``keys``, in order."""
        raise NotImplementedError


class Sparsify(Transform):
    """Dense window (1, X, Y, Z) + support mask -> (coords [N, 3] int32, feats [N, 1] float32).

    Support = ``img > threshold`` and ``mask``. Coordinates are in the full grid: a crop's
    ``crop_start`` (MetaTensor meta, or the ``offset`` argument) is added.

    Args:
        threshold: values above it are support (0: the window minimum is empty).
    """

    def __init__(self, threshold: float = 0.0):
        self.threshold = threshold

    def __call__(self, img, mask=None, offset: Sequence[int] | None = None):
        """
        Args:
            img: dense volume (1, X, Y, Z) or (X, Y, Z).
            mask: optional support mask (body mask) of the same spatial shape.
            offset: voxel offset of this (cropped) volume in the full grid.
        """
        if offset is None and isinstance(img, MetaTensor):
            offset = img.meta.get("crop_start")
        x = _spatial(_t(img))
        s = support_mask(x, mask, self.threshold)
        coords, (vals,) = _sparse_from_dense(x, s, offset=offset)
        return coords, vals.to(torch.float32).reshape(-1, 1)


class Densify(Transform):
    """(coords [N, 3], feats [N, C]) -> dense (C, X, Y, Z) float32, ``fill`` elsewhere (inverse of Sparsify).

    Args:
        spatial_shape: full grid shape (X, Y, Z), e.g. (512, 512, 512).
        fill: value outside the support (0, the window minimum).
        offset: start of the dense output in the full grid (crop origin); points outside are dropped.
    """

    def __init__(self, spatial_shape: Sequence[int], fill: float = 0.0, offset: Sequence[int] | None = None):
        self.spatial_shape = [int(s) for s in spatial_shape]
        self.fill = fill
        self.offset = offset

    def __call__(self, coords, feats):
        c = _t(coords).long()
        f = _t(feats).float()
        if f.ndim == 1:
            f = f[:, None]
        if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] != f.shape[0]:
            raise ValueError(f"coords must be [N, 3] and feats [N, C], got {tuple(c.shape)} and {tuple(f.shape)}")
        if self.offset is not None:
            c = c - torch.as_tensor([int(o) for o in self.offset])
        shape = torch.as_tensor(self.spatial_shape)
        keep = ((c >= 0) & (c < shape)).all(dim=1)
        if not bool(keep.all()):
            c, f = c[keep], f[keep]
        out = torch.full((f.shape[1], *self.spatial_shape), self.fill, dtype=torch.float32)
        out[:, c[:, 0], c[:, 1], c[:, 2]] = f.T
        return out


class Sparsifyd(_OnPresentKeys):
    """Dictionary form of :class:`Sparsify`.

    Writes ``coords_key`` [N, 3] int32 (full-grid i, j, k), ``feats_key`` [N, C] float32 (one
    column per key, support from the first key) and ``"spatial_shape"`` (full grid shape).

    Args:
        keys: dense window key(s).
        mask_key: support mask key (e.g. "body_mask"), or None.
        coords_key: output key for coordinates.
        feats_key: output key for features.
        threshold: values above it are support.
        drop_dense: remove the dense inputs (and mask) from the dictionary to save memory.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, mask_key: Hashable | None = "body_mask", coords_key: str = "coords",
                 feats_key: str = "feats", threshold: float = 0.0, drop_dense: bool = False,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.coords_key, self.feats_key = mask_key, coords_key, feats_key
        self.threshold, self.drop_dense = threshold, drop_dense

    def apply(self, d: dict, keys: list) -> dict:
        first = d[keys[0]]
        mask = _optional(d, self.mask_key)
        if self.mask_key is not None and mask is None and not self.allow_missing_keys:
            raise KeyError(f"mask key {self.mask_key!r} not in data; pass mask_key=None to use the window alone")
        x = _spatial(_t(first))
        s = support_mask(x, mask, self.threshold)
        offset = d.get("crop_start")
        if offset is None and isinstance(first, MetaTensor):
            offset = first.meta.get("crop_start")
        full_shape = d.get("full_shape")
        if full_shape is None and isinstance(first, MetaTensor):
            full_shape = first.meta.get("full_shape")
        coords, vals = _sparse_from_dense(x, s, [_spatial(_t(d[k])) for k in keys[1:]], offset)
        d[self.coords_key] = coords
        d[self.feats_key] = torch.stack([v.float() for v in vals], dim=1)
        d["spatial_shape"] = [int(v) for v in (full_shape if full_shape is not None else x.shape)]
        if self.drop_dense:
            for k in keys + ([self.mask_key] if self.mask_key in d else []):
                d.pop(k, None)
        return d


class Densifyd(MapTransform):
    """Dictionary form of :class:`Densify`: ``coords_key`` + ``feats_key`` -> dense ``output_key``.

    Args:
        keys: the feats key (one key).
        coords_key: coordinates key.
        output_key: where to write the dense (C, X, Y, Z) volume.
        spatial_shape: full grid shape (None: read ``d["spatial_shape"]``).
        fill: value outside the support.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection = "feats", coords_key: str = "coords", output_key: str = "dense",
                 spatial_shape: Sequence[int] | None = None, fill: float = 0.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.coords_key, self.output_key = coords_key, output_key
        self.spatial_shape, self.fill = spatial_shape, fill

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = self.spatial_shape or d.get("spatial_shape")
            if shape is None:
                raise KeyError("no spatial_shape given and none in data; pass spatial_shape=(X, Y, Z)")
            d[self.output_key] = Densify(shape, self.fill)(d[self.coords_key], d[key])
        return d


class RandSparseCrop(Randomizable, Transform):
    """Random ``block``-aligned box holding at most ``max_points`` support voxels (full-grid coordinates kept).

    When the whole volume fits the budget it is returned uncropped. A MetaTensor output carries
    ``crop_start`` (added by Sparsify to the coordinates), ``full_shape`` and a shifted affine.

    Args:
        max_points: support voxel budget of the crop (>= block**3).
        block: alignment of the box in voxels (8: one latent cell).
        threshold: values above it (inside the mask) are support.
    """

    def __init__(self, max_points: int, block: int = 8, threshold: float = 0.0):
        if max_points < block**3:
            raise ValueError(f"max_points={max_points} must be at least block**3={block**3}")
        self.max_points, self.block, self.threshold = int(max_points), int(block), threshold
        self.box: tuple[list[int], list[int]] | None = None

    def randomize(self, counts, shape) -> None:
        self.box = choose_crop_box(counts, self.max_points, self.block, shape, self.R)

    def __call__(self, img, mask=None, counts=None, randomize: bool = True):
        """
        Args:
            img: dense window (1, X, Y, Z) or (X, Y, Z) (array, memmap, tensor or MetaTensor).
            mask: optional support mask of the same shape (cropped too when given: returns (img, mask)).
            counts: optional precomputed :func:`block_counts` of the support (skips reading all voxels).
            randomize: draw a new box (False: reuse the last one).
        """
        shape = list(img.shape[-3:])
        if randomize or self.box is None:
            if counts is None:
                counts = block_counts(support_mask(img, mask, self.threshold), self.block)
            self.randomize(counts, shape)
        start, stop = self.box
        out = _crop_meta(img, start, stop)
        if mask is not None:
            return out, _crop_meta(mask, start, stop)
        return out


class RandSparseCropd(Randomizable, _OnPresentKeys):
    """Dictionary form of :class:`RandSparseCrop`: one box, applied to every key.

    Writes ``"crop_start"`` and ``"full_shape"`` into the dictionary (used by :class:`Sparsifyd`).

    Args:
        keys: keys to crop (support is computed from the first one).
        max_points: support voxel budget.
        mask_key: support mask key (cropped too), or None.
        counts_key: optional key of precomputed block counts.
        block: box alignment (8).
        threshold: values above it are support.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, max_points: int, mask_key: Hashable | None = "body_mask",
                 counts_key: Hashable | None = None, block: int = 8, threshold: float = 0.0,
                 allow_missing_keys: bool = False):
        _OnPresentKeys.__init__(self, keys, allow_missing_keys)
        self.cropper = RandSparseCrop(max_points, block, threshold)
        self.mask_key, self.counts_key = mask_key, counts_key

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def apply(self, d: dict, keys: list) -> dict:
        first = d[keys[0]]
        shape = list(first.shape[-3:])
        counts = _optional(d, self.counts_key)
        if counts is None:
            mask = _optional(d, self.mask_key)
            counts = block_counts(support_mask(first, mask, self.cropper.threshold), self.cropper.block)
        self.cropper.randomize(counts, shape)
        start, stop = self.cropper.box
        crop_keys = keys + ([self.mask_key] if self.mask_key is not None and self.mask_key in d
                            and self.mask_key not in keys else [])
        for k in crop_keys:
            d[k] = _crop_meta(d[k], start, stop)
        prev = np.asarray(d.get("crop_start", [0, 0, 0]), dtype=np.int64)
        d.setdefault("full_shape", shape)
        d["crop_start"] = (prev + np.asarray(start)).tolist()
        return d
