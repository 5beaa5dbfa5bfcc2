"""Windowed self-attention over sparse tokens and the transformer block that uses it.

Windows are cubes of ``window_size`` cells in absolute grid coordinates, shifted by ``shift``
(``window id = (coords + shift) // window_size`` per axis, per sample), so a crop and a whole
scan put a token in the same window. All windows are processed in one call of
``torch.nn.functional.scaled_dot_product_attention``: tokens are sorted by window, scattered
into a padded ``[num_windows, max_len, C]`` batch, and a key padding mask hides the padding
(no Python loop over windows). ``max_tokens`` bounds the padded batch for whole-volume
inference by splitting the windows into a few chunks.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

from .ops import layer_norm

#: SDPA kernels for the padded windows: all but cuDNN's, whose fused backward on Hopper returns
#: NaN gradients for some masked lengths (pytorch/pytorch#196678, torch 2.11; the kernel a
#: training step's profile shows). The other kernels compute the same attention.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

__all__ = [
    "WindowPartition",
    "window_partition",
    "grid_window_partition",
    "windowed_attention",
    "SparseWindowAttention",
    "SparseTransformerBlock",
    "AbsolutePositionEmbedder",
]


class WindowPartition(NamedTuple):
    """Tokens grouped by attention window (see :func:`window_partition`)."""

    order: torch.Tensor  # [N] token ids sorted by window
    dest: torch.Tensor  # [N] row of each token (in token order) in the padded [num_windows * length] batch
    valid: torch.Tensor  # [num_windows, length] bool: a token (True) or padding
    counts: torch.Tensor  # [num_windows] tokens per window
    num_windows: int
    length: int  # padded window length: the fullest window, rounded up to a multiple of 8


def window_partition(indices: torch.Tensor, window_size: int, shift: int = 0,
                     spatial_shape: Sequence[int] | None = None) -> WindowPartition:
    """Group tokens by window.

    Args:
        indices: [N, 4] (batch, i, j, k) absolute coordinates.
        window_size: window edge in cells.
        shift: shift of the window grid in cells (0 or window_size // 2).
        spatial_shape: the grid's shape; gives the window grid's extent without asking the GPU
            (one host sync less per partition).

    The padded length is rounded up to a multiple of 8, which keeps GPU SDPA on its fused masked
    kernels. Two host syncs remain: the number of windows and the fullest window.
    """
    idx = indices.long()
    w = (idx[:, 1:] + shift) // window_size
    if spatial_shape is not None:
        ext = [(int(s) - 1 + shift) // window_size + 1 for s in spatial_shape]
    elif idx.shape[0]:
        w = w - w.min(0, keepdim=True).values
        ext = (w.max(0).values + 1).tolist()
    else:
        ext = [1, 1, 1]
    key = ((idx[:, 0] * ext[0] + w[:, 0]) * ext[1] + w[:, 1]) * ext[2] + w[:, 2]
    sorted_key, order = torch.sort(key, stable=True)
    _, window_of_sorted, counts = torch.unique_consecutive(sorted_key, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(idx.shape[0], device=idx.device) - starts[window_of_sorted]
    length = -(-int(counts.max()) // 8) * 8 if counts.numel() else 0
    valid = torch.arange(length, device=idx.device)[None] < counts[:, None]
    dest = torch.empty_like(order).scatter_(0, order, window_of_sorted * length + slot)
    return WindowPartition(order, dest, valid, counts, counts.numel(), length)


def grid_window_partition(indices: torch.Tensor, active: torch.Tensor, origin: torch.Tensor,
                          extent: Sequence[int], window_size: int, shift: int = 0) -> WindowPartition:
    """:func:`window_partition` of every cell of a dense grid, with fixed shapes and no host sync.

    Args:
        indices: [N, 4] absolute (batch, i, j, k) of all ``B * prod(extent)`` cells.
        active: [N] bool: the cells that are tokens; the others are keys of no window (their own
            outputs are computed but mean nothing).
        origin: [B, 3] absolute coordinates of each sample's first cell.
        extent: the grid's (d, h, w) in cells.
        window_size, shift: as :func:`window_partition`.

    Each sample gets ``(e - 1) // window_size + 2`` windows per axis (any origin fits) of
    ``window_size^3`` slots, a cell's slot being its place in its window, so no sort is needed.
    A window without active cells attends over all its slots, which keeps its rows finite.
    """
    idx = indices.long()
    ws = int(window_size)
    per_axis = [(int(e) - 1) // ws + 2 for e in extent]
    a = idx[:, 1:] + shift
    win = a // ws - ((origin.long() + shift) // ws)[idx[:, 0]]
    slot = a % ws
    wid = ((idx[:, 0] * per_axis[0] + win[:, 0]) * per_axis[1] + win[:, 1]) * per_axis[2] + win[:, 2]
    length = ws**3
    dest = wid * length + (slot[:, 0] * ws + slot[:, 1]) * ws + slot[:, 2]
    num_windows = (int(idx.shape[0]) // max(1, math.prod(int(e) for e in extent))) * math.prod(per_axis)
    valid = torch.zeros(num_windows * length, dtype=torch.bool, device=idx.device).index_put_((dest,), active.bool())
    valid = valid.view(num_windows, length)
    valid = valid | ~valid.any(1, keepdim=True)
    return WindowPartition(None, dest, valid, None, num_windows, length)


def windowed_attention(
    qkv: torch.Tensor,
    indices: torch.Tensor,
    window_size: int,
    shift: int = 0,
    max_tokens: int | None = None,
    partition: WindowPartition | None = None,
) -> torch.Tensor:
    """Attention of each token to the tokens of its window.

    Tokens move into the padded batch by one ``index_copy`` and back, already in token order,
    by one ``index_select`` (their backward passes are a gather and an atomic-free add): four
    copies fewer than sorting tokens, padding, unpadding and unsorting one by one, which
    counts in a step whose time goes to launching kernels.

    Args:
        qkv: [N, 3, H, D] packed per-token heads (a fused projection's view; for separate
            ``q, k, v`` pass ``torch.stack([q, k, v], 1)``).
        indices: [N, 4] absolute coordinates (batch, i, j, k).
        window_size, shift: window cube edge and grid shift.
        max_tokens: optional bound on ``num_windows x length`` per SDPA call (inference).
        partition: precomputed :func:`window_partition` of ``indices`` (shared by the blocks).

    Returns:
        [N, H, D] attention output, in token order.
    """
    n, _, h, d = qkv.shape
    if n == 0:
        return qkv[:, 0]
    p = partition if partition is not None else window_partition(indices, window_size, shift)
    nw, length = p.num_windows, p.length
    flat = qkv.reshape(n, 3 * h * d)
    padded = flat.new_zeros(nw * length, 3 * h * d).index_copy(0, p.dest, flat)
    pq, pk, pv = padded.view(nw, length, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [nW, H, L, D]
    mask = p.valid[:, None, None, :]  # [nW, 1, 1, L]: key padding
    step = nw if not max_tokens else max(1, max_tokens // max(length, 1))
    outs = []
    with sdpa_kernel(ATTENTION_BACKENDS):
        for s in range(0, nw, step):  # a single iteration unless max_tokens bounds the batch
            outs.append(F.scaled_dot_product_attention(pq[s : s + step], pk[s : s + step], pv[s : s + step],
                                                       attn_mask=mask[s : s + step]))
    out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).reshape(nw * length, h, d).index_select(0, p.dest)


class SparseWindowAttention(nn.Module):
    """Multi-head windowed self-attention (fused ``to_qkv``, ``to_out``)."""

    def __init__(self, channels: int, num_heads: int, window_size: int = 8, shift: int = 0, qkv_bias: bool = True):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}; pick num_heads dividing it.")
        self.channels = channels
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift = shift
        self.max_tokens: int | None = None
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, feats: torch.Tensor, indices: torch.Tensor, partition: tuple | None = None) -> torch.Tensor:
        n = feats.shape[0]
        qkv = self.to_qkv(feats).view(n, 3, self.num_heads, self.channels // self.num_heads)
        out = windowed_attention(qkv, indices, self.window_size, self.shift, self.max_tokens, partition)
        return self.to_out(out.reshape(n, self.channels))


class FeedForward(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)); x + mlp(LN(x)). LayerNorms are per token (no affine).

    Args:
        channels: token width.
        num_heads: attention heads.
        window_size, shift: attention windows (absolute coordinates).
        mlp_ratio: hidden width of the MLP relative to ``channels``.
        use_checkpoint: recompute the block in backward (``torch.utils.checkpoint``).
    """

    def __init__(self, channels: int, num_heads: int, window_size: int = 8, shift: int = 0, mlp_ratio: float = 4.0, use_checkpoint: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseWindowAttention(channels, num_heads, window_size, shift)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.use_checkpoint = use_checkpoint
    def _forward(self, feats: torch.Tensor, indices: torch.Tensor, partition: tuple | None = None) -> torch.Tensor:
        feats = feats + self.attn(layer_norm(feats, eps=1e-6), indices, partition)
        return feats + self.mlp(layer_norm(feats, eps=1e-6))

    def forward(self, feats: torch.Tensor, indices: torch.Tensor, partition: tuple | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, feats, indices, partition, use_reentrant=False)
        return self._forward(feats, indices, partition)


class AbsolutePositionEmbedder(nn.Module):
    """Sinusoidal embedding of absolute (i, j, k) coordinates (no parameters).

    Per axis ``channels // 3 // 2`` frequencies ``1 / 10000^(f / F)``; sin and cos; zero padded to
    ``channels``.
    """

    def __init__(self, channels: int, in_channels: int = 3):
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels
        self.freq_dim = channels // in_channels // 2
        freqs = torch.arange(self.freq_dim, dtype=torch.float32) / max(self.freq_dim, 1)
        self.register_buffer("freqs", 1.0 / (10000**freqs), persistent=False)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        n = coords.shape[0]
        out = torch.outer(coords.reshape(-1).float(), self.freqs)
        emb = torch.cat([out.sin(), out.cos()], dim=-1).reshape(n, -1)
        if emb.shape[1] < self.channels:
            emb = torch.cat([emb, emb.new_zeros(n, self.channels - emb.shape[1])], dim=-1)
        return emb
