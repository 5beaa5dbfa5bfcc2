"""Sparse VQ-VAE networks on spconv: backend, sparse ops, attention, quantizer, model, pretrained weights."""

from .backend import SparseConvTensor, SparseInt32LimitError, check_int32_limit, conv_algo, int32_limit, make_sparse
from .ops import downsample, sparse_lookup, subdivide
from .pretrained import load_pretrained
from .quantizer import VectorQuantizer
from .vqvae import Direct3DS2_VQVAE, SparseVQVAE, Tokens, count_parameters

__all__ = [
    "SparseConvTensor",
    "SparseInt32LimitError",
    "check_int32_limit",
    "conv_algo",
    "int32_limit",
    "make_sparse",
    "downsample",
    "subdivide",
    "sparse_lookup",
    "VectorQuantizer",
    "load_pretrained",
    "SparseVQVAE",
    "Direct3DS2_VQVAE",
    "Tokens",
    "count_parameters",
]
