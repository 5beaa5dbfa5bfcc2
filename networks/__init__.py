"""Sparse VQ-VAE networks on spconv: backend, dense execution of well-filled convs, sparse ops,
attention, quantizer, model and its tiling, pretrained weights.

Names are imported lazily (PEP 562), so ``networks.quantizer`` can be used without loading
spconv; anything that touches sparse tensors imports :mod:`networks.backend` first, which
picks the conv algorithm and installs the CPU stream stub.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SparseConvTensor": "backend",
    "SparseInt32LimitError": "backend",
    "check_int32_limit": "backend",
    "conv_algo": "backend",
    "int32_limit": "backend",
    "make_sparse": "backend",
    "dense_conv_policy": "dense",
    "downsample": "ops",
    "subdivide": "ops",
    "sparse_lookup": "ops",
    "VectorQuantizer": "quantizer",
    "load_pretrained": "pretrained",
    "SparseVQVAE": "vqvae",
    "Direct3DS2_VQVAE": "vqvae",
    "Tokens": "vqvae",
    "count_parameters": "vqvae",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'networks' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
