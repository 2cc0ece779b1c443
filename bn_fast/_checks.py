"""Argument checks shared by the public functions.

Every check runs before any array is written, so a call that raises leaves
its arguments (running statistics and ``out`` included) exactly as they were.
"""

import math
import numbers

import numpy as np

LAYOUTS = ("NCHW", "NHWC")
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; expected one of {LAYOUTS}")
    return layout


def check_eps(eps):
    if type(eps) is float and 0.0 < eps < math.inf:  # the common case, without the ABC check
        return eps
    if (not isinstance(eps, numbers.Real) or isinstance(eps, bool)
            or not math.isfinite(eps) or eps <= 0):
        raise ValueError(f"eps={eps!r} must be a finite number > 0")
    return float(eps)


def check_momentum(momentum):
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if (not isinstance(momentum, numbers.Real) or isinstance(momentum, bool)
            or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum={momentum!r} must be a number in [0, 1]")
    return float(momentum)


def check_float_array(name, a):
    """Return ``a`` as an ndarray of float32 or float64, or raise TypeError."""
    if not isinstance(a, np.ndarray):
        if isinstance(a, (str, bytes)) or not hasattr(a, "__len__") and not hasattr(a, "__array__"):
            raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
        a = np.asarray(a)
        if a.dtype.kind in "iub":
            a = a.astype(np.float64)
    if not a.dtype.isnative:
        raise TypeError(f"{name} has non-native byte order {a.dtype.str!r}; "
                        f"convert with {name}.astype({name}.dtype.newbyteorder('='))")
    if a.dtype not in FLOATS:
        raise TypeError(
            f"{name} has dtype {a.dtype}, expected float32 or float64 "
            f"(convert with {name}.astype(np.float32))")
    return a


def check_x(x, layout, name="x"):
    """Check the input tensor; return it with its channel axis and channel count."""
    # A native float32/float64 ndarray of a supported rank skips check_float_array's
    # steps: right after a kernel has streamed megabytes through the cache, every step
    # of Python costs several times its usual time.
    if not (type(x) is np.ndarray and (x.dtype is FLOATS[0] or x.dtype is FLOATS[1])
            and 2 <= x.ndim <= 5):
        x = check_float_array(name, x)
        if not 2 <= x.ndim <= 5:
            raise ValueError(
                f"{name} has shape {x.shape} (rank {x.ndim}), expected rank 2 to 5: "
                f"(N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) for layout 'NCHW', "
                f"channels last for 'NHWC'")
    axis = 1 if check_layout(layout) == "NCHW" else x.ndim - 1
    return x, axis, x.shape[axis]


def check_vector(name, a, x, channels, layout, *, writeable=False):
    """A per-channel parameter: 1-D, ``channels`` long, float, never narrower than x."""
    if a is None:
        return None
    if (type(a) is np.ndarray and a.ndim == 1 and a.shape[0] == channels
            and (a.dtype is x.dtype or a.dtype is FLOATS[1])
            and (not writeable or a.flags.writeable)):
        return a  # the common case, in a fraction of the time of the checks below
    a = check_float_array(name, a)
    if a.ndim != 1 or a.shape[0] != channels:
        raise ValueError(
            f"{name} has shape {a.shape}, expected ({channels},) "
            f"(channels of x with shape {x.shape} and layout {layout!r})")
    if a.dtype.itemsize < x.dtype.itemsize:
        raise TypeError(
            f"{name} is {a.dtype} but x is {x.dtype}: per-channel arrays may be x's dtype "
            f"or float64, never narrower than x (that would silently lose precision)")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only, but it is updated in place")
    return a


def check_like(name, a, x):
    """An array that must have exactly x's shape and dtype (dy, out)."""
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.shape != x.shape or a.dtype != x.dtype:
        raise ValueError(
            f"{name} has shape {a.shape} and dtype {a.dtype}, "
            f"expected x's shape {x.shape} and dtype {x.dtype}")
    return a


def check_out(out, x, *inputs):
    """``out`` may be an input itself (in place) but must not partially overlap one."""
    out = check_like("out", out, x)
    if out is None:
        return None
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for a in inputs:
        if a is out:  # in place
            continue
        if (np.may_share_memory(out, a) and not (
                out.__array_interface__["data"][0] == a.__array_interface__["data"][0]
                and out.strides == a.strides)):
            raise ValueError("out overlaps an input without being that same array; "
                             "pass out=x for in-place, or a separate array")
    return out


def check_training_size(x, axis):
    if x.shape[axis] == 0:
        raise ValueError(f"x has shape {x.shape} with no channels (axis {axis} has size 0); "
                         f"training needs at least one channel")
    if x.size // x.shape[axis] <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}")
