"""Sparse VQ-VAE: 8x per axis down to a latent grid of codes, and back.

Two layouts share the quantizer, the latent transformers and the tiling:

- ``layout="patch"`` (default; its ``bench/quality.py`` runs are in bench/README.md): full resolution is touched once on
  the way in (a kernel-2 stride-2 conv, :func:`~networks.ops.patchify` + linear) and once on the
  way out (linear + :func:`~networks.ops.unpatchify`, a transposed conv), and the work happens
  at 1/2, 1/4 and 1/8 resolution in residual blocks of 3^3 submanifold convs, which span cell
  borders at every level. Encoder: down blocks -> linear -> position embedding -> windowed
  transformer blocks -> LayerNorm -> linear -> latent. Decoder: linear -> transformer blocks ->
  LayerNorm -> linear -> up blocks (residual blocks, then all 8 children of every cell).
- ``layout="direct3d"``: the Direct3D-S2 sparse VAE, kept for its pretrained weights. Encoder:
  linear 1 -> channels[0] at full resolution; down blocks (norm + SiLU, mean-pool by 2, two
  submanifold 3^3 convs, 1x1 skip); the transformer part as above. Decoder: transformer;
  subdivide blocks (conv, split into all 8 children, conv); linear -> 1. Two zero-initialised
  additions (learned position-in-parent embeddings) let children differ; ``child_embedding=False``
  gives exactly the original.

Whole volumes: the transformers see all latent tokens at once (cheap), the conv parts run tile
by tile over the latent grid with a halo of ``Encoder.halo`` / ``Decoder.halo`` latent cells,
the sum of the radii of their convs in latent units rounded up. Norms are per voxel and windows
use absolute coordinates, so the tiled result equals the untiled one. Decoder tiles shrink
level by level (:meth:`remaining_halos`), so the costly high-resolution layers only see the tile
plus the margin the later layers still need.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from . import grid
from .attention import AbsolutePositionEmbedder, SparseTransformerBlock, window_partition
from .backend import SparseConvTensor, make_sparse
from .blocks import PatchDownBlock3d, PatchUpBlock3d, SparseConv3d, SparseDownBlock3d, SparseSubdivideBlock3d
from .grid import GridBatch, supports_grid
from .ops import SparseLinear, layer_norm, replace
from .quantizer import build_quantizer
from .tiling import crop_to_box, remaining_halos, run_tiles, sort_rows

logger = logging.getLogger(__name__)

__all__ = ["Tokens", "SparseEncoder", "SparseDecoder", "PatchEncoder", "PatchDecoder", "SparseVQVAE", "Direct3DS2_VQVAE",
           "count_parameters", "LAYOUTS"]


@dataclass
class Tokens:
    """Discrete latent of a batch: one code per active latent cell.

    Attributes:
        coords: [M, 4] int32 (batch, latent i, j, k), sorted by (batch, i, j, k).
        indices: int64 code indices: [M] for a single-level quantizer, [M, D] (one column per
            residual level, coarsest first) for ``vq_depth`` D > 1.
        batch_size: number of samples.
        latent_shape: latent grid (e.g. (64, 64, 64)).
    """

    coords: torch.Tensor
    indices: torch.Tensor
    batch_size: int
    latent_shape: tuple

    def to(self, device) -> "Tokens":
        return Tokens(self.coords.to(device), self.indices.to(device), self.batch_size, tuple(self.latent_shape))

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class _LatentTransformer(nn.Module):
    """Input linear, absolute position embedding, windowed transformer blocks.

    The encoders and decoders below take these settings (``model_channels``, ``num_blocks``,
    ``num_heads``, ``window_size``, ``mlp_ratio``) as keyword arguments and pass them on.
    """

    def __init__(self, in_channels: int, model_channels: int = 512, num_blocks: int = 4, num_heads: int = 8,
                 window_size: int = 8, mlp_ratio: float = 4.0, use_checkpoint: bool = False):
        super().__init__()
        self.model_channels = model_channels
        self.window_size = window_size
        self.input_layer = SparseLinear(in_channels, model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(
                model_channels, num_heads, window_size, (window_size // 2) * (i % 2), mlp_ratio, use_checkpoint
            )
            for i in range(num_blocks)
        )

    def transform(self, x: SparseConvTensor, partitions: dict | None = None) -> SparseConvTensor:
        """Input linear, position embedding and the blocks.

        ``partitions`` caches the window partitions of ``x.indices`` by (window size, shift); pass
        the same dict to the encoder and the decoder of one forward pass (same latent cells) to
        build each partition once.
        """
        h = self.input_layer(x.features) + self.pos_embedder(x.indices[:, 1:]).to(x.features.dtype)
        parts = {} if partitions is None else partitions
        for blk in self.blocks:
            key = (self.window_size, blk.attn.shift)
            if key not in parts:
                parts[key] = window_partition(x.indices, self.window_size, blk.attn.shift, x.spatial_shape)
            h = blk(h, x.indices, parts[key])
        return replace(x, h)


class SparseEncoder(_LatentTransformer):
    """Full-resolution sparse input [N, in_channels] -> latent tokens [M, latent_channels]."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 512), latent_channels: int = 32,
                 norm: str = "layer", num_groups: int = 32, use_checkpoint: bool = False, child_embedding: bool = True,
                 **transformer):
        super().__init__(channels[-1], use_checkpoint=use_checkpoint, **transformer)
        self.input_layer1 = SparseLinear(in_channels, channels[0])
        self.downsample = nn.ModuleList(
            SparseDownBlock3d(channels[i], channels[i + 1], norm, num_groups, use_checkpoint, child_embedding)
            for i in range(len(channels) - 1)
        )
        self.out_layer = SparseLinear(self.model_channels, latent_channels)
        self.norm = norm
        self.factor = 2 ** (len(channels) - 1)
        n = len(self.downsample)
        # two radius-1 convs after each pooling; cell size after pooling l is 2^(l-n) latent cells
        self.halo = math.ceil(sum(2 * 2.0 ** (l - n) for l in range(1, n + 1)))
        self.apply(_init_linear)

    def forward_local(self, x: SparseConvTensor) -> SparseConvTensor:
        """Conv part: full resolution -> latent grid, channels[-1] features."""
        h = self.input_layer1(x)
        for blk in self.downsample:
            h = blk(h)
        return h

    def forward_global(self, h: SparseConvTensor, partitions: dict | None = None) -> SparseConvTensor:
        """Transformer part on all latent tokens, then LayerNorm and output linear."""
        h = self.transform(h, partitions)
        f = h.features
        f = layer_norm(f)
        return replace(h, self.out_layer(f))

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return self.forward_global(self.forward_local(x))


class SparseDecoder(_LatentTransformer):
    """Latent tokens [M, latent_channels] -> all 8^3 children per token at full resolution [M*512, 1]."""

    def __init__(self, out_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 512), latent_channels: int = 32,
                 use_checkpoint: bool = False, child_embedding: bool = True, **transformer):
        super().__init__(latent_channels, use_checkpoint=use_checkpoint, **transformer)
        ups = [self.model_channels] + list(channels[-2::-1])
        self.upsample = nn.ModuleList(
            SparseSubdivideBlock3d(ups[i], ups[i + 1], use_checkpoint, child_embedding) for i in range(len(ups) - 1)
        )
        self.out_layer = SparseLinear(channels[0], out_channels)
        self.out_channels = out_channels
        self.factor = 2 ** len(self.upsample)
        # block j: radius-1 conv at cell size 2^-j, subdivide, radius-1 conv at 2^-(j+1)
        self.radii = [2.0**-j + 2.0 ** -(j + 1) for j in range(len(self.upsample))]
        self.halo = math.ceil(sum(self.radii))
        self.apply(_init_linear)

    def remaining_halos(self) -> list:
        return remaining_halos(self.radii)

    def forward_global(self, z: SparseConvTensor, partitions: dict | None = None) -> SparseConvTensor:
        return self.transform(z, partitions)

    def forward_local(self, h: SparseConvTensor) -> SparseConvTensor:
        for blk in self.upsample:
            h = blk(h)
        return self.out_layer(h)

    def forward(self, z: SparseConvTensor, partitions: dict | None = None) -> SparseConvTensor:
        return self.forward_local(self.forward_global(z, partitions))


class PatchEncoder(_LatentTransformer):
    """Full-resolution sparse input -> latent tokens, through kernel-2 stride-2 downsamples and
    residual blocks at 1/2, 1/4, ... resolution (``channels`` are their widths)."""

    def __init__(self, in_channels=1, channels=(32, 64, 128), latent_channels=32, norm="layer", num_groups=32,
                 use_checkpoint=False, num_res_blocks=1, **transformer):
        super().__init__(channels[-1], use_checkpoint=use_checkpoint, **transformer)
        widths = [in_channels, *channels]
        self.downsample = nn.ModuleList(
            PatchDownBlock3d(widths[i], widths[i + 1], num_res_blocks, norm, num_groups, use_checkpoint)
            for i in range(len(channels))
        )
        self.out_layer = SparseLinear(self.model_channels, latent_channels)
        self.norm = norm
        n = len(channels)
        self.factor = 2**n
        # level l's convs (2 per residual block) have a radius of one cell of 2^(l+1-n) latent cells
        self.halo = math.ceil(sum(2 * num_res_blocks * 2.0 ** (l + 1 - n) for l in range(n)))
        self.apply(_init_linear)

    def forward_local(self, x: SparseConvTensor) -> SparseConvTensor:
        for blk in self.downsample:
            x = blk(x)
        return x

    forward_global = SparseEncoder.forward_global
    forward = SparseEncoder.forward


class PatchDecoder(_LatentTransformer):
    """Latent tokens -> all 8^n children per token at full resolution, through residual blocks
    and kernel-2 stride-2 transposed convs (``channels`` as in :class:`PatchEncoder`)."""

    def __init__(self, out_channels=1, channels=(32, 64, 128), latent_channels=32, norm="layer", num_groups=32,
                 use_checkpoint=False, num_res_blocks=1, **transformer):
        super().__init__(latent_channels, use_checkpoint=use_checkpoint, **transformer)
        self.proj = SparseLinear(self.model_channels, channels[-1])
        widths = [out_channels, *channels][::-1]
        self.upsample = nn.ModuleList(
            PatchUpBlock3d(widths[i], widths[i + 1], num_res_blocks, norm, num_groups, use_checkpoint)
            for i in range(len(channels))
        )
        self.out_layer = nn.Identity()
        self.out_channels = out_channels
        self.factor = 2 ** len(channels)
        # block j's residual convs run at cells of 2^-j latent cells, before its upsample
        self.radii = [2 * num_res_blocks * 2.0**-j for j in range(len(channels))]
        self.halo = math.ceil(sum(self.radii))
        self.apply(_init_linear)

    remaining_halos = SparseDecoder.remaining_halos

    def forward_global(self, z: SparseConvTensor, partitions: dict | None = None) -> SparseConvTensor:
        h = self.transform(z, partitions)
        return replace(h, self.proj(layer_norm(h.features)))

    forward_local = SparseDecoder.forward_local
    forward = SparseDecoder.forward


#: network layouts: ``patch`` (default) and ``direct3d`` (loads Direct3D-S2 weights)
LAYOUTS = ("patch", "direct3d")


class SparseVQVAE(nn.Module):
    """Sparse VQ-VAE for CT windows (see the module docstring for the two layouts).

    Args:
        resolution: latent grid edge (64 for a 512^3 volume).
        model_channels: transformer width.
        latent_channels: code dimension D.
        num_embeddings: codebook size K.
        channels: conv widths. ``patch``: at 1/2, 1/4, ... resolution, one downsample by 2 each
            (default (32, 64, 128)); ``direct3d``: full resolution first, len(channels) - 1
            poolings by 2 (default (32, 64, 128, 512)).
        layout: ``"patch"`` (default) or ``"direct3d"`` (Direct3D-S2, for its weights).
        num_res_blocks: residual blocks per level (``patch`` only).
        num_blocks: transformer blocks in the encoder and in the decoder.
        num_heads: attention heads.
        window_size: attention window edge in latent cells (shift window_size // 2 every other block).
        use_checkpoint: activation checkpointing of transformer and conv blocks.
        codebook_update: ``"gradient"`` or ``"ema"``.
        lambda_vq, lambda_commitment: loss weights (stored for the trainer; losses are returned unweighted).
        in_channels, out_channels: feature channels of input and reconstruction.
        mlp_ratio: transformer MLP width ratio.
        norm: conv-block norm, ``"layer"`` (per voxel, default), ``"group_voxel"`` or ``"group"``
            (per sample, extent dependent, not tileable).
        num_groups: groups of the group norms.
        vq_kmeans_init, vq_kmeans_init_points, vq_reservoir_size, vq_restart_every,
        vq_dead_code_steps, vq_dead_code_share, vq_ema_decay: see :class:`~networks.quantizer.VectorQuantizer`.
        vq_type: ``"vq"`` (plain lookup, ``vq.embeddings.weight`` [K, latent_channels]),
            ``"factorized"`` (l2-normalised lookup in ``vq_lookup_dim`` dimensions), ``"simvq"`` (a fixed basis times one learned map) or ``"fsq"``
            (finite scalar quantisation with ``fsq_levels``, prod(levels) codes).
        vq_depth: residual levels D (1: one code per latent cell); ``vq_depth_dropout`` trains
            on a random prefix of the levels so any depth <= D decodes.
        vq_entropy_weight: weight of the codebook usage loss (``losses["entropy"]``, returned
            weighted; 0: none; ``fsq`` has no codebook and ignores it): see :class:`~networks.quantizer.VectorQuantizer`.
        vq_entropy_scope: ``"sample"`` (default: the usage loss spreads each sample over the book by
            itself) or ``"batch"`` (the batch as a whole).
        vq_entropy_rows, vq_entropy_temperature: latents the usage loss looks at per step, and the
            softness of its assignments: see :class:`~networks.quantizer.VectorQuantizer`.
        vq_crop_margin: in training on crops, latent cells within this many cells of a crop face that
            cuts the scan (the batch's ``crop_faces``) are left out of the codebook's losses and statistics (k-means,
            usage, restarts): their latents see a context cut by the crop, which no cell of a whole
            scan sees at inference, and a book fitted to them holds codes whole scans seldom use
            (0: every cell counts). The decoder still trains on every cell.
        attn_max_tokens: bound on padded window tokens per attention call (None: one call).
        child_embedding: learned position-in-parent embeddings in the down and subdivide blocks
            of the ``direct3d`` layout (zero at init; False gives exactly the Direct3D-S2 layout).
    """

    grid_convs = (grid.encode_local, grid.decode_local)  # the grid path's conv levels; see compile_grid

    def __init__(
        self,
        resolution: int = 64,
        model_channels: int = 512,
        latent_channels: int = 32,
        num_embeddings: int = 8192,
        channels: Sequence[int] | None = None,
        num_blocks: int = 4,
        num_heads: int = 8,
        window_size: int = 8,
        use_checkpoint: bool = False,
        codebook_update: str = "gradient",
        lambda_vq: float = 1.0,
        lambda_commitment: float = 0.25,
        in_channels: int = 1,
        out_channels: int = 1,
        mlp_ratio: float = 4.0,
        norm: str = "layer",
        num_groups: int = 32,
        vq_kmeans_init: bool = False,
        vq_kmeans_init_points: int = 65536,
        vq_reservoir_size: int = 65536,
        vq_restart_every: int = 0,
        vq_dead_code_steps: int = 1000,
        vq_dead_code_share: float = 0.0,
        vq_ema_decay: float = 0.99,
        attn_max_tokens: int | None = None,
        child_embedding: bool = True,
        layout: str = "patch",
        num_res_blocks: int = 1,
        vq_type: str = "vq",
        vq_depth: int = 1,
        vq_lookup_dim: int = 8,
        fsq_levels: Sequence[int] = (8, 8, 8, 4, 4),
        vq_depth_dropout: bool = True,
        vq_entropy_weight: float = 0.0,
        vq_entropy_scope: str = "sample",
        vq_entropy_rows: int = 4096,
        vq_entropy_temperature: float = 0.1,
        vq_crop_margin: int = 0,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of {sorted(LAYOUTS)}; set network_def#layout to one of those.")
        if channels is None:
            channels = (32, 64, 128) if layout == "patch" else (32, 64, 128, 512)
        channels = tuple(int(c) for c in channels)
        if len(channels) < (1 if layout == "patch" else 2):
            raise ValueError(f"channels={channels} has too few levels for layout {layout!r}.")
        self.layout = layout
        self.resolution = resolution
        self.model_channels = model_channels
        self.latent_channels = latent_channels
        self.num_embeddings = num_embeddings
        self.channels = channels
        self.lambda_vq = lambda_vq
        self.lambda_commitment = lambda_commitment
        self.norm = norm
        common = dict(channels=channels, model_channels=model_channels, latent_channels=latent_channels,
                      num_blocks=num_blocks, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                      use_checkpoint=use_checkpoint)
        if layout == "patch":
            extra = dict(norm=norm, num_groups=num_groups, num_res_blocks=num_res_blocks)
            self.Encoder = PatchEncoder(in_channels, **common, **extra)
            self.Decoder = PatchDecoder(out_channels, **common, **extra)
        else:
            self.Encoder = SparseEncoder(in_channels, **common, norm=norm, num_groups=num_groups, child_embedding=child_embedding)
            self.Decoder = SparseDecoder(out_channels, **common, child_embedding=child_embedding)
        self.vq = build_quantizer(
            vq_type,
            vq_depth,
            num_embeddings,
            latent_channels,
            lookup_dim=vq_lookup_dim,
            fsq_levels=fsq_levels,
            depth_dropout=vq_depth_dropout,
            codebook_update=codebook_update,
            ema_decay=vq_ema_decay,
            kmeans_init=vq_kmeans_init,
            kmeans_init_points=vq_kmeans_init_points,
            reservoir_size=vq_reservoir_size,
            restart_every=vq_restart_every,
            dead_code_steps=vq_dead_code_steps,
            dead_code_share=vq_dead_code_share,
            entropy_weight=vq_entropy_weight,
            entropy_scope=vq_entropy_scope,
            entropy_rows=vq_entropy_rows,
            entropy_temperature=vq_entropy_temperature,
        )
        self.num_embeddings = self.vq.num_embeddings
        self.vq_depth = int(vq_depth)
        if int(vq_crop_margin) < 0:
            raise ValueError(f"vq_crop_margin={vq_crop_margin} must be >= 0 (latent cells; 0 lets every cell of a crop count)")
        self.vq_crop_margin = int(vq_crop_margin)
        self.factor = self.Encoder.factor
        self.last_indices: torch.Tensor | None = None
        for name, mod in self.named_modules():
            if isinstance(mod, SparseConv3d):
                mod.name = name
        self.set_attn_max_tokens(attn_max_tokens)

    # ------------------------------------------------------------------ helpers
    def set_attn_max_tokens(self, max_tokens: int | None) -> None:
        """Bound the padded tokens of one attention call (whole-volume inference on small GPUs)."""
        for mod in self.modules():
            if hasattr(mod, "max_tokens") and hasattr(mod, "to_qkv"):
                mod.max_tokens = max_tokens

    @property
    def latent_shape(self) -> tuple:
        return (self.resolution,) * 3

    def weighted_vq_loss(self, losses: dict) -> torch.Tensor:
        """``lambda_vq * vq + lambda_commitment * commitment + entropy`` (the usage loss comes weighted)."""
        return self.lambda_vq * losses["vq"] + self.lambda_commitment * losses["commitment"] + losses.get("entropy", 0.0)

    def compile_grid(self, **options) -> None:
        """Run the grid path's conv levels through ``torch.compile`` (``options`` are its keyword arguments).

        Each per-voxel norm, SiLU and mask then runs as one fused kernel instead of several passes
        over the grid: the same result to float rounding, a faster step and fewer saved activations.
        The first forward and backward of a new grid shape compile (minutes on two CPU cores); after
        the second shape the compiled code takes any shape.
        """
        self.grid_convs = (torch.compile(grid.encode_local, **options), torch.compile(grid.decode_local, **options))

    def __getstate__(self):
        # compiled functions do not pickle: a saved or copied model runs the plain grid path
        state = super().__getstate__()  # a copy, without what nn.Module.compile() added
        state.pop("grid_convs", None)
        return state

    # ------------------------------------------------------------------ training forward
    def forward(self, x: SparseConvTensor | GridBatch, quantize: bool = True, all_cells: bool = False,
                crop_faces: torch.Tensor | None = None):
        """Encode, (quantise), decode.

        Args:
            x: input ``SparseConvTensor`` (features [N, 1], indices (batch, i, j, k) in the full grid),
                or the same crop as a :class:`~networks.grid.GridBatch` (``layout="patch"``; the
                conv levels then run as dense ops over the crop's box, same result).
            quantize: False bypasses the quantizer (stage-0 autoencoder pretraining).
            crop_faces: for a ``SparseConvTensor`` of training crops, where they cut their scans
                (``networks.grid.crop_faces``; a ``GridBatch`` carries its own), for ``vq_crop_margin``.
            all_cells: with a ``GridBatch``, every cell of the latent grid is a token (those outside
                the body masked out of attention and losses): the same result for the cells that
                hold body, with shapes fixed by the grid's and no host sync, as a CUDA graph needs.
                The codebook's bookkeeping then waits for :meth:`finish_quantizer_step`.

        Returns:
            recon: at full resolution, all 8^3 children of every active latent cell: a
            ``SparseConvTensor`` with features [M, 1], or for a ``GridBatch`` input a ``GridBatch``
            whose ``active`` marks those children; losses: ``{"vq", "commitment"}`` 0-dim,
            unweighted (zeros when ``quantize`` is False), and ``"entropy"`` (weighted) in training
            with ``vq_entropy_weight > 0``. The code indices are kept in
            ``self.last_indices``.
        """
        if isinstance(x, GridBatch):
            return self._forward_grid(x, quantize, all_cells)
        latent, losses = self._forward_latent_counted(self.Encoder.forward_local(x), quantize, crop_faces)
        return self.Decoder.forward_local(latent), losses

    def _crop_weights(self, cells: torch.Tensor, faces: torch.Tensor | None, quantize: bool) -> torch.Tensor | None:
        """Weights of the latent cells ``cells`` [N, 4] for the codebook: those within
        ``vq_crop_margin`` cells of a face that cuts the scan get 0 (None: every cell counts)."""
        if not (self.vq_crop_margin and quantize and self.training):
            return None
        if faces is None:
            if not getattr(self, "_warned_no_faces", False):
                self._warned_no_faces = True
                logger.warning("vq_crop_margin=%d: this batch does not say where its crops cut the scans (a batch of "
                               "pipeline.dataset has 'box' and 'support'); every latent cell counts", self.vq_crop_margin)
            return None
        return grid.interior_weights(cells, faces.to(cells.device), self.vq_crop_margin)

    def _forward_latent_counted(self, h: SparseConvTensor, quantize: bool, faces: torch.Tensor | None):
        """:meth:`_forward_latent` of the active cells, the cells near a cut crop face left out of the
        codebook's losses and statistics (its bookkeeping then done here, eagerly)."""
        weights = self._crop_weights(h.indices, faces, quantize)
        out = self._forward_latent(h, quantize, weights=weights)
        if weights is not None:
            self.finish_quantizer_step()
        return out

    def _forward_latent(self, h: SparseConvTensor, quantize: bool, partitions: dict | None = None,
                        weights: torch.Tensor | None = None) -> tuple[SparseConvTensor, dict]:
        """Latent cells of the encoder's conv part -> input of the decoder's conv part, and the VQ
        losses (rows weighted by ``weights``)."""
        partitions = {} if partitions is None else partitions  # encoder and decoder attend over the same latent cells
        h = self.Encoder.forward_global(h, partitions)
        if quantize:
            z, idx, losses = self.vq(h.features, h.indices[:, 0], h.batch_size, weights)
            self.last_indices = idx.detach()
        else:
            z = h.features
            zero = z.new_zeros((), dtype=torch.float32)
            losses = {"vq": zero, "commitment": zero.clone()}
            self.last_indices = None
        return self.Decoder.forward_global(replace(h, z), partitions), losses

    def _forward_grid(self, x: GridBatch, quantize: bool, all_cells: bool = False):
        if not supports_grid(self):
            raise ValueError(f"a GridBatch needs layout='patch' with a per-voxel norm; this model has layout={self.layout!r}, "
                             f"norm={self.norm!r}: pass a SparseConvTensor")
        encode_local, decode_local = self.grid_convs
        feats, active = encode_local(self.Encoder, x)
        latent_shape = [-(-int(s) // self.factor) for s in x.spatial_shape]
        if all_cells:
            cells, on = grid.all_cells(feats, active, x.origin, self.factor, latent_shape)
            parts = grid.grid_partitions(cells, on, x.origin // self.factor, feats.shape[1:4], self.Encoder)
            interior = self._crop_weights(cells.indices, x.crop_faces, quantize)
            latent, losses = self._forward_latent(cells, quantize, parts, on.float() if interior is None else on.float() * interior)
            z = latent.features.view(*feats.shape[:4], -1).masked_fill(~active[..., None], 0)
        else:
            cells, rows = grid.latent_cells(feats, active, x.origin, self.factor, latent_shape)
            latent, losses = self._forward_latent_counted(cells, quantize, x.crop_faces)
            z = grid.scatter_cells(latent.features, rows, active)
        out, out_active = decode_local(self.Decoder, z, active)
        return GridBatch(out, out_active, x.origin, x.spatial_shape), losses

    @torch.no_grad()
    def finish_quantizer_step(self) -> None:
        """The codebook bookkeeping an ``all_cells`` training forward left (usage counts, reservoir,
        dead-code restarts); call it once after each such step."""
        for mod in self.vq.modules():
            if hasattr(mod, "finish_step"):
                mod.finish_step()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode_latent(self, x: SparseConvTensor, tile: int | None = None) -> SparseConvTensor:
        """Continuous latent (before quantisation), rows sorted by (batch, i, j, k).

        Args:
            x: full-resolution input.
            tile: latent-grid tile edge for the conv part (None: in one piece).
        """
        if tile:
            if self.norm == "group":
                raise ValueError("tiled Encode needs a per-voxel norm; this model uses norm='group' (per sample): encode untiled.")
            h = self._encode_local_tiled(x, int(tile))
        else:
            h = self.Encoder.forward_local(x)
        h = sort_rows(h)
        return self.Encoder.forward_global(h)

    def _encode_local_tiled(self, x: SparseConvTensor, tile: int) -> SparseConvTensor:
        f = self.factor
        latent_shape = [-(-int(s) // f) for s in x.spatial_shape]

        def run(sub, origin):
            return crop_to_box(self.Encoder.forward_local(sub), origin, [o + tile for o in origin])

        cells = x.indices[:, 1:].long() // f
        return run_tiles(x, cells, tile, self.Encoder.halo, run, latent_shape, self.channels[-1])

    @torch.no_grad()
    def Encode(self, x: SparseConvTensor, tile: int | None = None) -> Tokens:
        """Input -> :class:`Tokens` (one code per active latent cell, sorted by (batch, i, j, k)).

        Args:
            x: full-resolution ``SparseConvTensor``.
            tile: latent tile edge for whole volumes (e.g. 16); None runs in one piece.
        """
        h = self.encode_latent(x, tile)
        idx = self.vq.quantize_indices(h.features)
        return Tokens(h.indices.to(torch.int32), idx, int(x.batch_size), tuple(int(s) for s in h.spatial_shape))


    @torch.no_grad()
    def decode_latent(self, z: SparseConvTensor, tile: int | None = None) -> SparseConvTensor:
        """Latent ``SparseConvTensor`` (continuous or code vectors) -> full-resolution reconstruction."""
        h = self.Decoder.forward_global(z)
        if not tile:
            return self.Decoder.forward_local(h)
        tile = int(tile)
        shrink = self.Decoder.remaining_halos()

        def run(out, origin):
            for blk, (scale, margin) in zip(self.Decoder.upsample, shrink):
                # keep only what the remaining layers still need: the halo shrinks level by level
                lo, hi = [o * scale - margin for o in origin], [(o + tile) * scale + margin for o in origin]
                out = crop_to_box(blk(out), lo, hi)
            return self.Decoder.out_layer(out)

        out_shape = [int(s) * self.Decoder.factor for s in h.spatial_shape]
        return run_tiles(h, h.indices[:, 1:].long(), tile, self.Decoder.halo, run, out_shape, self.Decoder.out_channels)

    @torch.no_grad()
    def Decode(self, tokens: Tokens, tile: int | None = None, depth: int | None = None) -> SparseConvTensor:
        """:class:`Tokens` -> reconstruction (all 8^3 children of every token, features [M*512, 1]).

        Args:
            tokens: codes and latent coordinates.
            tile: latent tile edge for whole volumes (e.g. 16); None runs in one piece.
            depth: decode the first ``depth`` residual levels (None: all the tokens hold).
        """
        idx = tokens.indices
        if depth is not None:
            if idx.dim() == 1 or not 1 <= int(depth) <= idx.shape[1]:
                held = 1 if idx.dim() == 1 else idx.shape[1]
                raise ValueError(f"depth {depth}: these tokens hold {held} level(s); pass a depth from 1 to {held}.")
            idx = idx[:, : int(depth)]
        z = self.vq.lookup(idx.to(next(self.parameters()).device))
        lat = make_sparse(z, tokens.coords.to(z.device), tokens.latent_shape, tokens.batch_size)
        return self.decode_latent(lat, tile)


#: name kept from the original seed code
Direct3DS2_VQVAE = SparseVQVAE
