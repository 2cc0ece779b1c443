"""``python -m bn_fast bench``: time bn_fast against its NumPy reference, PyTorch and ONNX Runtime.

Every case is one operation (training forward, inference, backward) on one shape in
one layout; ONNX Runtime, an inference engine, is timed on inference only.  Times are
medians of repeated calls, each allocating its output, after five untimed warm-up calls
(so neither Numba's compilation nor the first touches of fresh memory, slow for a few
calls on a virtual machine, are timed).  bn_fast and its peers are timed in turns, in
ROUNDS rounds, so that a shared machine's slow spells fall on all of them alike (see
``interleaved_times``).  The fraction of memory bandwidth compares the least traffic
the operation needs with a plain ``np.copyto`` of a large array measured in the same run.
"""

import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import bn_fast as bnf

from . import _plot

# Logical (N, C, ...) shapes; NHWC arrays are built channels-last, (N, ..., C).
SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7), (8, 64, 32, 32),
          (1024, 4096)]
# Quick: one input larger than a typical L3 cache, one that fits, one 2-D.
QUICK_SHAPES = [(8, 64, 112, 112), (32, 256, 14, 14), (256, 1024)]
OPS = ("train", "infer", "backward")
LAYOUTS = ("NCHW", "NHWC")
# Least memory traffic, in passes over x: inference reads x and writes y; training
# reads x twice (statistics, then y) and writes y; backward reads dy and x twice
# (sums, then dx) and writes dx.
PASSES = {"train": 3, "infer": 2, "backward": 5}
COPY_BYTES = 256 * 2**20
# BatchNormalization as in opset 15 (training_mode since 14, scale and mean types apart since
# 15), in IR version 8 (opset 15's), so any onnxruntime of bn_fast[onnx] loads the model.
ORT_OPSET, ORT_IR_VERSION = 15, 8
EPS = 1e-5  # batch_norm_infer's default, set in the ONNX model (a float32 attribute there)


# ---------------------------------------------------------------- measuring

WARMUP_CALLS = 5  # compilation, then first touches of fresh memory (slow for a few calls in a VM)


def median_time(fn, budget, *, min_reps=3, warmup=True):
    """Median seconds of ``fn()``: at least ``min_reps`` calls and about ``budget`` seconds."""
    for _ in range(WARMUP_CALLS if warmup else 0):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "reps": len(times)}


# Rounds of interleaved_times.  Each block opens with one untimed call: the first call
# after another library's turn waits for its threads to stop spinning (here 1.4 ms, then
# 0.22, for a 0.09 ms bn_fast call right after ONNX Runtime; 0.27 ms after PyTorch).
ROUNDS = 5


def interleaved_times(fns, budget, *, rounds=ROUNDS, min_reps=3):
    """``median_time`` for each callable of ``fns`` (a dict), timed in turns.

    After the warm-up calls, each of ``rounds`` rounds gives each callable a block of
    about ``budget / rounds`` seconds (at least one timed call, ``min_reps`` over all),
    opened by one untimed call.  Timed one after the other, a case's bn_fast and PyTorch
    figures came from moments seconds apart, and a shared machine's speed changes over
    time (its copy bandwidth moved by up to 9% between runs of one session).
    """
    for fn in fns.values():
        for _ in range(WARMUP_CALLS):
            fn()
    times = {name: [] for name in fns}
    per_block = -(-min_reps // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            got = times[name]
            start, n0 = time.perf_counter(), len(got)
            while len(got) - n0 < per_block or time.perf_counter() - start < budget / rounds:
                t0 = time.perf_counter()
                fn()
                got.append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "reps": len(t)}
            for name, t in times.items()}


def copy_bandwidth(nthreads, budget):
    """Bytes/s of np.copyto on COPY_BYTES (read + write), best of 1 and ``nthreads`` threads."""
    src = np.ones(COPY_BYTES // 8)
    dst = np.zeros_like(src)
    by_threads = {k: 2 * src.nbytes / _copy_time(dst, src, k, budget)
                  for k in sorted({1, nthreads})}
    return max(by_threads.values()), by_threads


def _copy_time(dst, src, nthreads, budget):
    bounds = [i * src.size // nthreads for i in range(nthreads + 1)]
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds, bounds[1:])]
    with ThreadPoolExecutor(nthreads) as pool:
        return median_time(lambda: list(pool.map(lambda p: np.copyto(*p), parts)),
                           budget)["median_s"]


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "bn_fast": bnf.__version__,
            "numpy": np.__version__, "numba": _version("numba"), "torch": _version("torch"),
            "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx")}


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_torch():
    """(torch, None), or (None, why it cannot be imported)."""
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install raising something else
        return None, f"{type(exc).__name__}: {exc}"
    return torch, None


def import_ort():
    """((onnx, onnxruntime), None), or (None, why they cannot be imported).

    Imported here, when the bench runs, never by ``import bn_fast``.
    """
    try:
        import onnx
        import onnxruntime
    except Exception as exc:  # as for torch
        return None, f"{type(exc).__name__}: {exc}"
    return (onnx, onnxruntime), None


# ---------------------------------------------------------------- cases

class Data:
    """One (shape, layout, dtype) input with its parameters and backward state."""

    def __init__(self, shape, layout, dtype, rng):
        self.shape, self.layout = shape, layout
        arr = shape if layout == "NCHW" or len(shape) == 2 else (shape[0], *shape[2:], shape[1])
        self.x = rng.standard_normal(arr, dtype=dtype)
        self.dy = rng.standard_normal(arr, dtype=dtype)
        C = shape[1]
        self.gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
        self.beta = rng.standard_normal(C).astype(dtype)
        self.running = (np.zeros(C, dtype), np.ones(C, dtype))
        _, self.mean, self.invstd = bnf.batch_norm_train(self.x, layout=layout)


def bn_fast_calls(d):
    """Callables for each operation on the active bn_fast backend."""
    rm, rv = (a.copy() for a in d.running)  # updated by every training call
    return {
        "train": lambda: bnf.batch_norm_train(d.x, d.gamma, d.beta, running_mean=rm,
                                              running_var=rv, layout=d.layout),
        "infer": lambda: bnf.batch_norm_infer(d.x, d.gamma, d.beta, *d.running,
                                              layout=d.layout),
        "backward": lambda: bnf.batch_norm_backward(d.dy, d.x, d.mean, d.invstd, d.gamma,
                                                    training=True, layout=d.layout),
    }


def torch_calls(torch, d, ops):
    """The same operations with torch.nn.functional.batch_norm on the same memory."""
    F = torch.nn.functional

    def tensor(a):  # channels-last arrays become (N, C, ...) tensors in channels_last format
        t = torch.from_numpy(a)
        return t if d.layout == "NCHW" else t.movedim(-1, 1)

    x, dy = tensor(d.x), tensor(d.dy)
    gamma, beta = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    rm, rv = (torch.from_numpy(a.copy()) for a in d.running)
    stats = [torch.from_numpy(a) for a in d.running]

    def train():
        with torch.no_grad():
            return F.batch_norm(x, rm, rv, gamma, beta, training=True)

    def infer():
        with torch.no_grad():
            return F.batch_norm(x, *stats, gamma, beta, training=False)

    calls = {"train": train, "infer": infer}
    if "backward" in ops:  # one forward builds the graph; each call runs only its backward
        leaves = [x.detach().requires_grad_(), gamma.clone().requires_grad_(),
                  beta.clone().requires_grad_()]
        y = F.batch_norm(leaves[0], None, None, *leaves[1:], training=True)
        calls["backward"] = lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    return calls


def ort_calls(ort, d, threads):
    """Inference as a one-node ONNX model run by ONNX Runtime, on ``threads`` threads.

    ONNX's BatchNormalization is channels-first, so NHWC cases get the same logical
    tensor in NCHW order (transposed once, here, not timed).
    """
    onnx, onnxruntime = ort
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    x = np.ascontiguousarray(np.moveaxis(d.x, -1, 1)) if d.layout == "NHWC" else d.x
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    params = dict(zip(("scale", "B", "mean", "var"), (d.gamma, d.beta, *d.running)))
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", *params], ["y"], epsilon=EPS)],
        "bn_fast_bench", [helper.make_tensor_value_info("x", elem, x.shape)],
        [helper.make_tensor_value_info("y", elem, x.shape)],
        initializer=[numpy_helper.from_array(a, name) for name, a in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ORT_OPSET)],
                              ir_version=ORT_IR_VERSION)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sess = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])
    return {"infer": lambda: sess.run(None, {"x": x})}


def run_case(d, ops, backend, torch, ort, threads, budget):
    """Time ``ops`` on one input; return one result dict per op."""
    bnf.set_backend("numpy")  # slow on big inputs: no warm-up, as many calls as fit in budget
    ref = {op: median_time(f, budget, min_reps=1, warmup=False)
           for op, f in bn_fast_calls(d).items() if op in ops}
    bnf.set_backend(backend)  # the calls below run on it: the backend is looked up per call
    peers = {"bn_fast": bn_fast_calls(d)}
    if torch is not None:
        peers["torch"] = torch_calls(torch, d, ops)
    if ort is not None and "infer" in ops:
        peers["ort"] = ort_calls(ort, d, threads)
    results = []
    for op in ops:
        timed = interleaved_times({name: calls[op] for name, calls in peers.items()
                                   if op in calls}, budget)
        results.append({
            "op": op, "layout": d.layout, "shape": list(d.shape),
            "array_shape": list(d.x.shape), "dtype": d.x.dtype.name, "mb": d.x.nbytes / 1e6,
            "min_bytes": PASSES[op] * d.x.nbytes, "bn_fast": timed["bn_fast"],
            "numpy": ref[op], "torch": timed.get("torch"), "ort": timed.get("ort")})
    return results


def add_ratios(r, bandwidth):
    t = r["bn_fast"]["median_s"]
    r["speedup_numpy"] = r["numpy"]["median_s"] / t
    r["speedup_torch"] = r["torch"]["median_s"] / t if r["torch"] else None
    r["speedup_ort"] = r["ort"]["median_s"] / t if r["ort"] else None
    r["bandwidth_fraction"] = r["min_bytes"] / t / bandwidth


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


# ---------------------------------------------------------------- report

def _columns(backend, torch, ort):
    cols = [("op", 8, "{op}"), ("layout", 6, "{layout}"), ("shape", 15, "{shape_s}"),
            ("MB", 6, "{mb:.1f}"), (f"{backend} ms", 10, "{ours:.3f}"),
            ("numpy ms (n)", 15, "{ref:.2f} ({ref_n})"), ("x numpy", 7, "{speedup_numpy:.1f}")]
    if torch is not None:
        cols += [("torch ms", 9, "{theirs:.3f}"), ("x torch", 7, "{speedup_torch:.2f}")]
    if ort is not None:  # inference only: blank on the other rows
        cols += [("ort ms", 9, "{engine_s}"), ("x ort", 6, "{speedup_ort_s}")]
    return cols + [("bw/copy", 7, "{bandwidth_fraction:.2f}")]


def format_row(cols, r=None):
    if r is None:
        return "  ".join(f"{name:>{w}}" if i > 2 else f"{name:<{w}}"
                         for i, (name, w, _) in enumerate(cols))
    values = dict(r, shape_s="x".join(map(str, r["array_shape"])),
                  ours=1e3 * r["bn_fast"]["median_s"], ref=1e3 * r["numpy"]["median_s"],
                  ref_n=r["numpy"]["reps"],
                  theirs=1e3 * r["torch"]["median_s"] if r["torch"] else 0.0,
                  engine_s=f"{1e3 * r['ort']['median_s']:.3f}" if r["ort"] else "",
                  speedup_ort_s=f"{r['speedup_ort']:.2f}" if r["ort"] else "")
    return "  ".join(fmt.format(**values).rjust(w) if i > 2 else fmt.format(**values).ljust(w)
                     for i, (_, w, fmt) in enumerate(cols))


def header(info, cfg):
    bw = cfg["copy_bandwidth"]
    copies = ", ".join(f"{k} thread{'s' * (k > 1)} {v / 1e9:.1f}"
                       for k, v in bw["by_threads"].items())
    torch = f", torch {info['torch']}" if cfg["torch"] else ""
    ort = f", onnxruntime {info['onnxruntime']}" if cfg["ort"] else ""
    return (f"bn_fast {info['bn_fast']} bench | {info['cpu']}, {info['cores']} cores | "
            f"numpy {info['numpy']}, numba {info['numba']}{torch}{ort}\n"
            f"backend {cfg['backend']}, {cfg['threads']} threads, {cfg['dtype']} | "
            f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s "
            f"(np.copyto of {COPY_BYTES >> 20} MB, GB/s by threads: {copies})")


def _cases(n):
    return f"{n} case{'s' * (n != 1)}"


def footer(results, cfg, torch_note, ort_note):
    lines = ["", f"geometric mean over {_cases(len(results))}: "
             f"{geomean(r['speedup_numpy'] for r in results):.1f}x the NumPy reference"]
    if cfg["torch"]:
        lines[-1] += f", {geomean(r['speedup_torch'] for r in results):.2f}x PyTorch"
    engine = [r["speedup_ort"] for r in results if r["ort"]]
    if engine:
        lines.append(f"geometric mean over the {_cases(len(engine))} of inference: "
                     f"{geomean(engine):.2f}x ONNX Runtime")
    lines += [
        "x numpy, x torch, x ort: their time / bn_fast's time (above 1: bn_fast is faster)."]
    if engine:
        lines += [
            f"ort: onnxruntime's sess.run of a one-node ONNX model (BatchNormalization, opset "
            f"{ORT_OPSET}), inference only,",
            f"  intra-op threads {cfg['threads']}, inter-op 1. ONNX BatchNormalization is "
            f"channels-first, so NHWC cases",
            "  give it the same logical tensor in NCHW order, transposed once before timing."]
    lines += [
        "bw/copy: least bytes the op must move / time / copy bandwidth, counting inference 2,",
        "  training 3 and backward 5 passes over x; above 1 means the data stayed in cache.",
        f"Times: medians of calls that allocate their output, about {cfg['budget']} s per case "
        f"after {WARMUP_CALLS}",
        f"  warm-up calls, bn_fast and its peers in turns ({ROUNDS} rounds); the NumPy "
        "reference is not warmed",
        "  up and gets the calls that fit (n, at least 1).",
    ]
    if torch_note:
        lines.append(f"PyTorch columns omitted: torch is not importable ({torch_note}).")
    if ort_note:
        lines.append(f"ONNX Runtime columns omitted: onnx and onnxruntime are needed "
                     f"({ort_note}); pip install 'bn_fast[onnx]'.")
    return "\n".join(lines)


# ---------------------------------------------------------------- command

def bench(*, backend, threads, dtype, quick, shapes, ops, layouts, json_path, plot_path=None):
    """Run the benchmark, print the table, optionally write JSON and a plot; return the results.

    ONNX Runtime is timed when ``ops`` has inference and onnx and onnxruntime import.
    ``plot_path`` needs matplotlib, checked before anything is timed.
    """
    if plot_path:
        _plot.require_matplotlib()
    budget = 0.1 if quick else 0.3
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    torch, torch_note = import_torch()
    if torch is not None:
        torch.set_num_threads(threads)
    ort, ort_note = import_ort() if "infer" in ops else (None, None)
    bandwidth, by_threads = copy_bandwidth(threads, budget)
    info = machine_info()
    cfg = {"backend": backend, "threads": threads, "dtype": np.dtype(dtype).name,
           "quick": quick, "budget": budget, "torch": torch is not None, "ort": ort is not None,
           "ort_opset": ORT_OPSET if ort else None,
           "copy_bandwidth": {"bytes_per_s": bandwidth, "by_threads": by_threads,
                              "array_bytes": COPY_BYTES}}
    print(header(info, cfg), end="\n\n")
    cols = _columns(backend, torch, ort)
    print(format_row(cols), flush=True)
    rng = np.random.default_rng(0)
    results = []
    previous = bnf.get_backend()
    try:
        for shape in shapes:
            for layout in layouts:
                bnf.set_backend(backend)
                d = Data(shape, layout, dtype, rng)
                for r in run_case(d, ops, backend, torch, ort, threads, budget):
                    add_ratios(r, bandwidth)
                    results.append(r)
                    print(format_row(cols, r), flush=True)
    finally:
        bnf.set_backend(previous)
    print(footer(results, cfg, torch_note, ort_note))
    if json_path:
        summary = {"geomean_speedup_numpy": geomean(r["speedup_numpy"] for r in results),
                   "geomean_speedup_torch": geomean(r["speedup_torch"] for r in results),
                   "geomean_speedup_ort": geomean(r["speedup_ort"] for r in results)}
        doc = {"machine": info, "config": cfg, "torch_note": torch_note, "ort_note": ort_note,
               "results": results, "summary": summary}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"results written to {json_path}", file=sys.stderr)
    if plot_path:
        _plot.plot_speedups(results, info, cfg, plot_path)
        print(f"plot written to {plot_path}", file=sys.stderr)
    return results
