"""Input builders shared by the test modules."""

import numpy as np

# Channels-first shapes (N, C, *spatial) of every rank, with N=1, C=1 and odd sizes.
SHAPES = [
    (7, 5),
    (1, 3, 9),
    (4, 1, 5),
    (3, 4, 5, 7),
    (1, 6, 3, 5),
    (2, 1, 4, 4),
    (2, 3, 4, 1, 5),
    (33, 17, 3),
]
DTYPES = [np.float32, np.float64]
LAYOUTS = ["NCHW", "NHWC"]


def to_layout(shape_ncs, layout):
    """The array shape for a channels-first shape in ``layout``."""
    if layout == "NCHW" or len(shape_ncs) == 2:
        return tuple(shape_ncs)
    return (shape_ncs[0], *shape_ncs[2:], shape_ncs[1])


def make_x(rng, shape, dtype, layout="NCHW", loc=3.0, scale=2.0):
    return (rng.standard_normal(to_layout(shape, layout)) * scale + loc).astype(dtype)


def channels(x, layout):
    return x.shape[1] if layout == "NCHW" else x.shape[-1]


def make_params(rng, C, dtype):
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    return gamma, beta, rm, rv


def strided_variants(x, layout):
    """Non-contiguous views of the same logical tensor as ``x``, with their names."""
    axis = 1 if layout == "NCHW" else x.ndim - 1
    out = {}
    # Memory in the other layout's order, seen with this layout's shape.
    order = list(range(x.ndim))
    order.remove(axis)
    order = order + [axis] if layout == "NCHW" else [order[0], axis] + order[1:]
    other = np.ascontiguousarray(np.transpose(x, order))
    out["transposed"] = np.transpose(other, np.argsort(order))
    # Every other element of a twice-as-large buffer along the last axis.
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    big[..., ::2] = x
    out["sliced"] = big[..., ::2]
    # Negative strides on the last axis.
    out["reversed"] = np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    # Fortran order.
    out["fortran"] = np.asfortranarray(x)
    return out
