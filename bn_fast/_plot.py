"""``python -m bn_fast bench --plot FILE``: bn_fast's speedup per case as a bar chart.

matplotlib is optional (``pip install 'bn_fast[plot]'``) and imported only here, when a
plot is asked for.  The figure is drawn on matplotlib's Agg canvas, so no display is needed
and pyplot's global state is never touched.
"""

INSTALL_HINT = "pip install matplotlib  (or: pip install 'bn_fast[plot]')"
TARGET = 1.2  # the speedup over PyTorch the project aims for
OP_COLOURS = {"train": "tab:blue", "infer": "tab:orange", "backward": "tab:green"}


def require_matplotlib():
    """Import matplotlib, or raise ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"plotting needs matplotlib, which is not installed: "
                          f"{INSTALL_HINT}") from exc
    return matplotlib


def speedup_figure(results, info, cfg):
    """A Figure with one horizontal bar per case: the peer's time / bn_fast's time.

    The peer is PyTorch, or the NumPy reference when the bench ran without PyTorch.
    Bars are grouped by operation (one colour each), then layout, in the bench's shape order.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if cfg["torch"]:
        peer, key, note = "PyTorch", "speedup_torch", ""
    else:
        peer, key, note = "the NumPy reference", "speedup_numpy", " (PyTorch not installed)"
    ops = list(OP_COLOURS)
    rows = sorted(results, key=lambda r: (ops.index(r["op"]), r["layout"]))
    # a gap of one bar between operations
    ys = [i + ops.index(r["op"]) for i, r in enumerate(rows)]
    values = [r[key] for r in rows]

    fig = Figure(figsize=(10, 1.6 + 0.3 * (len(rows) + len(ops))), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(ys, values, color=[OP_COLOURS[r["op"]] for r in rows])
    ax.set_yticks(ys, [f"{r['op']}  {r['layout']}  {'x'.join(map(str, r['array_shape']))}"
                       for r in rows], fontsize=8)
    ax.invert_yaxis()  # first case on top
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, min(values) / 1.5), max(2.0, max(values) * 1.6))
    ax.xaxis.set_major_locator(LogLocator(base=2))  # 0.5x, 1x, 2x, 4x, ...
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    for y, v in zip(ys, values):
        ax.annotate(f"{v:.2f}x", (v, y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=7)
    lines = [ax.axvline(1.0, color="black", linewidth=1.5,
                        label=f"1.0: as fast as {peer}")]
    if cfg["torch"]:
        lines.append(ax.axvline(TARGET, color="tab:red", linestyle="--", linewidth=1.2,
                                label=f"{TARGET} target"))
    ax.legend(handles=[Patch(color=c, label=op) for op, c in OP_COLOURS.items()
                       if op in {r["op"] for r in rows}] + lines,
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_xlabel(f"speedup over {peer}: its time / bn_fast's time (log scale; "
                  f"above 1: bn_fast is faster)")
    threads = cfg["threads"]
    ax.set_title(f"bn_fast {info['bn_fast']} speedup over {peer}{note}\n"
                 f"{info['cpu']}, {threads} thread{'s' * (threads != 1)}, {cfg['dtype']}, "
                 f"{cfg['backend']} backend", fontsize=10)
    return fig


def plot_speedups(results, info, cfg, path):
    """Write :func:`speedup_figure` to ``path`` (its format from the file name, e.g. .png)."""
    speedup_figure(results, info, cfg).savefig(path, dpi=120)
