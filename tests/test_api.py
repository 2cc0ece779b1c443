"""Every public function against the NumPy reference, on every backend."""

import numpy as np
import pytest
from conftest import tol
from helpers import DTYPES, LAYOUTS, SHAPES, channels, make_params, make_x, strided_variants

import bn_fast as bnf
from bn_fast import _algebra, _backend
from bn_fast import reference as ref

CASES = [(s, d, lay) for s in SHAPES for d in DTYPES for lay in LAYOUTS]
IDS = [f"{'x'.join(map(str, s))}-{np.dtype(d).name}-{lay}" for s, d, lay in CASES]


def assert_close(actual, desired, dtype, scale=1.0):
    rtol, atol = tol(dtype)
    np.testing.assert_allclose(actual, desired, rtol=rtol * scale, atol=atol * scale)


def assert_training_close(got, want, running, running_want, dtype):
    """A training forward's (y, mean, invstd) and running (mean, var) against the reference's."""
    (y, mean, invstd), (yr, mr, sr) = got, want
    assert_close(y, yr, dtype, 10)
    assert_close(mean, mr, dtype)
    assert_close(invstd, sr, dtype, 10)
    assert_close(running[0], running_want[0], dtype)
    assert_close(running[1], running_want[1], dtype, 10)


@pytest.mark.parametrize("shape,dtype,layout", CASES, ids=IDS)
@pytest.mark.parametrize("affine", [True, False])
def test_train(backend, rng, shape, dtype, layout, affine):
    x = make_x(rng, shape, dtype, layout)
    gamma, beta, rm, rv = make_params(rng, channels(x, layout), dtype)
    if not affine:
        gamma = beta = None
    rm2, rv2, x0 = rm.copy(), rv.copy(), x.copy()
    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv,
                                           momentum=0.3, layout=layout)
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2,
                                      momentum=0.3, layout=layout)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.dtype == x.dtype and mean.shape == (channels(x, layout),)
    assert invstd.dtype == x.dtype and invstd.shape == mean.shape
    assert_close(y, yr, dtype, 10)
    assert_close(mean, mr, dtype)
    assert_close(invstd, sr, dtype)
    assert_close(rm, rm2, dtype)
    assert_close(rv, rv2, dtype)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("shape,dtype,layout", CASES, ids=IDS)
def test_infer(backend, rng, shape, dtype, layout):
    x = make_x(rng, shape, dtype, layout)
    gamma, beta, rm, rv = make_params(rng, channels(x, layout), dtype)
    y = bnf.batch_norm_infer(x, gamma, beta, rm, rv, eps=1e-3, layout=layout)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref.batch_norm_infer(x, gamma, beta, rm, rv, eps=1e-3, layout=layout),
                 dtype, 10)
    y0 = bnf.batch_norm_infer(x, None, None, rm, rv, layout=layout)
    assert_close(y0, ref.batch_norm_infer(x, None, None, rm, rv, layout=layout), dtype, 10)


@pytest.mark.parametrize("shape,dtype,layout", CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_backward(backend, rng, shape, dtype, layout, training, affine):
    x = make_x(rng, shape, dtype, layout)
    dy = make_x(rng, shape, dtype, layout, loc=0.5, scale=1.0)
    gamma, _, _, _ = make_params(rng, channels(x, layout), dtype)
    gamma = gamma if affine else None
    _, mean, invstd = ref.batch_norm_train(x, layout=layout)
    got = bnf.batch_norm_backward(dy, x, mean, invstd, gamma, training=training, layout=layout)
    want = ref.batch_norm_backward(dy, x, mean, invstd, gamma, training=training, layout=layout)
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    n = x.size // channels(x, layout)
    assert_close(got[0], want[0], dtype, 10)
    if affine:
        assert got[1].dtype == x.dtype and got[2].dtype == x.dtype
        assert_close(got[1], want[1], dtype, 10 * n)
        assert_close(got[2], want[2], dtype, 10 * n)
    else:
        assert got[1] is None and got[2] is None


@pytest.mark.parametrize("shape,dtype,layout", CASES, ids=IDS)
def test_fold_and_apply_affine(backend, rng, shape, dtype, layout):
    x = make_x(rng, shape, dtype, layout)
    gamma, beta, rm, rv = make_params(rng, channels(x, layout), dtype)
    scale, shift = bnf.fold_affine(gamma, beta, rm, rv, eps=1e-4)
    rscale, rshift = ref.fold_affine(gamma, beta, rm, rv, eps=1e-4)
    assert scale.dtype == dtype and shift.dtype == dtype
    assert_close(scale, rscale, dtype)
    assert_close(shift, rshift, dtype)
    y = bnf.apply_affine(x, scale, shift, layout=layout)
    assert_close(y, ref.apply_affine(x, scale, shift, layout=layout), dtype, 10)
    # The folded affine is inference.
    assert_close(y, ref.batch_norm_infer(x, gamma, beta, rm, rv, eps=1e-4, layout=layout),
                 dtype, 100)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 4, 5, 3), (5, 6, 7)])
def test_non_contiguous_inputs_match_contiguous(backend, rng, shape, dtype, layout):
    x = make_x(rng, shape, dtype, layout)
    dy = make_x(rng, shape, dtype, layout, loc=0.0)
    gamma, beta, rm, rv = make_params(rng, channels(x, layout), dtype)
    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, layout=layout)
    yi = bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout)
    dx, dg, db = bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout=layout)
    xs, dys = strided_variants(x, layout), strided_variants(dy, layout)
    for name, xv in xs.items():
        np.testing.assert_array_equal(xv, x)
        y2, mean2, invstd2 = bnf.batch_norm_train(xv, gamma, beta, layout=layout)
        assert_close(y2, y, dtype, 10)
        assert_close(mean2, mean, dtype)
        assert_close(bnf.batch_norm_infer(xv, gamma, beta, rm, rv, layout=layout), yi, dtype)
        dx2, dg2, db2 = bnf.batch_norm_backward(dys[name], xv, mean, invstd, gamma,
                                                layout=layout)
        assert_close(dx2, dx, dtype, 10)
        assert_close(dg2, dg, dtype, 100)
        assert_close(db2, db, dtype, 100)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_and_in_place(backend, rng, dtype, layout):
    x = make_x(rng, (3, 4, 5, 6), dtype, layout)
    gamma, beta, rm, rv = make_params(rng, channels(x, layout), dtype)
    want = bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout)

    out = np.empty_like(x)
    assert bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout, out=out) is out
    np.testing.assert_array_equal(out, want)

    inplace = x.copy()
    assert bnf.batch_norm_infer(inplace, gamma, beta, rm, rv, layout=layout,
                                out=inplace) is inplace
    np.testing.assert_array_equal(inplace, want)

    scale, shift = bnf.fold_affine(gamma, beta, rm, rv)
    inplace = x.copy()
    assert bnf.apply_affine(inplace, scale, shift, layout=layout, out=inplace) is inplace
    assert_close(inplace, want, dtype, 100)

    # out in a different memory order than x (written through a temporary).
    fout = np.asfortranarray(np.empty_like(x))
    assert bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout, out=fout) is fout
    np.testing.assert_array_equal(fout, want)

    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, layout=layout)
    out = np.empty_like(x)
    assert bnf.batch_norm_train(x, gamma, beta, layout=layout, out=out)[0] is out
    np.testing.assert_array_equal(out, y)
    inplace = x.copy()
    bnf.batch_norm_train(inplace, gamma, beta, layout=layout, out=inplace)
    np.testing.assert_array_equal(inplace, y)

    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, _, _ = bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout=layout)
    out = np.empty_like(x)
    assert bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout=layout, out=out)[0] is out
    np.testing.assert_array_equal(out, dx)
    inplace = dy.copy()
    bnf.batch_norm_backward(inplace, x, mean, invstd, gamma, layout=layout, out=inplace)
    np.testing.assert_array_equal(inplace, dx)


# C-contiguous x and out: every kind of view the kernels take (NCHW planes, NHWC rows,
# 2-D, one channel, narrow rows that are widened, 5-D), each written through out.
OUT_CASES = [((4, 6, 5), "NCHW"), ((4, 6, 5, 3), "NCHW"), ((5, 7), "NCHW"), ((5, 7), "NHWC"),
             ((3, 5, 4, 1), "NHWC"), ((3, 4, 5, 2), "NHWC"), ((16, 32, 32, 3), "NHWC"),
             ((2, 3, 4, 5, 6), "NHWC"), ((2, 3, 4, 5, 6), "NCHW")]


@pytest.mark.parametrize("shape,layout", OUT_CASES, ids=lambda v: str(v))
def test_contiguous_out_matches_a_new_output(backend, rng, shape, layout):
    x = rng.standard_normal(shape).astype(np.float32) * 2 + 3
    C = channels(x, layout)
    gamma, beta, rm, rv = make_params(rng, C, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    out = np.full_like(x, np.nan)
    want = bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout)
    assert bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert_close(out, ref.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout), np.float32, 10)
    scale, shift = bnf.fold_affine(gamma, beta, rm, rv)
    out[...] = np.nan
    np.testing.assert_array_equal(bnf.apply_affine(x, scale, shift, layout=layout, out=out),
                                  bnf.apply_affine(x, scale, shift, layout=layout))
    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, layout=layout)
    out[...] = np.nan
    np.testing.assert_array_equal(bnf.batch_norm_train(x, gamma, beta, layout=layout,
                                                       out=out)[0], y)
    dx = bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout=layout)[0]
    out[...] = np.nan
    np.testing.assert_array_equal(
        bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout=layout, out=out)[0], dx)


def _loss_train(x, gamma, beta, w, layout):
    return float((ref.batch_norm_train(x, gamma, beta, layout=layout)[0] * w).sum())


def _numeric_grad(f, a, h=1e-6):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 2, 3, 2)])
def test_backward_matches_finite_differences(backend, rng, shape, layout):
    x = make_x(rng, shape, np.float64, layout)
    w = make_x(rng, shape, np.float64, layout, loc=0.0)
    gamma, beta, _, _ = make_params(rng, channels(x, layout), np.float64)
    _, mean, invstd = bnf.batch_norm_train(x, gamma, beta, layout=layout)
    dx, dg, db = bnf.batch_norm_backward(w, x, mean, invstd, gamma, layout=layout)

    def loss():
        return _loss_train(x, gamma, beta, w, layout)
    np.testing.assert_allclose(dx, _numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dg, _numeric_grad(loss, gamma), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, _numeric_grad(loss, beta), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frozen_backward_matches_finite_differences(backend, rng, layout):
    x = make_x(rng, (3, 4, 5), np.float64, layout)
    w = make_x(rng, (3, 4, 5), np.float64, layout, loc=0.0)
    gamma, beta, rm, rv = make_params(rng, 4, np.float64)
    invstd = 1 / np.sqrt(rv + 1e-5)
    dx, dg, db = bnf.batch_norm_backward(w, x, rm, invstd, gamma, training=False, layout=layout)

    def loss():
        return float((ref.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout) * w).sum())
    np.testing.assert_allclose(dx, _numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dg, _numeric_grad(loss, gamma), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, _numeric_grad(loss, beta), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_by_hand(backend, dtype, layout):
    # Channel 0 holds 1, 2, 3, 4 (mean 2.5, biased var 1.25, unbiased var 5/3);
    # channel 1 holds 10, 10, 10, 14 (mean 11, biased var 3, unbiased var 4).
    x = np.array([[[1, 2], [10, 10]], [[3, 4], [10, 14]]], dtype=dtype)  # (N=2, C=2, L=2)
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    for unbiased, var in ((True, [5 / 3, 4.0]), (False, [1.25, 3.0])):
        rm = np.array([1.0, -1.0], dtype)
        rv = np.array([1.0, 2.0], dtype)
        _, mean, invstd = bnf.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.25,
                                               eps=1e-5, unbiased=unbiased, layout=layout)
        np.testing.assert_allclose(mean, [2.5, 11.0], rtol=1e-6)
        np.testing.assert_allclose(invstd, 1 / np.sqrt(np.array([1.25, 3.0]) + 1e-5), rtol=1e-6)
        np.testing.assert_allclose(rm, [0.75 * 1 + 0.25 * 2.5, 0.75 * -1 + 0.25 * 11], rtol=1e-6)
        np.testing.assert_allclose(rv, [0.75 * 1 + 0.25 * var[0], 0.75 * 2 + 0.25 * var[1]],
                                   rtol=1e-6)


def test_momentum_extremes(backend, rng):
    x = make_x(rng, (4, 3, 5), np.float64)
    rm, rv = np.full(3, 7.0), np.full(3, 9.0)
    bnf.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.0)
    np.testing.assert_array_equal(rm, 7.0)
    np.testing.assert_array_equal(rv, 9.0)
    _, mean, _ = bnf.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=1.0,
                                      unbiased=False)
    np.testing.assert_allclose(rm, mean)
    np.testing.assert_allclose(rv, x.var(axis=(0, 2)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_propagates(backend, rng, layout):
    x = make_x(rng, (4, 3, 5, 5), np.float32, layout)
    bad = (1, 2, 3, 0) if layout == "NCHW" else (1, 3, 0, 2)  # channel 2 either way
    x[bad] = np.nan
    y, mean, _ = bnf.batch_norm_train(x, layout=layout)
    yc = np.moveaxis(y, 1, -1) if layout == "NCHW" else y
    assert np.isnan(yc[..., 2]).all() and np.isfinite(yc[..., :2]).all()
    assert np.isnan(mean[2]) and np.isfinite(mean[:2]).all()
    yi = bnf.batch_norm_infer(x, None, None, np.zeros(3, np.float32), np.ones(3, np.float32),
                              layout=layout)
    assert np.isnan(yi[bad]) and np.isfinite(yi).sum() == yi.size - 1


def test_mixed_precision_parameters_allowed(backend, rng):
    x = make_x(rng, (4, 3, 5), np.float32)
    g64, b64, rm64, rv64 = make_params(rng, 3, np.float64)
    y = bnf.batch_norm_infer(x, g64, b64, rm64, rv64)
    assert y.dtype == np.float32
    assert_close(y, ref.batch_norm_infer(x, g64, b64, rm64, rv64), np.float32, 10)
    y, mean, invstd = bnf.batch_norm_train(x, g64, b64, running_mean=rm64, running_var=rv64)
    assert y.dtype == mean.dtype == invstd.dtype == np.float32


# Per-channel arrays in float64 beside float32 data, or absent: each is its own compiled
# variant of the per-channel algebra and of the one-pass kernels (16 channels of 48x36
# planes take those; 3 channels of 5 elements the separate passes).
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 16, 48, 36)])
@pytest.mark.parametrize("params", ["float64", "none"])
def test_float64_or_absent_parameters_with_float32_x(backend, rng, layout, shape, params):
    x = make_x(rng, shape, np.float32, layout)
    dy = make_x(rng, shape, np.float32, layout, loc=0.0)
    C = channels(x, layout)
    gamma, beta, rm, rv = make_params(rng, C, np.float64)
    if params == "none":
        gamma = beta = None
    rm2, rv2 = rm.copy(), rv.copy()
    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv,
                                           layout=layout)
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2,
                                      layout=layout)
    assert y.dtype == mean.dtype == invstd.dtype == np.float32
    assert rm.dtype == rv.dtype == np.float64
    assert_close(y, yr, np.float32, 10)
    assert_close(invstd, sr, np.float32, 10)
    np.testing.assert_allclose(rm, rm2, rtol=1e-6)
    np.testing.assert_allclose(rv, rv2, rtol=1e-6)
    assert_close(bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout),
                 ref.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout), np.float32, 10)
    for training in (True, False):
        # float64 statistics, as a user keeping them from a float64 computation would pass
        m64, s64 = mr.astype(np.float64), sr.astype(np.float64)
        got = bnf.batch_norm_backward(dy, x, m64, s64, gamma, training=training, layout=layout)
        want = ref.batch_norm_backward(dy, x, m64, s64, gamma, training=training, layout=layout)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
            else:
                assert a.dtype == np.float32
                assert_close(a, b, np.float32, 100)


def test_large_offset_float32_is_accurate(backend, rng):
    # float32 data far from zero: the normalisation must not cancel catastrophically.
    x = (1e4 + 1e-2 * rng.standard_normal((16, 3, 32, 32))).astype(np.float32)
    y, mean, invstd = bnf.batch_norm_train(x)
    yr, _, sr = ref.batch_norm_train(x)
    np.testing.assert_allclose(invstd, sr, rtol=1e-3)
    np.testing.assert_allclose(y, yr, atol=2e-3)
    yi = bnf.batch_norm_infer(x, None, None, x.astype(np.float64).mean((0, 2, 3)),
                              x.astype(np.float64).var((0, 2, 3)))
    np.testing.assert_allclose(yi, yr, atol=2e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_repeated_calls_are_bit_identical(backend, rng, layout):
    x = make_x(rng, (8, 5, 33, 31), np.float32, layout)
    dy = make_x(rng, (8, 5, 33, 31), np.float32, layout, loc=0.0)
    first = bnf.batch_norm_train(x, layout=layout)
    grads = bnf.batch_norm_backward(dy, x, first[1], first[2], np.ones(5, np.float32),
                                    layout=layout)
    for _ in range(3):
        again = bnf.batch_norm_train(x, layout=layout)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(grads, bnf.batch_norm_backward(dy, x, first[1], first[2],
                                                       np.ones(5, np.float32), layout=layout)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_inference(backend, layout):
    x = np.zeros((0, 3, 4, 4) if layout == "NCHW" else (0, 4, 4, 3), np.float32)
    y = bnf.batch_norm_infer(x, None, None, np.zeros(3), np.ones(3), layout=layout)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_layouts_agree_on_rank2(backend, rng):
    x = make_x(rng, (9, 4), np.float64)
    a = bnf.batch_norm_train(x, layout="NCHW")
    b = bnf.batch_norm_train(x, layout="NHWC")
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_thread_counts_give_the_same_results(backend, rng, nthreads):
    before = bnf.get_num_threads()
    x = make_x(rng, (4, 3, 40, 40), np.float64)
    try:
        bnf.set_num_threads(min(nthreads, before))
        y, mean, invstd = bnf.batch_norm_train(x)
    finally:
        bnf.set_num_threads(before)
    yr, mr, sr = ref.batch_norm_train(x)
    assert_close(y, yr, np.float64, 10)
    assert_close(mean, mr, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_per_channel_vectors(backend, rng, dtype):
    # Every-other-element views as running stats, gamma/beta and saved mean/invstd.
    x = make_x(rng, (4, 3, 5), dtype)
    dy = make_x(rng, (4, 3, 5), dtype, loc=0.0)
    gamma, beta, rm, rv = (np.repeat(p, 2)[::2] for p in make_params(rng, 3, dtype))
    assert not rm.flags.c_contiguous
    assert_close(bnf.batch_norm_infer(x, gamma, beta, rm, rv),
                 ref.batch_norm_infer(x, gamma, beta, rm, rv), dtype, 10)
    _, mean, invstd = ref.batch_norm_train(x)
    got = bnf.batch_norm_backward(dy, x, np.repeat(mean, 2)[::2], np.repeat(invstd, 2)[::2],
                                  gamma)
    want = ref.batch_norm_backward(dy, x, mean, invstd, gamma)
    for a, b in zip(got, want):
        assert_close(a, b, dtype, 100)
    rm2, rv2 = rm.copy(), rv.copy()
    y, _, _ = bnf.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv)
    yr, _, _ = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2)
    assert_close(y, yr, dtype, 10)
    assert_close(rm, rm2, dtype)
    assert_close(rv, rv2, dtype)


# Channels-first inputs big enough for the parallel kernels (>= 32768 elements): with
# 16 channels training and backward take the fused one-pass kernels (a block of
# channels summed, then normalised), 4 on 2 threads the separate passes, whose
# reductions read the planes in memory order, split between the threads; on 1 thread
# both take the serial fused kernels.
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("C", [4, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["contiguous", "strided planes", "in place"])
def test_nchw_fused_and_separate_paths_match_reference(backend, rng, nthreads, C, dtype,
                                                       view):
    before = bnf.get_num_threads()
    base = make_x(rng, (4, C, 48, 72), dtype)
    x = base[:, :, :, ::2] if view == "strided planes" else base
    dy = make_x(rng, x.shape, dtype, loc=0.0)
    gamma, beta, rm, rv = make_params(rng, C, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2)
    want = ref.batch_norm_backward(dy, x, mr, sr, gamma)
    x_in, dy_in = x.copy(), dy.copy()
    try:
        bnf.set_num_threads(min(nthreads, before))
        y, mean, invstd = bnf.batch_norm_train(x_in, gamma, beta, running_mean=rm,
                                               running_var=rv,
                                               out=x_in if view == "in place" else None)
        got = bnf.batch_norm_backward(dy_in, x, mean, invstd, gamma,
                                      out=dy_in if view == "in place" else None)
    finally:
        bnf.set_num_threads(before)
    assert_training_close((y, mean, invstd), (yr, mr, sr), (rm, rv), (rm2, rv2), dtype)
    for a, b in zip(got, want):
        assert_close(a, b, dtype, 100)
    if view == "in place":
        assert y is x_in and got[0] is dy_in


# Short float32 planes (under _numba.SHORT elements) in the two passes: statistics of
# blocks of channels over spans of at most 16 batch entries, merged at the end (144
# entries: 9 spans); 6 channels are too few for the fused kernels.  Centred at 1000,
# where sums of squares about zero would lose the variance.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["contiguous", "strided planes"])
def test_nchw_short_planes_over_many_batch_entries_match_reference(backend, rng, dtype, view):
    if view == "contiguous":
        x = make_x(rng, (144, 6, 7, 7), dtype, loc=1000.0)
    else:
        x = make_x(rng, (144, 6, 7, 14), dtype, loc=1000.0)[:, :, :, ::2]
    gamma, beta, rm, rv = make_params(rng, 6, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2)
    got = bnf.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv)
    assert_training_close(got, (yr, mr, sr), (rm, rv), (rm2, rv2), dtype)


# 7x7 planes of 525 channels on 2 threads: the fused kernels take blocks of 65 channels
# (the last one of 5), batch entry by batch entry.
@pytest.mark.parametrize("dtype", DTYPES)
def test_nchw_fused_blocks_of_channels_match_reference(backend, rng, dtype):
    x = make_x(rng, (4, 525, 7, 7), dtype)
    dy = make_x(rng, x.shape, dtype, loc=0.0)
    gamma, beta, rm, rv = make_params(rng, 525, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2)
    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv)
    assert_training_close((y, mean, invstd), (yr, mr, sr), (rm, rv), (rm2, rv2), dtype)
    got = bnf.batch_norm_backward(dy, x, mean, invstd, gamma)
    for a, b in zip(got, ref.batch_norm_backward(dy, x, mr, sr, gamma)):
        assert_close(a, b, dtype, 100)


# Channels-first inputs the separate passes serve, whose reductions split the N * C
# planes in memory order between the threads.  Inputs of 32 MiB or more get their
# statistics in pieces of at most BLOCK elements, each summed while the one before is
# squared (1031x1093 planes: 276 pieces of 4082 or 4083, the threads' split inside a
# plane; 56x56 ones: one piece each); smaller ones in runs of RUN elements.  Outputs of
# 64 MiB or more are written with streaming stores from each plane's first 32-byte
# boundary: 1031x1093 planes (15, split 7 and 8) start at every alignment and end
# mid-vector, 56x56 ones are whole vectors.  Short planes (7x11) go in blocks of 13,
# and the split of 429 planes between two threads falls inside one.  Channel 0 is
# constant, one sits far from zero.
@pytest.mark.parametrize("shape", [(3, 5, 1031, 1093), (140, 40, 56, 56), (33, 13, 7, 11)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_first_separate_passes_match_reference(backend, rng, shape, dtype):
    x = make_x(rng, shape, dtype)
    x[:, 0] = 2.5
    x[:, 2] += 1e4
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta, rm, rv = make_params(rng, shape[1], dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2)
    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv)
    assert_training_close((y, mean, invstd), (yr, mr, sr), (rm, rv), (rm2, rv2), dtype)
    assert mean[0] == dtype(2.5)
    np.testing.assert_array_equal(y[:, 0], np.broadcast_to(beta[0], y[:, 0].shape))
    del y, yr
    want = ref.batch_norm_backward(dy, x, mr, sr, gamma)
    for a, b in zip(bnf.batch_norm_backward(dy, x, mean, invstd, gamma), want):
        assert_close(a, b, dtype, 100)
    del want
    yir = ref.batch_norm_infer(x, gamma, beta, rm, rv)
    assert_close(bnf.batch_norm_infer(x, gamma, beta, rm, rv), yir, dtype, 10)
    assert_close(bnf.batch_norm_infer(x, gamma, beta, rm, rv, out=x), yir, dtype, 10)


# Channels-last inputs of 32 MiB or more take smaller blocks of rows and prefetch the
# next block; 270000 rows of 64 channels leave a partial block on each thread.  Outputs
# of 64 MiB or more are written with streaming stores when their rows are whole
# 32-byte vectors and aligned (new outputs, x itself when aligned), else as usual
# (an output one element off alignment).
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_channels_last_inputs_match_reference(backend, rng, dtype):
    x = make_x(rng, (3, 64, 300, 300), dtype, "NHWC")
    x[..., 0] = 2.5
    x[..., 2] += 1e4
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta, rm, rv = make_params(rng, 64, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2,
                                      layout="NHWC")
    y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv,
                                           layout="NHWC")
    assert_training_close((y, mean, invstd), (yr, mr, sr), (rm, rv), (rm2, rv2), dtype)
    assert mean[0] == dtype(2.5)
    np.testing.assert_array_equal(y[..., 0], np.broadcast_to(beta[0], y.shape[:-1]))
    del y, yr
    want = ref.batch_norm_backward(dy, x, mr, sr, gamma, layout="NHWC")
    for a, b in zip(bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout="NHWC"), want):
        assert_close(a, b, dtype, 100)
    del want
    yir = ref.batch_norm_infer(x, gamma, beta, rm, rv, layout="NHWC")
    raw = np.empty(x.size + 64 // x.itemsize + 1, dtype)
    first = (-raw.ctypes.data % 64) // x.itemsize
    for start in (first, first + 1):  # aligned, and one element off
        out = raw[start:start + x.size].reshape(x.shape)
        got = bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout="NHWC", out=out)
        assert got is out
        assert_close(got, yir, dtype, 10)


# Channels-last statistics of rows of 1024 channels or more merge groups of rows
# (_group_moments: eight in Numba, four in Cython), narrower rows two-pass blocks; 39
# rows leave remainders on 1 and 2 threads.  One channel is constant, one sits far from zero.
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("C", [1000, 1027])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["contiguous", "strided channels"])
def test_wide_channels_last_rows_match_reference(backend, rng, nthreads, C, dtype, view):
    before = bnf.get_num_threads()
    base = make_x(rng, (3, 2 * C, 13), dtype, "NHWC")  # (3, 13, 2C)
    base[..., 0] = 2.5
    base[..., 2] += 1e4
    x = base[..., ::2] if view == "strided channels" else base[..., :C]
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta, rm, rv = make_params(rng, C, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2,
                                      layout="NHWC")
    want = ref.batch_norm_backward(dy, x, mr, sr, gamma, layout="NHWC")
    try:
        bnf.set_num_threads(min(nthreads, before))
        y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, running_mean=rm,
                                               running_var=rv, layout="NHWC")
        got = bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout="NHWC")
    finally:
        bnf.set_num_threads(before)
    assert_training_close((y, mean, invstd), (yr, mr, sr), (rm, rv), (rm2, rv2), dtype)
    for a, b in zip(got, want):
        assert_close(a, b, dtype, 100)
    assert mean[0] == dtype(2.5)
    np.testing.assert_array_equal(y[..., 0], np.broadcast_to(beta[0], y.shape[:-1]))


# The channels-last normalisation takes rows wider than 4 KiB (1024 float32 or 512
# float64 channels) four at a time in 64-byte vectors (_affine_vectors in the Numba
# backend): 2053 channels end in a partial vector, and 520 rows split into tasks of 65
# or 32-33 rows end in a partial band.  One channel sits far from zero.
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["contiguous", "every other row"])
def test_wide_channels_last_normalisation_matches_reference(backend, rng, nthreads, dtype,
                                                             view):
    before = bnf.get_num_threads()
    C = 2053
    base = make_x(rng, (2, C, 520 if view == "contiguous" else 1040), dtype, "NHWC")
    base[..., 2] += 1e4
    x = base if view == "contiguous" else base[:, ::2]
    gamma, beta, rm, rv = make_params(rng, C, dtype)
    try:
        bnf.set_num_threads(min(nthreads, before))
        yi = bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout="NHWC")
        yt, _, _ = bnf.batch_norm_train(x, gamma, beta, layout="NHWC")
        scale, shift = bnf.fold_affine(gamma, beta, rm, rv)
        ya = bnf.apply_affine(x, scale, shift, layout="NHWC")
    finally:
        bnf.set_num_threads(before)
    assert_close(yi, ref.batch_norm_infer(x, gamma, beta, rm, rv, layout="NHWC"), dtype, 10)
    assert_close(yt, ref.batch_norm_train(x, gamma, beta, layout="NHWC")[0], dtype, 10)
    assert_close(ya, ref.apply_affine(x, scale, shift, layout="NHWC"), dtype, 10)


# The same rows in bands, every partial band (R rows split in tasks of 4-8 rows), with
# the means folded (two vectors) or one subtracted (three), out of place and in place.
# Rows of 1031 channels go in bands with three vectors (more than BAND_BYTES) and in
# whole rows with two (in bands in float64); of 2053, in bands with either (more than
# PLAIN_BAND_BYTES).  Neither is a multiple of a vector: each band ends in a tail.
@pytest.mark.parametrize("R", [32, 43, 50, 61])
@pytest.mark.parametrize("C", [1031, 2053])
@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_bands_match_reference_in_place_too(backend, rng, R, C, far, dtype):
    before = bnf.get_num_threads()
    x = rng.standard_normal((R, C)).astype(dtype)
    if far:
        x[:, 7] += 1e3
    gamma, beta, rm, rv = make_params(rng, C, dtype)
    rm[:], rv[:] = x.mean(axis=0), x.var(axis=0)
    want = ref.batch_norm_infer(x, gamma, beta, rm, rv, layout="NHWC")
    try:
        bnf.set_num_threads(1)
        y = bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout="NHWC")
        xi = x.copy()
        yi = bnf.batch_norm_infer(xi, gamma, beta, rm, rv, layout="NHWC", out=xi)
    finally:
        bnf.set_num_threads(before)
    assert yi is xi
    assert_close(y, want, dtype, 10)
    assert_close(yi, want, dtype, 10)


# A mean within two standard deviations of zero goes into the shift (center 0), as in
# PyTorch's x * scale + shift; one further out is subtracted first.  A constant channel
# (variance 0) keeps a nonzero mean; NaN stays NaN.  Both implementations: the NumPy
# one (Cython and NumPy backends) and the compiled per-channel loop (Numba).
def _coefficient_implementations():
    yield _algebra.affine_coefficients
    if "numba" in bnf.available_backends():
        from bn_fast import _numba

        yield _numba.affine_coefficients


@pytest.mark.parametrize("affine_coefficients", list(_coefficient_implementations()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_means_within_two_standard_deviations_fold_into_the_shift(affine_coefficients,
                                                                   dtype):
    mean = np.array([0.0, 1.99, -1.99, 2.01, -2.01, 5.0, 5.01, 3.0, 1e-3, 1e4, np.nan])
    var = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 6.25, 6.25, 0.0, 0.0, 1.0, 1.0])
    want = np.array([0.0, 0.0, 0.0, 2.01, -2.01, 0.0, 5.01, 3.0, 1e-3, 1e4, np.nan], dtype)
    center, scale, shift = (np.empty(len(mean), dtype) for _ in range(3))
    gamma, beta = np.linspace(0.5, 1.5, len(mean)), np.linspace(-1.0, 1.0, len(mean))
    affine_coefficients(mean, var, gamma, beta, 1e-5, center, scale, shift)
    np.testing.assert_array_equal(center, want)
    # Either way, (x - center) * scale + shift is the normalisation at x = mean + sd.
    x = mean + np.sqrt(var)
    y = (x - center.astype(np.float64)) * scale + shift
    np.testing.assert_allclose(y[:-1], (np.sqrt(var / (var + 1e-5)) * gamma + beta)[:-1],
                               rtol=tol(dtype)[0])


# Every channel's mean within two standard deviations: the channels-last kernels get a
# zero-length center and compute x * scale + shift on whole rows (64 and 2048 float32
# channels), or give blocks a zero center (4096 float32, and 2048 float64, channels).
# One channel is constant, at a value below two sqrt(eps).
@pytest.mark.parametrize("C", [64, 2048, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_normalisation_with_every_mean_folded(backend, rng, C, dtype):
    sd = rng.uniform(0.5, 2.0, C)
    loc = rng.uniform(-1.5, 1.5, C) * sd
    x = (rng.standard_normal((3, 5, 7, C)) * sd + loc).astype(dtype)
    x[..., 1] = 1e-3
    gamma, beta, _, _ = make_params(rng, C, dtype)
    rm, rv = loc.astype(dtype), (sd * sd).astype(dtype)
    yt, mean, invstd = bnf.batch_norm_train(x, gamma, beta, layout="NHWC")
    assert_close(yt, ref.batch_norm_train(x, gamma, beta, layout="NHWC")[0], dtype, 10)
    np.testing.assert_array_equal(yt[..., 1], np.broadcast_to(beta[1], yt.shape[:-1]))
    yi = bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout="NHWC")
    assert_close(yi, ref.batch_norm_infer(x, gamma, beta, rm, rv, layout="NHWC"), dtype, 10)
    scale, shift = bnf.fold_affine(gamma, beta, rm, rv)
    ya = bnf.apply_affine(x[:, :, ::2], scale, shift, layout="NHWC")  # strided rows
    assert_close(ya, ref.apply_affine(x[:, :, ::2], scale, shift, layout="NHWC"), dtype, 10)


# A zero-length center is zero: the same bits as a center of zeros, on whole rows, wide
# rows, strided channels and a streamed output (64 MiB).
@pytest.mark.parametrize("R,C", [(1000, 64), (300, 2048), (200, 4096), (65536, 256)])
def test_affine_nhwc_takes_a_zero_length_center_as_zero(backend, rng, R, C):
    K, nt = _backend.kernels(R * C)
    x = rng.standard_normal((R, 2 * C), dtype=np.float32)
    scale, shift = rng.standard_normal((2, C), dtype=np.float32)
    def aligned():  # as bn_fast's own outputs, which stream when large
        raw = np.empty(R * C + 16, np.float32)
        first = (-raw.ctypes.data % 64) // 4
        return raw[first:first + R * C].reshape(R, C)

    for xv in (np.ascontiguousarray(x[:, :C]), x[:, ::2]):
        got, want = aligned(), aligned()
        K.affine_nhwc(xv, np.zeros(0, np.float32), scale, shift, got, nt)
        K.affine_nhwc(xv, np.zeros(C, np.float32), scale, shift, want, nt)
        np.testing.assert_array_equal(got, want)
        assert_close(got, xv.astype(np.float64) * scale + shift, np.float32)


# Channels-last inputs of fewer than 32 channels and at least 16384 elements run on
# rows widened to k * C elements (k the largest divisor of the row count with k * C <=
# 256: here 64, 50, 16, 8 and 81; none for the prime 6229), with per-channel vectors
# tiled and statistics folded back.  Channel 0 is constant.
@pytest.mark.parametrize("C,rows", [(3, 64 * 96), (5, 36 * 100), (16, 2048), (31, 640),
                                    (3, 7 * 9 * 99), (3, 6229)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out", ["new", "in place", "strided out"])
def test_few_channels_last_match_reference(backend, rng, C, rows, dtype, out):
    x = make_x(rng, (1, C, rows), dtype, "NHWC")  # (1, rows, C)
    x[..., 0] = 1.5
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta, rm, rv = make_params(rng, C, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    yr, mr, sr = ref.batch_norm_train(x, gamma, beta, running_mean=rm2, running_var=rv2,
                                      layout="NHWC")
    wants = {t: ref.batch_norm_backward(dy, x, mr, sr, gamma, training=t, layout="NHWC")
             for t in (True, False)}
    yir = ref.batch_norm_infer(x, gamma, beta, rm2, rv2, layout="NHWC")

    def target(a):
        if out == "in place":
            return a.copy()
        if out == "strided out":
            return np.empty(a.shape[:-1] + (2 * C,), dtype)[..., ::2]
        return None

    o = target(x)
    y, mean, invstd = bnf.batch_norm_train(o if out == "in place" else x, gamma, beta,
                                           running_mean=rm, running_var=rv, layout="NHWC",
                                           out=o)
    assert_training_close((y, mean, invstd), (yr, mr, sr), (rm, rv), (rm2, rv2), dtype)
    assert mean[0] == dtype(1.5)
    np.testing.assert_array_equal(y[..., 0], np.broadcast_to(beta[0], y.shape[:-1]))
    o = target(x)
    yi = bnf.batch_norm_infer(o if out == "in place" else x, gamma, beta, rm, rv,
                              layout="NHWC", out=o)
    assert_close(yi, yir, dtype, 10)
    for training in (True, False):
        o = target(dy)
        got = bnf.batch_norm_backward(o if out == "in place" else dy, x, mr, sr, gamma,
                                      training=training, layout="NHWC", out=o)
        for a, b in zip(got, wants[training]):
            assert_close(a, b, dtype, 100)
        if o is not None:
            assert got[0] is o
