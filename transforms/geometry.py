"""World-space resampling: the isotropic cube grid, resampling between grids, mapping back.

All resampling is defined in world space: a target grid (affine + shape) is filled by mapping
each target voxel through ``inv(source_affine) @ target_affine``. When that map is axis-aligned
(a signed permutation with scales, the usual case after ``Orientation("RAS")``, and also for
label maps stored LAS against an LPS image) the work is separable: one 1D interpolation per axis,
only over the part of the target that falls inside the source. Oblique maps fall back to chunked
``torch.nn.functional.grid_sample``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Transform

__all__ = [
    "cube_affine_for",
    "resample_to_grid",
    "resample_to_source",
    "ResampleToCube",
    "ResampleToCubed",
    "world_to_voxel",
    "voxel_to_world",
    "memory_order",
    "in_memory_order",
]

AIR_HU = -1024.0
_LINEAR = ("bilinear", "trilinear", "linear")


def _np_affine(affine) -> np.ndarray:
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().double().numpy()
    return np.asarray(affine, dtype=np.float64)


def voxel_to_world(affine, ijk) -> np.ndarray:
    """Maps voxel indices [..., 3] to world mm [..., 3] with a 4x4 affine."""
    a = _np_affine(affine)
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ a[:3, :3].T + a[:3, 3]


def world_to_voxel(affine, xyz) -> np.ndarray:
    """Maps world mm [..., 3] to (fractional) voxel indices [..., 3] with a 4x4 affine."""
    inv = np.linalg.inv(_np_affine(affine))
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def cube_affine_for(affine, shape: Sequence[int], resolution: int = 512) -> tuple[np.ndarray, float]:
    """Affine of the isotropic world-aligned (RAS) cube that holds a volume, centred.

    The spacing is chosen so the largest physical extent of the volume (voxel edges included,
    measured along the world axes) fills ``resolution`` voxels.

    Args:
        affine: 4x4 voxel-to-RAS affine of the volume.
        shape: spatial shape (X, Y, Z) of the volume.
        resolution: voxels per cube side.

    Returns:
        (cube_affine 4x4 float64, isotropic spacing in mm).
    """
    a = _np_affine(affine)
    shape = [int(s) for s in shape[-3:]]
    corners = np.array([[x, y, z] for x in (-0.5, shape[0] - 0.5) for y in (-0.5, shape[1] - 0.5)
                        for z in (-0.5, shape[2] - 0.5)])
    world = voxel_to_world(a, corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    spacing = float((hi - lo).max() / resolution)
    centre = (lo + hi) / 2.0
    cube = np.eye(4)
    cube[:3, :3] = np.eye(3) * spacing
    cube[:3, 3] = centre - spacing * (resolution - 1) / 2.0
    return cube, spacing


def _signed_permutation(m: np.ndarray, tol: float = 1e-6):
    """For a 3x3 matrix with one non-zero per column and row, the source axis of each target axis."""
    a = np.abs(m)
    perm = a.argmax(axis=0)
    if len(set(perm.tolist())) != 3:
        return None
    scale = np.max(a, axis=0)
    off = a.copy()
    off[perm, np.arange(3)] = 0.0
    if np.any(off > tol * np.maximum(scale, 1e-12)[None, :]):
        return None
    return perm


def memory_order(x: torch.Tensor) -> list[int]:
    """Spatial dims (last three) of ``x`` from outermost to innermost in memory."""
    sp = x.ndim - 3
    return sorted(range(sp, x.ndim), key=lambda d: (-x.stride(d), d))


def in_memory_order(x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    """``x.permute(*perm)``, made contiguous when it is not already."""
    xm = x.permute(*perm)
    return xm if xm.is_contiguous() else xm.contiguous()


def _take(x: torch.Tensor, dim: int, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather along ``dim`` of a contiguous tensor (gather for the innermost dim, index_select otherwise)."""
    if dim == x.ndim - 1:
        shape = list(x.shape)
        shape[dim] = idx.numel()
        ix = idx.view(*([1] * (x.ndim - 1)), -1).expand(*shape)
        return torch.gather(x, dim, ix, out=out) if out is not None else torch.gather(x, dim, ix)
    if out is not None:
        out.copy_(x.index_select(dim, idx))
        return out
    return x.index_select(dim, idx)


def _is_run(idx: torch.Tensor) -> bool:
    n = idx.numel()
    return n > 0 and int(idx[-1] - idx[0]) == n - 1 and bool((idx[1:] - idx[:-1] == 1).all())


def _axis_plan(scale: float, offset: float, n_in: int, n_out: int, linear: bool):
    """Valid target range and source indices/weights for u = scale * i + offset along one axis.

    Target voxels within half a source voxel of the source edge take the edge value; farther ones
    are padding. Returns (lo, hi, idx0, w) with w None when no blending is needed.
    """
    i = np.arange(n_out, dtype=np.float64)
    u = scale * i + offset
    valid = (u >= -0.5 - 1e-4) & (u <= n_in - 0.5 + 1e-4)
    if not valid.any():
        return None
    lo, hi = int(np.argmax(valid)), int(n_out - np.argmax(valid[::-1]))
    u = np.clip(u[lo:hi], 0.0, n_in - 1)
    if not linear or n_in == 1:
        return lo, hi, torch.from_numpy(np.floor(u + 0.5).astype(np.int64).clip(0, n_in - 1)), None
    i0 = np.floor(u).clip(0, n_in - 2)
    w = u - i0
    if np.all(np.abs(w - np.round(w)) < 1e-4):
        idx = np.round(u).astype(np.int64).clip(0, n_in - 1)
        return lo, hi, torch.from_numpy(idx), None
    return lo, hi, torch.from_numpy(i0.astype(np.int64)), torch.from_numpy(w.astype(np.float32))


def _resample_separable(x, m, perm, out_shape, linear, pad, out_dtype):
    """Axis-aligned resampling, done in the source's memory order (no transposing copies).

    The output tensor has the logical shape (*lead, *out_shape) and the same memory layout as
    the source (e.g. F-order for volumes read by SimpleITK/nibabel).
    """
    sp = x.ndim - 3
    lead = list(x.shape[:sp])
    mem = memory_order(x)  # source dims, outermost first
    xm = in_memory_order(x, [*range(sp), *mem])
    # target axis feeding each memory position: target a reads source axis perm[a]
    inv = {int(perm[a]): a for a in range(3)}
    tgt_of_pos = [inv[d - sp] for d in mem]
    plans = []
    for pos, a in enumerate(tgt_of_pos):
        src_axis = int(perm[a])
        plan = _axis_plan(float(m[src_axis, a]), float(m[src_axis, 3]), xm.shape[sp + pos], int(out_shape[a]), linear)
        plans.append(plan)
    # output in the same memory order: allocate (lead, out dims in memory order), view logically.
    out_mem_shape = lead + [int(out_shape[a]) for a in tgt_of_pos]
    out_m = torch.empty(out_mem_shape, dtype=out_dtype)
    if any(p is None for p in plans):
        out_m.fill_(pad)
    else:
        box = [(p[0], p[1]) for p in plans]
        # pad only the slabs outside the valid box
        for pos, (lo, hi) in enumerate(box):
            pre = [slice(None)] * sp + [slice(b[0], b[1]) for b in box[:pos]]
            if lo > 0:
                out_m[tuple(pre + [slice(0, lo)])] = pad
            if hi < out_mem_shape[sp + pos]:
                out_m[tuple(pre + [slice(hi, None)])] = pad
        target = out_m[tuple([slice(None)] * sp + [slice(lo, hi) for lo, hi in box])]
        # free passes (contiguous runs) first, then real gathers; the last one writes into ``target``
        work = []
        for pos, (_, _, idx, w) in enumerate(plans):
            if w is None and _is_run(idx):
                xm = xm.narrow(sp + pos, int(idx[0]), idx.numel())
            else:
                work.append((pos, idx, w))
        if not work:
            target.copy_(xm)
        # reversed runs become one multi-axis flip; shrinking passes go first, then the flip, then
        # growing passes, so each pass touches as few voxels as possible
        flips, shrink, grow = [], [], []
        for pos, idx, w in work:
            dim = sp + pos
            if w is None and _is_run(idx.flip(0)):
                xm = xm.narrow(dim, int(idx[-1]), idx.numel())
                flips.append(dim)
            else:
                (shrink if idx.numel() <= xm.shape[dim] else grow).append((dim, idx, w))
        steps = sorted(shrink, key=lambda t: t[1].numel() / xm.shape[t[0]])
        steps += [("flip", None, None)] if flips else []
        steps += sorted(grow, key=lambda t: t[1].numel() / xm.shape[t[0]])
        for n, (dim, idx, w) in enumerate(steps):
            last = n == len(steps) - 1
            if dim == "flip":
                xm = xm.flip(flips)
                if last:
                    target.copy_(xm)
            elif w is None:
                if last and dim == xm.ndim - 1 and target.dtype == xm.dtype:
                    _take(xm, dim, idx, out=target)
                else:
                    xm = _take(xm, dim, idx)
                    if last:
                        target.copy_(xm)
            else:
                a_ = _take(xm, dim, idx)
                b_ = _take(xm, dim, idx + 1)
                shape = [1] * xm.ndim
                shape[dim] = idx.numel()
                wv = w.view(shape)
                if last:
                    if target.dtype == a_.dtype:
                        torch.lerp(a_, b_, wv, out=target)
                    else:
                        target.copy_(a_.lerp_(b_, wv))
                else:
                    xm = a_.lerp_(b_, wv)
                del a_, b_
    # logical view: position of target axis a in memory order
    pos_of_tgt = [tgt_of_pos.index(a) for a in range(3)]
    return out_m.permute(*range(sp), *(sp + p for p in pos_of_tgt))


def _resample_grid_sample(x, m, out_shape, linear, pad):
    """Oblique fallback: chunked grid_sample over target slabs (float32 grids, no 64-bit volumes)."""
    sp = x.ndim - 3
    lead = x.shape[:sp]
    src = x.reshape(1, -1, *x.shape[sp:]).float()
    n_in = np.asarray(x.shape[sp:], dtype=np.float64)
    X, Y, Z = (int(s) for s in out_shape)
    out = torch.empty((src.shape[1], X, Y, Z), dtype=src.dtype)
    mt = torch.from_numpy(m).float()
    jj, kk = torch.meshgrid(torch.arange(Y, dtype=torch.float32), torch.arange(Z, dtype=torch.float32), indexing="ij")
    chunk = max(1, int(2**23 // max(Y * Z, 1)))
    norm = torch.from_numpy(2.0 / np.maximum(n_in - 1, 1)).float()
    for x0 in range(0, X, chunk):
        x1 = min(X, x0 + chunk)
        ii = torch.arange(x0, x1, dtype=torch.float32)[:, None, None].expand(-1, Y, Z)
        pts = torch.stack([ii, jj.expand_as(ii), kk.expand_as(ii)], dim=-1)  # (x, Y, Z, 3)
        u = pts @ mt[:3, :3].T + mt[:3, 3]
        inside = ((u >= -0.5) & (u <= torch.from_numpy(n_in - 0.5).float())).all(dim=-1)
        g = (u.clamp(min=0) * norm - 1.0).flip(-1)  # grid order (k, j, i) for (D=i, H=j, W=k)
        res = torch.nn.functional.grid_sample(
            src, g[None], mode="bilinear" if linear else "nearest", padding_mode="border", align_corners=True
        )[0]
        res[:, ~inside] = pad
        out[:, x0:x1] = res
    return out.reshape(*lead, X, Y, Z)


def resample_to_grid(img, src_affine, dst_affine, dst_shape: Sequence[int], mode: str = "bilinear",
                     padding_value: float | None = None, dtype: torch.dtype | None = None,
                     contiguous: bool = False) -> torch.Tensor:
    """Resamples a channel-first volume onto another grid in world space.

    Args:
        img: tensor or array (C, X, Y, Z) (or (X, Y, Z)) on the source grid.
        src_affine: 4x4 voxel-to-world affine of ``img``.
        dst_affine: 4x4 voxel-to-world affine of the target grid.
        dst_shape: spatial shape of the target grid.
        mode: "bilinear"/"trilinear" (linear) or "nearest" (labels).
        padding_value: value of target voxels outside the source (more than half a voxel away);
            None: -1024 (air) for linear modes, 0 (background) for nearest.
        dtype: output dtype (default: float32 for linear, input dtype for nearest).
        contiguous: return a C-contiguous tensor. By default the output keeps the source's memory
            layout (e.g. F-order for volumes read by SimpleITK/nibabel), which avoids a transposing
            copy; the logical axes are (C, X, Y, Z) either way.

    Returns:
        torch.Tensor (C, *dst_shape) (plain tensor, no metadata).
    """
    x = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img)
    linear = mode in _LINEAR
    if mode not in _LINEAR + ("nearest",):
        raise ValueError(f"mode {mode!r} not supported; use 'bilinear' or 'nearest'")
    if linear and not x.is_floating_point():
        x = x.float()
    if linear and x.dtype == torch.float64:
        x = x.float()
    out_dtype = dtype or x.dtype
    if padding_value is None:
        padding_value = AIR_HU if linear else 0
    m = np.linalg.inv(_np_affine(src_affine)) @ _np_affine(dst_affine)  # target voxel -> source voxel
    dst_shape = [int(s) for s in dst_shape[-3:]]
    perm = _signed_permutation(m[:3, :3])
    if perm is not None:
        out = _resample_separable(x, m, perm, dst_shape, linear, padding_value, out_dtype)
        return out.contiguous() if contiguous else out
    res = _resample_grid_sample(x, m, dst_shape, linear, padding_value)
    if not linear and not out_dtype.is_floating_point:
        res = res.round()
    return res.to(out_dtype)


def _meta_of(img) -> dict:
    return dict(img.meta) if isinstance(img, MetaTensor) else {}


def resample_to_source(cube, meta: Mapping | None = None, mode: str = "bilinear", padding_value: float | None = None,
                       target_affine=None, target_shape: Sequence[int] | None = None) -> MetaTensor:
    """Maps a cube-grid volume (e.g. a decoded reconstruction) back onto the source grid.

    Args:
        cube: (C, R, R, R) or (R, R, R) tensor/array on the cube grid (a MetaTensor carries its meta).
        meta: meta dict written by :class:`ResampleToCube` (``cube_affine``, ``source_affine``,
            ``source_shape``); defaults to ``cube.meta``.
        mode: "bilinear" for intensities, "nearest" for labels.
        padding_value: value outside the cube (None: -1024 for bilinear, 0 for nearest).
        target_affine: overrides the target affine (e.g. ``meta["original_affine"]`` of the file).
        target_shape: overrides the target shape (e.g. ``meta["original_shape"]``).

    Returns:
        MetaTensor on the source grid with ``affine`` = the source affine.
    """
    meta = dict(meta if meta is not None else _meta_of(cube))
    for k in ("cube_affine", "source_affine", "source_shape"):
        if k not in meta:
            raise KeyError(f"meta has no {k!r}: pass the meta written by ResampleToCube")
    squeeze = (cube.ndim if hasattr(cube, "ndim") else np.ndim(cube)) == 3
    x = torch.as_tensor(cube.as_tensor() if isinstance(cube, MetaTensor) else cube)
    if squeeze:
        x = x[None]
    t_aff = _np_affine(target_affine if target_affine is not None else meta["source_affine"])
    t_shape = [int(s) for s in (target_shape if target_shape is not None else meta["source_shape"])][-3:]
    out = resample_to_grid(x, meta["cube_affine"], t_aff, t_shape, mode=mode, padding_value=padding_value)
    if squeeze:
        out = out[0]
    new_meta = {k: v for k, v in meta.items() if k not in ("affine",)}
    new_meta["spatial_shape"] = np.asarray(t_shape)
    return MetaTensor(out, affine=torch.as_tensor(t_aff), meta=new_meta)


class ResampleToCube(InvertibleTransform, Transform):
    """Resamples a volume into an isotropic R^3 cube aligned with the RAS world axes, centred.

    The spacing makes the largest physical extent fill ``resolution``; the rest is padded with
    ``padding_value`` (air). Writes ``cube_affine``, ``cube_spacing``, ``source_affine`` and
    ``source_shape`` into meta so :func:`resample_to_source` (or ``inverse``/``Invertd``) maps back.

    Args:
        resolution: voxels per cube side (512 default).
        mode: "bilinear" (images) or "nearest" (labels).
        padding_value: value outside the source volume (None: -1024 HU for bilinear, 0 for nearest).
        dtype: output dtype (None: float32 for bilinear, input dtype for nearest).
        contiguous: return C-contiguous data. By default the cube keeps the memory layout of the
            source (F-order for SimpleITK/nibabel volumes), which saves a transposing copy of the
            whole cube; indexing is (C, X, Y, Z) either way.
    """

    def __init__(self, resolution: int = 512, mode: str = "bilinear", padding_value: float | None = None,
                 dtype: torch.dtype | None = None, contiguous: bool = False):
        self.resolution = int(resolution)
        self.mode = mode
        self.padding_value = padding_value
        self.dtype = dtype
        self.contiguous = contiguous

    def __call__(self, img, cube_affine=None, mode: str | None = None, padding_value: float | None = None):
        """
        Args:
            img: (C, X, Y, Z) MetaTensor with a voxel-to-world affine.
            cube_affine: use this cube grid (e.g. the image's) instead of fitting one to ``img``.
            mode: overrides ``self.mode``.
            padding_value: overrides ``self.padding_value``.
        """
        if not isinstance(img, MetaTensor):
            raise TypeError("ResampleToCube needs a MetaTensor with an affine (load it with LoadCT)")
        mode = mode or self.mode
        pad = self.padding_value if padding_value is None else padding_value
        src_aff = _np_affine(img.affine)
        src_shape = [int(s) for s in img.shape[-3:]]
        if cube_affine is None:
            cube, spacing = cube_affine_for(src_aff, src_shape, self.resolution)
        else:
            cube = _np_affine(cube_affine)
            spacing = float(np.sqrt((cube[:3, :3] ** 2).sum(axis=0)).mean())
        R = self.resolution
        data = resample_to_grid(img, src_aff, cube, (R, R, R), mode=mode, padding_value=pad, dtype=self.dtype,
                                contiguous=self.contiguous)
        meta = dict(img.meta)
        meta.update(
            {
                "cube_affine": torch.as_tensor(cube),
                "cube_spacing": spacing,
                "cube_resolution": R,
                "source_affine": torch.as_tensor(src_aff),
                "source_shape": src_shape,
                "spatial_shape": np.asarray([R, R, R]),
            }
        )
        meta.pop("affine", None)
        out = MetaTensor(data, affine=torch.as_tensor(cube), meta=meta, applied_operations=list(img.applied_operations))
        self.push_transform(out, orig_size=src_shape,
                            extra_info={"source_affine": src_aff.tolist(), "cube_affine": cube.tolist(), "mode": mode})
        return out

    def inverse(self, data):
        """Maps a cube volume (with this transform in its applied_operations) back to the source grid."""
        xform = self.pop_transform(data)
        info = xform["extra_info"]
        meta = {"cube_affine": info["cube_affine"], "source_affine": info["source_affine"],
                "source_shape": xform["orig_size"]}
        out = resample_to_source(data, meta, mode=info.get("mode", self.mode), padding_value=self.padding_value)
        if isinstance(data, MetaTensor):
            m = dict(data.meta)
            for k in ("cube_affine", "cube_spacing", "cube_resolution", "source_affine", "source_shape", "affine"):
                m.pop(k, None)
            m["spatial_shape"] = np.asarray(xform["orig_size"])
            out = MetaTensor(out.as_tensor(), affine=torch.as_tensor(info["source_affine"]), meta=m,
                             applied_operations=list(data.applied_operations))
        return out


class ResampleToCubed(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`ResampleToCube`: one world-space cube for every key.

    The cube grid is fitted to ``ref_key`` (the image); every other key (e.g. a label map with its
    own affine and orientation) is resampled onto that same world grid, so voxels pair by position.

    Args:
        keys: keys to resample.
        ref_key: key whose extent defines the cube (default: first of ``keys``).
        resolution: voxels per cube side.
        mode: one mode or one per key ("bilinear" images, "nearest" labels).
        padding_value: one value or one per key (None: -1024 for bilinear keys, 0 for nearest keys).
        dtype: output dtype, one or one per key (None keeps float32 / label dtype).
        contiguous: return C-contiguous data (default: keep the source memory layout, see ResampleToCube).
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, ref_key: Hashable | None = None, resolution: int = 512,
                 mode: str | Sequence[str] = "bilinear", padding_value: float | Sequence[float] | None = None,
                 dtype=None, contiguous: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        n = len(self.keys)
        self.ref_key = ref_key if ref_key is not None else self.keys[0]
        self.modes = [mode] * n if isinstance(mode, str) else list(mode)
        self.pads = list(padding_value) if isinstance(padding_value, Sequence) else [padding_value] * n
        self.dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * n
        self.resampler = ResampleToCube(resolution=resolution)
        self._per_key = {k: ResampleToCube(resolution, m, p, t, contiguous)
                         for k, m, p, t in zip(self.keys, self.modes, self.pads, self.dtypes)}

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.ref_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"reference key {self.ref_key!r} not in data; it defines the cube grid")
        ref = d[self.ref_key]
        cube, _ = cube_affine_for(ref.affine, ref.shape[-3:], self.resampler.resolution)
        for key in self.key_iterator(d):
            d[key] = self._per_key[key](d[key], cube_affine=cube)
        return d

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._per_key[key].inverse(d[key])
        return d
