"""fold_conv_bn / fold_bn_conv: the folded layer must equal BN + the unfolded layer.

The layers are evaluated with NumPy reference convolutions written here (N-d,
groups, stride, padding, dilation, output padding), checked against torch when
it is installed, and the batch norm with its textbook formula in float64.
"""

import itertools

import numpy as np
import pytest
from conftest import tol

import bn_fast as bnf

# ------------------------------------------------------------------ reference layers


def _tuple(v, nd):
    return (v,) * nd if np.isscalar(v) else tuple(v)


def conv_ref(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation like torch.nn.functional.conv{1,2,3}d, in float64.

    x (N, C, *S), w (O, C/groups, *k); with no spatial axes it is Linear (x @ w.T + b).
    """
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = w.ndim - 2
    stride, padding, dilation = (_tuple(v, nd) for v in (stride, padding, dilation))
    N, C = x.shape[:2]
    c_out, cg = w.shape[:2]
    x = np.pad(x, [(0, 0), (0, 0), *[(p, p) for p in padding]])
    out_size = [(n - d * (k - 1) - 1) // s + 1
                for n, k, s, d in zip(x.shape[2:], w.shape[2:], stride, dilation)]
    xg = x.reshape(N, groups, cg, *x.shape[2:])
    wg = w.reshape(groups, c_out // groups, cg, *w.shape[2:])
    y = np.zeros((N, groups, c_out // groups, *out_size))
    for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
        window = tuple(slice(t * d, t * d + s * (n - 1) + 1, s)
                       for t, d, s, n in zip(tap, dilation, stride, out_size))
        y += np.einsum("ngc...,goc->ngo...", xg[(..., *window)], wg[(..., *tap)])
    y = y.reshape(N, c_out, *out_size)
    return y if b is None else y + np.reshape(b, (c_out,) + (1,) * nd)


def conv_transpose_ref(x, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1,
                       groups=1):
    """Transposed convolution like torch.nn.functional.conv_transpose{1,2,3}d, in float64.

    x (N, C, *S), w (C, O/groups, *k): every input value scatters its kernel into the
    full output, whose first and last ``padding`` positions are then cropped.
    """
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    nd = w.ndim - 2
    stride, padding, output_padding, dilation = (
        _tuple(v, nd) for v in (stride, padding, output_padding, dilation))
    N, C = x.shape[:2]
    og = w.shape[1]
    full = [(n - 1) * s + d * (k - 1) + 1 + op
            for n, k, s, d, op in zip(x.shape[2:], w.shape[2:], stride, dilation, output_padding)]
    xg = x.reshape(N, groups, C // groups, *x.shape[2:])
    wg = w.reshape(groups, C // groups, og, *w.shape[2:])
    y = np.zeros((N, groups, og, *full))
    for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
        window = tuple(slice(t * d, t * d + s * (n - 1) + 1, s)
                       for t, d, s, n in zip(tap, dilation, stride, x.shape[2:]))
        y[(..., *window)] += np.einsum("ngc...,gco->ngo...", xg, wg[(..., *tap)])
    crop = tuple(slice(p, f - p) for p, f in zip(padding, full))
    y = y.reshape(N, groups * og, *full)[(..., *crop)]
    return y if b is None else y + np.reshape(b, (groups * og,) + (1,) * nd)


def bn_ref(y, gamma, beta, running_mean, running_var, eps):
    """Inference batch norm over axis 1, textbook formula, float64."""
    shape = (-1,) + (1,) * (y.ndim - 2)
    f = [None if a is None else np.asarray(a, np.float64).reshape(shape)
         for a in (gamma, beta, running_mean, running_var)]
    z = (y - f[2]) / np.sqrt(f[3] + eps)
    z = z if f[0] is None else z * f[0]
    return z if f[1] is None else z + f[1]


def to_oihw(w, layout):
    """A conv weight as PyTorch Conv's (out, in/groups, *k) for the reference; HWIO only."""
    nd = w.ndim - 2
    return w.transpose(nd + 1, nd, *range(nd)) if layout == "HWIO" else w


def layer_ref(x, w, b, layout, groups, geometry):
    if layout == "IOHW":
        return conv_transpose_ref(x, w, b, groups=groups, **geometry)
    return conv_ref(x, to_oihw(w, layout), b, groups=groups, **geometry)


# ------------------------------------------------------------------ cases

EPS = 1e-3


def channels(groups):
    """(in, out, groups) for the named grouping."""
    return {"g1": (3, 4, 1), "g2": (4, 6, 2), "depthwise": (3, 6, 3)}[groups]


def weight_shape(layout, c_in, c_out, groups, kernel):
    return {"OIHW": (c_out, c_in // groups, *kernel),
            "IOHW": (c_in, c_out // groups, *kernel),
            "HWIO": (*kernel, c_in // groups, c_out)}[layout]


KERNELS = {0: (), 1: (3,), 2: (3, 2), 3: (2, 3, 2)}
SPATIAL = {0: (), 1: (9,), 2: (6, 5), 3: (4, 5, 4)}

# Conv -> BN: strides, zero padding and dilation (folding after the layer is always exact).
CONV_BN_GEOMETRY = {
    ("conv", 0): {},
    ("conv", 1): dict(stride=2, padding=1, dilation=2),
    ("conv", 2): dict(stride=(2, 1), padding=(1, 2)),
    ("conv", 3): dict(stride=2, padding=(1, 0, 1)),
    ("transpose", 1): dict(stride=2, padding=1, output_padding=1, dilation=2),
    ("transpose", 2): dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0)),
    ("transpose", 3): dict(stride=(1, 2, 1), padding=(0, 1, 1)),
}
# BN -> layer: no zero padding for Conv; stride 1 and padding >= dilation*(k-1) for
# ConvTranspose, the cases fold_bn_conv documents as exact.
BN_CONV_GEOMETRY = {
    ("conv", 0): {},
    ("conv", 1): dict(stride=2, dilation=2),
    ("conv", 2): dict(stride=(1, 2)),
    ("conv", 3): dict(stride=(2, 1, 1), dilation=(1, 2, 1)),
    ("transpose", 1): dict(padding=5, dilation=2, output_padding=1),
    ("transpose", 2): dict(padding=(2, 1)),
    ("transpose", 3): dict(padding=(2, 4, 1), dilation=(1, 2, 1)),
}

CASES = [(layout, nd, groups)
         for layout in ("OIHW", "IOHW", "HWIO")
         for nd in ((1, 2, 3) if layout == "IOHW" else (0, 1, 2, 3))
         for groups in (("g1",) if nd == 0 else ("g1", "g2", "depthwise"))]
CASE_IDS = [f"{layout}-{nd}d-{groups}" for layout, nd, groups in CASES]


def make_case(rng, layout, nd, groups, dtype, *, bias, affine, bn_side, n=2):
    c_in, c_out, g = channels(groups)
    kernel = KERNELS[nd]
    w = rng.standard_normal(weight_shape(layout, c_in, c_out, g, kernel)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if bias else None
    c = c_out if bn_side == "output" else c_in
    bn = dict(
        gamma=rng.uniform(0.5, 2.0, c).astype(dtype) if affine else None,
        beta=rng.standard_normal(c).astype(dtype) if affine else None,
        running_mean=rng.standard_normal(c).astype(dtype),
        running_var=rng.uniform(0.2, 3.0, c).astype(dtype),
    )
    x = rng.standard_normal((n, c_in, *SPATIAL[nd])).astype(dtype)
    return x, w, b, g, bn


def kind(layout):
    return "transpose" if layout == "IOHW" else "conv"


def assert_close(actual, expected, dtype):
    rtol, atol = tol(dtype)
    # float32 weights carry a relative rounding error; scale atol with the output size.
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * np.abs(expected).max())


def check_result(w2, b2, w, c_out):
    assert w2.shape == w.shape and w2.dtype == w.dtype and w2.flags.c_contiguous
    assert b2.shape == (c_out,) and b2.dtype == w.dtype


# ------------------------------------------------------------------ the reference itself


def test_conv_ref_linear_and_identity(rng):
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((5, 4))
    b = rng.standard_normal(5)
    np.testing.assert_allclose(conv_ref(x, w, b), x @ w.T + b, rtol=1e-12)
    x = rng.standard_normal((2, 3, 5, 4))
    identity = np.zeros((3, 1, 3, 3))
    identity[:, 0, 1, 1] = 1.0
    np.testing.assert_array_equal(conv_ref(x, identity, padding=1, groups=3), x)


def test_conv_transpose_ref_is_adjoint_of_conv(rng):
    """<conv(x, w), y> == <x, conv_transpose(y, w)>: the transposed conv is the adjoint."""
    geometry = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((6, 2, 3, 3))
    y = conv_ref(x, w, groups=2, **geometry)
    dy = rng.standard_normal(y.shape)
    # The weight (O, I/g, *k) read as ConvTranspose's (in=O, out/groups=I/g, *k).
    dx = conv_transpose_ref(dy, w, groups=2, **geometry)
    assert dx.shape == x.shape
    np.testing.assert_allclose(np.vdot(y, dy), np.vdot(x, dx), rtol=1e-10)


# ------------------------------------------------------------------ Conv/Linear -> BN


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize(("layout", "nd", "groups"), CASES, ids=CASE_IDS)
def test_fold_conv_bn_matches_layer_then_bn(rng, layout, nd, groups, affine, bias, dtype):
    x, w, b, g, bn = make_case(rng, layout, nd, groups, dtype, bias=bias, affine=affine,
                               bn_side="output")
    geometry = CONV_BN_GEOMETRY[kind(layout), nd]
    expected = bn_ref(layer_ref(x, w, b, layout, g, geometry), **bn, eps=EPS)
    w2, b2 = bnf.fold_conv_bn(w, b, **bn, eps=EPS, weight_layout=layout, groups=g)
    check_result(w2, b2, w, channels(groups)[1])
    assert_close(layer_ref(x, w2, b2, layout, g, geometry), expected, dtype)


# ------------------------------------------------------------------ BN -> Conv/Linear


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize(("layout", "nd", "groups"), CASES, ids=CASE_IDS)
def test_fold_bn_conv_matches_bn_then_layer(rng, layout, nd, groups, affine, bias, dtype):
    x, w, b, g, bn = make_case(rng, layout, nd, groups, dtype, bias=bias, affine=affine,
                               bn_side="input")
    geometry = BN_CONV_GEOMETRY[kind(layout), nd]
    expected = layer_ref(bn_ref(x.astype(np.float64), **bn, eps=EPS), w, b, layout, g, geometry)
    w2, b2 = bnf.fold_bn_conv(w, b, **bn, eps=EPS, weight_layout=layout, groups=g)
    check_result(w2, b2, w, channels(groups)[1])
    assert_close(layer_ref(x, w2, b2, layout, g, geometry), expected, dtype)


def _bn_then_folded(rng, layout, geometry, *, nd=2, groups="g2"):
    """(BN then layer, folded layer) outputs for a float64 case with a non-zero shift."""
    x, w, b, g, bn = make_case(rng, layout, nd, groups, np.float64, bias=True, affine=True,
                               bn_side="input")
    before = layer_ref(bn_ref(x, **bn, eps=EPS), w, b, layout, g, geometry)
    w2, b2 = bnf.fold_bn_conv(w, b, **bn, eps=EPS, weight_layout=layout, groups=g)
    return before, layer_ref(x, w2, b2, layout, g, geometry)


def test_fold_bn_conv_zero_padding_differs_only_at_the_border(rng):
    """The documented caveat: with zero padding only outputs that see padding are wrong."""
    before, after = _bn_then_folded(rng, "OIHW", dict(padding=(1, 1)))  # kernel (3, 2)
    inner = (..., slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(after[inner], before[inner], rtol=1e-12, atol=1e-12)
    assert np.abs(after - before).max() > 1e-3


def test_fold_bn_conv_exact_with_copying_padding_modes(rng):
    """Reflect/replicate/wrap padding pads with input values, so BN commutes with it."""
    x, w, b, g, bn = make_case(rng, "OIHW", 2, "g2", np.float64, bias=True, affine=True,
                               bn_side="input")
    w2, b2 = bnf.fold_bn_conv(w, b, **bn, eps=EPS, groups=g)
    for mode in ("reflect", "edge", "wrap"):
        pad = [(0, 0), (0, 0), (1, 1), (2, 0)]
        before = conv_ref(np.pad(bn_ref(x, **bn, eps=EPS), pad, mode=mode), w, b, groups=g)
        after = conv_ref(np.pad(x, pad, mode=mode), w2, b2, groups=g)
        np.testing.assert_allclose(after, before, rtol=1e-12, atol=1e-12)


def test_fold_bn_conv_transpose_exact_region(rng):
    """ConvTranspose, stride 1: exact at output indices d*(k-1)-p .. L-1-p, wrong outside."""
    x_len, k, d, p = 9, 3, 2, 1  # exact indices 3 .. 7 of an output of length 11
    before, after = _bn_then_folded(rng, "IOHW", dict(padding=p, dilation=d), nd=1)
    assert before.shape[-1] == x_len - 2 * p + d * (k - 1)
    exact = np.zeros(before.shape[-1], bool)
    exact[d * (k - 1) - p:x_len - p] = True
    np.testing.assert_allclose(after[..., exact], before[..., exact], rtol=1e-12, atol=1e-12)
    assert (np.abs(after - before).max(axis=(0, 1))[~exact] > 1e-6).all()


def test_fold_bn_conv_transpose_stride_2_is_not_exact(rng):
    """kernel 2, stride 2 (each output sees one tap per axis): every output position is off."""
    x, w, b, g, bn = make_case(rng, "IOHW", 2, "g1", np.float64, bias=True, affine=True,
                               bn_side="input")
    w = w[..., :2, :2]
    geometry = dict(stride=2)
    before = conv_transpose_ref(bn_ref(x, **bn, eps=EPS), w, b, **geometry)
    w2, b2 = bnf.fold_bn_conv(w, b, **bn, eps=EPS, weight_layout="IOHW")
    after = conv_transpose_ref(x, w2, b2, **geometry)
    assert (np.abs(after - before).max(axis=(0, 1)) > 1e-6).all()


def test_keras_depthwise_kernel_as_grouped_hwio(rng):
    """The README recipe: a DepthwiseConv2D kernel (kh, kw, C, m) is HWIO (kh, kw, 1, C*m)."""
    C, m = 3, 2
    dw = rng.standard_normal((3, 2, C, m))

    def as_oihw(kernel):  # tf.nn.depthwise_conv2d: output channel k*m + q reads input k
        w = np.zeros((C * m, 1, 3, 2))
        for k, q in itertools.product(range(C), range(m)):
            w[k * m + q, 0] = kernel[:, :, k, q]
        return w

    x = rng.standard_normal((2, C, 6, 5))
    for fold, c in ((bnf.fold_conv_bn, C * m), (bnf.fold_bn_conv, C)):
        bn = dict(gamma=rng.uniform(0.5, 2, c), beta=rng.standard_normal(c),
                  running_mean=rng.standard_normal(c), running_var=rng.uniform(0.5, 2, c))
        if fold is bnf.fold_conv_bn:
            expected = bn_ref(conv_ref(x, as_oihw(dw), groups=C), **bn, eps=EPS)
        else:
            expected = conv_ref(bn_ref(x, **bn, eps=EPS), as_oihw(dw), groups=C)
        w2, b2 = fold(dw.reshape(3, 2, 1, C * m), None, **bn, eps=EPS, weight_layout="HWIO",
                      groups=C)
        actual = conv_ref(x, as_oihw(w2.reshape(dw.shape)), b2, groups=C)
        assert_close(actual, expected, np.float64)


# ------------------------------------------------------------------ dtypes and inputs


@pytest.mark.parametrize("fold", [bnf.fold_conv_bn, bnf.fold_bn_conv])
def test_result_keeps_weight_dtype(rng, fold):
    w = rng.standard_normal((4, 4, 3)).astype(np.float32)
    bn64 = dict(gamma=rng.uniform(0.5, 2, 4), beta=rng.standard_normal(4),
                running_mean=rng.standard_normal(4), running_var=rng.uniform(0.5, 2, 4))
    w2, b2 = fold(w, rng.standard_normal(4), **bn64)
    assert w2.dtype == np.float32 and b2.dtype == np.float32
    # float64 arithmetic inside: the float32 result is the float64 one, rounded once.
    w2_64, b2_64 = fold(w.astype(np.float64), None, **bn64)
    np.testing.assert_array_equal(w2, w2_64.astype(np.float32))
    w2, b2 = fold(w.astype(np.float64), None, **{k: v.astype(np.float32)
                                                  for k, v in bn64.items()})
    assert w2.dtype == np.float64 and b2.dtype == np.float64


@pytest.mark.parametrize("fold", [bnf.fold_conv_bn, bnf.fold_bn_conv])
@pytest.mark.parametrize("layout", ["OIHW", "IOHW", "HWIO"])
def test_inputs_not_modified(rng, fold, layout):
    _, w, b, g, bn = make_case(rng, layout, 2, "g2", np.float32, bias=True, affine=True,
                               bn_side="output" if fold is bnf.fold_conv_bn else "input")
    args = [w, b, bn["gamma"], bn["beta"], bn["running_mean"], bn["running_var"]]
    copies = [a.copy() for a in args]
    for a in args:
        a.flags.writeable = False  # any write into an input would raise
    w2, b2 = fold(*args, weight_layout=layout, groups=g)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)
    assert not np.shares_memory(w2, w) and not np.shares_memory(b2, b)
    assert w2.flags.writeable and b2.flags.writeable


def test_transposed_weight_view(rng):
    """A non-contiguous weight (a transposed view) folds like its contiguous copy."""
    w = rng.standard_normal((3, 2, 6)).transpose(2, 1, 0)  # (6, 2, 3) OIHW, groups 2
    bn = dict(gamma=None, beta=None, running_mean=rng.standard_normal(6),
              running_var=rng.uniform(0.5, 2, 6))
    w2, b2 = bnf.fold_conv_bn(w, None, **bn, groups=2)
    w2c, b2c = bnf.fold_conv_bn(np.ascontiguousarray(w), None, **bn, groups=2)
    np.testing.assert_array_equal(w2, w2c)
    np.testing.assert_array_equal(b2, b2c)


# ------------------------------------------------------------------ errors


def _bn(c):
    return dict(gamma=np.ones(c), beta=np.zeros(c), running_mean=np.zeros(c),
                running_var=np.ones(c))


ERRORS = [
    # (fold, weight shape, bias, bn channels, options, error, message)
    ("conv_bn", (8, 3, 3, 3), None, 7, {}, ValueError,
     r"running_mean has shape \(7,\), expected \(8,\) \(the BN normalises the output"),
    ("bn_conv", (8, 3, 3, 3), None, 8, {}, ValueError,
     r"running_mean has shape \(8,\), expected \(3,\) \(the BN normalises the input"),
    ("bn_conv", (8, 2, 3), None, 2, {"groups": 2}, ValueError, r"expected \(4,\)"),
    ("conv_bn", (4, 6, 3), None, 4, {"weight_layout": "IOHW", "groups": 2}, ValueError,
     r"running_mean has shape \(4,\), expected \(12,\)"),
    ("conv_bn", (3, 3, 2, 5), None, 6, {"weight_layout": "HWIO"}, ValueError,
     r"expected \(5,\) .*weight_layout='HWIO'"),
    ("conv_bn", (6, 2, 3), None, 6, {"groups": 4}, ValueError,
     r"groups=4 does not divide the 6 output channels of weight with shape \(6, 2, 3\)"),
    ("bn_conv", (6, 2, 3), None, 6, {"groups": 4, "weight_layout": "IOHW"}, ValueError,
     r"groups=4 does not divide the 6 input channels"),
    ("conv_bn", (3, 2, 5), None, 5, {"groups": 2, "weight_layout": "HWIO"}, ValueError,
     r"groups=2 does not divide the 5 output channels"),
    ("conv_bn", (4, 2), None, 4, {"groups": 0}, ValueError, r"groups=0 must be an integer"),
    ("conv_bn", (4, 2), None, 4, {"groups": 2.0}, TypeError, r"groups=2.0 must be an integer"),
    ("conv_bn", (4, 2), None, 4, {"groups": True}, TypeError, r"groups=True"),
    ("conv_bn", (4, 2), None, 4, {"weight_layout": "OHWI"}, ValueError,
     r"weight_layout='OHWI' is not supported; expected one of \('OIHW', 'IOHW', 'HWIO'\)"),
    ("bn_conv", (4, 2), None, 2, {"weight_layout": "oihw"}, ValueError, r"weight_layout='oihw'"),
    ("conv_bn", (4, 2, 3), 3, 4, {}, ValueError, r"bias has shape \(3,\), expected \(4,\)"),
    ("bn_conv", (4, 2, 3), (4, 1), 2, {}, ValueError, r"bias has shape \(4, 1\), expected \(4,\)"),
    ("conv_bn", (4,), None, 4, {}, ValueError,
     r"weight has shape \(4,\) \(rank 1\), expected rank >= 2"),
    ("bn_conv", (), None, 1, {}, ValueError, r"weight has shape \(\) \(rank 0\)"),
    ("conv_bn", (4, 2), None, 4, {"eps": 0.0}, ValueError, r"eps=0.0 must be a finite number > 0"),
    ("bn_conv", (4, 2), None, 2, {"eps": -1e-5}, ValueError, r"eps=-1e-05"),
]


@pytest.mark.parametrize(("fold", "shape", "bias", "c", "options", "error", "match"), ERRORS)
def test_errors(fold, shape, bias, c, options, error, match):
    fold = {"conv_bn": bnf.fold_conv_bn, "bn_conv": bnf.fold_bn_conv}[fold]
    bias = None if bias is None else np.zeros(bias)
    with pytest.raises(error, match=match):
        fold(np.ones(shape), bias, **_bn(c), **options)


def test_type_errors():
    with pytest.raises(TypeError, match="weight has dtype int64"):
        bnf.fold_conv_bn(np.ones((2, 2), np.int64), None, **_bn(2))
    with pytest.raises(TypeError, match="bias has dtype complex128"):
        bnf.fold_bn_conv(np.ones((2, 2)), np.ones(2, complex), **_bn(2))
    with pytest.raises(ValueError, match="running_var has shape"):
        bnf.fold_bn_conv(np.ones((2, 2)), None, None, None, np.zeros(2), np.ones(3))


# ------------------------------------------------------------------ against torch

TORCH_CASES = [(layout, nd, groups) for layout, nd, groups in CASES if layout != "HWIO"]


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def torch_layer(torch, x, w, b, layout, groups, geometry):
    """The layer with torch.nn.functional, float64."""
    F = torch.nn.functional
    nd = w.ndim - 2
    x, w = torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(w, np.float64))
    b = None if b is None else torch.from_numpy(np.asarray(b, np.float64))
    if nd == 0:
        return F.linear(x, w, b).numpy()
    if layout == "IOHW":
        return getattr(F, f"conv_transpose{nd}d")(x, w, b, groups=groups, **geometry).numpy()
    return getattr(F, f"conv{nd}d")(x, w, b, groups=groups, **geometry).numpy()


def torch_bn(torch, y, bn):
    t = {k: None if v is None else torch.from_numpy(np.asarray(v, np.float64))
         for k, v in bn.items()}
    y = torch.from_numpy(np.asarray(y, np.float64))
    return torch.nn.functional.batch_norm(y, t["running_mean"], t["running_var"], t["gamma"],
                                          t["beta"], training=False, eps=EPS).numpy()


@pytest.mark.parametrize(("layout", "nd", "groups"), TORCH_CASES,
                         ids=[f"{a}-{b}d-{c}" for a, b, c in TORCH_CASES])
def test_reference_layers_match_torch(torch, rng, layout, nd, groups):
    x, w, b, g, _ = make_case(rng, layout, nd, groups, np.float64, bias=True, affine=False,
                              bn_side="output")
    for geometry in (CONV_BN_GEOMETRY[kind(layout), nd], BN_CONV_GEOMETRY[kind(layout), nd]):
        np.testing.assert_allclose(layer_ref(x, w, b, layout, g, geometry),
                                   torch_layer(torch, x, w, b, layout, g, geometry),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("direction", ["conv_bn", "bn_conv"])
@pytest.mark.parametrize(("layout", "nd", "groups"), TORCH_CASES,
                         ids=[f"{a}-{b}d-{c}" for a, b, c in TORCH_CASES])
def test_fold_matches_torch(torch, rng, layout, nd, groups, direction, dtype):
    side = "output" if direction == "conv_bn" else "input"
    x, w, b, g, bn = make_case(rng, layout, nd, groups, dtype, bias=True, affine=True,
                               bn_side=side)
    if direction == "conv_bn":
        geometry = CONV_BN_GEOMETRY[kind(layout), nd]
        expected = torch_bn(torch, torch_layer(torch, x, w, b, layout, g, geometry), bn)
        w2, b2 = bnf.fold_conv_bn(w, b, **bn, eps=EPS, weight_layout=layout, groups=g)
    else:
        geometry = BN_CONV_GEOMETRY[kind(layout), nd]
        expected = torch_layer(torch, torch_bn(torch, x, bn), w, b, layout, g, geometry)
        w2, b2 = bnf.fold_bn_conv(w, b, **bn, eps=EPS, weight_layout=layout, groups=g)
    assert_close(torch_layer(torch, x, w2, b2, layout, g, geometry), expected, dtype)


@pytest.mark.parametrize(("layout", "nd"), [("OIHW", 0), ("OIHW", 1), ("OIHW", 2), ("OIHW", 3),
                                          ("IOHW", 1), ("IOHW", 2), ("IOHW", 3)])
def test_fold_conv_bn_matches_torch_fusion(torch, rng, layout, nd):
    """torch.nn.utils.fusion (groups=1 only) gives the same fused weights."""
    from torch.nn.utils import fusion

    transpose = layout == "IOHW"
    _, w, b, _, bn = make_case(rng, layout, nd, "g1", np.float64, bias=True, affine=True,
                               bn_side="output")
    t = {k: torch.from_numpy(v) for k, v in bn.items()}
    args = (torch.from_numpy(w), torch.from_numpy(b), t["running_mean"], t["running_var"], EPS,
            t["gamma"], t["beta"])
    fw, fb = (fusion.fuse_linear_bn_weights(*args) if nd == 0
              else fusion.fuse_conv_bn_weights(*args, transpose=transpose))
    w2, b2 = bnf.fold_conv_bn(w, b, **bn, eps=EPS, weight_layout=layout)
    np.testing.assert_allclose(w2, fw.detach().numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(b2, fb.detach().numpy(), rtol=1e-13, atol=1e-13)
