"""Training on a dense box: the patch layout's conv levels as dense ops over a crop's grid.

A training crop of real CT is nearly full, and there the sparse conv levels spend their time on
index work (rulebooks, parent lookups, gathers) and kernel launches, not arithmetic. This module
runs the same weights over a dense, channels-last grid of the crop's box ``[B, D, H, W, C]``
with a mask of the active sites, and gives the same result as the sparse forward pass:

- features are zero outside the active sites wherever a conv reads them (a submanifold conv
  equals a dense conv over zeros, read at the active sites);
- a kernel-2 stride-2 down block (:func:`~networks.ops.patchify` + linear) is a space-to-depth
  reshape + linear, its output active where any child is; an up block's linear + unpatchify is
  a linear + depth-to-space reshape, all 8 children of an active cell active;
- per-voxel norms, SiLU and linears are per-site ops, so values at inactive sites never reach an
  active one.

At the latent grid the active cells are gathered into a sparse tensor, and the transformers and
the quantizer run exactly as in the sparse pass (they see only the cells that hold body); the
decoder's output is scattered back into the grid. Only ``layout="patch"`` with a per-voxel norm
has this path; :func:`supports_grid` says whether a model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import grid_window_partition
from .backend import SparseConvTensor, make_sparse

__all__ = ["GridBatch", "grid_from_sparse", "grid_values_at", "supports_grid", "encode_local", "decode_local",
           "latent_cells", "all_cells", "grid_partitions", "scatter_cells"]


@dataclass
class GridBatch:
    """A batch on a dense grid.

    Attributes:
        values: [B, D, H, W, C] features, channels last, zero outside ``active``.
        active: [B, D, H, W] bool, the active sites.
        origin: [B, 3] int64 (on the values' device): absolute voxel coordinates of each sample's
            grid corner (a multiple of the model's factor, so cells line up with the sparse pass).
        spatial_shape: the full grid the coordinates live in (e.g. [512, 512, 512]).
        crop_faces: [B, 6] int64 or None: per sample, the latent cells of the crop faces that cut the
            scan (:func:`crop_faces`), for ``network_def#vq_crop_margin``.
    """

    values: torch.Tensor
    active: torch.Tensor
    origin: torch.Tensor
    spatial_shape: list
    crop_faces: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])


def grid_from_sparse(x: SparseConvTensor, boxes: torch.Tensor, factor: int = 8) -> GridBatch:
    """The dense grid of a sparse batch whose sample ``b`` lies in ``boxes[b]`` = (lo, hi) voxels.

    Each sample gets its own origin (``lo`` rounded down to ``factor``) and all share the largest
    extent (rounded up to ``factor``).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.int64).cpu()
    lo = boxes[:, :3] // factor * factor
    hi = -(-boxes[:, 3:] // factor) * factor
    d, h, w = (int(v) for v in (hi - lo).amax(0))
    b = int(x.batch_size)
    dev = x.features.device
    origin = lo.to(dev)
    idx = x.indices.long()
    local = idx[:, 1:] - origin[idx[:, 0]]
    rows = ((idx[:, 0] * d + local[:, 0]) * h + local[:, 1]) * w + local[:, 2]
    c = x.features.shape[1]
    values = x.features.new_zeros(b * d * h * w, c).index_copy_(0, rows, x.features)
    active = torch.zeros(b * d * h * w, dtype=torch.bool, device=dev).index_fill_(0, rows, True)
    return GridBatch(values.view(b, d, h, w, c), active.view(b, d, h, w), origin, list(x.spatial_shape))


def grid_values_at(grid: GridBatch, indices: torch.Tensor) -> torch.Tensor:
    """The grid's values [N, C] at absolute (batch, i, j, k) ``indices`` (which must lie in the grid)."""
    idx = indices.long()
    local = idx[:, 1:] - grid.origin[idx[:, 0]]
    return grid.values[idx[:, 0], local[:, 0], local[:, 1], local[:, 2]]


def supports_grid(model) -> bool:
    """Whether ``model`` (a :class:`~networks.SparseVQVAE`) can run on a :class:`GridBatch`."""
    return getattr(model, "layout", None) == "patch" and getattr(model, "norm", None) in ("layer", "group_voxel")


# ---------------------------------------------------------------------------------------------
# per-level ops on channels-last grids


def _space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """[B, D, H, W, C] -> [B, D/2, H/2, W/2, 8C], children in (i, j, k) order, child-major (as patchify)."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, d // 2, h // 2, w // 2, 8 * c)


def _depth_to_space(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_space_to_depth` (as unpatchify)."""
    b, d, h, w, c8 = x.shape
    c = c8 // 8
    x = x.view(b, d, h, w, 2, 2, 2, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, 2 * d, 2 * h, 2 * w, c)


def _pool_active(active: torch.Tensor) -> torch.Tensor:
    b, d, h, w = active.shape
    return active.view(b, d // 2, 2, h // 2, 2, w // 2, 2).any(6).any(4).any(2)


def _expand_active(active: torch.Tensor) -> torch.Tensor:
    b, d, h, w = active.shape
    return active[:, :, None, :, None, :, None].expand(b, d, 2, h, 2, w, 2).reshape(b, 2 * d, 2 * h, 2 * w)


def _conv(module, x: torch.Tensor) -> torch.Tensor:
    """A :class:`~networks.blocks.SparseConv3d` as a dense conv3d (spconv's [Cout, k, k, k, Cin] weight)."""
    conv = module.conv
    w = conv.weight.permute(0, 4, 1, 2, 3)
    out = F.conv3d(x.permute(0, 4, 1, 2, 3), w, conv.bias, padding=conv.weight.shape[1] // 2)
    return out.permute(0, 2, 3, 4, 1)


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[-1]
    return module.normalize(x.reshape(-1, c)).view(x.shape)


def _res_block(block, x: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """:class:`~networks.blocks.SparseResBlock3d`; ``x`` is zero where ``off``, and so is the result."""
    n1, _, c1, n2, _, c2 = block.layers
    h = _conv(c1, F.silu(_norm(n1, x)).masked_fill(off, 0))
    h = _conv(c2, F.silu(_norm(n2, h)).masked_fill(off, 0))
    return x + h.masked_fill(off, 0)


def encode_local(encoder, grid: GridBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv part of a :class:`~networks.vqvae.PatchEncoder`: (latent features [B, d, h, w, C], active [B, d, h, w])."""
    x, active = grid.values, grid.active
    for blk in encoder.downsample:
        active = _pool_active(active)
        off = ~active[..., None]
        x = blk.down(_space_to_depth(x)).masked_fill(off, 0)
        for res in blk.res:
            x = _res_block(res, x, off)
    return x, active


def decode_local(decoder, x: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv part of a :class:`~networks.vqvae.PatchDecoder`: latent grid -> (reconstruction
    [B, D, H, W, out], active [B, D, H, W]: all children of the active latent cells)."""
    for blk in decoder.upsample:
        off = ~active[..., None]
        for res in blk.res:
            x = _res_block(res, x, off)
        norm, _ = blk.act
        x = _depth_to_space(blk.up(F.silu(_norm(norm, x))))
        active = _expand_active(active)
        x = x.masked_fill(~active[..., None], 0)
    return decoder.out_layer(x), active


def latent_cells(x: torch.Tensor, active: torch.Tensor, origin: torch.Tensor, factor: int,
                 latent_shape) -> tuple[SparseConvTensor, torch.Tensor]:
    """The active latent cells of a grid as a sparse tensor (absolute coordinates, sorted as in
    the sparse pass), and their rows in the flattened grid."""
    b, d, h, w, c = x.shape
    rows = active.reshape(-1).nonzero().squeeze(1)
    cell = torch.stack([rows // (d * h * w), rows // (h * w) % d, rows // w % h, rows % w], 1)
    coords = cell.clone()
    coords[:, 1:] += origin[cell[:, 0]] // factor
    return make_sparse(x.reshape(-1, c).index_select(0, rows), coords, latent_shape, b), rows


#: the crop-face coordinate of a face that cuts nothing (beyond any latent grid)
UNCUT = 1 << 40


def crop_faces(box: torch.Tensor, support: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, 6] int64: per sample, the latent-cell coordinates of the crop's faces (low i, j, k, then
    high i, j, k, exclusive) where the crop cuts the scan, i.e. where the scan's support box
    (``support`` [B, 6] voxels) goes on past the crop ``box`` [B, 6]; -``UNCUT`` / ``UNCUT`` for a
    face that cuts nothing (the scan's edge, or a crop holding the whole body)."""
    box, support = torch.as_tensor(box, dtype=torch.int64), torch.as_tensor(support, dtype=torch.int64)
    low = torch.where(box[:, :3] > support[:, :3], box[:, :3] // factor, -UNCUT)
    high = torch.where(box[:, 3:] < support[:, 3:], -(-box[:, 3:] // factor), UNCUT)
    return torch.cat([low, high], 1)


def interior_weights(coords: torch.Tensor, faces: torch.Tensor, margin: int) -> torch.Tensor:
    """[N] 1.0 for the latent cells ``coords`` [N, 4] (sample, absolute cell) at least ``margin``
    cells inside each face of their sample's crop that cuts the scan (``faces`` from
    :func:`crop_faces`), 0.0 for the others: near such a face the encoder sees a context cut by the
    crop (its convs and attention windows stop there), which no cell of a whole scan sees. The
    margin shrinks on an axis cut on both sides that is too short to keep a cell with it. No host sync."""
    f = faces[coords[:, 0].long()]
    low, high, cell = f[:, :3], f[:, 3:], coords[:, 1:].long()
    m = torch.clamp((high - low - 1) // 2, max=int(margin))
    return ((cell - low >= m) & (high - 1 - cell >= m)).all(1).float()


def all_cells(x: torch.Tensor, active: torch.Tensor, origin: torch.Tensor, factor: int,
              latent_shape) -> tuple[SparseConvTensor, torch.Tensor]:
    """Every cell of a latent grid as a token (``B * d * h * w`` of them, whatever holds body: fixed
    shapes, no host sync), and which of them are active."""
    b, d, h, w, c = x.shape
    axes = (torch.arange(n, device=x.device) for n in (b, d, h, w))
    cell = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 4)
    coords = cell.clone()
    coords[:, 1:] += origin[cell[:, 0]] // factor
    return make_sparse(x.reshape(-1, c), coords, latent_shape, b), active.reshape(-1)


def grid_partitions(cells: SparseConvTensor, active: torch.Tensor, origin: torch.Tensor, extent, transformer) -> dict:
    """The attention windows of :func:`all_cells`' tokens for ``transformer``'s blocks, keyed as
    ``_LatentTransformer.transform`` caches them (window size, shift)."""
    ws = transformer.window_size
    return {(ws, blk.attn.shift): grid_window_partition(cells.indices, active, origin, extent, ws, blk.attn.shift)
            for blk in transformer.blocks}


def scatter_cells(features: torch.Tensor, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Features [M, C] of the cells at ``rows`` into a zero grid shaped as ``like``'s [B, d, h, w]."""
    b, d, h, w = like.shape
    out = features.new_zeros(b * d * h * w, features.shape[1]).index_copy(0, rows, features)
    return out.view(b, d, h, w, -1)
