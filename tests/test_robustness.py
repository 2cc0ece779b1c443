"""Robustness: properties over random inputs, numerical stability, nothing lost, no leaks.

Every test runs on every available backend.  The property tests draw shapes (size-1
axes, odd sizes, ranks 2-5), both layouts, both dtypes, memory layouts (transposed,
sliced, negative strides), eps, momentum and read-only inputs, and check each public
function against ``bn_fast.reference``, that repeated calls are bit-identical, and
that no input is modified.
"""

import contextlib
import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tol
from helpers import DTYPES, LAYOUTS, to_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bn_fast as bnf
from bn_fast import _backend
from bn_fast import reference as ref

# derandomize: the same examples on every run, like the fixed seeds elsewhere.
PROPERTY = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def assert_close(actual, desired, dtype, k=10):
    """Within k times the dtype's tolerance, absolute errors relative to the largest value."""
    rtol, atol = tol(dtype)
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=k * rtol, atol=k * atol * scale)


def assert_same_bits(a, b):
    """Bit-identical arrays (None for None)."""
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def snapshot(*arrays):
    return [None if a is None else a.copy() for a in arrays]


def assert_unchanged(arrays, copies):
    for a, c in zip(arrays, copies):
        assert_same_bits(a, c)


def strided(values, order, steps):
    """A copy of ``values`` in a view of a larger buffer.

    The buffer holds the axes in ``order`` (outermost first, so a non-identity order
    is a transposed view) and ``|steps[i]|`` times as many elements along axis i;
    the view takes every ``steps[i]``-th one (2: sliced, negative: reversed).
    """
    full = [values.shape[a] * abs(steps[a]) for a in order]
    buffer = np.zeros(full, values.dtype)
    view = buffer.transpose(np.argsort(order))[tuple(slice(None, None, s) for s in steps)]
    view[...] = values
    return view


@st.composite
def cases(draw):
    """Inputs for every public function, in one randomly chosen configuration."""
    rank = draw(st.integers(2, 5))
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    ncs = draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank))
    if ncs[0] * math.prod(ncs[2:]) < 2:  # training needs more than one value per channel
        ncs[0] = 2
    shape, C = to_layout(ncs, layout), ncs[1]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    memory = st.tuples(st.permutations(range(rank)),
                       st.lists(st.sampled_from([1, 2, -1, -2]), min_size=rank, max_size=rank))

    def array(values):
        return strided(values, *draw(memory))

    x = array((rng.standard_normal(shape) * 2 + 3).astype(dtype))
    dy = array(rng.standard_normal(shape).astype(dtype))
    pdtype = np.dtype(draw(st.sampled_from([dtype, np.float64])))  # per-channel arrays
    affine = draw(st.booleans())
    gamma = rng.uniform(0.5, 1.5, C).astype(pdtype) if affine else None
    beta = rng.standard_normal(C).astype(pdtype) if affine else None
    rm = rng.standard_normal(C).astype(pdtype)
    rv = rng.uniform(0.5, 2.0, C).astype(pdtype)
    out = array(np.zeros(shape, dtype)) if draw(st.booleans()) else None
    readonly = draw(st.booleans())
    if readonly:
        for a in (x, dy, gamma, beta):
            if a is not None:
                a.flags.writeable = False
    return SimpleNamespace(
        x=x, dy=dy, gamma=gamma, beta=beta, rm=rm, rv=rv, out=out, layout=layout,
        eps=draw(st.floats(1e-6, 1.0)), momentum=draw(st.floats(0.0, 1.0)),
        unbiased=draw(st.booleans()), training=draw(st.booleans()),
        every_size_threaded=draw(st.booleans()), readonly=readonly)


@contextlib.contextmanager
def threads_for(case):
    """Optionally run even these small inputs on the threaded kernels."""
    saved = _backend.SERIAL_BELOW
    if case.every_size_threaded:
        _backend.SERIAL_BELOW = 0
    try:
        yield
    finally:
        _backend.SERIAL_BELOW = saved


def twice(call, out=None):
    """Call twice; return copies of both results (out is overwritten by the second call)."""
    results = []
    for _ in range(2):
        got = call()
        assert out is None or got[0] is out
        results.append([None if r is None else np.array(r, copy=True) for r in got])
    return results


# ---------------------------------------------------------------- properties

@PROPERTY
@given(case=cases())
def test_train_property(backend, case):
    c = case
    inputs = (c.x, c.gamma, c.beta)
    before = snapshot(*inputs)

    def call():
        rm, rv = c.rm.copy(), c.rv.copy()
        y, mean, invstd = bnf.batch_norm_train(
            c.x, c.gamma, c.beta, running_mean=rm, running_var=rv, momentum=c.momentum,
            eps=c.eps, unbiased=c.unbiased, layout=c.layout, out=c.out)
        return y, mean, invstd, rm, rv

    with threads_for(c):
        first, second = twice(call, c.out)
    rm, rv = c.rm.copy(), c.rv.copy()
    want = ref.batch_norm_train(c.x, c.gamma, c.beta, running_mean=rm, running_var=rv,
                                momentum=c.momentum, eps=c.eps, unbiased=c.unbiased,
                                layout=c.layout)
    for got, w in zip(first, [*want, rm, rv]):
        assert_close(got, w, c.x.dtype)
    for a, b in zip(first, second):
        assert_same_bits(a, b)
    assert_unchanged(inputs, before)


@PROPERTY
@given(case=cases())
def test_inference_fold_and_affine_property(backend, case):
    c = case
    inputs = (c.x, c.gamma, c.beta, c.rm, c.rv)
    before = snapshot(*inputs)
    with threads_for(c):
        first, second = twice(lambda: [bnf.batch_norm_infer(
            c.x, c.gamma, c.beta, c.rm, c.rv, eps=c.eps, layout=c.layout, out=c.out)], c.out)
        scale, shift = bnf.fold_affine(c.gamma, c.beta, c.rm, c.rv, eps=c.eps)
        folded = twice(lambda: [bnf.apply_affine(c.x, scale, shift, layout=c.layout,
                                                 out=c.out)], c.out)
    want = ref.batch_norm_infer(c.x, c.gamma, c.beta, c.rm, c.rv, eps=c.eps, layout=c.layout)
    assert_close(first[0], want, c.x.dtype)
    rscale, rshift = ref.fold_affine(c.gamma, c.beta, c.rm, c.rv, eps=c.eps)
    assert scale.dtype == shift.dtype == c.rm.dtype
    assert_close(scale, rscale, c.rm.dtype)
    assert_close(shift, rshift, c.rm.dtype)
    assert_close(folded[0][0], ref.apply_affine(c.x, scale, shift, layout=c.layout),
                 c.x.dtype)
    assert_close(folded[0][0], want, c.x.dtype, 100)
    for a, b in [(first[0][0], second[0][0]), (folded[0][0], folded[1][0])]:
        assert_same_bits(a, b)
    assert_unchanged(inputs, before)


@PROPERTY
@given(case=cases())
def test_backward_property(backend, case):
    c = case
    if c.training:
        _, mean, invstd = ref.batch_norm_train(c.x, layout=c.layout)
    else:
        mean, invstd = c.rm, (1.0 / np.sqrt(c.rv.astype(np.float64) + c.eps)).astype(c.rm.dtype)
    inputs = (c.dy, c.x, mean, invstd, c.gamma)
    before = snapshot(*inputs)
    with threads_for(c):
        first, second = twice(lambda: bnf.batch_norm_backward(
            c.dy, c.x, mean, invstd, c.gamma, training=c.training, layout=c.layout,
            out=c.out), c.out)
    want = ref.batch_norm_backward(c.dy, c.x, mean, invstd, c.gamma, training=c.training,
                                   layout=c.layout)
    assert_close(first[0], want[0], c.x.dtype)
    if c.gamma is None:
        assert first[1] is None and first[2] is None
    else:
        assert_close(first[1], want[1], c.x.dtype)
        assert_close(first[2], want[2], c.x.dtype)
    for a, b in zip(first, second):
        assert_same_bits(a, b)
    assert_unchanged(inputs, before)


# ---------------------------------------------------------------- numerical stability

def nchw_or_nhwc(x_nchw, layout):
    return x_nchw if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1))


def batch_stats(x, layout):
    """bn_fast's batch mean and biased variance, through float64 running statistics."""
    C = x.shape[1] if layout == "NCHW" else x.shape[-1]
    rm, rv = np.zeros(C), np.zeros(C)
    y, mean, invstd = bnf.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=1.0,
                                           unbiased=False, layout=layout)
    return y, rm, rv, invstd


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_offset_float32_variance(backend, layout):
    rng = np.random.default_rng(1)
    x64 = 1e4 + 1e-2 * rng.standard_normal((16, 3, 32, 32))
    x = nchw_or_nhwc(x64.astype(np.float32), layout)
    exact = x64.astype(np.float32).astype(np.float64).var(axis=(0, 2, 3))
    y, _, var, _ = batch_stats(x, layout)
    np.testing.assert_allclose(var, exact, rtol=1e-3)
    np.testing.assert_allclose(y, ref.batch_norm_train(x, layout=layout)[0], atol=2e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_near_1e30_do_not_overflow_the_variance(backend, layout):
    # float32 holds 1e30 but not its square: the statistics must be accumulated wider.
    rng = np.random.default_rng(2)
    x = nchw_or_nhwc((1e30 * (1 + 0.1 * rng.standard_normal((8, 3, 16, 16))))
                     .astype(np.float32), layout)
    axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
    exact = x.astype(np.float64)
    y, mean, var, invstd = batch_stats(x, layout)
    np.testing.assert_allclose(mean, exact.mean(axis=axes), rtol=1e-12)
    np.testing.assert_allclose(var, exact.var(axis=axes), rtol=1e-12)
    assert np.isfinite(invstd).all() and (invstd > 0).all()
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref.batch_norm_train(x, layout=layout)[0], atol=1e-5)


CONSTANTS = [0.0, 0.1, 1 / 3, -7.77, 3.14159e-3, 1e4 + 0.3, 1e30]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 3), (3, 4, 7, 5), (16, 4, 64, 64)],
                         ids=["rank2", "small", "threaded"])
def test_constant_channel_gives_beta_exactly(backend, shape, dtype, layout):
    rng = np.random.default_rng(3)
    x = nchw_or_nhwc(rng.standard_normal(shape).astype(dtype), layout)
    C = shape[1]
    channel = (slice(None), 1) if layout == "NCHW" else (..., 1)
    beta = rng.standard_normal(C).astype(dtype)
    for value in CONSTANTS:
        x[channel] = value
        exact = float(x[channel].flat[0])
        for gamma, b in [(None, None), (np.full(C, 2.5, dtype), beta)]:
            rm, rv = np.zeros(C), np.ones(C)
            y, _, _ = bnf.batch_norm_train(x, gamma, b, running_mean=rm, running_var=rv,
                                           momentum=1.0, layout=layout)
            want = 0.0 if b is None else b[1]
            assert rm[1] == exact, f"mean of a channel of {value!r}s is off by {rm[1] - exact}"
            assert rv[1] < 1e-30 * max(1.0, exact * exact)
            assert (y[channel] == want).all(), (
                f"channel of {value!r}s: |y - beta| up to {np.abs(y[channel] - want).max()}")


@pytest.fixture(scope="module")
def hundred_million():
    """1e8 float32 values near 1 (a float32 sum would stall at 2**24), and their mean."""
    x = np.random.default_rng(4).standard_normal(100_000_000, dtype=np.float32)
    x *= 0.5
    x += 1.0
    return x, x.mean(dtype=np.float64)  # numpy: pairwise float64 sums, ~1e-14 relative


@pytest.mark.parametrize("shape", [(100, 1, 1000, 1000), (100_000_000, 1)],
                         ids=["NCHW-planes", "rows"])
def test_1e8_elements_in_one_channel_keep_the_mean(backend, hundred_million, shape):
    x, exact = hundred_million
    rm, rv = np.zeros(1), np.ones(1)
    y, mean, _ = bnf.batch_norm_train(x.reshape(shape), running_mean=rm, running_var=rv,
                                      momentum=1.0)
    del y  # 400 MB
    assert abs(rm[0] / exact - 1) < 1e-6
    assert abs(mean[0] / exact - 1) < 1e-6


# ---------------------------------------------------------------- nothing lost

def _arrays(dtype=np.float32, shape=(4, 3, 5, 5)):
    rng = np.random.default_rng(5)
    C = shape[1]
    return SimpleNamespace(
        x=rng.standard_normal(shape).astype(dtype), dy=rng.standard_normal(shape).astype(dtype),
        gamma=rng.uniform(0.5, 1.5, C).astype(dtype), beta=rng.standard_normal(C).astype(dtype),
        rm=rng.standard_normal(C).astype(dtype), rv=rng.uniform(0.5, 2, C).astype(dtype),
        out=np.full(shape, 7.0, dtype))


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _train(a, **kw):
    kw = {"running_mean": a.rm, "running_var": a.rv, "out": a.out, **kw}
    return bnf.batch_norm_train(a.x, a.gamma, a.beta, **kw)


def _infer(a, **kw):
    return bnf.batch_norm_infer(a.x, a.gamma, a.beta, a.rm, a.rv, **{"out": a.out, **kw})


def _backward(a, **kw):
    return bnf.batch_norm_backward(a.dy, a.x, a.rm, a.rv, a.gamma, **{"out": a.out, **kw})


def _apply(a, **kw):
    return bnf.apply_affine(a.x, a.gamma, a.beta, **{"out": a.out, **kw})


def _fold(a, **kw):
    return bnf.fold_affine(a.gamma, a.beta, a.rm, a.rv, **kw)


def _set(**new):
    def edit(a):
        for k, v in new.items():
            setattr(a, k, v(a) if callable(v) else v)
        return a
    return edit


# Failures that tests/test_errors.py does not already cover, in every function.
FAILURES = [
    # (id, edit of the arrays, call, exception, message pattern)
    ("train-readonly-out", _set(out=lambda a: _readonly(a.out)), _train, ValueError,
     r"out is read-only"),
    ("backward-readonly-out", _set(out=lambda a: _readonly(a.out)), _backward, ValueError,
     r"out is read-only"),
    ("apply-readonly-out", _set(out=lambda a: _readonly(a.out)), _apply, ValueError,
     r"out is read-only"),
    ("train-readonly-running-mean", _set(rm=lambda a: _readonly(a.rm)), _train, ValueError,
     r"running_mean is read-only"),
    ("train-running-var-length", _set(rv=np.ones(4, np.float32)), _train, ValueError,
     r"running_var has shape \(4,\)"),
    ("train-out-overlaps-x", _set(out=lambda a: a.x[:, ::-1]), _train, ValueError,
     r"out overlaps an input"),
    ("backward-out-overlaps-dy", _set(out=lambda a: a.dy[::-1]), _backward, ValueError,
     r"out overlaps an input"),
    ("train-no-channels", _set(x=np.ones((4, 0, 5), np.float32), gamma=None, beta=None,
                               rm=np.zeros(0, np.float32), rv=np.ones(0, np.float32),
                               out=None), _train, ValueError, r"no channels"),
]


@pytest.mark.parametrize("edit,call,exc,pattern", [f[1:] for f in FAILURES],
                         ids=[f[0] for f in FAILURES])
def test_failed_call_changes_nothing(backend, edit, call, exc, pattern):
    a = edit(_arrays())
    arrays = [getattr(a, k) for k in vars(a)]
    before = snapshot(*arrays)
    with pytest.raises(exc, match=pattern):
        call(a)
    assert_unchanged(arrays, before)


class _FailingKernels:
    """A kernel module whose element-wise kernels fail, as on a MemoryError mid-call."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        if name.startswith(("affine_", "dx_", "normalise")):
            def fail(*args):
                raise MemoryError("injected")
            return fail
        return getattr(self._module, name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_running_stats_are_written_only_after_the_kernels_succeed(backend, layout,
                                                                  monkeypatch):
    real = _backend.kernels

    def failing(size):
        module, nthreads = real(size)
        return _FailingKernels(module), nthreads
    monkeypatch.setattr(_backend, "kernels", failing)
    a = _arrays()
    if layout == "NHWC":
        a.x, a.out = np.moveaxis(a.x, 1, -1).copy(), np.moveaxis(a.out, 1, -1).copy()
    arrays = [a.x, a.gamma, a.beta, a.rm, a.rv, a.out]
    before = snapshot(*arrays)
    with pytest.raises(MemoryError, match="injected"):
        _train(a, layout=layout)
    assert_unchanged(arrays, before)


def test_read_only_inputs_work(backend):
    a = _arrays()
    want = {"train": _train(a, out=None, running_mean=None, running_var=None),
            "infer": _infer(a, out=None), "backward": _backward(a, out=None),
            "frozen": _backward(a, out=None, training=False), "apply": _apply(a, out=None),
            "fold": _fold(a)}
    frozen = SimpleNamespace(**{k: _readonly(v) for k, v in vars(a).items()})
    got = {"train": _train(frozen, out=None, running_mean=None, running_var=None),
           "infer": _infer(frozen, out=None), "backward": _backward(frozen, out=None),
           "frozen": _backward(frozen, out=None, training=False),
           "apply": _apply(frozen, out=None), "fold": _fold(frozen)}
    for op, results in want.items():
        results = results if isinstance(results, tuple) else (results,)
        others = got[op] if isinstance(got[op], tuple) else (got[op],)
        for w, g in zip(results, others):
            assert_same_bits(g, w)


BAD_DTYPES = {"float16": (np.float16, r"has dtype float16, expected float32 or float64"),
              "byteswapped": (np.dtype(">f4"), r"has non-native byte order '>f4'")}
# (call, attribute of _arrays() it reads, the argument's name in the error message)
TAKERS = [(call, "x", "x") for call in (_train, _infer, _backward, _apply)] + [
    (_backward, "dy", "dy"), (_apply, "gamma", "scale"),
    *[(call, "gamma", "gamma") for call in (_train, _infer, _backward, _fold)],
    *[(call, "rv", "running_var") for call in (_train, _infer, _fold)]]


@pytest.mark.parametrize("bad", list(BAD_DTYPES))
@pytest.mark.parametrize("call,attribute,name", TAKERS,
                         ids=[f"{t[2]}-{t[0].__name__[1:]}" for t in TAKERS])
def test_float16_and_byteswapped_arrays_are_rejected(backend, call, attribute, name, bad):
    dtype, pattern = BAD_DTYPES[bad]
    a = _arrays()
    setattr(a, attribute, getattr(a, attribute).astype(dtype))
    arrays = [getattr(a, k) for k in vars(a)]
    before = snapshot(*arrays)
    with pytest.raises(TypeError, match=rf"^{name} {pattern}"):
        call(a)
    assert_unchanged(arrays, before)


def _empty_batch(rank, layout, dtype=np.float32):
    ncs = (0, 3, 4, 2, 3)[:rank]
    return np.zeros(to_layout(ncs, layout), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_empty_batch(backend, rank, layout):
    x = _empty_batch(rank, layout)
    g, b, rm, rv = np.ones(3, np.float32), np.zeros(3, np.float32), np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnf.batch_norm_train(x, g, b, running_mean=rm, running_var=rv, layout=layout)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    for y in (bnf.batch_norm_infer(x, g, b, rm, rv, layout=layout),
              bnf.apply_affine(x, g, b, layout=layout),
              bnf.batch_norm_backward(x, x, rm, rv, g, training=False, layout=layout)[0]):
        assert y.shape == x.shape and y.dtype == x.dtype
    out = np.empty_like(x)
    assert bnf.batch_norm_infer(x, g, b, rm, rv, layout=layout, out=out) is out


# ---------------------------------------------------------------- no leaks

LEAK_CHECK = """
import gc, os, sys
import numpy as np
import bn_fast as bnf

bnf.set_backend(sys.argv[1])
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


rng = np.random.default_rng(0)
x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
out = np.empty_like(x)
_, mean, invstd = bnf.batch_norm_train(x)


def bad():
    try:
        bnf.batch_norm_train(x[:1, :, :1, :1])
    except ValueError:
        pass


OPS = [
    lambda: bnf.batch_norm_train(x, g, b, running_mean=rm, running_var=rv),
    lambda: bnf.batch_norm_train(xt, layout="NHWC", out=np.empty_like(xt)),
    lambda: bnf.batch_norm_infer(x, g, b, rm, rv, out=out),
    lambda: bnf.batch_norm_infer(x[:, :, ::-1], g, b, rm, rv),
    lambda: bnf.batch_norm_backward(x, x, mean, invstd, g),
    lambda: bnf.batch_norm_backward(xt, xt, mean, invstd, None, training=False,
                                    layout="NHWC"),
    lambda: bnf.apply_affine(x, g, b),
    lambda: bnf.fold_affine(g, b, rm, rv),
    bad,
]


def run(calls):
    for i in range(calls):
        OPS[i % len(OPS)]()


run(10_000)  # warm-up: compilation, caches, allocator pools
gc.collect()
before = rss()
run(100_000)
gc.collect()
print(before, rss())
"""


def test_100k_small_calls_keep_rss_flat(backend):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LEAK_CHECK), backend],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    # 2 MiB over 100,000 calls: a leak of 21 bytes per call would show.
    assert after - before < 2 * 2**20, f"RSS grew from {before} to {after} bytes"
