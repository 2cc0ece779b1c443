"""The per-channel algebra between the kernels, written once for every backend.

These functions work on vectors of length C: the statistics or gradient sums a
kernel produced, and the parameters.  They are plain NumPy array expressions, so
the Numba backend compiles them (``_numba.py``; one compiled call instead of a
dozen small NumPy calls is most of a small tensor's time) and the Cython and
NumPy backends run them as they are.  Absent parameters (gamma, beta, running
statistics, dgamma and dbeta when gamma is None) arrive as zero-length arrays, so
that Numba compiles no variant for None.  Everything is computed in float64 and
rounded once, when stored into an output.
"""

import numpy as np


def affine_coefficients(mean, var, gamma, beta, eps, center, scale, shift):
    """Fill center, scale, shift (x's dtype) so that ``(x - center) * scale + shift``
    is ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    center is the mean rounded to x's dtype: ``x - center`` is then exact in x's
    dtype for x near the mean, and the rounding remainder goes into the shift in
    float64 (float32 data around 1e4 would otherwise lose most of their digits).
    """
    # np.float64(eps) makes var + eps float64 in NumPy as in Numba (a Python float would
    # leave float32 var float32).  mean - center is exact, in the wider of their dtypes.
    # Three temporaries, not six: 1.2-1.25x faster compiled, right after a kernel.
    a = 1.0 / np.sqrt(var + np.float64(eps))
    if gamma.shape[0]:
        a = a * gamma
    center[:] = mean
    scale[:] = a
    if beta.shape[0]:
        shift[:] = beta - (mean - center) * a
    else:
        shift[:] = (center - mean) * a


def running_update(mean, var, eps, momentum, var_factor, running_mean, running_var,
                   saved_mean, saved_invstd):
    """After a training forward: the saved mean and invstd, and the running statistics.

    ``r = (1 - momentum) * r + momentum * stat`` with ``var_factor * var`` as the
    variance (n / (n - 1) for PyTorch's unbiased running variance, else 1).
    """
    saved_mean[:] = mean
    saved_invstd[:] = 1.0 / np.sqrt(var + eps)
    if running_mean.shape[0]:
        running_mean[:] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[:] = ((1.0 - momentum) * running_var.astype(np.float64)
                          + momentum * var_factor * var)


def backward_coefficients(mean, center, invstd, gamma, n, sdy, sdyx, a, b, d, dgamma, dbeta):
    """Fill a, b, d (x's dtype) so that ``dx = dy * a + (x - center) * b + d``.

    sdy and sdyx are the float64 sums of dy and of ``dy * (x - center)`` over the n
    elements of each channel; sdyx is corrected in place to be about the mean
    (``mean - center`` is the remainder of rounding the mean to x's dtype).
    dgamma and dbeta are filled unless zero-length (no gamma).
    """
    lo = mean.astype(np.float64) - center
    sdyx -= lo * sdy
    inv = invstd.astype(np.float64)
    g = inv * gamma if gamma.shape[0] else inv
    bb = -g * inv * inv * sdyx / n
    a[:] = g
    b[:] = bb
    d[:] = -g * sdy / n - lo * bb
    if dgamma.shape[0]:
        dgamma[:] = sdyx * inv
        dbeta[:] = sdy


def fold_moments(mean, var, mean_out, var_out):
    """Mean and biased variance of C channels from k = len(mean) // C parts of equal
    size, part j of channel c at index j * C + c (see ``_api._prepared``).

    Chan's formula for equal counts, about the first part's mean: equal parts give
    that mean exactly, so a constant channel still has variance 0.
    """
    C = mean_out.shape[0]
    k = mean.shape[0] // C
    m = mean.reshape(k, C)
    m0 = m[0].copy()
    mean_out[:] = m0 + (m - m0).sum(axis=0) / k
    d = m - mean_out
    var_out[:] = var.reshape(k, C).sum(axis=0) / k + (d * d).sum(axis=0) / k


def fold_sums(s, out):
    """out[c] = the sum of s[j * C + c] over the k = len(s) // C parts."""
    out[:] = s.reshape(s.shape[0] // out.shape[0], out.shape[0]).sum(axis=0)
