"""python -m bn_fast: bench, info and warmup, run as a user would, in a subprocess."""

import itertools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import bn_fast as bnf
from bn_fast import _bench, _plot

SHAPES = [(4, 3, 5, 5), (16, 8)]
SHAPES_ARG = ",".join("x".join(map(str, s)) for s in SHAPES)


def run(*args, env=None, python_args=("-m", "bn_fast")):
    return subprocess.run([sys.executable, *python_args, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def without(module):
    """python_args that run ``python -m bn_fast`` as if ``module`` were not installed."""
    return ("-c", f"import runpy, sys; sys.modules[{module!r}] = None; "
                  f"runpy.run_module('bn_fast', run_name='__main__')")


def needs_ort():
    pytest.importorskip("onnx", reason="the ONNX Runtime column needs onnx to build its model")
    return pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


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
    r = run("bench", "--quick", "--threads", "1", "--shapes", "16x8", "--ops", "infer",
            "--layouts", "NHWC", "--json", str(path), python_args=without("torch"))
    assert r.returncode == 0, r.stderr
    assert "torch ms" not in r.stdout and "PyTorch columns omitted" in r.stdout
    doc = json.loads(path.read_text())
    assert [(x["op"], x["layout"]) for x in doc["results"]] == [("infer", "NHWC")]
    assert doc["results"][0]["torch"] is None and doc["config"]["torch"] is False
    assert doc["summary"]["geomean_speedup_torch"] is None


def test_bench_times_onnx_runtime_on_inference_only(tmp_path):
    needs_ort()
    path = tmp_path / "bench.json"
    r = run("bench", "--quick", "--threads", "1", "--shapes", "4x3x5x5", "--ops", "train,infer",
            "--json", str(path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = next(line for line in lines if line.startswith("op "))
    # the two right-aligned ORT columns: "ort ms" (width 9) and "x ort" (width 6)
    span = slice(head.index("ort ms") - 3, head.index("x ort") + len("x ort"))
    rows = [line for line in lines if line.split()[:1] in (["train"], ["infer"])]
    assert len(rows) == 4
    doc = json.loads(path.read_text())
    assert doc["config"]["ort"] is True and doc["ort_note"] is None
    assert doc["machine"]["onnxruntime"]
    for row, x in zip(rows, doc["results"]):
        cells = row[span].split()
        assert row.split()[:2] == [x["op"], x["layout"]]
        if x["op"] == "infer":
            assert x["ort"]["median_s"] > 0 and x["ort"]["reps"] >= 3
            assert x["speedup_ort"] == pytest.approx(
                x["ort"]["median_s"] / x["bn_fast"]["median_s"])
            assert [float(c) for c in cells] == [
                pytest.approx(1e3 * x["ort"]["median_s"], abs=1e-3),
                pytest.approx(x["speedup_ort"], abs=0.01)]
        else:
            assert x["ort"] is None and x["speedup_ort"] is None
            assert cells == []
    infer = [x["speedup_ort"] for x in doc["results"] if x["op"] == "infer"]
    assert doc["summary"]["geomean_speedup_ort"] == pytest.approx(math.sqrt(math.prod(infer)))
    assert "over the 2 cases of inference" in r.stdout
    assert "NHWC cases\n  give it the same logical tensor in NCHW order" in r.stdout


@pytest.mark.parametrize("module", ["onnxruntime", "onnx"])
def test_bench_without_onnx_runtime_omits_its_columns(tmp_path, module):
    path = tmp_path / "bench.json"
    r = run("bench", "--quick", "--threads", "1", "--shapes", "16x8", "--ops", "infer",
            "--layouts", "NCHW", "--json", str(path), python_args=without(module))
    assert r.returncode == 0, r.stderr
    assert "ort ms" not in r.stdout and "x ort " not in r.stdout
    note = next(line for line in r.stdout.splitlines() if "ONNX Runtime columns omitted" in line)
    assert module in note and "pip install 'bn_fast[onnx]'" in note
    doc = json.loads(path.read_text())
    assert doc["results"][0]["ort"] is None and doc["results"][0]["speedup_ort"] is None
    assert doc["config"]["ort"] is False and module in doc["ort_note"]
    assert doc["summary"]["geomean_speedup_ort"] is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", _bench.LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 3, 4, 5, 2), (16, 8)])
def test_onnx_runtime_peer_computes_the_same_inference(dtype, layout, shape):
    ort = (pytest.importorskip("onnx"), needs_ort())
    rng = np.random.default_rng(7)
    d = _bench.Data(shape, layout, dtype, rng)
    # small variances, so that a wrong eps would show
    d.running = (rng.standard_normal(shape[1]).astype(dtype),
                 rng.uniform(1e-4, 1e-3, shape[1]).astype(dtype))
    (y,) = _bench.ort_calls(ort, d, 1)["infer"]()
    # ONNX attributes are float32: the model's epsilon is EPS rounded to float32
    eps = float(np.float32(_bench.EPS))
    expected = bnf.batch_norm_infer(d.x, d.gamma, d.beta, *d.running, eps=eps, layout=layout)
    if layout == "NHWC":  # ONNX Runtime got the NCHW-ordered tensor
        expected = np.moveaxis(expected, -1, 1)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(y, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


def test_bench_plot_writes_a_png(tmp_path):
    image = pytest.importorskip("matplotlib.image", reason="--plot needs matplotlib")
    path = tmp_path / "bench.png"
    r = run("bench", "--quick", "--threads", "1", "--shapes", "16x8", "--layouts", "NCHW",
            "--plot", str(path))
    assert r.returncode == 0, r.stderr
    assert f"plot written to {path}" in r.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.shape[2] in (3, 4) and pixels.std() > 0  # not a blank canvas


def test_bench_plot_without_matplotlib_fails_before_timing(tmp_path):
    path = tmp_path / "bench.png"
    r = run("bench", "--quick", "--threads", "1", "--shapes", "16x8", "--plot", str(path),
            python_args=without("matplotlib"))
    assert r.returncode == 2
    assert "--plot: plotting needs matplotlib, which is not installed" in r.stderr
    assert "pip install matplotlib" in r.stderr and "bn_fast[plot]" in r.stderr
    assert r.stdout == "" and not path.exists()  # nothing was timed


@pytest.mark.parametrize("torch_present", [True, False])
def test_plot_shows_speedup_over_pytorch_or_the_numpy_reference(torch_present):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    results = [{"op": op, "layout": layout, "array_shape": [16, 8],
                "speedup_torch": 1.5 if torch_present else None, "speedup_numpy": 12.0}
               for op in _bench.OPS for layout in _bench.LAYOUTS]
    info = {"bn_fast": bnf.__version__, "cpu": "Test CPU 9000"}
    cfg = {"torch": torch_present, "threads": 2, "dtype": "float64", "backend": "cython"}
    ax = _plot.speedup_figure(results, info, cfg).axes[0]
    title = ax.get_title()
    assert "Test CPU 9000, 2 threads, float64, cython backend" in title
    assert ("over PyTorch" in title) is torch_present
    assert ("over the NumPy reference (PyTorch not installed)" in title) is not torch_present
    assert [p.get_width() for p in ax.patches] == [1.5 if torch_present else 12.0] * 6
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:2] == ["train  NCHW  16x8", "train  NHWC  16x8"]
    assert labels[-1] == "backward  NHWC  16x8"
    vlines = {line.get_xdata()[0]: line.get_linestyle() for line in ax.get_lines()}
    assert vlines == ({1.0: "-", 1.2: "--"} if torch_present else {1.0: "-"})
    assert ax.get_xscale() == "log"


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
    steps = re.findall(r"\] +(\d+)/(\d+) ", r.stderr)
    assert steps[0][0] == "0" and steps[-1][0] == steps[-1][1] != "0"
    assert len(steps) == int(steps[-1][1]) + 1
    # Each redraw (after a carriage return, which text mode reads as a newline) covers
    # the one before: no tail of a longer line is left on the terminal.
    lines = [line for line in r.stderr.splitlines() if line.startswith("warmup [")]
    assert len(lines) == len(steps) and len({len(line) for line in lines}) == 1, lines
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


def test_interleaved_times_take_turns_after_warming_up():
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in ("bn_fast", "torch")}
    result = _bench.interleaved_times(fns, 0.0, rounds=4, min_reps=3)
    warm = _bench.WARMUP_CALLS
    assert log[:2 * warm] == ["bn_fast"] * warm + ["torch"] * warm
    # each round: one untimed and one timed call of each, in turn
    assert log[2 * warm:] == ["bn_fast", "bn_fast", "torch", "torch"] * 4
    assert {name: r["reps"] for name, r in result.items()} == {"bn_fast": 4, "torch": 4}
    assert all(r["median_s"] >= 0 for r in result.values())
