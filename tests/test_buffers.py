"""Recycled memory for large outputs (bn_fast/_buffers.py)."""

import pickle
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from conftest import BACKENDS
from helpers import make_params, make_x

import bn_fast as bnf
from bn_fast import _buffers
from bn_fast import reference as ref

BIG = (4, 16, 128, 128)  # 4 MiB of float32: recycled from the threshold set below


@pytest.fixture(autouse=True)
def recycle_from_4_mib(monkeypatch):
    # With glibc, MIN_BYTES is 32 MiB (its malloc reuses smaller blocks); the cache
    # works the same from any size, and 4 MiB inputs keep these tests quick.
    monkeypatch.setattr(_buffers, "MIN_BYTES", 1 << 22)


def address(a):
    return a.__array_interface__["data"][0]


def test_a_dropped_output_is_reused_and_correct(backend, rng):
    x = make_x(rng, BIG, np.float32)
    y = bnf.batch_norm_train(x)[0]
    assert isinstance(y.base, _buffers._Lease)
    first = address(y)
    del y
    y = bnf.batch_norm_train(2 * x)[0]
    assert address(y) == first
    np.testing.assert_allclose(y, ref.batch_norm_train(2 * x)[0], rtol=1e-4, atol=1e-4)
    assert y.flags.c_contiguous and y.flags.writeable and y.flags.aligned
    assert address(y) % _buffers.ALIGN == 0


def test_memory_still_referenced_by_a_view_is_not_reused(backend, rng):
    x = make_x(rng, BIG, np.float32)
    gamma, beta, rm, rv = make_params(rng, 16, np.float32)
    y = bnf.batch_norm_infer(x, gamma, beta, rm, rv)
    part = y[1:, 3]
    kept = part.copy()
    del y
    others = [bnf.batch_norm_infer(x + k, gamma, beta, rm, rv) for k in range(3)]
    np.testing.assert_array_equal(part, kept)
    assert not any(np.shares_memory(part, o) for o in others)
    assert not np.shares_memory(others[0], others[1])


def test_outputs_pickle_and_view_like_plain_arrays(backend, rng):
    x = make_x(rng, BIG, np.float32)
    y = bnf.batch_norm_train(x)[0]
    z = pickle.loads(pickle.dumps(y))
    np.testing.assert_array_equal(z, y)
    assert not np.shares_memory(z, y)
    v = y[::2].T
    del y
    assert v.shape == (128, 128, 16, 2) and np.isfinite(v).all()


def test_kept_bytes_stay_within_the_limit():
    cache = _buffers.OutputCache(limit=3 * _buffers.MIN_BYTES + 3 * _buffers.ALIGN)
    arrays = [cache.empty((_buffers.MIN_BYTES,), np.uint8) for _ in range(5)]
    assert len({address(a) for a in arrays}) == 5
    del arrays
    assert 0 < cache.kept_bytes() <= cache.limit
    cache.clear()
    assert cache.kept_bytes() == 0


def test_sizes_are_matched_exactly():
    cache = _buffers.OutputCache(limit=1 << 30)
    a = cache.empty((1 << 20,), np.float32)
    first = address(a)
    del a
    b = cache.empty((1 << 20,), np.float64)  # twice the bytes: a new buffer
    assert address(b) != first
    c = cache.empty((1024, 1024), np.float32)  # the same bytes in another shape: reused
    assert address(c) == first and c.shape == (1024, 1024) and c.dtype == np.float32


def test_small_outputs_and_a_zero_limit_use_plain_arrays():
    assert _buffers.OutputCache(1 << 30).empty((10, 10), np.float32).base is None
    below = _buffers.OutputCache(1 << 30).empty((_buffers.MIN_BYTES - 1,), np.uint8)
    assert below.base is None and below.flags.owndata
    off = _buffers.OutputCache(0)
    a = off.empty((_buffers.MIN_BYTES,), np.uint8)
    assert a.base is None and a.flags.owndata
    del a
    assert off.kept_bytes() == 0


def test_threads_never_share_live_outputs(backend):
    rng = np.random.default_rng(7)
    xs = [make_x(rng, BIG, np.float32) for _ in range(4)]
    want = [ref.batch_norm_train(x)[0] for x in xs]
    failures = []

    def work(i):
        live = []
        for k in range(6):
            y = bnf.batch_norm_train(xs[i])[0]
            if k % 2:
                live.append(y)  # keep some alive while later calls recycle others
            if not np.allclose(y, want[i], rtol=1e-4, atol=1e-4):
                failures.append(i)
        shared.extend(live)

    shared = []
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len({address(a) for a in shared}) == len(shared) == 12
    for i, a in enumerate(shared):
        assert any(np.allclose(a, w, rtol=1e-4, atol=1e-4) for w in want), i


@pytest.mark.parametrize("value,ok", [("0", True), ("256", True), ("abc", False),
                                      ("-1", False), ("nan", False)])
def test_cache_size_from_the_environment(value, ok):
    code = ("import bn_fast._buffers as b; print(b.cache.limit)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"BN_FAST_CACHE_MB": value, "PATH": ""}, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == int(float(value) * 2**20)
    else:
        assert r.returncode != 0
        assert f"BN_FAST_CACHE_MB={value!r}: expected a number of megabytes >= 0" in r.stderr


@pytest.fixture(params=[b for b in BACKENDS if b != "numpy"])
def compiled_backend(request):
    previous = bnf.get_backend()
    bnf.set_backend(request.param)
    yield request.param
    bnf.set_backend(previous)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("op", ["train", "infer", "backward"])
def test_peak_memory_is_the_output_plus_per_channel_scratch(compiled_backend, monkeypatch,
                                                            op, layout):
    # The compiled backends allocate only the output and O(threads x C) scratch (the
    # NumPy reference backend works on float64 copies by design).  tracemalloc sees
    # NumPy's allocations (the Python layer's and the Cython kernels'), not Numba's.
    monkeypatch.setattr(_buffers.cache, "limit", 0)  # measure fresh outputs
    rng = np.random.default_rng(3)
    x = make_x(rng, BIG if layout == "NCHW" else (4, 128, 128, 16), np.float32, "NCHW")
    gamma, beta, rm, rv = make_params(rng, 16, np.float32)
    _, mean, invstd = bnf.batch_norm_train(x, layout=layout)
    call = {"train": lambda: bnf.batch_norm_train(x, gamma, beta, running_mean=rm,
                                                  running_var=rv, layout=layout),
            "infer": lambda: bnf.batch_norm_infer(x, gamma, beta, rm, rv, layout=layout),
            "backward": lambda: bnf.batch_norm_backward(x, x, mean, invstd, gamma,
                                                        layout=layout)}[op]
    call()
    tracemalloc.start()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result is not None
    assert x.nbytes <= peak < x.nbytes + 64 * 1024
