"""Vectorised sparse ops on spconv tensors: norms, activations, down/subdivide, lookup.

Normalisation is per voxel by default. ``SparseNorm(mode="layer")`` is a LayerNorm over the
channels of each voxel and ``mode="group_voxel"`` a GroupNorm whose statistics are computed per
voxel over the channels of each group. Both make a voxel's output depend only on that voxel,
so a training crop, a whole scan and a tile of it give the same features: tiled inference is
exact. ``mode="group"`` (GroupNorm statistics per sample over all its voxels, as in the
original Direct3D-S2 VAE) is available for fidelity with pretrained weights, but its result
depends on the extent of the crop or tile, so tiled Encode refuses it.

Every op here is a handful of tensor ops (linearised keys, sort/unique, scatter): no Python
loop over voxels, windows or samples.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import SparseConvTensor, make_sparse

__all__ = [
    "layer_norm",
    "linearize",
    "replace",
    "SparseNorm",
    "SparseSiLU",
    "SparseLinear",
    "child_index",
    "per_child",
    "downsample",
    "subdivide",
    "patchify",
    "unpatchify",
    "sparse_lookup",
    "crop_indices",
    "in_box",
    "CHILD_OFFSETS",
]

#: offsets of the 8 children of a cell, in (i, j, k) order with k fastest
CHILD_OFFSETS = torch.tensor(
    [[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.int32
)


def linearize(indices: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """int64 key of each (batch, i, j, k) row: ``((b * X + i) * Y + j) * Z + k``."""
    idx = indices.long()
    x, y, z = (int(s) for s in spatial_shape)
    return ((idx[:, 0] * x + idx[:, 1]) * y + idx[:, 2]) * z + idx[:, 3]


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, returned in ``x``'s dtype, statistics in fp32.

    On CUDA the kernel takes half inputs and accumulates in fp32 itself, so it runs with
    autocast off: autocast would hand back an fp32 copy of the activation, and the explicit
    ``float()`` / ``to(dtype)`` round trip costs two more passes over it (at a 128^3 crop the
    full-resolution norm then took 6.7 ms of an H200's time, forward and backward). Elsewhere
    the fp32 round trip stays (CPU kernels of reduced precision are slow or missing).
    """
    if x.is_cuda:
        with torch.autocast("cuda", enabled=False):
            w = weight.to(x.dtype) if weight is not None else None
            b = bias.to(x.dtype) if bias is not None else None
            return F.layer_norm(x, x.shape[-1:], w, b, eps)
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)


def replace(x: SparseConvTensor, features: torch.Tensor) -> SparseConvTensor:
    """Same sparsity pattern (and rulebooks), new features."""
    return x.replace_feature(features)


class SparseNorm(nn.Module):
    """Normalisation of the features of each voxel (see the module docstring).

    Args:
        channels: feature channels C.
        mode: ``"layer"`` (per-voxel LayerNorm over C, default), ``"group_voxel"``
            (per-voxel statistics over each group of C/num_groups channels) or ``"group"``
            (per-sample GroupNorm statistics, extent dependent).
        num_groups: groups for the group modes (clipped to divide C).
        eps: numerical epsilon.
        affine: learnable per-channel scale and shift (``weight``, ``bias`` [C]).

    Statistics are computed in fp32 whatever the autocast dtype.
    """

    def __init__(self, channels: int, mode: str = "layer", num_groups: int = 32, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if mode not in ("layer", "group_voxel", "group"):
            raise ValueError(f"norm mode {mode!r} is not one of 'layer', 'group_voxel', 'group'.")
        self.channels = channels
        self.mode = mode
        g = min(num_groups, channels)
        while channels % g:
            g -= 1
        self.num_groups = g
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{self.channels}, mode={self.mode}, num_groups={self.num_groups}"

    def normalize(self, feats: torch.Tensor, batch: torch.Tensor | None = None, batch_size: int = 1) -> torch.Tensor:
        """Normalise a [N, C] feature matrix (``batch`` [N] is needed for ``mode="group"``)."""
        if self.mode == "layer":
            return layer_norm(feats, self.weight, self.bias, self.eps)
        dtype = feats.dtype
        f = feats.float()
        n, c = f.shape
        if self.mode == "group_voxel":
            g = f.view(n, self.num_groups, c // self.num_groups)
            var, mean = torch.var_mean(g, dim=-1, unbiased=False, keepdim=True)
            out = ((g - mean) * torch.rsqrt(var + self.eps)).view(n, c)
        else:
            if batch is None:
                batch = torch.zeros(n, dtype=torch.long, device=f.device)
            batch = batch.long()
            g = f.view(n, self.num_groups, c // self.num_groups)
            cnt = torch.zeros(batch_size, device=f.device).index_add_(0, batch, torch.ones(n, device=f.device))
            cnt = (cnt * (c // self.num_groups)).clamp_min(1.0)[:, None]
            s1 = torch.zeros(batch_size, self.num_groups, device=f.device).index_add_(0, batch, g.sum(-1))
            mean = s1 / cnt
            d = g - mean[batch][..., None]
            s2 = torch.zeros(batch_size, self.num_groups, device=f.device).index_add_(0, batch, (d * d).sum(-1))
            var = s2 / cnt
            out = (d * torch.rsqrt(var + self.eps)[batch][..., None]).view(n, c)
        if self.weight is not None:
            out = out * self.weight.float() + self.bias.float()
        return out.to(dtype)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        batch = x.indices[:, 0] if self.mode == "group" else None
        return replace(x, self.normalize(x.features, batch, x.batch_size))


class SparseSiLU(nn.Module):
    """SiLU on the features."""

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return replace(x, F.silu(x.features))


class SparseLinear(nn.Linear):
    """``nn.Linear`` on the features of a sparse tensor (a 1x1x1 conv)."""

    def forward(self, x):  # type: ignore[override]
        if isinstance(x, SparseConvTensor):
            return replace(x, super().forward(x.features))
        return super().forward(x)


def child_index(indices: torch.Tensor) -> torch.Tensor:
    """Position [N] (0..7) of each voxel inside its parent cell, in :data:`CHILD_OFFSETS` order."""
    c = indices[:, 1:].long() & 1
    return c[:, 0] * 4 + c[:, 1] * 2 + c[:, 2]


def per_child(table: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row ``child_index`` of ``table`` [8, C] for every voxel: [N, C] in ``dtype``.

    A one-hot matrix product rather than ``table[child_index]``: the backward of that gather
    accumulates N rows into 8 with sorted atomics (68 ms at a 128^3 crop on an H100), the
    product's backward is one GEMM.
    """
    # compared with arange rather than F.one_hot, which checks the index range on the host
    one_hot = (child_index(indices)[:, None] == torch.arange(8, device=indices.device)).to(dtype)
    return one_hot @ table.to(dtype)


def _parents(x: SparseConvTensor, factor: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The parent cells of ``x``'s rows: (inverse [N]: each row's parent, parent indices [M, 4] sorted
    by linearised key, the parents' spatial shape)."""
    idx = x.indices.long()
    parents = torch.cat([idx[:, :1], idx[:, 1:] // factor], dim=1)
    shape = [-(-int(s) // factor) for s in x.spatial_shape]
    uniq, inverse = torch.unique(linearize(parents, shape), return_inverse=True)
    out_idx = torch.empty(uniq.numel(), 4, dtype=torch.long, device=idx.device)
    out_idx[inverse] = parents
    return inverse, out_idx, shape


def downsample(x: SparseConvTensor, factor: int = 2) -> SparseConvTensor:
    """Pool by ``factor`` per axis: parent cell ``coords // factor``, features = mean of the children.

    The result is a new tensor (no rulebooks) with ``spatial_shape // factor``; its rows are
    sorted by linearised key.
    """
    inverse, out_idx, shape = _parents(x, factor)
    m = out_idx.shape[0]
    feats = x.features
    summed = torch.zeros(m, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add_(0, inverse, feats)
    count = torch.zeros(m, dtype=feats.dtype, device=feats.device).index_add_(
        0, inverse, torch.ones_like(inverse, dtype=feats.dtype)
    )
    return make_sparse(summed / count[:, None], out_idx, shape, x.batch_size)


def _children(indices: torch.Tensor, factor: int) -> torch.Tensor:
    """Indices [M * factor^3, 4] of all children of each row of ``indices``, parent-major,
    children in (i, j, k) order with k fastest (for factor 2: :data:`CHILD_OFFSETS`)."""
    # built on the device (no host-to-device copy, which would wait for the GPU)
    r = torch.arange(factor, dtype=indices.dtype, device=indices.device)
    off = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).view(-1, 3)
    child = indices[:, None, 1:] * factor + off[None]
    batch = indices[:, None, :1].expand(-1, off.shape[0], 1)
    return torch.cat([batch, child], dim=-1).reshape(-1, 4)


def subdivide(x: SparseConvTensor, factor: int = 2) -> SparseConvTensor:
    """Split every cell into all ``factor^3`` children, each with its parent's features.

    Child rows are grouped by parent (parent-major, children in (i, j, k) order, k fastest).
    """
    k = factor**3
    feats = x.features[:, None, :].expand(-1, k, -1).reshape(-1, x.features.shape[1])
    shape = [int(s) * factor for s in x.spatial_shape]
    return make_sparse(feats, _children(x.indices, factor), shape, x.batch_size)


def patchify(x: SparseConvTensor) -> SparseConvTensor:
    """Gather the 8 children of every cell into its channels: [M, 8 * C], zeros for absent children.

    With a linear layer after it this is a kernel-2, stride-2 conv (children in
    :data:`CHILD_OFFSETS` order, channels child-major). Rows sorted by linearised key.
    """
    inverse, out_idx, shape = _parents(x, 2)
    m, c = out_idx.shape[0], x.features.shape[1]
    slots = inverse * 8 + child_index(x.indices)
    feats = x.features.new_zeros(m * 8, c).index_copy(0, slots, x.features)
    return make_sparse(feats.view(m, 8 * c), out_idx, shape, x.batch_size)


def unpatchify(x: SparseConvTensor) -> SparseConvTensor:
    """Inverse of :func:`patchify`: [M, 8 * C] -> all 8 children of every cell, [8 M, C] each
    (with a linear layer before it, a kernel-2, stride-2 transposed conv)."""
    c = x.features.shape[1] // 8
    shape = [int(s) * 2 for s in x.spatial_shape]
    return make_sparse(x.features.reshape(-1, c), _children(x.indices, 2), shape, x.batch_size)


def sparse_lookup(source: SparseConvTensor, query_indices: torch.Tensor) -> torch.Tensor:
    """Features of ``source`` at ``query_indices`` [M, 4] (batch, i, j, k); 0 where absent.

    Args:
        source: sparse tensor with unique coordinates.
        query_indices: int tensor [M, 4] in the same grid as ``source``.

    Returns:
        [M, C] tensor (dtype and device of ``source.features``).

    Vectorised: linearised int64 keys, one sort of the source keys, ``searchsorted``.
    Queries outside ``source.spatial_shape`` give 0.
    """
    shape = [int(s) for s in source.spatial_shape]
    feats = source.features
    q = query_indices.to(source.indices.device)
    out = torch.zeros(q.shape[0], feats.shape[1], dtype=feats.dtype, device=feats.device)
    if q.shape[0] == 0 or feats.shape[0] == 0:
        return out
    qi = q.long()
    inside = in_box(qi[:, 1:], [0, 0, 0], shape)
    src_keys = linearize(source.indices, shape)
    q_keys = linearize(qi.clamp_min(0), shape)
    sorted_keys, order = torch.sort(src_keys)
    pos = torch.searchsorted(sorted_keys, q_keys).clamp_max(sorted_keys.numel() - 1)
    found = (sorted_keys[pos] == q_keys) & inside
    rows = order[pos]
    out = torch.where(found[:, None], feats.index_select(0, rows), out)
    return out


def crop_indices(indices: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """Bool mask of rows of ``indices`` [N, 4] whose (i, j, k) lie in the box ``[lo, hi)``."""
    return in_box(indices[:, 1:], lo, hi)


def in_box(coords: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """Bool mask of rows of ``coords`` [N, 3] inside the box ``[lo, hi)``."""
    c = coords.long()
    keep = torch.ones(c.shape[0], dtype=torch.bool, device=c.device)
    for a in range(c.shape[1]):  # per axis with Python bounds: no host-to-device copy
        keep &= (c[:, a] >= int(lo[a])) & (c[:, a] < int(hi[a]))
    return keep
