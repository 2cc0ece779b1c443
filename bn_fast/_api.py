"""Public batch-norm functions: validate, canonicalise the layout, allocate, dispatch.

Kernels see two canonical views: ``(N, C, S)`` for channels-first memory and
``(R, C)`` for channels-last memory (or a spatial size of 1).  Which one is used
follows x's memory order, not only the declared layout, so a channels-last
array passed with ``layout="NCHW"`` (a transposed view) is processed in place
without a copy, like PyTorch's channels_last memory format.  Outputs are
allocated in the same memory order as x.
"""

import math

import numpy as np

from . import _backend, _buffers
from ._checks import (
    check_eps,
    check_float_array,
    check_like,
    check_momentum,
    check_out,
    check_training_size,
    check_vector,
    check_x,
)

# ---------------------------------------------------------------- canonical views

def _kind(x, axis):
    """'ncs' for an (N, C, S) view, 'rc' for an (R, C) view, following x's memory order."""
    C = x.shape[axis]
    S = math.prod(n for i, n in enumerate(x.shape) if i not in (0, axis))
    if S == 1:
        return "rc"
    if C > 1:
        big = [abs(st) for st, n in zip(x.strides, x.shape) if n > 1]
        if abs(x.strides[axis]) == min(big):
            return "rc"
    return "ncs"


def _target(a, kind):
    return 1 if kind == "ncs" else a.ndim - 1


def _moved(a, axis, kind):
    target = _target(a, kind)
    return a if axis == target else np.moveaxis(a, axis, target)


def _canonical_shape(a, axis, kind):
    C = a.shape[axis]
    rest = math.prod(n for i, n in enumerate(a.shape) if i != axis)
    if kind == "ncs":
        return a.shape[0], C, rest // a.shape[0] if a.shape[0] else 0
    return rest, C


def _view(a, axis, kind):
    """The canonical view of ``a`` without copying, or None when strides forbid it."""
    try:
        return _moved(a, axis, kind).reshape(_canonical_shape(a, axis, kind), copy=False)
    except ValueError:
        return None


def _input(a, axis, kind):
    v = _view(a, axis, kind)
    if v is None:
        v = np.ascontiguousarray(_moved(a, axis, kind)).reshape(_canonical_shape(a, axis, kind))
    return v


def _output(x, axis, kind, out, shape):
    """Return (result, view the kernel writes, out to copy into afterwards or None).

    A new result gets x's memory order: channels-last memory stays channels-last.
    """
    if out is not None:
        if out.flags.c_contiguous and x.flags.c_contiguous:
            # x's view is then a reshape in memory order (see _prepare), and so is out's;
            # _view's moveaxis and checks took 1.5 us of a 6 us call on (2, 16, 8, 8).
            return out, out.reshape(shape), None
        v = _view(out, axis, kind)
        if v is not None and v.shape != shape:  # a widened view (see _prepared)
            v = v.reshape(shape, copy=False)
        if v is not None:
            return out, v, None
    target = _target(x, kind)
    if axis == target:
        y = _buffers.empty(x.shape, x.dtype, x.nbytes)
        return y, y.reshape(shape), out
    moved = _buffers.empty(_moved(x, axis, kind).shape, x.dtype, x.nbytes)
    return np.moveaxis(moved, target, axis), moved.reshape(shape), out


def _finish(y, pending_out):
    if pending_out is None:
        return y
    np.copyto(pending_out, y)
    return pending_out


# An absent per-channel parameter, as the kernels and _algebra take it (see there).
_NONE = np.empty(0)


def _param(v):
    return _NONE if v is None else v


def _prepare(x, axis):
    """(kind, canonical view of x), copying x only when its strides allow no view."""
    if x.flags.c_contiguous and x.size:
        # The common case, without moveaxis or stride inspection.
        N, C = x.shape[0], x.shape[axis]
        S = x.size // (N * C)
        if S == 1:
            return "rc", x.reshape(N, C)
        if axis == 1:
            return "ncs", x.reshape(N, C, S)
        if C > 1:
            return "rc", x.reshape(N * S, C)
    kind = _kind(x, axis)
    return kind, _input(x, axis, kind)


# Inputs (x, and dy for backward) up to this many bytes in all take the fused kernels.
FUSED_BYTES = 1 << 23


def _fused(K, kind, xv, nt, inputs=1):
    """Whether channels-first training (1 input) and backward (2) run K's one-pass kernels.

    Otherwise they make two passes (statistics or sums, then the element-wise kernel).
    The fused kernels read one block of channels after another, each task cb channels
    of every batch entry, in runs of a few KB far apart.  That pays only while the
    inputs are in cache.  On an AMD EPYC (Zen 5, 1 MB of L2 per core, 32 MB of L3),
    against the two passes, whose reductions read memory in order: on 2.1-4.2 MB per
    input, fused training took 0.82-1.02x their time and backward 0.87-1.08x; on 6.4 MB,
    0.87-1.14x and 1.09-1.35x; on 12.8 MB, 1.05-1.84x and 1.24-2.07x.  Smaller blocks,
    or prefetching the next batch entry's run, did not help.  (On an earlier Intel
    machine, with 2 MB of L2, fused training on 32x2048x7x7 had taken 0.87x the two
    passes' time.)  The fused kernels also leave threads idle below 4 channels per
    thread, and tasks of short runs far apart (K.fused_run under 1024 elements, as with
    64 channels of 8x8) were slower.  The NumPy backend has no fused kernels.
    """
    if kind != "ncs" or not hasattr(K, "train_nchw"):
        return False
    N, C, S = xv.shape
    return (C >= 4 * nt and inputs * xv.nbytes <= FUSED_BYTES
            and K.fused_run(C, S, nt) >= 1024)


# Channels-last rows of a few channels are too short for the kernels' inner loops to
# vectorise: C=3 NHWC inference ran at half the speed of a copy, slower than PyTorch.
# A C-contiguous (R, C) view is also an (R / k, k * C) view whose column j * C + c
# holds channel c, so the kernels run on that, with per-channel vectors tiled k
# times, and the statistics and sums of the k column groups are folded back to C.
NARROW = 32         # channels-last views with fewer channels are widened by k, the largest
WIDE_ROW = 256      # divisor of R with k * C <= WIDE_ROW (not at all if k * C < NARROW),
WIDEN_FROM = 16384  # from this many elements: below, tiling and folding cost more than they save


def _prepared(x, axis, *others, out=None):
    """(kernel module, threads, kind, view of x, views of others, k) for x.

    ``others`` (dy) get views of x's canonical shape.  k > 1 when all the views,
    and out's, are widened by k (see above); per-channel vectors must then be tiled.
    """
    K, nt = _backend.kernels(x.size)
    kind, xv = _prepare(x, axis)
    views = ()
    if others:
        # dy laid out as x (the common case) has the view x has, without _input's steps.
        same = x.flags.c_contiguous
        views = [a.reshape(xv.shape) if same and a.flags.c_contiguous else _input(a, axis, kind)
                 for a in others]
    k = 1
    if kind == "rc" and xv.shape[1] < NARROW and x.size >= WIDEN_FROM:
        arrays = [xv, *views] + ([] if out is None else [_view(out, axis, kind)])
        if all(v is not None and v.flags.c_contiguous for v in arrays):
            R, C = xv.shape
            k = next((j for j in range(WIDE_ROW // C, 1, -1) if R % j == 0), 1)
            if k * C < NARROW:
                k = 1
            xv = xv.reshape(R // k, k * C)
            views = [v.reshape(xv.shape) for v in views]
    return K, nt, kind, xv, views, k


def _tile(v, k):
    """A per-channel vector for a view widened by k."""
    return v if k == 1 else np.tile(v, k)


def _affine(x, axis, scale, shift, out):
    """y = x * scale + shift per channel; ``scale`` (C,), ``shift`` None (zero) or (C,)."""
    K, nt, kind, xv, _, k = _prepared(x, axis, out=out)
    C = len(scale) * k
    scale = _tile(scale.astype(x.dtype), k)
    shift = (np.zeros(C, x.dtype) if shift is None
             else _tile(np.ascontiguousarray(shift, x.dtype), k))
    y, yv, pending = _output(x, axis, kind, out, xv.shape)
    if x.size:
        if kind == "ncs":
            K.affine_nchw(xv, np.zeros(C, x.dtype), scale, shift, yv, nt)
        else:  # a zero-length center is zero, and saves loading one
            K.affine_nhwc(xv, np.zeros(0, x.dtype), scale, shift, yv, nt)
    return _finish(y, pending)


def _normalise(x, axis, prepared, mean, var, gamma, beta, eps, out):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per channel, in x's dtype."""
    K, nt, kind, xv, _, k = prepared
    if k == 1 and hasattr(K, "normalise"):  # the compiled backends: all of it in one call
        y, yv, pending = _output(x, axis, kind, out, xv.shape)
        if x.size:
            K.normalise(xv, mean, var, _param(gamma), _param(beta), eps, yv, nt)
        return _finish(y, pending)
    C, e = len(mean), np.empty  # separate np.empty calls: half the time of a loop
    center, scale, shift = e(C, x.dtype), e(C, x.dtype), e(C, x.dtype)
    K.affine_coefficients(mean, var, _param(gamma), _param(beta), eps, center, scale, shift)
    if kind != "ncs" and not np.count_nonzero(center):  # as in _numba.normalise
        center = center[:0]
    if k > 1:
        center, scale, shift = _tile(center, k), _tile(scale, k), _tile(shift, k)
    y, yv, pending = _output(x, axis, kind, out, xv.shape)
    if x.size:
        (K.affine_nchw if kind == "ncs" else K.affine_nhwc)(xv, center, scale, shift, yv, nt)
    return _finish(y, pending)


# ---------------------------------------------------------------- public functions

def batch_norm_train(x, gamma=None, beta=None, *, running_mean=None, running_var=None,
                     momentum=0.1, eps=1e-5, unbiased=True, layout="NCHW", out=None):
    """Batch-norm training forward: normalise x with its own batch statistics.

    Parameters
    ----------
    x : ndarray, float32 or float64, rank 2-5
        ``(N, C, ...)`` for ``layout="NCHW"``, ``(N, ..., C)`` for ``"NHWC"``.
    gamma, beta : ndarray (C,), optional
        Scale and shift; None means 1 and 0 (``affine=False``).
    running_mean, running_var : ndarray (C,), optional
        Updated in place, ``r = (1 - momentum) * r + momentum * batch_stat``;
        ``running_var`` receives the unbiased variance when ``unbiased=True``
        (PyTorch) and the biased one otherwise (ONNX, Keras, Flax).
    momentum : float in [0, 1]
    eps : float > 0
    unbiased : bool
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        Preallocated output of x's shape and dtype; may be x itself.

    Returns
    -------
    y : ndarray, x's shape and dtype
    mean, invstd : ndarray (C,), x's dtype
        Batch mean and ``1 / sqrt(biased_var + eps)``, for the backward pass.

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4), dtype=np.float32)
    >>> y, mean, invstd = batch_norm_train(x)
    >>> bool(abs(y.mean()) < 1e-5)
    True
    """
    x, axis, C = check_x(x, layout)
    gamma = check_vector("gamma", gamma, x, C, layout)
    beta = check_vector("beta", beta, x, C, layout)
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"{given} was given without its partner: pass both running_mean "
                         f"and running_var, or neither")
    running_mean = check_vector("running_mean", running_mean, x, C, layout, writeable=True)
    running_var = check_vector("running_var", running_var, x, C, layout, writeable=True)
    momentum = check_momentum(momentum)
    eps = check_eps(eps)
    if not isinstance(unbiased, (bool, np.bool_)):
        raise TypeError(f"unbiased={unbiased!r} must be True or False")
    out = check_out(out, x, x)
    check_training_size(x, axis)

    K, nt, kind, xv, _, k = prepared = _prepared(x, axis, out=out)
    mean = np.empty(C)
    var = np.empty(C)
    if _fused(K, kind, xv, nt):
        y, yv, pending = _output(x, axis, kind, out, xv.shape)
        K.train_nchw(xv, _param(gamma), _param(beta), eps, mean, var, yv, nt)
        y = _finish(y, pending)
    else:
        if k == 1:
            (K.stats_nchw if kind == "ncs" else K.stats_nhwc)(xv, mean, var, nt)
        else:
            parts_mean, parts_var = np.empty(k * C), np.empty(k * C)
            K.stats_nhwc(xv, parts_mean, parts_var, nt)
            K.fold_moments(parts_mean, parts_var, mean, var)
        y = _normalise(x, axis, prepared, mean, var, gamma, beta, eps, out)
    saved_mean, saved_invstd = np.empty(C, x.dtype), np.empty(C, x.dtype)
    n = x.size // C
    K.running_update(mean, var, eps, momentum, n / (n - 1) if unbiased else 1.0,
                     _param(running_mean), _param(running_var), saved_mean, saved_invstd)
    return y, saved_mean, saved_invstd


def batch_norm_infer(x, gamma, beta, running_mean, running_var, *, eps=1e-5,
                     layout="NCHW", out=None):
    """Batch-norm inference: normalise x with running statistics.

    ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta`` per channel.

    Parameters
    ----------
    x : ndarray, float32 or float64, rank 2-5
    gamma, beta : ndarray (C,) or None (1 and 0)
    running_mean, running_var : ndarray (C,)
    eps : float > 0
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional; may be x itself for in-place inference.

    Returns
    -------
    y : ndarray, x's shape and dtype

    Examples
    --------
    >>> x = np.ones((2, 3, 4), dtype=np.float32)
    >>> y = batch_norm_infer(x, None, None, np.ones(3), np.ones(3), eps=1e-5)
    >>> float(abs(y).max())
    0.0
    """
    x, axis, C = check_x(x, layout)
    gamma = check_vector("gamma", gamma, x, C, layout)
    beta = check_vector("beta", beta, x, C, layout)
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is None:
            raise ValueError(f"{name} is required for inference (got None)")
    running_mean = check_vector("running_mean", running_mean, x, C, layout)
    running_var = check_vector("running_var", running_var, x, C, layout)
    eps = check_eps(eps)
    out = check_out(out, x, x)
    return _normalise(x, axis, _prepared(x, axis, out=out), running_mean, running_var, gamma, beta,
                      eps, out)


def apply_affine(x, scale, shift, *, layout="NCHW", out=None):
    """Apply a per-channel affine ``y = x * scale + shift`` (folded inference).

    Parameters
    ----------
    x : ndarray, float32 or float64, rank 2-5
    scale, shift : ndarray (C,), e.g. from :func:`fold_affine`
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional; may be x itself.

    Examples
    --------
    >>> x = np.ones((2, 3), dtype=np.float32)
    >>> apply_affine(x, np.full(3, 2.0), np.zeros(3)).tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    x, axis, C = check_x(x, layout)
    for name, v in (("scale", scale), ("shift", shift)):
        if v is None:
            raise ValueError(f"{name} is required (got None)")
    scale = check_vector("scale", scale, x, C, layout)
    shift = check_vector("shift", shift, x, C, layout)
    out = check_out(out, x, x)
    return _affine(x, axis, scale, shift, out)


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, training=True, layout="NCHW",
                        out=None):
    """Gradients of batch norm with respect to x, gamma and beta.

    Parameters
    ----------
    dy : ndarray, x's shape and dtype
        Gradient of the loss with respect to y.
    x : ndarray, the forward input
    mean, invstd : ndarray (C,)
        As returned by :func:`batch_norm_train`; for ``training=False`` (frozen
        statistics, BN in eval mode) pass ``running_mean`` and
        ``1 / sqrt(running_var + eps)``.
    gamma : ndarray (C,) or None
        None means ``affine=False``: dgamma and dbeta are returned as None.
    training : bool
        True: mean and invstd are functions of x (batch statistics).
        False: they are constants.
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional; preallocated dx (may be dy itself).

    Returns
    -------
    dx : ndarray, x's shape and dtype
    dgamma, dbeta : ndarray (C,) in x's dtype, or None when gamma is None

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((8, 3), dtype=np.float64)
    >>> y, mean, invstd = batch_norm_train(x)
    >>> dx, dg, db = batch_norm_backward(np.ones_like(x), x, mean, invstd, np.ones(3))
    >>> bool(abs(dx).max() < 1e-12)
    True
    """
    x, axis, C = check_x(x, layout)
    dy = check_like("dy", check_float_array("dy", dy), x)
    for name, v in (("mean", mean), ("invstd", invstd)):
        if v is None:
            raise ValueError(f"{name} is required (got None)")
    mean = check_vector("mean", mean, x, C, layout)
    invstd = check_vector("invstd", invstd, x, C, layout)
    gamma = check_vector("gamma", gamma, x, C, layout)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training={training!r} must be True or False")
    out = check_out(out, x, x, dy)

    if not training and gamma is None:  # constant statistics: dx = dy * invstd, nothing else
        return _affine(dy, axis, invstd, None, out), None, None

    K, nt, kind, xv, (dyv,), k = _prepared(x, axis, dy, out=out)
    # Sums about the mean rounded to x's dtype: x - center is then exact in x's dtype.
    center = np.ascontiguousarray(mean, x.dtype)
    sdy = np.zeros(C)
    sdyx = np.zeros(C)
    ng = 0 if gamma is None else C
    dgamma, dbeta = np.empty(ng, x.dtype), np.empty(ng, x.dtype)
    if training and x.size and _fused(K, kind, xv, nt, inputs=2):
        y, yv, pending = _output(x, axis, kind, out, xv.shape)
        K.backward_nchw(dyv, xv, center, mean, invstd, _param(gamma), sdy, sdyx, dgamma, dbeta,
                        yv, nt)
        dx = _finish(y, pending)
    else:
        if x.size and k == 1:
            (K.dsum_nchw if kind == "ncs" else K.dsum_nhwc)(dyv, xv, center, sdy, sdyx, nt)
        elif x.size:
            parts_sdy, parts_sdyx = np.empty(k * C), np.empty(k * C)
            K.dsum_nhwc(dyv, xv, _tile(center, k), parts_sdy, parts_sdyx, nt)
            K.fold_sums(parts_sdy, sdy)
            K.fold_sums(parts_sdyx, sdyx)
        a, b, d = np.empty(C, x.dtype), np.empty(C, x.dtype), np.empty(C, x.dtype)
        K.backward_coefficients(mean, center, invstd, _param(gamma), max(1, x.size // C), sdy,
                                sdyx, a, b, d, dgamma, dbeta)
        if training:
            y, yv, pending = _output(x, axis, kind, out, xv.shape)
            if x.size:
                (K.dx_nchw if kind == "ncs" else K.dx_nhwc)(
                    dyv, xv, _tile(center, k), _tile(a, k), _tile(b, k), _tile(d, k), yv, nt)
            dx = _finish(y, pending)
        else:  # constant statistics: dx = dy * gamma * invstd, which is a
            dx = _affine(dy, axis, a, None, out)
    if gamma is None:
        return dx, None, None
    return dx, dgamma, dbeta


__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "apply_affine"]
