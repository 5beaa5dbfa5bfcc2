"""Tile-by-tile running of the conv parts over the latent grid: each occupied tile plus a halo of
latent cells, results cropped to what the tile owns (see :mod:`networks.vqvae`)."""

from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import torch

from .backend import SparseConvTensor, make_sparse
from .ops import crop_indices, in_box, linearize

__all__ = ["remaining_halos", "crop_to_box", "run_tiles", "sort_rows"]

#: progress of long tile loops (a whole scan on a CPU takes minutes), at most every PROGRESS_SECONDS
logger = logging.getLogger("ctvq.tiles")
PROGRESS_SECONDS = 10.0


def remaining_halos(radii: Sequence[float]) -> list:
    """Per up block of a decoder whose block j consumes ``radii[j]`` latent cells of halo: (scale of
    its output level in voxels per latent cell, margin in those voxels that the later blocks
    still need), for level-by-level cropping of tiles."""
    out = []
    for j in range(len(radii)):
        scale = 2 ** (j + 1)
        out.append((scale, math.ceil(sum(radii[j + 1 :]) * scale)))
    return out


def _occupied_tiles(cells: torch.Tensor, tile: int) -> torch.Tensor:
    """Origins [T, 3] (latent cells) of the tiles holding at least one of ``cells`` [N, 3], in
    (i, j, k) order.

    An occupancy grid of tiles rather than ``torch.unique(..., dim=0)``, whose row sort over the tens
    of millions of voxels of a whole scan took over 20 GB and minutes on a CPU.
    """
    if cells.shape[0] == 0:
        return cells.new_zeros(0, 3, dtype=torch.long)
    t = cells.long() // tile
    ext = (t.max(0).values + 1).tolist()
    occupied = torch.zeros(ext[0] * ext[1] * ext[2], dtype=torch.bool, device=cells.device)
    occupied[(t[:, 0] * ext[1] + t[:, 1]) * ext[2] + t[:, 2]] = True
    key = occupied.nonzero().squeeze(1)
    return torch.stack([key // (ext[1] * ext[2]), key // ext[2] % ext[1], key % ext[2]], 1) * tile


def crop_to_box(x: SparseConvTensor, lo, hi) -> SparseConvTensor:
    """Rows of ``x`` whose (i, j, k) lie in the box ``[lo, hi)``."""
    keep = crop_indices(x.indices, lo, hi)
    return make_sparse(x.features[keep], x.indices[keep], x.spatial_shape, x.batch_size)


def run_tiles(x: SparseConvTensor, cells: torch.Tensor, tile: int, halo: int, run, out_shape,
               channels: int) -> SparseConvTensor:
    """``run(part, origin)`` on the rows of ``x`` whose ``cells`` [N, 3] lie in each occupied tile
    plus ``halo``, results concatenated (``run`` crops its output to what the tile owns)."""
    feats, idx = [], []
    origins = _occupied_tiles(cells, tile).tolist()
    start = last = time.monotonic()
    for n, origin in enumerate(origins, 1):  # loop over tiles, not voxels
        sel = in_box(cells, [o - halo for o in origin], [o + tile + halo for o in origin])
        out = run(make_sparse(x.features[sel], x.indices[sel], x.spatial_shape, x.batch_size), origin)
        feats.append(out.features)
        idx.append(out.indices)
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS and n < len(origins):
            logger.info("%d of %d tiles, %.0f s", n, len(origins), now - start)
            last = now
    if not feats:
        return make_sparse(x.features.new_zeros(0, channels), x.indices.new_zeros(0, 4), out_shape, x.batch_size)
    return make_sparse(torch.cat(feats), torch.cat(idx), out_shape, x.batch_size)


def sort_rows(x: SparseConvTensor) -> SparseConvTensor:
    order = torch.argsort(linearize(x.indices, x.spatial_shape))
    return make_sparse(x.features[order], x.indices[order], x.spatial_shape, x.batch_size)
