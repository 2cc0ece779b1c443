"""The per-channel algebra between the kernels, written once for every backend.

These functions work on vectors of length C: the statistics or gradient sums a
kernel produced, and the parameters.  Each formula is a ``*_terms`` function of
one channel's numbers that works as well on whole float64 vectors, element by
element.  The NumPy and Cython backends call the vector functions, which apply
the terms to whole vectors once; the Numba backend compiles the ``*_each``
functions, which apply them channel by channel in a loop (``_numba.py``).  Numba
compiled the vector functions into code that took 5 ns per channel (20 us at
4096 channels, for one call of affine_coefficients), where the loop, whose
1 / sqrt then vectorises, took 0.6 ns.  Absent parameters (gamma, beta,
running statistics, dgamma and dbeta when gamma is None) arrive as zero-length
arrays, so that Numba compiles no variant for None; in the terms they are 1 or 0.
Everything is computed in float64 and rounded once, when stored into an output.
"""

import numpy as np


def _f64(v, absent):
    return np.asarray(v, np.float64) if v.shape[0] else absent


# ---------------------------------------------------------------- normalisation

FOLD = 2.0  # standard deviations (see center_terms)


def center_terms(mean, var):
    """What the normalisation subtracts from x: the mean, or 0 where the mean lies
    within FOLD standard deviations of zero.

    A mean far from zero must be subtracted first: float32 data around 1e4 would
    otherwise lose most of their digits.  A mean within two standard deviations can go
    into the shift instead (``x * scale + shift``, PyTorch's form) at no cost in
    accuracy: against a float64 reference, float32 y was within 4.9 ulp of gamma that
    way at |mean| = 2 sd, and 5.6 subtracting it (7.1 against 5.4 at 4 sd).  Where every
    channel folds, the channels-last kernels load two per-channel vectors per element
    instead of three.  Squares, not a square root: no warning for a negative
    running_var.  A constant channel (var 0) keeps a nonzero mean, so its y is exactly
    beta.
    """
    return mean * (mean * mean > FOLD * FOLD * var)


def affine_terms(mean, center, var, gamma, beta, eps):
    """scale and shift such that ``(x - center) * scale + shift`` is
    ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    center is center_terms rounded to x's dtype: ``x - center`` is then exact in x's
    dtype for x near the mean, and the remainder ``mean - center`` (exact in float64)
    goes into the shift.
    """
    a = gamma / np.sqrt(var + eps)
    return a, beta - (mean - center) * a


def affine_coefficients(mean, var, gamma, beta, eps, center, scale, shift):
    """Fill center, scale, shift (x's dtype) with center_terms and affine_terms."""
    m, v = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    center[:] = center_terms(m, v)
    scale[:], shift[:] = affine_terms(m, center, v, _f64(gamma, 1.0), _f64(beta, 0.0),
                                      np.float64(eps))


def affine_coefficients_each(mean, var, gamma, beta, eps, center, scale, shift):
    for c in range(mean.shape[0]):
        center[c] = center_terms(mean[c], var[c])
        scale[c], shift[c] = affine_terms(mean[c], center[c], var[c],
                                          gamma[c] if gamma.shape[0] else 1.0,
                                          beta[c] if beta.shape[0] else 0.0, eps)


# ---------------------------------------------------------------- training forward

def invstd_terms(var, eps):
    return 1.0 / np.sqrt(var + eps)


def running_terms(running, stat, momentum, factor):
    """``(1 - momentum) * running + momentum * factor * stat``."""
    return (1.0 - momentum) * running + momentum * factor * stat


def running_update(mean, var, eps, momentum, var_factor, running_mean, running_var,
                   saved_mean, saved_invstd):
    """After a training forward: the saved mean and invstd, and the running statistics.

    ``r = (1 - momentum) * r + momentum * stat`` with ``var_factor * var`` as the
    variance (n / (n - 1) for PyTorch's unbiased running variance, else 1).
    """
    saved_mean[:] = mean
    saved_invstd[:] = invstd_terms(var, np.float64(eps))
    if running_mean.shape[0]:
        running_mean[:] = running_terms(running_mean.astype(np.float64), mean, momentum, 1.0)
        running_var[:] = running_terms(running_var.astype(np.float64), var, momentum,
                                       var_factor)


def running_update_each(mean, var, eps, momentum, var_factor, running_mean, running_var,
                        saved_mean, saved_invstd):
    for c in range(mean.shape[0]):
        saved_mean[c] = mean[c]
        saved_invstd[c] = invstd_terms(var[c], eps)
    for c in range(running_mean.shape[0]):
        running_mean[c] = running_terms(running_mean[c], mean[c], momentum, 1.0)
        running_var[c] = running_terms(running_var[c], var[c], momentum, var_factor)


# ---------------------------------------------------------------- backward

def backward_terms(lo, invstd, gamma, n, sdy, sdyx):
    """(a, b, d, sdyx about the mean) such that ``dx = dy * a + (x - center) * b + d``.

    sdy and sdyx are the float64 sums of dy and of ``dy * (x - center)`` over the n
    elements of a channel; lo is ``mean - center``, the remainder of rounding the
    mean to x's dtype.
    """
    s = sdyx - lo * sdy
    a = invstd * gamma
    b = -a * invstd * invstd * s / n
    return a, b, -a * sdy / n - lo * b, s


def backward_coefficients(mean, center, invstd, gamma, n, sdy, sdyx, a, b, d, dgamma, dbeta):
    """Fill a, b, d (x's dtype) with backward_terms, correct sdyx in place to be about
    the mean, and fill dgamma and dbeta unless zero-length (no gamma)."""
    inv = np.asarray(invstd, np.float64)
    a[:], b[:], d[:], sdyx[:] = backward_terms(np.asarray(mean, np.float64) - center, inv,
                                               _f64(gamma, 1.0), n, sdy, sdyx)
    if dgamma.shape[0]:
        dgamma[:] = sdyx * inv
        dbeta[:] = sdy


def backward_coefficients_each(mean, center, invstd, gamma, n, sdy, sdyx, a, b, d, dgamma,
                               dbeta):
    for c in range(mean.shape[0]):
        a[c], b[c], d[c], sdyx[c] = backward_terms(mean[c] - center[c], invstd[c],
                                                   gamma[c] if gamma.shape[0] else 1.0, n,
                                                   sdy[c], sdyx[c])
    for c in range(dgamma.shape[0]):
        dgamma[c] = sdyx[c] * invstd[c]
        dbeta[c] = sdy[c]


# ---------------------------------------------------------------- widened channels-last views

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
