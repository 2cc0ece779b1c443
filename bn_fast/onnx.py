"""Fold inference-mode BatchNormalization into the layer before it, in ONNX models.

Needs the optional ``onnx`` package (``pip install 'bn_fast[onnx]'``), imported only
when a function here is called, so ``import bn_fast`` and ``import bn_fast.onnx``
work without it.  ``python -m bn_fast fold IN OUT [--check]`` is the command line
(:func:`add_fold_command`, :func:`run`).

A BatchNormalization in the main graph folds into its producer when

- the producer is a Conv or ConvTranspose (any rank and groups), a Gemm, or a
  MatMul with a constant 2-D weight and a 2-D input (BN normalises axis 1, which
  is MatMul's last axis only in 2-D); the MatMul becomes a Gemm carrying the bias;
- the producer's output feeds only that BN and is not a graph output;
- the BN is in inference mode (``training_mode=0``, ``is_test=1`` in opset < 7,
  ``spatial=1``, only its first output present);
- the BN parameters and the producer's weight and bias are constants: initializers
  (not also graph inputs, which can be overridden at run time, from IR version 4),
  Constant nodes, or Identity nodes of those.

Everything else stays, with the reason recorded in the report.  The weights are
folded by :func:`bn_fast.fold_conv_bn`; initializers, Constant and Identity nodes
that only the folded layers used are removed.  Nodes keep their order, so a
topologically sorted graph stays sorted; the opset and the other nodes are untouched.
"""

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .fold import fold_affine, fold_conv_bn

INSTALL_HINT = "pip install 'bn_fast[onnx]'  (or: pip install onnx onnxruntime)"

#: graphs with at least this many nodes get a progress line on stderr
LARGE_MODEL_NODES = 300

#: folded models this large are saved with their weights in ``OUTPUT.data`` beside
#: the file (protobuf cannot serialize 2 GB)
EXTERNAL_DATA_BYTES = 2**31 - 2**20

_STD_DOMAINS = ("", "ai.onnx")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _require(name):
    """Import onnx or onnxruntime, or raise ImportError saying how to install it."""
    try:
        return __import__(name)
    except ImportError as exc:
        raise ImportError(f"bn_fast.onnx needs the {name!r} package, which is not installed: "
                          f"{INSTALL_HINT}") from exc


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class FoldedBN:
    """One BatchNormalization folded into ``producer`` (an ``op_type 'name'`` label)."""

    bn: str
    producer: str
    producer_op: str


@dataclass(frozen=True)
class KeptBN:
    """One BatchNormalization left in the graph, and why."""

    bn: str
    reason: str


@dataclass
class FoldReport:
    """What :func:`fold_model` did.

    ``nodes_before``/``nodes_after`` count main-graph nodes; ``removed_initializers``
    and ``removed_nodes`` count constants (initializers; Constant and Identity nodes)
    that only the folded layers used.  ``subgraph_batch_norms`` counts BNs inside
    If/Loop/Scan bodies, which are not visited.
    """

    nodes_before: int = 0
    nodes_after: int = 0
    batch_norms_before: int = 0
    batch_norms_after: int = 0
    folded: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    removed_initializers: int = 0
    removed_nodes: int = 0
    subgraph_batch_norms: int = 0

    def summary(self, *, verbose=False):
        """Several lines of text: counts, the kept BNs with reasons (and with
        ``verbose`` every folded one)."""
        lines = [f"nodes: {self.nodes_before} -> {self.nodes_after}",
                 f"BatchNormalization: {self.batch_norms_before} -> {self.batch_norms_after}"]
        by_op = {}
        for f in self.folded:
            by_op[f.producer_op] = by_op.get(f.producer_op, 0) + 1
        ops = ", ".join(f"{op} {n}" for op, n in sorted(by_op.items()))
        lines.append(f"folded: {len(self.folded)}" + (f" (into {ops})" if ops else ""))
        if verbose:
            lines += [f"  {f.bn} -> {f.producer}" for f in self.folded]
        lines.append(f"kept: {len(self.kept)}")
        lines += [f"  {k.bn}: {k.reason}" for k in self.kept]
        if self.removed_initializers or self.removed_nodes:
            lines.append(f"removed unused constants: {self.removed_initializers} initializers, "
                         f"{self.removed_nodes} Constant/Identity nodes")
        if self.subgraph_batch_norms:
            lines.append(f"not visited: {self.subgraph_batch_norms} BatchNormalization inside "
                         f"subgraphs (If/Loop/Scan bodies)")
        return "\n".join(lines)


# ---------------------------------------------------------------- graph bookkeeping


def _label(node):
    return f"{node.op_type} '{node.name}'" if node.name else \
        f"{node.op_type} (output '{node.output[0] if node.output else ''}')"


def _subgraphs(node):
    onnx = _require("onnx")
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk_subgraph_nodes(graph):
    for node in graph.node:
        yield node
        for g in _subgraphs(node):
            yield from _walk_subgraph_nodes(g)


def _opset(model):
    return max((o.version for o in model.opset_import if o.domain in _STD_DOMAINS), default=0)


def _attr(node, name, default=None):
    onnx = _require("onnx")
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value):
    onnx = _require("onnx")
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _is_op(node, op_type):
    return node.op_type == op_type and node.domain in _STD_DOMAINS


class _Graph:
    """Producers, consumers and constants of a main graph, updated as folds happen."""

    def __init__(self, model):
        onnx = _require("onnx")
        self.onnx = onnx
        self.model = model
        self.graph = g = model.graph
        self.opset = _opset(model)
        self.nodes = list(g.node)
        self.removed = set()
        self.graph_outputs = {o.name for o in g.output}
        inputs = {i.name for i in g.input}
        # From IR version 4 an initializer that is also a graph input is only a default
        # value (the caller may feed another), so it is not a constant; before IR 4
        # every initializer had to be listed as an input (onnxruntime's rule too).
        self.inputs_hold_initializers = model.ir_version < 4
        self.overridable = set() if self.inputs_hold_initializers else inputs
        self.initializers = {t.name: t for t in g.initializer}
        self.original_initializers = set(self.initializers)
        self.producer = {}
        self.consumers = {}
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = i
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(i)
        # names read inside If/Loop/Scan bodies: they are used, by whom does not matter
        self.outer_refs = {name for node in self.nodes for sub in _subgraphs(node)
                           for n in _walk_subgraph_nodes(sub) for name in n.input}
        self.names = (set(self.initializers) | set(self.producer) | inputs
                      | {v.name for v in g.value_info} | self.outer_refs)
        self.new_initializers = []
        self._cache = {}
        self._ranks = None

    # ------------------------------------------------ queries

    def uses(self, name):
        """Nodes reading ``name`` (indices), plus -1 for a graph output or subgraph use."""
        uses = list(self.consumers.get(name, ()))
        if name in self.graph_outputs or name in self.outer_refs:
            uses.append(-1)
        return uses

    def constant(self, name, _depth=0):
        """The value of ``name`` as an ndarray if it is a constant, else None."""
        if name in self._cache:
            return self._cache[name]
        value = None
        numpy_helper = self.onnx.numpy_helper
        if name in self.initializers:
            if name not in self.overridable:
                value = numpy_helper.to_array(self.initializers[name])
        elif name in self.producer and _depth < 64:
            node = self.nodes[self.producer[name]]
            if _is_op(node, "Constant"):
                value = self._constant_node_value(node)
            elif _is_op(node, "Identity"):
                value = self.constant(node.input[0], _depth + 1)
        self._cache[name] = value
        return value

    def _constant_node_value(self, node):
        for attr in node.attribute:
            if attr.name == "value":
                return self.onnx.numpy_helper.to_array(attr.t)
            if attr.name == "value_float":
                return np.array(attr.f, np.float32)
            if attr.name == "value_floats":
                return np.array(attr.floats, np.float32)
        return None  # ints, strings and sparse tensors are never BN or weight values

    def rank(self, name):
        """Rank of tensor ``name`` from the model's shapes or shape inference, or None."""
        if self._ranks is None:
            self._ranks = {}
            try:
                inferred = self.onnx.shape_inference.infer_shapes(self.model)
            except Exception:  # a model shape inference cannot handle: ranks unknown
                inferred = self.model
            g = inferred.graph
            for v in (*g.input, *g.value_info, *g.output):
                if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                    self._ranks[v.name] = len(v.type.tensor_type.shape.dim)
            for t in g.initializer:
                self._ranks[t.name] = len(t.dims)
        return self._ranks.get(name)

    # ------------------------------------------------ edits

    def unique(self, base):
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def add_initializer(self, base, array):
        name = self.unique(base)
        tensor = self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.initializers[name] = tensor
        self.new_initializers.append(tensor)
        self._cache[name] = array
        return name

    def set_input(self, i, slot, name):
        node = self.nodes[i]
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        if old:
            self.consumers[old].remove(i)
        node.input[slot] = name
        self.consumers.setdefault(name, []).append(i)

    def remove_node(self, i):
        node = self.nodes[i]
        for name in node.input:
            if name:
                self.consumers[name].remove(i)
        for name in node.output:
            if self.producer.get(name) == i:
                del self.producer[name]
        self.removed.add(i)

    def rename_output(self, i, new):
        node = self.nodes[i]
        old = node.output[0]
        del self.producer[old]
        node.output[0] = new
        self.producer[new] = i
        return old

    def replace_node(self, i, new_node):
        """Put ``new_node`` at position ``i`` (whose node must have been removed)."""
        self.nodes[i].CopyFrom(new_node)
        self.removed.discard(i)
        for name in new_node.input:
            if name:
                self.consumers.setdefault(name, []).append(i)
        for name in new_node.output:
            self.producer[name] = i

    def drop_unused(self, names, report):
        """Remove the constants among ``names`` that nothing reads any more."""
        todo = list(names)
        dropped = set()
        while todo:
            name = todo.pop()
            if not name or name in dropped or self.uses(name):
                continue
            if name in self.initializers and name not in self.overridable:
                dropped.add(name)
                report.removed_initializers += name in self.original_initializers
            elif name in self.producer:
                i = self.producer[name]
                node = self.nodes[i]
                if not (_is_op(node, "Constant") or _is_op(node, "Identity")) or \
                        len(node.output) != 1:
                    continue
                todo.extend(n for n in node.input if n)
                self.remove_node(i)
                report.removed_nodes += 1
        return dropped

    def commit(self, dropped_initializers, dead_names):
        """Write the node and initializer changes back into the GraphProto."""
        g = self.graph
        for i in sorted(self.removed, reverse=True):
            del g.node[i]
        for i in reversed(range(len(g.initializer))):
            if g.initializer[i].name in dropped_initializers:
                del g.initializer[i]
        g.initializer.extend(t for t in self.new_initializers
                             if t.name not in dropped_initializers)
        if self.inputs_hold_initializers:  # IR < 4: initializers are listed as inputs too
            for i in reversed(range(len(g.input))):
                if g.input[i].name in dropped_initializers:
                    del g.input[i]
            g.input.extend(self.onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                           for t in self.new_initializers
                           if t.name not in dropped_initializers)
        for i in reversed(range(len(g.value_info))):
            if g.value_info[i].name in dead_names:
                del g.value_info[i]


# ---------------------------------------------------------------- folding one BN


class _Keep(Exception):
    """This BN stays; the message says why."""


def _check_bn(g, bn):
    """Raise _Keep unless ``bn`` is an inference-mode, per-channel BN with constant
    parameters; return (gamma, beta, mean, var, eps)."""
    if g.opset < 7 and _attr(bn, "is_test", 0) != 1:
        raise _Keep(f"training mode (is_test={_attr(bn, 'is_test', 0)} in opset {g.opset})")
    if _attr(bn, "training_mode", 0) != 0:
        raise _Keep(f"training mode (training_mode={_attr(bn, 'training_mode')})")
    if _attr(bn, "spatial", 1) != 1:
        raise _Keep("spatial=0: statistics per activation, not per channel")
    extra = [name for name in bn.output[1:] if name]
    if extra:
        raise _Keep(f"training mode: {1 + len(extra)} outputs (running or saved statistics "
                    f"{', '.join(repr(n) for n in extra)})")
    if len(bn.input) != 5 or not all(bn.input):
        raise _Keep(f"expected 5 inputs, got {len(bn.input)}")
    params = []
    for role, name in zip(("scale", "B", "input_mean", "input_var"), bn.input[1:]):
        value = g.constant(name)
        if value is None:
            why = ("a graph input with a default initializer (can be overridden at run time)"
                   if name in g.overridable and name in g.initializers else "not a constant")
            raise _Keep(f"parameter {role} ('{name}') is {why}")
        if value.dtype.kind != "f":
            raise _Keep(f"parameter {role} ('{name}') has dtype {value.dtype}")
        params.append(value if value.dtype in _FLOATS else value.astype(np.float64))
    eps = float(_attr(bn, "epsilon", 1e-5))
    return (*params, eps)


def _producer(g, bn_index):
    """The index of the node producing the BN's input, or raise _Keep."""
    x = g.nodes[bn_index].input[0]
    if x not in g.producer:
        kind = "an initializer" if x in g.initializers else "a graph input"
        raise _Keep(f"its input '{x}' is {kind}, not the output of a layer")
    p = g.producer[x]
    node = g.nodes[p]
    if not any(_is_op(node, op) for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")):
        raise _Keep(f"producer {_label(node)} is not a Conv, ConvTranspose, Gemm or MatMul")
    if x in g.graph_outputs:
        raise _Keep(f"the output '{x}' of producer {_label(node)} is also a graph output")
    if x in g.outer_refs:
        raise _Keep(f"the output '{x}' of producer {_label(node)} is also used inside a subgraph")
    others = [i for i in g.uses(x) if i != bn_index]
    if others:
        users = ", ".join(_label(g.nodes[i]) for i in dict.fromkeys(others))
        raise _Keep(f"the output '{x}' of producer {_label(node)} is also used by {users}")
    return p


def _weight(g, node, slot, role):
    name = node.input[slot] if len(node.input) > slot else ""
    if not name:
        return None, ""
    value = g.constant(name)
    if value is None:
        raise _Keep(f"{role} '{name}' of producer {_label(node)} is not a constant")
    if value.dtype not in _FLOATS:
        raise _Keep(f"{role} '{name}' of producer {_label(node)} has dtype {value.dtype}; "
                    f"bn_fast folds float32 and float64")
    return value, name


def _fold_one(g, bn_index, report):
    """Fold the BN at ``bn_index`` or raise _Keep.

    Returns the constants the folded layers no longer read (if nothing else does,
    they go) and the producer's former output name (gone from the graph).
    """
    bn = g.nodes[bn_index]
    gamma, beta, mean, var, eps = _check_bn(g, bn)
    p = _producer(g, bn_index)
    node = g.nodes[p]
    op = node.op_type
    w, w_name = _weight(g, node, 1, "weight")
    if w is None:
        raise _Keep(f"producer {_label(node)} has no weight input")
    try:
        if op in ("Conv", "ConvTranspose"):
            b, b_name = _weight(g, node, 2, "bias")
            layout = "OIHW" if op == "Conv" else "IOHW"
            w2, b2 = fold_conv_bn(w, b, gamma, beta, mean, var, eps=eps,
                                  weight_layout=layout, groups=int(_attr(node, "group", 1)))
        elif op == "Gemm":
            w2, b2, b_name = _fold_gemm(g, node, w, gamma, beta, mean, var, eps)
        else:
            w2, b2 = _fold_matmul(g, node, w, gamma, beta, mean, var, eps)
            b_name = ""
    except (ValueError, TypeError) as exc:
        raise _Keep(f"bn_fast cannot fold it: {exc}") from exc

    new_w = g.add_initializer(f"{w_name}_bnfold", w2)
    new_b = g.add_initializer(f"{b_name}_bnfold" if b_name else f"{w_name}_bnfold_bias", b2)
    y = bn.output[0]
    stale = [*bn.input[1:], w_name, b_name]
    g.remove_node(bn_index)
    if op == "MatMul":
        a = node.input[0]
        old = node.output[0]
        g.remove_node(p)
        g.replace_node(bn_index, g.onnx.helper.make_node(
            "Gemm", [a, new_w, new_b], [y], name=node.name or bn.name))
        report.folded.append(FoldedBN(_label(bn), f"MatMul '{node.name}' (now a Gemm)"
                                      if node.name else "MatMul (now a Gemm)", "MatMul"))
        return stale, old
    g.set_input(p, 1, new_w)
    g.set_input(p, 2, new_b)
    old = g.rename_output(p, y)
    report.folded.append(FoldedBN(_label(bn), _label(node), op))
    return stale, old


def _fold_gemm(g, node, w, gamma, beta, mean, var, eps):
    """Gemm ``alpha * A' @ B' + beta * C``: fold into B (alpha folded in, then 1)
    and C (beta folded in, then 1); C may broadcast along either axis."""
    alpha, beta_g = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    if w.ndim != 2:
        raise _Keep(f"Gemm weight has shape {w.shape}, expected 2-D")
    trans_b = int(_attr(node, "transB", 0))
    layout = "OIHW" if trans_b else "HWIO"  # B' = B.T: (out, in); else (in, out)
    n_out = w.shape[0] if trans_b else w.shape[1]
    c, c_name = _weight(g, node, 2, "bias C")
    w64 = w.astype(np.float64) * alpha
    if c is None or c.size == 1 or (c.ndim >= 1 and c.shape[-1] == n_out
                                     and c.size == n_out):
        bias = None if c is None else beta_g * np.broadcast_to(
            c.astype(np.float64).reshape(-1), (n_out,))
        w2, b2 = fold_conv_bn(w64, bias, gamma, beta, mean, var, eps=eps, weight_layout=layout)
    else:  # C varies along the rows (M, 1) or (M, N): scale and shift it per column
        w2, _ = fold_conv_bn(w64, None, gamma, beta, mean, var, eps=eps, weight_layout=layout)
        scale, shift = fold_affine(gamma, beta, mean, var, eps=eps)
        b2 = beta_g * c.astype(np.float64) * scale.astype(np.float64) + shift
    _set_attr(node, "alpha", 1.0)
    _set_attr(node, "beta", 1.0)
    return w2.astype(w.dtype), b2.astype(w.dtype), c_name


def _fold_matmul(g, node, w, gamma, beta, mean, var, eps):
    """MatMul ``A @ B`` with constant 2-D B (in, out): correct only for 2-D A, where the
    output's axis 1 (BN's channels) is MatMul's last axis."""
    if w.ndim != 2:
        raise _Keep(f"MatMul weight has shape {w.shape}; only a 2-D (in, out) weight folds")
    a = node.input[0]
    rank = g.rank(a)
    if rank is None:
        raise _Keep(f"the rank of MatMul input '{a}' is unknown; folding is only correct when "
                    f"it is 2-D (BN normalises axis 1, MatMul's weight acts on the last axis)")
    if rank != 2:
        raise _Keep(f"MatMul input '{a}' has rank {rank}: BN normalises axis 1 of the output, "
                    f"MatMul's weight acts on its last axis")
    if g.opset < 7:
        raise _Keep(f"turning MatMul into Gemm needs opset >= 7 (model has {g.opset})")
    return fold_conv_bn(w, None, gamma, beta, mean, var, eps=eps, weight_layout="HWIO")


# ---------------------------------------------------------------- public API


def _load(model_or_path, inplace):
    onnx = _require("onnx")
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path if inplace else copy.deepcopy(model_or_path)
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(os.fspath(model_or_path))
    raise TypeError(f"model_or_path must be an onnx.ModelProto or a file path, "
                    f"got {type(model_or_path).__name__}")


def fold_model(model_or_path, *, progress=None, inplace=False):
    """Fold every foldable inference-mode BatchNormalization into the layer before it.

    Parameters
    ----------
    model_or_path : onnx.ModelProto, str or os.PathLike
        The model or the path of an ``.onnx`` file.
    progress : callable(done, total) or None
        Called before each BatchNormalization of the main graph and once at the end.
    inplace : bool
        Fold a ModelProto in place instead of a copy (saves memory on large models).

    Returns
    -------
    model : onnx.ModelProto
        The folded model: same opset, inputs, outputs and other nodes.
    report : FoldReport
        Counts, the folded BNs and the kept ones with the reason
        (``report.summary()`` for text).

    Examples
    --------
    >>> folded, report = fold_model("resnet.onnx")             # doctest: +SKIP
    >>> onnx.save(folded, "resnet-folded.onnx")                # doctest: +SKIP
    >>> print(report.summary())                                # doctest: +SKIP
    """
    model = _load(model_or_path, inplace)
    g = _Graph(model)
    report = FoldReport(nodes_before=len(g.nodes))
    bn_indices = [i for i, n in enumerate(g.nodes) if _is_op(n, "BatchNormalization")]
    report.batch_norms_before = len(bn_indices)
    report.subgraph_batch_norms = sum(
        _is_op(n, "BatchNormalization") for node in g.nodes for sub in _subgraphs(node)
        for n in _walk_subgraph_nodes(sub))
    stale, dead = [], set()
    for k, i in enumerate(bn_indices):
        if progress is not None:
            progress(k, len(bn_indices))
        bn = g.nodes[i]
        label = _label(bn)
        try:
            names, old_output = _fold_one(g, i, report)
        except _Keep as why:
            report.kept.append(KeptBN(label, str(why)))
            continue
        stale += names
        dead.add(old_output)
    if progress is not None:
        progress(len(bn_indices), len(bn_indices))
    dropped = g.drop_unused(stale, report)
    g.commit(dropped, dead)
    report.nodes_after = len(model.graph.node)
    report.batch_norms_after = sum(_is_op(n, "BatchNormalization") for n in model.graph.node)
    return model, report


# ---------------------------------------------------------------- checking with onnxruntime


def _random_feeds(session, dynamic_size, rng):
    """One random array per model input: dynamic dims set to ``dynamic_size``;
    floats standard normal, integers 0 or 1, booleans random."""
    feeds = {}
    for inp in session.get_inputs():
        kind = inp.type
        if not kind.startswith("tensor("):
            raise ValueError(f"input '{inp.name}' has type {kind}; only tensors can be "
                             f"made up at random")
        try:
            dtype = np.dtype({"float": "float32", "double": "float64", "bool": "bool",
                              "string": "object"}.get(kind[7:-1], kind[7:-1]))
        except TypeError:
            dtype = np.dtype(object)
        shape = [d if isinstance(d, int) and d > 0 else dynamic_size for d in inp.shape]
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[inp.name] = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[inp.name] = rng.random(shape) < 0.5
        else:
            raise ValueError(f"input '{inp.name}' has type {kind}; cannot make it up at random")
    return feeds


@dataclass(frozen=True)
class CheckResult:
    """``max_abs``: largest ``|original - folded|`` over all outputs (inf where only one
    is NaN or inf); ``max_rel``: the largest of those differences divided by the largest
    finite ``|original|`` of its output; ``nonfinite``: NaN and inf values in the
    original's outputs (many make the check weak)."""

    max_abs: float
    max_rel: float
    worst_output: str
    outputs: int
    dynamic_size: int
    nonfinite: int


def check_models(original, folded, *, dynamic_size=2, seed=0):
    """Run both models with onnxruntime (graph optimizations off, so the original's
    BNs really run) on the same random inputs; return a :class:`CheckResult`.

    ``original`` and ``folded`` are ModelProtos or paths (paths for models over 2 GB).
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3

    def session(m, which):
        source = os.fspath(m) if isinstance(m, (str, os.PathLike)) else m.SerializeToString()
        try:
            return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RuntimeError(f"onnxruntime cannot load the {which} model: {exc}") from exc

    s0, s1 = session(original, "original"), session(folded, "folded")
    feeds = _random_feeds(s0, dynamic_size, np.random.default_rng(seed))
    names = [o.name for o in s0.get_outputs()]
    outputs = []
    for s, which in ((s0, "original"), (s1, "folded")):
        try:
            outputs.append(s.run(names, feeds))
        except Exception as exc:
            raise RuntimeError(f"onnxruntime cannot run the {which} model on random inputs "
                               f"(dynamic dims = {dynamic_size}): {exc}") from exc
    max_abs = max_rel = 0.0
    worst = names[0] if names else ""
    nonfinite = 0
    for name, a, b in zip(names, *outputs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise RuntimeError(f"output '{name}' has shape {a.shape} in the original model "
                               f"and {b.shape} in the folded one")
        if not a.size:
            continue
        # equal values (NaN where both are NaN, the same inf) differ by 0, a NaN or an
        # inf against anything else by inf
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(invalid="ignore"):
            d = np.where(same, 0.0, np.abs(a - b))
        diff = float(np.nan_to_num(d, nan=np.inf).max())
        finite = np.isfinite(a)
        nonfinite += int(a.size - finite.sum())
        largest = float(np.abs(a[finite]).max()) if finite.any() else 0.0
        rel = diff / largest if largest > 0 else (0.0 if diff == 0 else np.inf)
        if rel > max_rel or (rel == max_rel and diff > max_abs):
            worst = name
        max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
    return CheckResult(max_abs, max_rel, worst, len(names), dynamic_size, nonfinite)


# ---------------------------------------------------------------- command line


def add_fold_command(subparsers):
    """Register ``fold`` on the ``python -m bn_fast`` subcommand parser."""
    parser = subparsers.add_parser(
        "fold", help="fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul "
        "in an ONNX model", description="Fold every inference-mode BatchNormalization of "
        "an ONNX model into the Conv, ConvTranspose, Gemm or MatMul before it; say which "
        "stay and why.  Needs: " + INSTALL_HINT)
    parser.add_argument("input", help="the .onnx model to fold")
    parser.add_argument("output", help="where to write the folded model")
    parser.add_argument("--check", action="store_true",
                        help="run both models with onnxruntime on random inputs and report "
                        "the largest absolute and relative difference")
    parser.add_argument("--dynamic-size", type=int, default=2, metavar="N",
                        help="size given to dynamic dimensions of the inputs by --check "
                        "(default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of --check inputs")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="--check fails (exit code 1) when the relative difference is "
                        "larger (default: 1e-4)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="list every folded BatchNormalization")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help=f"progress line on stderr (default: on for graphs of "
                        f">= {LARGE_MODEL_NODES} nodes)")
    parser.set_defaults(run=run)
    return parser


class _Progress:
    """A progress bar on stderr, redrawn when it moves by a percent."""

    def __init__(self, enabled, width=30):
        self.enabled, self.width = enabled, width
        self.shown = None

    def say(self, text):
        if self.enabled:
            sys.stderr.write(f"\r{text:<70}\n")
            sys.stderr.flush()

    def __call__(self, done, total):
        percent = 100 * done // max(total, 1)
        if self.enabled and percent != self.shown:
            self.shown = percent
            bar = self.width * done // max(total, 1)
            sys.stderr.write(f"\rfold [{'#' * bar}{'.' * (self.width - bar)}] "
                             f"{done}/{total} BatchNormalization")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _save(onnx, model, path):
    if model.ByteSize() >= EXTERNAL_DATA_BYTES:
        data = os.fspath(path) + ".data"
        if os.path.exists(data):  # onnx appends to an existing data file
            os.remove(data)
        onnx.save(model, path, save_as_external_data=True, location=os.path.basename(data))
        return True
    onnx.save(model, path)
    return False


def run(args):
    """Run ``fold`` for parsed ``args``; raise SystemExit with a message on failure."""
    try:
        onnx = _require("onnx")
        if args.check:
            _require("onnxruntime")
    except ImportError as exc:
        raise SystemExit(f"python -m bn_fast fold: {exc}") from None
    if args.dynamic_size < 1:
        raise SystemExit(f"--dynamic-size={args.dynamic_size} must be >= 1")
    start = time.perf_counter()
    try:
        model = onnx.load(args.input)
    except Exception as exc:
        raise SystemExit(f"cannot read {args.input!r} as an ONNX model: {exc}") from None
    show = args.progress
    if show is None:
        show = len(model.graph.node) >= LARGE_MODEL_NODES
    progress = _Progress(show)
    progress.say(f"loaded {args.input} ({len(model.graph.node)} nodes) in "
                 f"{time.perf_counter() - start:.1f} s")
    folded, report = fold_model(model, progress=progress, inplace=True)
    external = _save(onnx, folded, args.output)
    try:
        onnx.checker.check_model(args.output if external else folded)
    except Exception as exc:
        raise SystemExit(f"the folded model {args.output!r} fails onnx.checker.check_model "
                         f"(was the input valid?): {exc}") from None
    print(f"{args.input} -> {args.output} (opset {_opset(folded)})")
    print(report.summary(verbose=args.verbose))
    if args.check:
        progress.say("check: running both models with onnxruntime")
        try:
            result = check_models(args.input, args.output if external else folded,
                                  dynamic_size=args.dynamic_size, seed=args.seed)
        except (RuntimeError, ValueError) as exc:
            raise SystemExit(f"check: {exc}") from None
        verdict = "ok" if result.max_rel <= args.tol else f"FAILED (> --tol {args.tol:g})"
        print(f"check (onnxruntime, random inputs, dynamic dims = {result.dynamic_size}, "
              f"{result.outputs} output{'s' if result.outputs != 1 else ''}): "
              f"max abs diff {result.max_abs:.3g}, max rel diff {result.max_rel:.3g} "
              f"('{result.worst_output}'): {verdict}")
        if result.nonfinite:
            print(f"check: warning: the original model's outputs hold {result.nonfinite} "
                  f"NaN or inf values on these inputs, which compare only as equal or not")
        if result.max_rel > args.tol:
            raise SystemExit(1)
    return 0
