"""Plain NumPy batch norm, float64 inside: the test oracle and the ``"numpy"`` backend.

The first half mirrors the public API with the most direct formulas (channels
moved to the last axis, everything in float64, no validation), so tests can
compare any backend against it.  The second half implements the kernel
interface of ``_numba`` with NumPy array expressions; ``set_backend("numpy")``
runs the public API on it.
"""

import numpy as np

# The per-channel algebra between kernels, shared with the compiled backends.
from ._algebra import (  # noqa: F401
    affine_coefficients,
    backward_coefficients,
    fold_moments,
    fold_sums,
    running_update,
)


def _channels_last(a, layout):
    return np.moveaxis(np.asarray(a, dtype=np.float64), 1, -1) if layout == "NCHW" \
        else np.asarray(a, dtype=np.float64)


def _restore(a, layout, dtype):
    a = np.moveaxis(a, -1, 1) if layout == "NCHW" else a
    return a.astype(dtype)


def _param(p, C, default):
    return np.full(C, default) if p is None else np.asarray(p, dtype=np.float64)


def _write(out, y):
    if out is None:
        return y
    out[...] = y
    return out


def batch_norm_train(x, gamma=None, beta=None, *, running_mean=None, running_var=None,
                     momentum=0.1, eps=1e-5, unbiased=True, layout="NCHW", out=None):
    xc = _channels_last(x, layout)
    C = xc.shape[-1]
    flat = xc.reshape(-1, C)
    mean = flat.mean(axis=0)
    var = ((flat - mean) ** 2).mean(axis=0)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (xc - mean) * invstd * _param(gamma, C, 1.0) + _param(beta, C, 0.0)
    if running_mean is not None:
        n = flat.shape[0]
        v = var * n / (n - 1) if unbiased else var
        running_mean[...] = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = (1 - momentum) * running_var.astype(np.float64) + momentum * v
    return _write(out, _restore(y, layout, x.dtype)), mean.astype(x.dtype), invstd.astype(x.dtype)


def batch_norm_infer(x, gamma, beta, running_mean, running_var, *, eps=1e-5,
                     layout="NCHW", out=None):
    xc = _channels_last(x, layout)
    C = xc.shape[-1]
    y = ((xc - np.asarray(running_mean, np.float64))
         / np.sqrt(np.asarray(running_var, np.float64) + eps)
         * _param(gamma, C, 1.0) + _param(beta, C, 0.0))
    return _write(out, _restore(y, layout, x.dtype))


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, training=True, layout="NCHW",
                        out=None):
    xc = _channels_last(x, layout)
    g = _channels_last(dy, layout)
    C = xc.shape[-1]
    n = xc.size // C if C else 0
    mean = np.asarray(mean, np.float64)
    invstd = np.asarray(invstd, np.float64)
    xhat = (xc - mean) * invstd
    axes = tuple(range(xc.ndim - 1))
    dbeta = g.sum(axis=axes)
    dgamma = (g * xhat).sum(axis=axes)
    gam = _param(gamma, C, 1.0)
    if training:
        dx = gam * invstd * (g - dbeta / n - xhat * dgamma / n)
    else:
        dx = g * gam * invstd
    dx = _write(out, _restore(dx, layout, x.dtype))
    if gamma is None:
        return dx, None, None
    return dx, dgamma.astype(x.dtype), dbeta.astype(x.dtype)


def fold_affine(gamma, beta, running_mean, running_var, *, eps=1e-5):
    C = len(running_mean)
    scale = _param(gamma, C, 1.0) / np.sqrt(np.asarray(running_var, np.float64) + eps)
    shift = _param(beta, C, 0.0) - np.asarray(running_mean, np.float64) * scale
    return scale, shift


def apply_affine(x, scale, shift, *, layout="NCHW", out=None):
    xc = _channels_last(x, layout)
    y = xc * np.asarray(scale, np.float64) + np.asarray(shift, np.float64)
    return _write(out, _restore(y, layout, x.dtype))


# ------------------------------------------------------------------
# The kernel interface (see _numba.py for the contract of each name).

def get_num_threads():
    return 1


def set_num_threads(n):
    """The NumPy backend runs on one thread; the setting is accepted and ignored."""


def _ncs(v):
    return v[None, :, None]


def _corrected(d, axes, m, mean, var):
    # Deviations d from a first mean m: correcting m by their mean makes the mean of a
    # constant channel exactly its value (as in _cython.pyx).
    e = d.mean(axis=axes)
    mean[:] = m + e
    var[:] = np.maximum((d * d).mean(axis=axes) - e * e, 0.0)


def stats_nchw(x, mean, var, nthreads):
    x = x.astype(np.float64)
    m = x.mean(axis=(0, 2))
    _corrected(x - _ncs(m), (0, 2), m, mean, var)


def stats_nhwc(x, mean, var, nthreads):
    x = x.astype(np.float64)
    m = x.mean(axis=0)
    _corrected(x - m, 0, m, mean, var)


def affine_nchw(x, center, scale, shift, y, nthreads):
    y[...] = (x - _ncs(center)) * _ncs(scale) + _ncs(shift)


def affine_nhwc(x, center, scale, shift, y, nthreads):
    y[...] = (x - center if len(center) else x) * scale + shift


def dsum_nchw(dy, x, mean, sdy, sdyx, nthreads):
    g = dy.astype(np.float64)
    sdy[:] = g.sum(axis=(0, 2))
    sdyx[:] = (g * (x - _ncs(mean))).sum(axis=(0, 2))


def dsum_nhwc(dy, x, mean, sdy, sdyx, nthreads):
    g = dy.astype(np.float64)
    sdy[:] = g.sum(axis=0)
    sdyx[:] = (g * (x - mean)).sum(axis=0)


def dx_nchw(dy, x, mean, a, b, d, dx, nthreads):
    dx[...] = dy * _ncs(a) + (x - _ncs(mean)) * _ncs(b) + _ncs(d)


def dx_nhwc(dy, x, mean, a, b, d, dx, nthreads):
    dx[...] = dy * a + (x - mean) * b + d
