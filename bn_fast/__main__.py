"""``python -m bn_fast``: bench, info, warmup, fold.

    python -m bn_fast bench [--quick] [--threads N] [--dtype float32|float64]
                            [--backend NAME] [--json FILE] [--plot FILE.png]
                            [--ops train,infer,backward] [--layouts NCHW,NHWC]
                            [--shapes 32x64x112x112,1024x4096]
    python -m bn_fast info
    python -m bn_fast warmup
    python -m bn_fast fold IN.onnx OUT.onnx [--check] [-v]   (needs bn_fast[onnx])
"""

import argparse
import sys
import time

import numpy as np

import bn_fast as bnf

from . import _backend, _bench, _plot
from . import onnx as _onnx


def _choices(allowed):
    """An argparse type for a comma-separated subset of ``allowed``, order kept."""
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma-separated list of {', '.join(allowed)}")
        return tuple(s for s in allowed if s in items)
    return parse


def _shapes(text):
    """'32x64x56x56,1024x4096' -> [(32, 64, 56, 56), (1024, 4096)], channels on axis 1."""
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(n) for n in item.strip().lower().split("x"))
        except ValueError:
            shape = ()
        if not 2 <= len(shape) <= 5 or min(shape) < 1 or np.prod(shape) // shape[1] < 2:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected a shape (N, C, ...) like 32x64x56x56 or 1024x4096, "
                f"rank 2 to 5, more than one value per channel")
        shapes.append(shape)
    return shapes


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bn_fast",
                                     description="bn_fast command line: bench, info, warmup, fold")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,info,warmup,fold}")

    b = sub.add_parser("bench", help="time bn_fast against the NumPy reference and PyTorch",
                       description="Time training forward, inference and backward on "
                       "ResNet-50-like shapes in both layouts against the NumPy reference "
                       "backend and PyTorch, and inference against ONNX Runtime (each when "
                       "installed).")
    b.add_argument("--quick", action="store_true",
                   help="smaller shapes and shorter timings (well under a minute)")
    b.add_argument("--threads", type=int, help="threads for bn_fast, torch and onnxruntime "
                   "(default: all)")
    b.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    b.add_argument("--backend", help="bn_fast backend to time (default: the active one)")
    b.add_argument("--json", metavar="FILE", help="also write every result to FILE")
    b.add_argument("--plot", metavar="FILE.png",
                   help="also draw the speedup over PyTorch per case to FILE.png "
                   "(needs matplotlib: pip install 'bn_fast[plot]')")
    b.add_argument("--ops", type=_choices(_bench.OPS), default=_bench.OPS,
                   help="comma-separated subset of train,infer,backward")
    b.add_argument("--layouts", type=_choices(_bench.LAYOUTS), default=_bench.LAYOUTS,
                   help="comma-separated subset of NCHW,NHWC")
    b.add_argument("--shapes", type=_shapes,
                   help="comma-separated (N, C, ...) shapes, e.g. 8x64x56x56,1024x4096")
    b.set_defaults(run=_run_bench, error=b.error)

    sub.add_parser("info", help="versions, backends, threads").set_defaults(run=_run_info)
    sub.add_parser("warmup", help="compile every Numba kernel specialization ahead of time "
                   "(fills the on-disk cache)").set_defaults(run=_run_warmup)
    _onnx.add_fold_command(sub)
    return parser


# ---------------------------------------------------------------- bench

def _run_bench(args):
    available = bnf.available_backends()
    backend = args.backend or bnf.get_backend()
    if backend not in available:
        args.error(f"--backend {backend!r} is not available here; "
                     f"available: {', '.join(available)}")
    if args.threads is not None:
        try:
            bnf.set_num_threads(args.threads)
        except ValueError as exc:
            args.error(f"--threads: {exc}")
    if args.plot:
        try:
            _plot.require_matplotlib()
        except ImportError as exc:
            args.error(f"--plot: {exc}")
    _bench.bench(backend=backend, threads=bnf.get_num_threads(), dtype=args.dtype,
                 quick=args.quick, shapes=args.shapes, ops=args.ops, layouts=args.layouts,
                 json_path=args.json, plot_path=args.plot)


# ---------------------------------------------------------------- info

def _threading_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # chosen when the thread pool starts: start it
        try:
            from numba.np.ufunc.parallel import _launch_threads
            _launch_threads()
            return numba.threading_layer()
        except Exception as exc:
            return f"unknown ({type(exc).__name__}: {exc})"


def _run_info(args):
    backends = bnf.available_backends()
    info = _bench.machine_info()
    lines = [
        f"bn_fast {bnf.__version__}",
        f"active backend: {bnf.get_backend()}",
        f"available backends: {', '.join(backends)}",
        f"threads: {bnf.get_num_threads()} (cores: {info['cores']})",
    ]
    if "numba" in sys.modules:
        lines.append(f"numba threading layer: {_threading_layer()}")
    lines.append(f"cpu: {info['cpu']}")
    lines += [f"{name}: {info[name] or 'not installed'}"
              for name in ("python", "numpy", "numba", "torch")]
    print("\n".join(lines))


# ---------------------------------------------------------------- warmup

def _warmup_inputs(dtype):
    """(label, x, layout): one input per memory order Numba types differently.

    Each comes small and large: below and above the size where kernels switch from
    their serial to their parallel twin.  Mixed cases (a strided dy with a
    contiguous x, a strided out=) compile on first use.
    """
    large = -(-_backend.SERIAL_BELOW // 24)  # (2, 3, 4, large) has enough elements
    # Channels-first training and backward take the fused kernels when there are 4
    # channels per thread and planes of 128 or more, the separate passes otherwise:
    # warm both.
    many = 4 * max(1, bnf.get_num_threads())
    for size, w in (("small", 5), ("large", large)):
        name = f"{np.dtype(dtype).name} {size}"
        for what, layout, a in (("NCHW", "NCHW", np.ones((2, 3, 4, w), dtype)),
                                (f"NCHW {many} channels", "NCHW",
                                 np.ones((2, many, 4, max(w, 32)), dtype)),
                                ("NHWC", "NHWC", np.ones((2, 4, w, 3), dtype))):
            wide = np.ones(a.shape[:-1] + (2 * a.shape[-1],), dtype)
            readonly = a.copy()
            readonly.flags.writeable = False
            yield f"{name} {what}", a, layout
            yield f"{name} {what} strided", wide[..., ::2], layout
            yield f"{name} {what} read-only", readonly, layout
        yield f"{name} (N, C) Fortran order", np.ones((3, 8 * w), dtype).T, "NCHW"


def _warm(x, layout):
    """Call every public function once on x (each kernel at x's memory order).

    Per-channel arrays come in x's dtype and in float64 (which also stands for an
    absent gamma or beta): the per-channel algebra and the one-pass kernels are
    compiled for each.
    """
    C = x.shape[1] if layout == "NCHW" else x.shape[-1]
    for p in {x.dtype: np.ones(C, x.dtype), np.dtype(np.float64): np.ones(C)}.values():
        _, mean, invstd = bnf.batch_norm_train(x, p, p, running_mean=p.copy(),
                                               running_var=p.copy(), layout=layout)
        bnf.batch_norm_infer(x, p, p, p, p, layout=layout)
        bnf.apply_affine(x, p, p, layout=layout)
        for stats in ((mean, invstd), (p, p)):
            for training in (True, False):
                bnf.batch_norm_backward(x, x, *stats, p, training=training, layout=layout)


def _progress(i, n, label, pad, width=30):
    """Redraw the bar over the last one: every line is as long (pad: the longest label),
    so that no tail of a longer one is left behind."""
    done = width * i // n
    sys.stderr.write(f"\rwarmup [{'#' * done}{'.' * (width - done)}] "
                     f"{i:>{len(str(n))}}/{n} {label:<{pad}}")
    sys.stderr.flush()


def _run_warmup(args):
    if "numba" not in bnf.available_backends():
        print(f"warmup: nothing to compile, Numba is not available here (backends: "
              f"{', '.join(bnf.available_backends())})")
        return
    cases = [c for dtype in (np.float32, np.float64) for c in _warmup_inputs(dtype)]
    previous = bnf.get_backend()
    bnf.set_backend("numba")
    start = time.perf_counter()
    pad = max(len(label) for label, _, _ in cases)
    try:
        for i, (label, x, layout) in enumerate(cases):
            _progress(i, len(cases), label, pad)
            _warm(x, layout)
        _progress(len(cases), len(cases), "done", pad)
    finally:
        sys.stderr.write("\n")
        bnf.set_backend(previous)
    print(f"warmup: Numba kernels compiled or loaded from the on-disk cache for "
          f"{len(cases)} input kinds in {time.perf_counter() - start:.1f} s")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
