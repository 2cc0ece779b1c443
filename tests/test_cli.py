"""python -m bn_fast: bench, info and warmup, run as a user would, in a subprocess."""

import itertools
import json
import math
import os
import re
import subprocess
import sys

import pytest

import bn_fast as bnf
from bn_fast import _bench

SHAPES = [(4, 3, 5, 5), (16, 8)]
SHAPES_ARG = ",".join("x".join(map(str, s)) for s in SHAPES)


def run(*args, env=None, python_args=("-m", "bn_fast")):
    return subprocess.run([sys.executable, *python_args, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_bench_json_has_every_case(tmp_path):
    path = tmp_path / "bench.json"
    r = run("bench", "--quick", "--threads", "1", "--shapes", SHAPES_ARG, "--json", str(path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(path.read_text())

    cases = {(x["op"], x["layout"], tuple(x["shape"])) for x in doc["results"]}
    assert cases == set(itertools.product(_bench.OPS, _bench.LAYOUTS, SHAPES))
    assert len(doc["results"]) == len(cases)

    cfg = doc["config"]
    assert cfg["threads"] == 1 and cfg["dtype"] == "float32"
    assert cfg["backend"] == bnf.get_backend()
    bandwidth = cfg["copy_bandwidth"]["bytes_per_s"]
    assert 1e8 < bandwidth < 1e13
    for key in ("cpu", "cores", "numpy", "numba", "torch"):
        assert key in doc["machine"]

    torch_present = doc["machine"]["torch"] is not None and doc["torch_note"] is None
    passes = {"infer": 2, "train": 3, "backward": 5}
    for x in doc["results"]:
        assert x["bn_fast"]["median_s"] > 0 and x["bn_fast"]["reps"] >= 3
        assert x["numpy"]["median_s"] > 0 and x["numpy"]["reps"] >= 1
        assert (x["torch"] is not None) == torch_present
        if torch_present:
            assert x["torch"]["median_s"] > 0
            assert x["speedup_torch"] == pytest.approx(
                x["torch"]["median_s"] / x["bn_fast"]["median_s"])
        nbytes = 4 * math.prod(x["shape"])
        assert x["min_bytes"] == passes[x["op"]] * nbytes
        fraction = x["min_bytes"] / x["bn_fast"]["median_s"] / bandwidth
        assert x["bandwidth_fraction"] == pytest.approx(fraction)
        assert 0 < x["bandwidth_fraction"] < 2
        if x["layout"] == "NHWC" and len(x["shape"]) == 4:
            n, c, h, w = x["shape"]
            assert x["array_shape"] == [n, h, w, c]
    assert doc["summary"]["geomean_speedup_numpy"] > 0

    table = [line for line in r.stdout.splitlines() if line.split()[:1] in
             [[op] for op in _bench.OPS]]
    assert len(table) == len(cases)
    assert "copy bandwidth" in r.stdout and "geometric mean over 12 cases" in r.stdout


def test_bench_without_torch_omits_its_columns(tmp_path):
    path = tmp_path / "bench.json"
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            "runpy.run_module('bn_fast', run_name='__main__')")
    r = run("bench", "--quick", "--threads", "1", "--shapes", "16x8", "--ops", "infer",
            "--layouts", "NHWC", "--json", str(path), python_args=("-c", code))
    assert r.returncode == 0, r.stderr
    assert "torch ms" not in r.stdout and "PyTorch columns omitted" in r.stdout
    doc = json.loads(path.read_text())
    assert [(x["op"], x["layout"]) for x in doc["results"]] == [("infer", "NHWC")]
    assert doc["results"][0]["torch"] is None and doc["config"]["torch"] is False
    assert doc["summary"]["geomean_speedup_torch"] is None


def test_info_names_the_backend():
    r = run("info", env={"BN_FAST_BACKEND": "numpy"})
    assert r.returncode == 0, r.stderr
    assert "active backend: numpy" in r.stdout
    available = re.search(r"available backends: (.*)", r.stdout).group(1).split(", ")
    assert available == bnf.available_backends()
    assert f"bn_fast {bnf.__version__}" in r.stdout


def test_warmup_reports_progress():
    # NUMBA_DISABLE_JIT runs the kernels as Python, so this checks the command's flow
    # without minutes of compilation on a cold cache.
    r = run("warmup", env={"NUMBA_DISABLE_JIT": "1"})
    assert r.returncode == 0, r.stderr
    steps = re.findall(r"\] (\d+)/(\d+) ", r.stderr)
    assert steps[0][0] == "0" and steps[-1][0] == steps[-1][1] != "0"
    assert len(steps) == int(steps[-1][1]) + 1
    assert r.stdout.startswith("warmup: ")


@pytest.mark.parametrize("args, message", [
    (["bench", "--backend", "nope"], "'nope' is not available here; available: "),
    (["bench", "--threads", "0"], "--threads: n=0 must be an integer"),
    (["bench", "--shapes", "4x"], "argument --shapes: '4x'"),
    (["bench", "--ops", "forward"], "argument --ops: 'forward'"),
    (["bench", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required"),
])
def test_bad_options_fail_with_a_message(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stdout == ""


def test_median_time_repeats_and_warms_up():
    calls = []
    result = _bench.median_time(lambda: calls.append(1), 0.0, min_reps=3)
    assert result["reps"] == 3 and result["median_s"] >= 0
    assert len(calls) == 3 + _bench.WARMUP_CALLS
