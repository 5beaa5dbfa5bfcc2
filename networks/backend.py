"""Sparse backend: spconv's ``SparseConvTensor`` is the one sparse type of the package.

On import this module

- imports spconv and picks the convolution algorithm (:func:`conv_algo`): ``ConvAlgo.Native``
  on CPU, implicit GEMM on GPU; the ``SPCONV_ALGO`` environment variable (``native``,
  ``mask_implicit_gemm``, ``mask_split_implicit_gemm``) overrides the choice;
- installs a CPU stream stub: spconv asks ``torch.cuda.current_stream().cuda_stream`` in its
  kernels (backward included); without CUDA the stub answers stream 0, so forward and backward
  both run on CPU.

Before spconv is imported it installs :class:`CpuSpconvAlgo`: on a machine without CUDA, spconv's
``spconv.algo`` (descriptions of its ~2,300 CUDA kernels, built at import: 6-10 s on 2 cores) is
replaced by the empty tuners its CPU path needs (same outputs and gradients, ``tests/test_startup.py``);
``CTVQ_SPCONV_FULL=1`` keeps the original.

It also owns the guard for spconv's int32 indexing (:func:`check_int32_limit`): a feature
buffer of ``N x C x bytes >= 2 GiB`` overflows spconv's kernels, so layers check before they run
and fail with an error that names the layer and the setting to lower.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from typing import Iterator, Sequence

import warnings

import torch


class CpuSpconvAlgo(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook for ``spconv.algo`` without CUDA: ``GEMM``/``CONV`` None (as in spconv's CPU-only build)
    and empty C++ tuners ``GEMM_CPP``/``CONV_CPP`` (consulted for CUDA kernels only)."""

    def find_spec(self, name, path=None, target=None):
        if name != "spconv.algo" or os.environ.get("CTVQ_SPCONV_FULL"):
            return None
        if torch.cuda.is_available():
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        from spconv.core_cc.csrc.sparse.convops.convops import ConvTunerSimple
        from spconv.core_cc.csrc.sparse.convops.gemmops import GemmTunerSimple

        module.GEMM = module.CONV = None
        module.GEMM_CPP = GemmTunerSimple([])
        module.CONV_CPP = ConvTunerSimple([])


if not any(isinstance(f, CpuSpconvAlgo) for f in sys.meta_path):
    sys.meta_path.insert(0, CpuSpconvAlgo())


with warnings.catch_warnings():
    # spconv 2.3 uses the deprecated torch.cuda.amp decorators; nothing to act on here
    warnings.simplefilter("ignore", FutureWarning)
    import spconv
    import spconv.pytorch as spconv_torch
    from spconv.core import ConvAlgo
    from spconv.pytorch import SparseConvTensor

__all__ = [
    "ConvAlgo",
    "SparseConvTensor",
    "spconv_torch",
    "conv_algo",
    "install_cpu_stream_stub",
    "check_int32_limit",
    "int32_limit",
    "get_int32_limit",
    "level_key",
    "make_sparse",
    "SparseInt32LimitError",
]

SPCONV_VERSION = getattr(spconv, "__version__", "unknown")

#: spconv indexes feature buffers with int32: N x C x element_size must stay below this.
INT32_LIMIT_BYTES = 2**31
_limit_bytes = INT32_LIMIT_BYTES

_ALGOS = {
    "native": ConvAlgo.Native,
    "mask_implicit_gemm": ConvAlgo.MaskImplicitGemm,
    "implicit_gemm": ConvAlgo.MaskImplicitGemm,
    "mask_split_implicit_gemm": ConvAlgo.MaskSplitImplicitGemm,
}


def conv_algo(device: torch.device | str | None = None) -> ConvAlgo:
    """The spconv algorithm for convolutions on ``device``.

    Args:
        device: where the features live; ``None`` means "CUDA if available".

    ``SPCONV_ALGO`` (one of ``native``, ``mask_implicit_gemm``, ``mask_split_implicit_gemm``)
    overrides the default (``Native`` on CPU, ``MaskImplicitGemm`` on GPU).
    """
    env = os.environ.get("SPCONV_ALGO", "").strip().lower()
    if env:
        if env not in _ALGOS:
            raise ValueError(f"SPCONV_ALGO={env!r} is not one of {sorted(_ALGOS)}; unset it or pick one of those.")
        return _ALGOS[env]
    if device is None:
        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = torch.device(device).type == "cuda"
    return ConvAlgo.MaskImplicitGemm if on_gpu else ConvAlgo.Native


def _current_stream() -> int:
    if torch.cuda.is_available():
        return torch.cuda.current_stream().cuda_stream
    return 0


def install_cpu_stream_stub() -> None:
    """Make spconv's stream query answer 0 when CUDA is absent (idempotent).

    spconv imports ``get_current_stream`` by name into several modules, so each binding is
    replaced; with CUDA present the stub returns the real current stream.
    """
    import importlib

    for name in ("cppcore", "ops", "hash", "conv", "pool", "functional", "utils", "core"):
        try:
            mod = importlib.import_module(f"spconv.pytorch.{name}")
        except Exception:  # pragma: no cover - optional spconv modules
            continue
        if hasattr(mod, "get_current_stream"):
            mod.get_current_stream = _current_stream


install_cpu_stream_stub()


class SparseInt32LimitError(RuntimeError):
    """A sparse feature buffer would exceed spconv's int32 indexing limit."""


def get_int32_limit() -> int:
    """The byte limit :func:`check_int32_limit` enforces (2 GiB unless changed by :func:`int32_limit`)."""
    return _limit_bytes


@contextlib.contextmanager
def int32_limit(limit_bytes: int) -> Iterator[None]:
    """Temporarily use another byte limit for :func:`check_int32_limit` (tests, tighter budgets)."""
    global _limit_bytes
    old = _limit_bytes
    _limit_bytes = int(limit_bytes)
    try:
        yield
    finally:
        _limit_bytes = old


def check_int32_limit(
    num_points: int,
    channels: int,
    dtype: torch.dtype,
    layer: str = "sparse conv",
    limit_bytes: int | None = None,
) -> None:
    """Raise :class:`SparseInt32LimitError` when ``num_points x channels x bytes`` reaches the limit.

    Args:
        num_points: active voxels N of the layer's input or output.
        channels: the larger of the layer's input and output channels C.
        dtype: feature dtype (fp16 halves the bytes).
        layer: name of the layer, quoted in the error.
        limit_bytes: override of the limit (default: :func:`get_int32_limit`).
    """
    limit = _limit_bytes if limit_bytes is None else int(limit_bytes)
    nbytes = int(num_points) * int(channels) * torch.empty((), dtype=dtype).element_size()
    if nbytes >= limit:
        raise SparseInt32LimitError(
            f"{layer}: {num_points} voxels x {channels} channels ({dtype}) = {nbytes / 2**30:.2f} GiB reaches "
            f"spconv's int32 limit ({limit / 2**30:.2f} GiB); lower `max_points` (training crop), the crop size, "
            f"or the tile size (Encode/Decode `tile=`)."
        )


def level_key(spatial_shape: Sequence[int]) -> str:
    """The ``indice_key`` shared by every submanifold conv at one resolution level (rulebook reuse)."""
    return "subm_" + "x".join(str(int(s)) for s in spatial_shape)


def make_sparse(
    features: torch.Tensor,
    indices: torch.Tensor,
    spatial_shape: Sequence[int],
    batch_size: int,
) -> SparseConvTensor:
    """Build a ``SparseConvTensor`` (indices cast to int32, contiguous)."""
    return SparseConvTensor(
        features.contiguous(),
        indices.to(torch.int32).contiguous(),
        [int(s) for s in spatial_shape],
        int(batch_size),
    )
