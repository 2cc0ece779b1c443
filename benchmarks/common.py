"""Parameters, inputs and skip rules shared by the asv suites.

The shapes are the bench command's (``python -m bn_fast bench``, bn_fast/_bench.py), in NCHW
order; for ``layout="NHWC"`` the input is built channels-last, ``(N, H, W, C)``.
A full ``asv run`` must stay within a few minutes per commit on a 2-core
machine, so some combinations are a quick subset and raise NotImplementedError
in ``setup`` (asv reports them as skipped):

- the NumPy reference backend runs float32 only, and not on the largest shapes;
- the largest shapes (25.7 M elements each) run float32 only;
- a 2-D input ``(N, C)`` is the same array in both layouts: NCHW only;
- a backend that cannot be imported here (the Cython extension not built) is skipped.

asv re-runs ``setup`` before every timed call, so inputs are built once per
process (they are never written) and the untimed warm-up call, which triggers
Numba's compilation or cache load, is made once per process too.
"""

import functools

import numpy as np

import bn_fast as bnf

BACKENDS = ["numba", "cython", "numpy"]
LAYOUTS = ["NCHW", "NHWC"]
DTYPES = ["float32", "float64"]
SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7), (8, 64, 32, 32),
          (1024, 4096)]
LARGEST = [(32, 64, 112, 112), (32, 256, 56, 56)]

EPS = 1e-5
MOMENTUM = 0.1

AVAILABLE = bnf.available_backends()


def _preload_numba():
    """Load Numba's typing and lowering registries once, when asv imports the suite.

    With the forkserver launch method (asv.conf.json), asv forks one process per
    benchmark and parameter set from a server that has imported this module.
    Without this, each of them pays ~0.4 s on its first Numba call (the registries
    import numba.np.*, and SciPy where installed): minutes over a full run.  Numba's thread pool is
    not started, so forking stays safe.
    """
    try:
        from numba.core.registry import cpu_target

        cpu_target.typing_context.refresh()
        cpu_target.target_context.refresh()
    except (ImportError, AttributeError):  # Numba internals moved: slower, still correct
        pass


if "numba" in AVAILABLE:
    _preload_numba()


def skip_unsupported(backend, layout, dtype, shape):
    """Raise NotImplementedError for a combination outside the suite (see module docstring).

    ``backend=None`` checks only the data-side rules (for the PyTorch peer).
    """
    if len(shape) == 2 and layout == "NHWC":
        raise NotImplementedError("a 2-D input (N, C) is the same array in both layouts")
    if shape in LARGEST and dtype != "float32":
        raise NotImplementedError(f"quick subset: shape {shape} runs float32 only")
    if backend == "numpy" and (dtype != "float32" or shape in LARGEST):
        raise NotImplementedError("quick subset: the NumPy reference runs float32 on the "
                                  "smaller shapes only")
    if backend is not None and backend not in AVAILABLE:
        raise NotImplementedError(f"backend {backend!r} is not available here "
                                  f"(available: {AVAILABLE})")


def memory_shape(layout, shape):
    """The array's shape: ``shape`` is (N, C, ...); NHWC moves C last."""
    if layout == "NCHW":
        return tuple(shape)
    return (shape[0], *shape[2:], shape[1])


@functools.cache
def activations(layout, dtype, shape, seed=0):
    """A seeded input of ``shape`` (NCHW order) in ``layout``, C-contiguous; never written.

    Uniform on [-1, 3): a non-zero mean like real activations.  The uniform generator
    is five times faster than the normal one on the 25.7 M-element shapes, and batch
    norm's speed does not depend on the values.
    """
    x = np.random.default_rng(seed).random(memory_shape(layout, shape), dtype=dtype)
    x *= 4
    x -= 1
    return x


def channel_params(channels, dtype, seed=2):
    """gamma, beta, running_mean, running_var in ``dtype``, fresh for every setup."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.uniform(-0.5, 0.5, channels).astype(dtype)
    running_mean = rng.uniform(0.5, 1.5, channels).astype(dtype)
    running_var = rng.uniform(1.0, 2.0, channels).astype(dtype)
    return gamma, beta, running_mean, running_var


_done = set()


def once(key, fn):
    """Call ``fn()`` the first time ``key`` is seen in this process."""
    if key not in _done:
        fn()
        _done.add(key)


class Benchmark:
    """backend x layout x dtype x shape.

    Subclasses add their own inputs in ``prepare`` and define ``warm``, which calls
    every operation they time once.
    """

    params = [BACKENDS, LAYOUTS, DTYPES, SHAPES]
    param_names = ["backend", "layout", "dtype", "shape"]
    timeout = 120

    def setup(self, backend, layout, dtype, shape):
        skip_unsupported(backend, layout, dtype, shape)
        bnf.set_backend(backend)
        self.case = (backend, layout, dtype, shape)
        self.layout = layout
        self.x = activations(layout, dtype, shape)
        self.gamma, self.beta, self.running_mean, self.running_var = channel_params(
            shape[1], dtype)
        self.prepare()
        once((type(self).__name__, *self.case), self.warm)

    def prepare(self):
        pass
