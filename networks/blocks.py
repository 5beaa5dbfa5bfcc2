"""Convolution blocks of the sparse VQ-VAE: guarded submanifold conv, down and subdivide blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .backend import SparseConvTensor, check_int32_limit, conv_algo, level_key, spconv_torch
from .dense import conv3d_dense, grid_for
from .ops import SparseLinear, SparseNorm, SparseSiLU, downsample, patchify, per_child, replace, subdivide, unpatchify

__all__ = ["SparseConv3d", "SparseDownBlock3d", "SparseSubdivideBlock3d", "SparseResBlock3d", "PatchDownBlock3d", "PatchUpBlock3d"]


class SparseConv3d(nn.Module):
    """Submanifold 3^3 conv (output sites = input sites) through spconv.

    The spconv module is ``self.conv`` (weight [Cout, 3, 3, 3, Cin], KRSC, axis order of the
    indices' (i, j, k) columns). Its ``indice_key`` is the resolution level, so every conv at one
    level reuses one rulebook. The algorithm follows the features' device
    (:func:`networks.backend.conv_algo`). Before running, the int32 guard checks
    ``N x max(Cin, Cout)``; ``name`` (set by the model) is quoted in its error.

    Where the level's voxels fill enough of their bounding box (by default in inference only)
    the same conv runs as a dense ``conv3d`` over that box (:mod:`networks.dense`; same
    result, same weight).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.name = "SparseConv3d"
        self.conv = spconv_torch.SubMConv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias, algo=conv_algo("cpu"))

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        feats = x.features
        widest = max(self.in_channels, self.out_channels)
        grid = grid_for(x, widest)
        if grid is not None:
            w, b = self.conv.weight, self.conv.bias
            if feats.is_cuda:
                return replace(x, conv3d_dense(feats, grid, w, b))
            with torch.autocast(feats.device.type, enabled=False):
                return replace(x, conv3d_dense(feats.to(w.dtype), grid, w, b))
        check_int32_limit(feats.shape[0], widest, feats.dtype, self.name)
        self.conv.algo = conv_algo(feats.device)
        self.conv.indice_key = level_key(x.spatial_shape)
        if feats.dtype != self.conv.weight.dtype and not (feats.is_cuda and torch.is_autocast_enabled("cuda")):
            # spconv casts to fp16 itself under CUDA autocast; elsewhere match the weight dtype
            x = replace(x, feats.to(self.conv.weight.dtype))
        # Always take spconv's training path: its inference path fuses the bias, which the CPU
        # kernels do not support, and skips the autocast cast (fp32 features with fp16 weights
        # then find no GPU kernel: "can't find suitable algorithm for 0").
        training = True
        c = self.conv
        if feats.is_cuda:
            return c._conv_forward(training, x, c.weight, c.bias, name=c.name, sparse_unique_name=c._sparse_unique_name)
        with torch.autocast(feats.device.type, enabled=False):  # spconv's CPU path knows fp32/fp16 only
            return c._conv_forward(training, x, c.weight, c.bias, name=c.name, sparse_unique_name=c._sparse_unique_name)


def _maybe_checkpoint(fn, x, enabled: bool):
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)
    return fn(x)


class SparseDownBlock3d(nn.Module):
    """norm + SiLU, downsample by 2 (mean of children), conv, norm, SiLU, conv; 1x1 skip.

    Args:
        channels: input channels.
        out_channels: output channels.
        norm: :class:`~networks.ops.SparseNorm` mode.
        num_groups: groups for the group norm modes.
        use_checkpoint: recompute in backward.
        child_embedding: add a learned vector per position inside the parent cell (8 x channels,
            zero at init) between norm and SiLU. A plain mean of children is blind to where in
            the cell each child sits (any permutation of the 8 children pools the same), which
            caps detail below the cell size; the position-dependent nonlinearity before pooling
            lets the pooled features tell the children apart. Zero-initialised, so pretrained
            Direct3D-S2 weights behave as before.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int,
        norm: str = "layer",
        num_groups: int = 32,
        use_checkpoint: bool = False,
        child_embedding: bool = True,
    ):
        super().__init__()
        self.act_layers = nn.Sequential(SparseNorm(channels, norm, num_groups), SparseSiLU())
        if child_embedding:
            self.child_embedding = nn.Parameter(torch.zeros(8, channels))
        else:
            self.register_parameter("child_embedding", None)
        self.out_layers = nn.Sequential(
            SparseConv3d(channels, out_channels),
            SparseNorm(out_channels, norm, num_groups),
            SparseSiLU(),
            SparseConv3d(out_channels, out_channels),
        )
        self.skip_connection = SparseLinear(channels, out_channels) if out_channels != channels else nn.Identity()
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: SparseConvTensor) -> SparseConvTensor:
        c = x.features.shape[1]
        # one pooling pass for both paths: [activated | raw] features share the coordinates
        a = self.act_layers[0](x).features
        if self.child_embedding is not None:
            a = a + per_child(self.child_embedding, x.indices, a.dtype)
        a = F.silu(a)
        both = downsample(replace(x, torch.cat([a, x.features], dim=1)))
        h = replace(both, both.features[:, :c])
        skip = self.skip_connection(both.features[:, c:])
        h = self.out_layers(h)
        return replace(h, h.features + skip)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return _maybe_checkpoint(self._forward, x, self.use_checkpoint)


class SparseSubdivideBlock3d(nn.Module):
    """conv + SiLU, subdivide into all 8 children, conv + SiLU.

    Args:
        channels: input channels.
        out_channels: output channels.
        child_embedding: add a learned vector per child position (8 x out_channels, zero at
            init) after subdividing. Without it the 8 children start from identical copies
            and can only differ through their neighbours; with it each child knows where it
            sits in its parent. Zero-initialised, so pretrained copies behave as before.
        use_checkpoint: recompute in backward.
    """

    def __init__(self, channels: int, out_channels: int, use_checkpoint: bool = False, child_embedding: bool = True):
        super().__init__()
        self.act_layers = nn.Sequential(SparseConv3d(channels, out_channels), SparseSiLU())
        self.out_layers = nn.Sequential(SparseConv3d(out_channels, out_channels), SparseSiLU())
        if child_embedding:
            self.child_embedding = nn.Parameter(torch.zeros(8, out_channels))
        else:
            self.register_parameter("child_embedding", None)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: SparseConvTensor) -> SparseConvTensor:
        h = subdivide(self.act_layers(x))
        if self.child_embedding is not None:  # children are parent-major, 8 per parent
            f = h.features
            f = (f.view(-1, 8, f.shape[1]) + self.child_embedding.to(f.dtype)).view(-1, f.shape[1])
            h = replace(h, f)
        return self.out_layers(h)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return _maybe_checkpoint(self._forward, x, self.use_checkpoint)


class SparseResBlock3d(nn.Module):
    """Pre-activation residual block: ``x + conv(SiLU(norm(conv(SiLU(norm(x))))))``, 3^3 convs.

    The second conv starts at zero, so a new block is the identity and deep stacks train from
    the first step. Its convs span cell borders, which is what keeps a lattice out of the output.
    """

    def __init__(self, channels: int, norm: str = "layer", num_groups: int = 32):
        super().__init__()
        self.layers = nn.Sequential(
            SparseNorm(channels, norm, num_groups), SparseSiLU(), SparseConv3d(channels, channels),
            SparseNorm(channels, norm, num_groups), SparseSiLU(), SparseConv3d(channels, channels),
        )
        nn.init.zeros_(self.layers[-1].conv.weight)
        nn.init.zeros_(self.layers[-1].conv.bias)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return replace(x, x.features + self.layers(x).features)


class PatchDownBlock3d(nn.Module):
    """Kernel-2 stride-2 conv (:func:`~networks.ops.patchify` + linear), then residual blocks.

    Args:
        channels: input channels.
        out_channels: output channels.
        num_res_blocks: :class:`SparseResBlock3d` after the downsample.
        norm, num_groups: norm of the residual blocks.
        use_checkpoint: recompute in backward.
    """

    def __init__(self, channels: int, out_channels: int, num_res_blocks: int = 1, norm: str = "layer",
                 num_groups: int = 32, use_checkpoint: bool = False):
        super().__init__()
        self.down = SparseLinear(8 * channels, out_channels)
        self.res = nn.Sequential(*(SparseResBlock3d(out_channels, norm, num_groups) for _ in range(num_res_blocks)))
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return self.res(self.down(patchify(x)))

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return _maybe_checkpoint(self._forward, x, self.use_checkpoint)


class PatchUpBlock3d(nn.Module):
    """Residual blocks, then norm + SiLU and a kernel-2 stride-2 transposed conv (linear to
    8 x out_channels + :func:`~networks.ops.unpatchify`): every cell emits all 8 children."""

    def __init__(self, channels: int, out_channels: int, num_res_blocks: int = 1, norm: str = "layer",
                 num_groups: int = 32, use_checkpoint: bool = False):
        super().__init__()
        self.res = nn.Sequential(*(SparseResBlock3d(channels, norm, num_groups) for _ in range(num_res_blocks)))
        self.act = nn.Sequential(SparseNorm(channels, norm, num_groups), SparseSiLU())
        self.up = SparseLinear(channels, 8 * out_channels)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return unpatchify(self.up(self.act(self.res(x))))

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return _maybe_checkpoint(self._forward, x, self.use_checkpoint)
