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


import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = [
    "window_partition",
    "windowed_attention",
    "SparseWindowAttention",
    "SparseTransformerBlock",
    "AbsolutePositionEmbedder",
]


def window_partition(indices: torch.Tensor, window_size: int, shift: int = 0):
    """Group tokens by window.

    Args:
        indices: [N, 4] (batch, i, j, k) absolute coordinates.
        window_size: window edge in cells.
        shift: shift of the window grid in cells (0 or window_size // 2).

    Returns:
        order [N] (tokens sorted by window), window_of_sorted [N], slot_of_sorted [N]
        (position inside the window), num_windows, max_len, counts [num_windows].
    """
    idx = indices.long()
    w = (idx[:, 1:] + shift) // window_size
    w = w - w.min(0, keepdim=True).values if idx.shape[0] else w
    ext = (w.max(0).values + 1) if idx.shape[0] else torch.ones(3, dtype=torch.long, device=idx.device)
    key = ((idx[:, 0] * ext[0] + w[:, 0]) * ext[1] + w[:, 1]) * ext[2] + w[:, 2]
    sorted_key, order = torch.sort(key, stable=True)
    uniq, window_of_sorted, counts = torch.unique_consecutive(sorted_key, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(idx.shape[0], device=idx.device) - starts[window_of_sorted]
    max_len = int(counts.max()) if counts.numel() else 0
    return order, window_of_sorted, slot, uniq.numel(), max_len, counts


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    window_size: int,
    shift: int = 0,
    max_tokens: int | None = None,
    partition: tuple | None = None,
) -> torch.Tensor:
    """Attention of each token to the tokens of its window.

    Args:
        q, k, v: [N, H, D] per-token heads.
        indices: [N, 4] absolute coordinates (batch, i, j, k).
        window_size, shift: window cube edge and grid shift.
        max_tokens: optional bound on ``num_windows x max_len`` per SDPA call (inference).
        partition: precomputed :func:`window_partition` of ``indices`` (shared by the blocks).

    Returns:
        [N, H, D] attention output, in token order.
    """
    n, h, d = q.shape
    if n == 0:
        return q
    if partition is None:
        partition = window_partition(indices, window_size, shift)
    order, win, slot, nw, lmax, _ = partition
    lmax = -(-lmax // 8) * 8  # aligned key length: keeps GPU SDPA on its fused masked kernels
    qkv = torch.stack([q, k, v], 0)[:, order]  # [3, N, H, D]
    padded = qkv.new_zeros(3, nw, lmax, h, d)
    padded[:, win, slot] = qkv
    valid = torch.zeros(nw, lmax, dtype=torch.bool, device=q.device)
    valid[win, slot] = True
    mask = valid[:, None, None, :]  # [nW, 1, 1, L]: key padding
    pq, pk, pv = (t.transpose(1, 2) for t in padded)  # [nW, H, L, D]
    step = nw if not max_tokens else max(1, max_tokens // max(lmax, 1))
    outs = []
    for s in range(0, nw, step):  # a single iteration unless max_tokens bounds the batch
        outs.append(F.scaled_dot_product_attention(pq[s : s + step], pk[s : s + step], pv[s : s + step], attn_mask=mask[s : s + step]))
    out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
    out = out.transpose(1, 2)[win, slot]  # [N sorted, H, D]
    res = torch.empty_like(out)
    res[order] = out
    return res


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
        out = windowed_attention(
            qkv[:, 0], qkv[:, 1], qkv[:, 2], indices, self.window_size, self.shift, self.max_tokens, partition
        )
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
        h = F.layer_norm(feats.float(), feats.shape[-1:], eps=1e-6).to(feats.dtype)
        feats = feats + self.attn(h, indices, partition)
        h = F.layer_norm(feats.float(), feats.shape[-1:], eps=1e-6).to(feats.dtype)
        return feats + self.mlp(h)

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
