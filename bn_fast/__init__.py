"""bn_fast: fast batch normalization on the CPU for NumPy arrays.

Training forward, backward and inference as parallel kernels (Numba, or a
Cython + OpenMP fallback) in channels-first and channels-last layouts.
"""

from ._api import apply_affine, batch_norm_backward, batch_norm_infer, batch_norm_train
from ._backend import available_backends, get_backend, get_num_threads, set_backend, set_num_threads
from .fold import fold_affine, fold_bn_conv, fold_conv_bn
from .layer import BatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "apply_affine",
    "available_backends",
    "batch_norm_backward",
    "batch_norm_infer",
    "batch_norm_train",
    "fold_affine",
    "fold_bn_conv",
    "fold_conv_bn",
    "get_backend",
    "get_num_threads",
    "set_backend",
    "set_num_threads",
]
