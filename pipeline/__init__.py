"""ctvq's runnable parts: preprocessing, training, inference, evaluation, export.

Importing ``pipeline`` installs :class:`CpuSpconvAlgo`: on a machine without CUDA, spconv's
``spconv.algo`` (descriptions of its ~2,300 CUDA kernels, built at import: 6-10 s on 2 cores)
is replaced by the empty tuners its CPU path needs. ``CTVQ_SPCONV_FULL=1`` keeps the original.
"""

import importlib.abc
import importlib.util
import os
import sys


class CpuSpconvAlgo(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook for ``spconv.algo`` without CUDA: ``GEMM``/``CONV`` None (as in spconv's CPU-only build)
    and empty C++ tuners ``GEMM_CPP``/``CONV_CPP`` (consulted for CUDA kernels only)."""

    def find_spec(self, name, path=None, target=None):
        if name != "spconv.algo" or os.environ.get("CTVQ_SPCONV_FULL"):
            return None
        import torch

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


def quiet_fx_notice() -> None:
    """Silences torch's one-time ``is_fx_tracing`` notice, which spconv's tensor class triggers on every
    first ``SparseConvTensor`` (nothing here traces with torch.fx)."""
    import logging

    from torch.fx import _symbolic_trace as fx

    notice = getattr(fx, "is_fx_tracing_warning", None)
    if notice is None or not hasattr(notice, "cache_info") or notice.cache_info().currsize:
        return
    level = fx.log.level
    fx.log.setLevel(logging.ERROR)
    try:
        notice()  # cached from now on: torch prints it at most once per process
    finally:
        fx.log.setLevel(level)
