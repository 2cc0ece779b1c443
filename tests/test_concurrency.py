"""Threads and processes: concurrent calls, and child processes after the parent used threads.

Each scenario runs in a fresh interpreter (``SCENARIO`` below, written to a file so that
spawn and forkserver children can import it), with the Numba threading layer chosen by
``NUMBA_THREADING_LAYER`` and two threads per kernel.  A layer that cannot be loaded
here is skipped with Numba's reason.  Every wait has a timeout, so a hang fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bn_fast as bnf

PACKAGE_ROOT = str(Path(bnf.__file__).resolve().parent.parent)
LAYERS = ["tbb", "omp", "workqueue"]

SCENARIO = r'''
"""python scenario.py threads BACKEND | processes START_METHOD: prints one JSON line."""
import json
import multiprocessing
import sys
import threading

import numpy as np

import bn_fast as bnf

# (layout, shape): above and below the size at which the kernels start threads.
CASES = [("NCHW", (8, 16, 24, 24)), ("NHWC", (8, 24, 24, 16)), ("NCHW", (5, 3, 7)),
         ("NHWC", (6, 5))]
TIMEOUT = 60


def inputs(index):
    layout, shape = CASES[index]
    rng = np.random.default_rng(index)
    C = shape[1] if layout == "NCHW" else shape[-1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    g = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return layout, x, dy, g, b


def every_op(index):
    """Every public operation on case ``index``; a list of result arrays."""
    layout, x, dy, g, b = inputs(index)
    C = g.shape[0]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = bnf.batch_norm_train(x, g, b, running_mean=rm, running_var=rv,
                                           layout=layout)
    scale, shift = bnf.fold_affine(g, b, rm, rv)
    return [y, mean, invstd, rm, rv,
            bnf.batch_norm_infer(x, g, b, rm, rv, layout=layout),
            *bnf.batch_norm_backward(dy, x, mean, invstd, g, layout=layout),
            *bnf.batch_norm_backward(dy, x, rm, invstd, g, training=False, layout=layout),
            scale, shift, bnf.apply_affine(x, scale, shift, layout=layout)]


def numba_layer():
    """The Numba threading layer in use, or raise SystemExit with a skip report."""
    try:
        import numba
    except ImportError:
        return None
    previous = bnf.get_backend()
    try:
        bnf.set_backend("numba")  # importing the backend starts Numba's thread pool
    except ValueError as exc:  # "No threading layer could be loaded"
        print(json.dumps({"skip": " ".join(str(exc).split())}))
        raise SystemExit(0) from None
    bnf.set_backend(previous)
    return numba.threading_layer()


def threads(backend, n_threads=8, rounds=3):
    bnf.set_backend(backend)
    expected = [every_op(i) for i in range(len(CASES))]  # same thread count: same bits
    problems = []
    start = threading.Barrier(n_threads)

    def work(t):
        start.wait()
        for r in range(rounds):
            for i in range(len(CASES)):
                index = (i + t + r) % len(CASES)  # threads run different ops at once
                for k, (got, want) in enumerate(zip(every_op(index), expected[index])):
                    if got.tobytes() != want.tobytes():
                        problems.append(f"thread {t}, round {r}, case {index}, result {k}")

    pool = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(TIMEOUT)
    return {"problems": problems[:10], "alive": sum(t.is_alive() for t in pool)}


def child(task):
    backend, index = task
    bnf.set_backend(backend)
    report = {"threads": bnf.get_num_threads(), "results": every_op(index)}
    try:
        bnf.set_num_threads(2)
        report["set_two"] = "accepted"
    except ValueError as exc:
        report["set_two"] = str(exc)
    return report


def processes(method):
    backends = [b for b in ("numba", "cython") if b in bnf.available_backends()]
    tasks = [(b, i) for b in backends for i in range(len(CASES))]
    expected = {}
    for task in tasks:  # the parent uses the threaded kernels of both backends first
        bnf.set_backend(task[0])
        expected[task] = every_op(task[1])
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        reports = pool.map_async(child, tasks).get(timeout=TIMEOUT)
    problems = []
    for task, report in zip(tasks, reports):
        for k, (got, want) in enumerate(zip(report["results"], expected[task])):
            if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                problems.append(f"{task}: result {k} differs")
    return {"problems": problems, "backends": backends,
            "child_threads": sorted({r["threads"] for r in reports}),
            "set_two": sorted({r["set_two"] for r in reports}),
            "parent_threads": bnf.get_num_threads()}


if __name__ == "__main__":
    report = {"layer": numba_layer()}
    if sys.argv[1] == "threads":
        report.update(threads(sys.argv[2]))
    else:
        report.update(processes(sys.argv[2]))
    print(json.dumps(report))
'''


def run_scenario(tmp_path, *args, layer=None):
    """Run SCENARIO with ``args``; return its report, or skip with its reason."""
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    env = {k: v for k, v in os.environ.items()
           if k not in ("BN_FAST_BACKEND", "NUMBA_THREADING_LAYER")}
    env.update(NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")])))
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    try:
        result = subprocess.run([sys.executable, str(script), *args], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scenario {args} with layer {layer} hung: {exc}")
    assert result.returncode == 0, (
        f"scenario {args} with layer {layer} died ({result.returncode}):\n{result.stderr}")
    report = json.loads(result.stdout.splitlines()[-1])
    if "skip" in report:
        pytest.skip(f"Numba threading layer {layer!r} cannot be loaded here: {report['skip']}")
    if layer:
        assert report["layer"] == layer
    return report


def needs(backend):
    return pytest.mark.skipif(backend not in bnf.available_backends(),
                              reason=f"backend {backend!r} is not available here")


# ---------------------------------------------------------------- threads

@needs("numba")
@pytest.mark.parametrize("layer", LAYERS)
def test_eight_threads_under_each_numba_layer(tmp_path, layer):
    report = run_scenario(tmp_path, "threads", "numba", layer=layer)
    assert report["alive"] == 0, "threads still running after the timeout"
    assert report["problems"] == []


@pytest.mark.parametrize("backend", [b for b in ("cython", "numpy")
                                     if b in bnf.available_backends()])
def test_eight_threads_on_the_other_backends(tmp_path, backend):
    report = run_scenario(tmp_path, "threads", backend)
    assert report["alive"] == 0, "threads still running after the timeout"
    assert report["problems"] == []


# ---------------------------------------------------------------- processes

FORK_CHILD = "this process was forked from one that had imported bn_fast"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("layer", LAYERS)
def test_fork_pool_after_the_parent_used_threads(tmp_path, layer):
    report = run_scenario(tmp_path, "processes", "fork", layer=layer)
    assert report["problems"] == []
    assert report["parent_threads"] == 2
    assert report["child_threads"] == [1]  # forked children run on one thread...
    assert len(report["set_two"]) == 1 and FORK_CHILD in report["set_two"][0]  # ...and say why


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawn_and_forkserver_pools(tmp_path, method):
    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"start method {method!r} is not available here")
    report = run_scenario(tmp_path, "processes", method)
    assert report["problems"] == []
    assert report["child_threads"] == [2]  # fresh processes: every thread
    assert report["set_two"] == ["accepted"]
