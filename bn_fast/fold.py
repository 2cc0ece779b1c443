"""Folding batch norm into a per-channel affine (and into neighbouring layers).

All arithmetic is done in float64, so folding adds no error beyond the final
rounding to the result dtype; inputs are never modified.
"""

import numpy as np

from ._checks import check_eps, check_float_array


def _channel_vector(name, a, channels):
    a = check_float_array(name, a)
    if a.ndim != 1 or (channels is not None and a.shape[0] != channels):
        expected = "a 1-D array" if channels is None else f"shape ({channels},)"
        raise ValueError(f"{name} has shape {a.shape}, expected {expected}")
    return a


def _bn_params(gamma, beta, running_mean, running_var):
    """Check the four BN vectors; return them (gamma/beta may be None) and their dtype."""
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v is None:
            raise ValueError(f"{name} is required (got None)")
    running_mean = _channel_vector("running_mean", running_mean, None)
    C = running_mean.shape[0]
    running_var = _channel_vector("running_var", running_var, C)
    gamma = None if gamma is None else _channel_vector("gamma", gamma, C)
    beta = None if beta is None else _channel_vector("beta", beta, C)
    dtype = np.result_type(*[v for v in (gamma, beta, running_mean, running_var)
                             if v is not None])
    return gamma, beta, running_mean, running_var, dtype


def _affine64(gamma, beta, running_mean, running_var, eps):
    C = running_mean.shape[0]
    g = np.ones(C) if gamma is None else gamma.astype(np.float64)
    b = np.zeros(C) if beta is None else beta.astype(np.float64)
    scale = g / np.sqrt(running_var.astype(np.float64) + eps)
    return scale, b - running_mean.astype(np.float64) * scale


def fold_affine(gamma, beta, running_mean, running_var, *, eps=1e-5):
    """Fold inference-mode batch norm into one per-channel affine ``y = x * scale + shift``.

    Parameters
    ----------
    gamma, beta : ndarray (C,) or None (1 and 0)
    running_mean, running_var : ndarray (C,)
    eps : float > 0

    Returns
    -------
    scale, shift : ndarray (C,)
        In the widest dtype of the inputs; computed in float64.
        ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``.

    Examples
    --------
    >>> scale, shift = fold_affine(None, None, np.zeros(2), np.ones(2), eps=0.0625)
    >>> scale.round(4).tolist(), shift.tolist()
    ([0.9701, 0.9701], [0.0, 0.0])
    """
    eps = check_eps(eps)
    gamma, beta, running_mean, running_var, dtype = _bn_params(
        gamma, beta, running_mean, running_var)
    scale, shift = _affine64(gamma, beta, running_mean, running_var, eps)
    return scale.astype(dtype), shift.astype(dtype)
