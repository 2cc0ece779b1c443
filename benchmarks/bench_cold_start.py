"""Cold start: a fresh Python process imports bn_fast and runs each operation once.

What a script or a test run pays before its first batch-norm result, with a warm
on-disk Numba cache (``setup_cache`` fills one in asv's temporary directory and
every child gets it as ``NUMBA_CACHE_DIR``): importing the package, loading the
compiled kernels from the cache, starting the thread pool and calling each kernel
once, on a small float32 input in the given layout.

These are ``track_`` benchmarks returning seconds measured inside the child with
``time.perf_counter``, from just before ``import bn_fast`` to after the last call.
Interpreter start-up, ``import numpy`` and building the inputs are not included
(they are the same with or without bn_fast), so the numbers do not depend on how
long the operating system takes to spawn a process.
"""

import json
import os
import subprocess
import sys

from .common import AVAILABLE, BACKENDS, LAYOUTS

CHILD = r"""
import json, sys, time
import numpy as np

layout = sys.argv[1]
rng = np.random.default_rng(0)
shape = (8, 64, 32, 32) if layout == "NCHW" else (8, 32, 32, 64)
x = rng.standard_normal(shape, dtype=np.float32)
dy = rng.standard_normal(shape, dtype=np.float32)
gamma, beta = rng.uniform(0.5, 1.5, 64).astype(np.float32), np.zeros(64, np.float32)
running_mean, running_var = np.zeros(64, np.float32), np.ones(64, np.float32)
weight = rng.standard_normal((64, 64, 3, 3), dtype=np.float32)

start = time.perf_counter()
import bn_fast as bnf
imported = time.perf_counter()
y, mean, invstd = bnf.batch_norm_train(x, gamma, beta, running_mean=running_mean,
                                       running_var=running_var, layout=layout)
bnf.batch_norm_backward(dy, x, mean, invstd, gamma, layout=layout)
bnf.batch_norm_infer(x, gamma, beta, running_mean, running_var, layout=layout)
scale, shift = bnf.fold_affine(gamma, beta, running_mean, running_var)
bnf.apply_affine(x, scale, shift, layout=layout)
for name in ("fold_conv_bn", "fold_bn_conv"):
    if hasattr(bnf, name):
        getattr(bnf, name)(weight, None, gamma, beta, running_mean, running_var)
done = time.perf_counter()
print(json.dumps({"backend": bnf.get_backend(), "import": imported - start,
                  "total": done - start}))
"""


def run_child(cache_dir, backend, layout):
    """Run CHILD in a fresh interpreter; return its timings (seconds)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, BN_FAST_BACKEND=backend)
    proc = subprocess.run([sys.executable, "-c", CHILD, layout], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"cold-start child failed ({backend}, {layout}):\n{proc.stderr}")
    result = json.loads(proc.stdout.splitlines()[-1])
    if result["backend"] != backend:
        raise RuntimeError(f"the child used backend {result['backend']!r}, not {backend!r}")
    return result


class ColdStart:
    params = [BACKENDS, LAYOUTS]
    param_names = ["backend", "layout"]
    unit = "seconds"
    timeout = 300

    def setup_cache(self):
        """Fill a Numba cache with every kernel the children call (compiles once: ~10 s)."""
        cache_dir = os.path.abspath("numba-cache")
        for backend in AVAILABLE:
            for layout in LAYOUTS:
                run_child(cache_dir, backend, layout)
        return cache_dir

    setup_cache.timeout = 600

    def setup(self, cache_dir, backend, layout):
        if backend not in AVAILABLE:
            raise NotImplementedError(f"backend {backend!r} is not available here "
                                      f"(available: {AVAILABLE})")

    def track_cold_start(self, cache_dir, backend, layout):
        """import bn_fast, then each operation once (seconds)."""
        return run_child(cache_dir, backend, layout)["total"]

    def track_import(self, cache_dir, backend, layout):
        """import bn_fast alone (seconds; Numba itself loads on the first call)."""
        return run_child(cache_dir, backend, layout)["import"]
