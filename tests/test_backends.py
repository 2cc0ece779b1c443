"""Backend selection, the Cython fallback, thread controls and the optional build.

Scenarios that need a different import state (Numba missing, BN_FAST_BACKEND set)
run in a fresh interpreter, so this process's backends are left alone.
"""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import bn_fast as bnf
from bn_fast import _backend
from bn_fast import reference as ref

PACKAGE_ROOT = str(Path(bnf.__file__).resolve().parent.parent)
SETUP_PY = Path(PACKAGE_ROOT, "setup.py")

try:
    from bn_fast import _cython
    CYTHON_MISSING = ""
except ImportError as exc:
    _cython = None
    CYTHON_MISSING = (f"the optional extension bn_fast._cython is not built here ({exc}); "
                      "it needs Cython and a C compiler with OpenMP at install time")
needs_cython = pytest.mark.skipif(_cython is None, reason=CYTHON_MISSING)

# Imports bn_fast the way a user would and compares every public operation with the
# reference; the preamble decides which modules are importable.  Shapes above and below
# the serial threshold, so both the threaded and the one-thread kernels run.
CHECK_OPS = """
import warnings
warnings.simplefilter("error")  # a fallback to the NumPy backend warns: make it fatal
import numpy as np
import bn_fast as bnf
from bn_fast import reference as ref

rng = np.random.default_rng(7)
for layout, shape in [("NCHW", (4, 3, 64, 65)), ("NHWC", (4, 64, 65, 3)),
                      ("NCHW", (3, 5, 7)), ("NHWC", (6, 5))]:
    for dtype, tol in [(np.float32, 2e-5), (np.float64, 1e-11)]:
        x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[1] if layout == "NCHW" else shape[-1]
        g = rng.uniform(0.5, 1.5, C).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
        rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
        got = bnf.batch_norm_train(x, g, b, layout=layout)
        want = ref.batch_norm_train(x, g, b, layout=layout)
        for u, v in zip(got, want):
            np.testing.assert_allclose(u, v, rtol=tol, atol=tol)
        np.testing.assert_allclose(bnf.batch_norm_infer(x, g, b, rm, rv, layout=layout),
                                   ref.batch_norm_infer(x, g, b, rm, rv, layout=layout),
                                   rtol=tol, atol=tol)
        mean, invstd = want[1], want[2]
        got = bnf.batch_norm_backward(dy, x, mean, invstd, g, layout=layout)
        want = ref.batch_norm_backward(dy, x, mean, invstd, g, layout=layout)
        for u, v in zip(got, want):
            np.testing.assert_allclose(u, v, rtol=10 * tol, atol=10 * tol)
print("backend", bnf.get_backend(), "available", bnf.available_backends())
"""

NO_NUMBA = 'import sys\nsys.modules["numba"] = None  # what `import numba` sees without Numba\n'
NO_CYTHON = 'import sys\nsys.modules["bn_fast._cython"] = None  # as if the build had failed\n'


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter importing this bn_fast; return the result."""
    environ = {k: v for k, v in os.environ.items() if k != "BN_FAST_BACKEND"}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT,
                                                          environ.get("PYTHONPATH")]))
    environ.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ,
                          capture_output=True, text=True, timeout=300)


def assert_ran(result, stdout_part):
    assert result.returncode == 0, result.stderr
    assert stdout_part in result.stdout, result.stdout


# ---------------------------------------------------------------- selection

@needs_cython
def test_without_numba_the_cython_backend_serves():
    result = run_python(NO_NUMBA + CHECK_OPS)
    assert_ran(result, "backend cython available ['cython', 'numpy']")


@pytest.mark.parametrize("name", ["numba", "cython", "numpy"])
def test_bn_fast_backend_environment_variable_forces_a_backend(name):
    if name not in bnf.available_backends():
        pytest.skip(f"backend {name!r} is not available here: {_backend._errors.get(name)}")
    result = run_python(CHECK_OPS, BN_FAST_BACKEND=name)
    assert_ran(result, f"backend {name} available")


def test_bn_fast_backend_environment_variable_rejects_unknown_names():
    result = run_python("import bn_fast; bn_fast.get_backend()", BN_FAST_BACKEND="fortran")
    assert result.returncode != 0
    assert "ValueError: unknown backend 'fortran'" in result.stderr, result.stderr


def test_without_any_compiled_backend_numpy_serves_with_a_warning():
    code = NO_NUMBA + NO_CYTHON + """
import warnings
import bn_fast as bnf
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    name = bnf.get_backend()
print(name, [str(w.message) for w in caught if w.category is RuntimeWarning])
"""
    result = run_python(code)
    assert_ran(result, "numpy ['bn_fast: neither Numba nor the compiled Cython extension")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError) as info:
        bnf.set_backend("fortran")
    message = str(info.value)
    assert "unknown backend 'fortran'" in message
    assert "'numba', 'cython', 'numpy'" in message  # what could be asked for
    assert f"available here: {bnf.available_backends()}" in message


def test_unavailable_backend_says_why_and_what_is_available():
    code = NO_NUMBA + """
import bn_fast as bnf
try:
    bnf.set_backend("numba")
except ValueError as exc:
    print(exc)
print("available", bnf.available_backends())
"""
    result = run_python(code)
    assert_ran(result, "backend 'numba' is not available: ModuleNotFoundError")
    message, available = result.stdout.splitlines()
    assert available.startswith("available [") and "numba" not in available
    assert message.endswith(f"(available here: {available.removeprefix('available ')})")


def test_set_backend_switches_and_get_backend_reports(backend):
    assert bnf.get_backend() == backend
    assert backend in bnf.available_backends()


# ---------------------------------------------------------------- threads

@needs_cython
def test_set_num_threads_sets_the_openmp_threads():
    before = bnf.get_num_threads()
    try:
        for n in sorted({1, _backend.max_threads()}):
            bnf.set_num_threads(n)
            assert bnf.get_num_threads() == n
            assert _cython.get_num_threads() == n
    finally:
        bnf.set_num_threads(before)
    assert _cython.get_num_threads() == before


@pytest.mark.skipif(_backend.max_threads() < 2, reason="needs 2 cores")
@pytest.mark.parametrize("name", [b for b in bnf.available_backends() if b != "numpy"])
def test_each_python_thread_runs_kernels_with_bn_fast_thread_count(name):
    """The compiled backends' thread counts are per Python thread: a thread whose own
    setting is 1 still gets bn_fast's count on its first call."""
    previous = bnf.get_backend()
    bnf.set_backend(name)
    module = _backend._current[1]
    x = np.ones((8, 4, 64, 64), np.float32)  # above SERIAL_BELOW: the parallel kernels
    seen = []

    def work():
        module.set_num_threads(1)
        bnf.batch_norm_train(x)
        seen.append(module.get_num_threads())

    thread = threading.Thread(target=work)
    try:
        thread.start()
        thread.join()
    finally:
        bnf.set_backend(previous)
    assert seen == [bnf.get_num_threads()] and seen[0] > 1


@pytest.mark.parametrize("name", [b for b in bnf.available_backends() if b != "numpy"])
def test_kernels_follow_the_backend_and_thread_count_set_later(name):
    """_backend.kernels keeps its answer between calls: each set_* must renew it."""
    previous, threads = bnf.get_backend(), bnf.get_num_threads()
    try:
        bnf.set_backend(name)
        for n in sorted({1, _backend.max_threads()}):
            bnf.set_num_threads(n)
            module, nthreads = _backend.kernels(1 << 20)
            assert nthreads == n
            assert getattr(module, "_module", module).__name__ == _backend.MODULES[name]
        bnf.set_backend("numpy")
        assert _backend.kernels(1 << 20)[0] is _backend._loaded["numpy"]
    finally:
        bnf.set_backend(previous)
        bnf.set_num_threads(threads)


@needs_cython
@pytest.mark.parametrize("n", [0, "too many"])
def test_bad_thread_counts_change_nothing(n):
    n = _backend.max_threads() + 1 if n == "too many" else n
    before = bnf.get_num_threads(), _cython.get_num_threads()
    with pytest.raises(ValueError, match=rf"n={n} must be an integer from 1 to "
                                         rf"{_backend.max_threads()}"):
        bnf.set_num_threads(n)
    assert (bnf.get_num_threads(), _cython.get_num_threads()) == before


@needs_cython
def test_cython_thread_limit_follows_omp_num_threads():
    result = run_python(NO_NUMBA + """
import bn_fast as bnf
bnf.get_backend()
print("limit", bnf._backend.max_threads(), bnf.get_num_threads())
""", OMP_NUM_THREADS="1")
    assert_ran(result, "limit 1 1")


# ---------------------------------------------------------------- Cython kernels directly

def _run_kernels(K, kind, x, dy, vectors, nthreads):
    """Every kernel of module K on x, with a strided output and an in-place call."""
    C = x.shape[1]
    m, s, h, d = vectors
    out = {"stats": (np.empty(C), np.empty(C)), "dsum": (np.empty(C), np.empty(C)),
           "affine": np.empty(x.shape, x.dtype),
           "dx": np.empty(x.shape, x.dtype)[..., ::-1],  # a negative stride
           "in-place": x.copy()}
    getattr(K, "stats_" + kind)(x, *out["stats"], nthreads)
    getattr(K, "dsum_" + kind)(dy, x, m, *out["dsum"], nthreads)
    getattr(K, "affine_" + kind)(x, m, s, h, out["affine"], nthreads)
    getattr(K, "dx_" + kind)(dy, x, m, s, h, d, out["dx"], nthreads)
    getattr(K, "affine_" + kind)(out["in-place"], m, s, h, out["in-place"], nthreads)
    return out


@needs_cython
@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,shape", [("nchw", (3, 5, 5000)), ("nchw", (2, 1, 7)),
                                        ("nhwc", (9000, 3)), ("nhwc", (5, 70))])
def test_cython_kernels_match_the_reference_kernels(kind, shape, dtype, nthreads):
    rng = np.random.default_rng(3)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    vectors = [rng.standard_normal(shape[1]).astype(dtype) for _ in range(4)]
    # Views equal to x: strided (every other element of a wider array) and read-only.
    wide = np.zeros((*shape[:-1], 2 * shape[-1]), dtype)
    wide[..., ::2] = x
    frozen = x.copy()
    frozen.flags.writeable = False
    for name, xv in {"contiguous": x, "strided": wide[..., ::2], "read-only": frozen}.items():
        got = _run_kernels(_cython, kind, xv, dy, vectors, nthreads)
        want = _run_kernels(ref, kind, xv, dy, vectors, nthreads)
        for op in want:
            np.testing.assert_allclose(got[op], want[op], rtol=tol, atol=tol,
                                       err_msg=f"{op} of {kind} on a {name} x")


# ---------------------------------------------------------------- the optional build

@pytest.mark.skipif(not SETUP_PY.exists(), reason="needs the source tree (setup.py)")
def test_build_without_a_c_compiler_warns_and_succeeds(tmp_path):
    # CC=false stands in for a machine without a working C compiler.
    package = Path(PACKAGE_ROOT, "bn_fast")
    installed = [*package.glob("_cython*.so"), *package.glob("_cython*.pyd")]
    result = subprocess.run(
        [sys.executable, str(SETUP_PY), "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=PACKAGE_ROOT, env={**os.environ, "CC": "false"}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr
    assert "the optional extension bn_fast._cython was not built" in result.stderr
    assert not list(tmp_path.rglob("_cython*.so")) and not list(tmp_path.rglob("_cython*.pyd"))
    # A failed build elsewhere must leave the source tree's extension (an editable
    # install's) alone: only a failed editable build removes it.
    assert all(p.exists() for p in installed)


# ---------------------------------------------------------------- Numba's on-disk cache

FUSED_CACHE = """
import numpy as np
import bn_fast as bnf
from bn_fast import _api, _backend, _numba
x = np.random.default_rng(0).standard_normal((2, 8, 32, 32), dtype=np.float32)
K, nt, kind, xv, _, k = _api._prepared(x, 1)
assert nt == 1 and _api._fused(K, kind, xv, nt)  # the serial fused kernel serves
bnf.batch_norm_train(x)
ones = np.ones(8, np.float32)
bnf.batch_norm_infer(x, ones, ones, ones, ones)  # normalise, which links _coefficients in
stats = [_numba.train_nchw.serial.stats, _numba.running_update.stats, _numba.normalise.stats]
print("hits", sum(sum(s.cache_hits.values()) for s in stats),
      "misses", sum(sum(s.cache_misses.values()) for s in stats))
"""


@pytest.mark.skipif("numba" not in bnf.available_backends(), reason="needs Numba")
def test_an_edit_of_the_algebra_alone_recompiles_the_fused_kernels(tmp_path):
    """Numba checks a cached function against its own file only; the fused kernels
    compile _algebra's functions into themselves (normalise through the _coefficients
    it calls), and must not outlive an edit of it, and neither must the loops _numba.py
    compiles from _algebra's code."""
    package = tmp_path / "bn_fast"
    package.mkdir()
    for source in Path(bnf.__file__).parent.glob("*.py"):  # no extension: Numba serves
        (package / source.name).write_text(source.read_text())

    def run():
        env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_NUM_THREADS="1",
                   NUMBA_CACHE_DIR=str(tmp_path / "cache"))
        env.pop("BN_FAST_BACKEND", None)
        r = subprocess.run([sys.executable, "-c", FUSED_CACHE], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()[-3:]

    assert run() == ["0", "misses", "3"]  # compiled
    assert run() == ["3", "misses", "0"]  # from the cache
    with open(package / "_algebra.py", "a") as f:
        f.write("# an edit\n")
    assert run() == ["0", "misses", "3"]  # compiled again


CACHED_CALL = """
import sys
import numpy as np
import bn_fast as bnf
shape = (2, 16, 32, 32) if sys.argv[1] == "parallel" else (2, 16, 8, 8)
x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
ones = np.ones(16, np.float32)
if sys.argv[1] == "parallel":  # compiles the parallel affine_nchw alone
    y = bnf.apply_affine(x, ones, ones)
    assert np.array_equal(y, x + 1)
else:
    y = bnf.batch_norm_infer(x, ones, ones, ones - 1, ones)
    want = x.astype(np.float64) / np.sqrt(1 + 1e-5) + 1
    assert np.abs(y - want).max() < 1e-5, np.abs(y - want).max()
print("ok")
"""


@pytest.mark.skipif("numba" not in bnf.available_backends(), reason="needs Numba")
def test_cached_normalisation_runs_where_the_thread_pool_never_started(tmp_path):
    """Under NUMBA_NUM_THREADS=1 nothing starts Numba's thread pool, and a cached
    function that linked in a parallel one compiled by an earlier process crashed
    (numba/numba#8578): the third run here died of a segfault."""
    def run(mode, threads):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads,
                   NUMBA_CACHE_DIR=str(tmp_path / "cache"))
        env.pop("BN_FAST_BACKEND", None)
        r = subprocess.run([sys.executable, "-c", CACHED_CALL, mode], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert (r.returncode, r.stdout.split()[-1:]) == (0, ["ok"]), r.stderr
    run("parallel", "2")
    run("serial", "1")  # compiles the normalisation, linking cached kernels in
    run("serial", "1")  # loads it from the cache


BAD_LAYER = """
import warnings
import bn_fast as bnf
warnings.simplefilter("ignore")  # the NumPy fallback warns where Cython is absent too
print(bnf.get_backend())
try:
    bnf.set_backend("numba")
except ValueError as exc:
    print(" ".join(str(exc).split()))
"""


@pytest.mark.skipif("numba" not in bnf.available_backends(), reason="needs Numba")
def test_a_threading_layer_numba_cannot_load_makes_its_backend_unavailable(tmp_path):
    """The Numba backend starts Numba's thread pool on import, so a layer that cannot be
    loaded shows there, with Numba's reason, and "auto" passes on to the next backend."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="nonsense")
    env.pop("BN_FAST_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", BAD_LAYER], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    chosen, why = r.stdout.splitlines()
    assert chosen in ("cython", "numpy")
    assert why.startswith("backend 'numba' is not available")
    assert "threading layer requested 'nonsense' is unknown" in why
