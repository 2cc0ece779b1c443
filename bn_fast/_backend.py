"""Which kernel module serves the public API, and with how many threads.

Every backend module exposes the same kernel names and signatures (see
``_numba.py``), plus ``get_num_threads``/``set_num_threads``.

Threads and processes:

- Calls from several Python threads at once are safe.  Numba's ``workqueue``
  threading layer is the exception (it aborts the process on concurrent
  launches), so while it is the active layer the parallel kernels take one
  process-wide lock; serial kernels (small inputs, one thread) never wait.
- A process forked from one that has imported bn_fast runs every kernel on one
  thread.  GNU OpenMP (Numba's ``omp`` layer, the Cython extension) aborts or
  hangs a forked child that starts a parallel region after the parent did; with
  one thread the Numba module calls its serial twins, and the Cython kernels
  run a one-thread team, neither of which touches the thread pool.  Children
  started with ``spawn`` or ``forkserver`` are fresh processes and use every core.
"""

import importlib
import os
import threading
import warnings

MODULES = {"numba": "bn_fast._numba", "cython": "bn_fast._cython", "numpy": "bn_fast.reference"}
AUTO_ORDER = ("numba", "cython", "numpy")

_loaded = {}     # name -> module, for backends imported so far
_errors = {}     # name -> why it could not be imported
_current = None  # (name, module)
_threads = None  # what set_num_threads asked for; None means every core
_forked = False  # True in a child created by fork(): run on one thread
_serialised = None  # what kernels() hands out for Numba: the module, or it behind the lock
_launch_lock = threading.Lock()
_agreed = threading.local()  # .key: (module, threads) this Python thread's backend was set to
# What kernels() works with: (module, the module to call, threads, key), key being
# (module, threads), kept rather than built on every call.
# Worked out on first use after anything it depends on changed (the backend, the thread
# count, the backends loaded, a fork); working it out on every call cost 3.5-5 us, cold.
_plan = None


def _after_fork_in_child():
    global _forked, _launch_lock, _plan
    _forked = True
    _plan = None
    _launch_lock = threading.Lock()  # a thread of the parent may have held it at fork time


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _import(name):
    global _plan
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        raise ImportError(_errors[name])
    try:
        module = importlib.import_module(MODULES[name])
    except Exception as exc:  # ImportError, or a broken install raising something else
        _errors[name] = f"{type(exc).__name__}: {exc}"
        raise ImportError(_errors[name]) from exc
    _loaded[name] = module
    _plan = None  # max_threads() may change
    if _threads is not None:
        module.set_num_threads(_threads)
    return module


def available_backends():
    """Names of the backends that can be imported here, in auto-selection order."""
    names = []
    for name in AUTO_ORDER:
        try:
            _import(name)
        except ImportError:
            continue
        names.append(name)
    return names


def set_backend(name):
    """Use backend ``name`` ("auto", "numba", "cython" or "numpy") for every later call."""
    global _current, _plan
    _plan = None
    if name is None or name == "auto":
        for candidate in AUTO_ORDER:
            try:
                module = _import(candidate)
            except ImportError:
                continue
            if candidate == "numpy":
                warnings.warn(
                    "bn_fast: neither Numba nor the compiled Cython extension is available "
                    f"({_errors.get('numba')}; {_errors.get('cython')}); using the slow NumPy "
                    "reference backend", RuntimeWarning, stacklevel=2)
            _current = (candidate, module)
            return candidate
    if name not in MODULES:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of "
                         f"{list(MODULES)} (available here: {available_backends()})")
    try:
        module = _import(name)
    except ImportError as exc:
        raise ValueError(f"backend {name!r} is not available: {exc} "
                         f"(available here: {available_backends()})") from None
    _current = (name, module)
    return name


def get_backend():
    """Name of the backend in use."""
    if _current is None:
        set_backend(os.environ.get("BN_FAST_BACKEND", "auto"))
    return _current[0]


# Below this many elements one thread is faster than waking the others (measured: the
# parallel kernels overtake the serial ones between 32K and 64K float32 elements).
SERIAL_BELOW = 32768


def kernels(size):
    """The kernel module in use and the thread count for an input of ``size`` elements."""
    module, calls, nthreads, key = _plan or _new_plan()
    if size < SERIAL_BELOW or nthreads == 1:
        return module, 1
    # The backend's setting is per Python thread (Numba's, OpenMP's): make each calling
    # thread agree, once per backend and count.  Asking every call cost 9 us of a 60 us
    # inference on 2 MB: numba.get_num_threads takes a process-wide multiprocessing lock.
    if getattr(_agreed, "key", None) != key:
        if module.get_num_threads() != nthreads:
            module.set_num_threads(nthreads)
        _agreed.key = key
    return calls, nthreads


def _new_plan():
    global _plan
    if _current is None:
        get_backend()
    name, module = _current
    nthreads = get_num_threads()
    calls = module
    if name == "numba" and nthreads > 1:
        module.get_num_threads()  # starts Numba's thread pool, whose layer _numba_launcher asks
        calls = _numba_launcher(module)
    _plan = (module, calls, nthreads, (module, nthreads))
    return _plan


class _Serialised:
    """A kernel module whose kernels run one at a time, under ``_launch_lock``."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        kernel = getattr(self._module, name)
        if not callable(kernel):  # a constant such as BLOCK
            return kernel

        def locked(*args):
            with _launch_lock:
                return kernel(*args)
        setattr(self, name, locked)  # later lookups skip __getattr__
        return locked


def _numba_launcher(module):
    """``module``, or ``module`` behind the launch lock when Numba's layer is ``workqueue``.

    The layer is known once Numba's thread pool has started (``_new_plan`` starts it
    before asking) and cannot change afterwards.
    """
    global _serialised
    if _serialised is None:
        import numba

        _serialised = _Serialised(module) if numba.threading_layer() == "workqueue" else module
    return _serialised


def max_threads():
    """The compiled backend's thread limit (NUMBA_NUM_THREADS, OMP_NUM_THREADS), else the cores.

    1 in a process forked from one that had imported bn_fast.
    """
    if _forked:
        return 1
    for name in ("numba", "cython"):
        if name in _loaded:
            return _loaded[name].max_threads()
    return os.cpu_count() or 1


def set_num_threads(n):
    """Use ``n`` threads (1 to the number of cores) in every compiled backend."""
    global _threads, _plan
    limit = max_threads()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        why = ("this process was forked from one that had imported bn_fast, and thread "
               "pools do not survive fork(): start child processes with the 'spawn' or "
               "'forkserver' method to use threads in them" if _forked
               else "the cores available")
        raise ValueError(f"n={n!r} must be an integer from 1 to {limit} ({why})")
    _threads = n
    _plan = None
    for module in _loaded.values():
        module.set_num_threads(n)


def get_num_threads():
    """The number of threads the kernels use (1 in a process forked after importing bn_fast)."""
    if _forked:
        return 1
    return max_threads() if _threads is None else _threads
