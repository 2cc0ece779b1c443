"""bn_fast.onnx.fold_model and ``python -m bn_fast fold``: ONNX models built here with
onnx.helper (and one exported from PyTorch); every folded model must pass
onnx.checker, have no foldable BatchNormalization left and agree with the original
under onnxruntime (graph optimizations off, so the original's BNs really run).
"""

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper, numpy_helper  # noqa: E402

from bn_fast.onnx import check_models, fold_model  # noqa: E402

RNG = np.random.default_rng(20261121)
CLI = [sys.executable, "-m", "bn_fast", "fold"]


# ------------------------------------------------------------------ building models


class Net:
    """A graph under construction: constants, nodes, inputs with random feeds."""

    def __init__(self, dtype=np.float32, opset=17, ir_version=8):
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.opset, self.ir_version = opset, ir_version
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.feeds = {}
        self.count = 0

    def name(self, base):
        self.count += 1
        return f"{base}{self.count}"

    def const(self, base, array, *, node=False, dtype=None):
        name = self.name(base)
        tensor = numpy_helper.from_array(np.asarray(array, dtype or self.dtype), name)
        if node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def input(self, shape, *, name="x", batch="N"):
        """A graph input fed with ``shape``; its first dim is declared as ``batch``."""
        dims = [batch or shape[0], *shape[1:]]
        self.inputs.append(helper.make_tensor_value_info(name, self.elem, dims))
        self.feeds[name] = RNG.standard_normal(shape).astype(self.dtype)
        return name

    def op(self, op_type, inputs, n_out=1, **attrs):
        outputs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=outputs[0], **attrs))
        return outputs[0] if n_out == 1 else outputs

    def bn(self, x, c, *, node=False, epsilon=1e-3, n_out=1, **attrs):
        params = [self.const("gamma", RNG.uniform(0.5, 1.5, c), node=node),
                  self.const("beta", RNG.standard_normal(c), node=node),
                  self.const("mean", 0.5 * RNG.standard_normal(c), node=node),
                  self.const("var", RNG.uniform(0.5, 2.0, c), node=node)]
        return self.op("BatchNormalization", [x, *params], n_out=n_out, epsilon=epsilon,
                       **attrs)

    def conv(self, x, c_in, c_out, *, nd=2, k=3, groups=1, bias=True, node=False,
             transpose=False, **attrs):
        shape = (c_in, c_out // groups) if transpose else (c_out, c_in // groups)
        inputs = [x, self.const("w", RNG.standard_normal(shape + (k,) * nd) / np.sqrt(k),
                                node=node)]
        if bias:
            inputs.append(self.const("b", RNG.standard_normal(c_out), node=node))
        return self.op("ConvTranspose" if transpose else "Conv", inputs, group=groups, **attrs)

    def output(self, name, rank):
        self.outputs.append(helper.make_tensor_value_info(
            name, self.elem, [f"{name}_d{i}" for i in range(rank)]))

    def model(self):
        graph = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = self.ir_version
        return model


def ort_run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(original, folded, feeds):
    """Outputs agree to 1e-5 relative (to each output's largest magnitude)."""
    out0, out1 = ort_run(original, feeds), ort_run(folded, feeds)
    assert len(out0) == len(out1)
    for a, b in zip(out0, out1):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def op_types(model):
    return [n.op_type for n in model.graph.node]


def data_inputs(model):
    """Graph inputs that are not initializers (before IR 4 those are listed too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def assert_topologically_sorted(model):
    g = model.graph
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    for node in g.node:
        missing = [name for name in node.input if name not in known]
        assert not missing, f"{node.op_type} {node.name!r} reads {missing} before they exist"
        known.update(node.output)


def fold_ok(net, *, folded, kept=(), compare=True):
    """Fold ``net``'s model and check everything a folded model must satisfy.

    ``kept``: one substring per kept BN, found in its reason (in graph order).
    """
    model = net.model()
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    out, report = fold_model(model)
    assert model.SerializeToString() == before, "fold_model modified its input"
    onnx.checker.check_model(out, full_check=True)
    assert_topologically_sorted(out)
    assert list(out.opset_import) == list(model.opset_import)
    assert data_inputs(out) == data_inputs(model)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert len(report.folded) == folded, report.summary()
    assert len(report.kept) == len(kept), report.summary()
    for k, why in zip(report.kept, kept):
        assert why in k.reason, (why, k.reason)
    assert op_types(out).count("BatchNormalization") == len(kept) == report.batch_norms_after
    assert report.nodes_after == len(out.graph.node)
    assert report.nodes_before == len(model.graph.node)
    again = fold_model(out)[1]
    assert again.folded == [], again.summary()
    if compare:
        assert_same_outputs(model, out, net.feeds)
    return model, out, report


# ------------------------------------------------------------------ Conv, ConvTranspose


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", ["1", "2", "depthwise"])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_bn(nd, groups, bias):
    c_in, c_out = 4, 8
    g = {"1": 1, "2": 2, "depthwise": c_in}[groups]
    net = Net()
    x = net.input((2, c_in) + (5,) * nd)
    y = net.bn(net.conv(x, c_in, c_out, nd=nd, groups=g, bias=bias, pads=[1] * 2 * nd,
                        strides=[2] * nd), c_out)
    net.output(y, nd + 2)
    model, out, report = fold_ok(net, folded=1)
    assert op_types(out) == ["Conv"]
    conv = out.graph.node[0]
    assert len(conv.input) == 3 and conv.input[2], "the folded conv must carry a bias"
    assert conv.output[0] == y
    assert len(out.graph.initializer) == 2, "unused weights and BN parameters must be removed"
    assert report.folded[0].producer_op == "Conv"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", ["1", "2", "depthwise"])
@pytest.mark.parametrize("nd", [1, 2])
def test_conv_transpose_bn(nd, groups, bias):
    c_in, c_out = 4, 6 if groups != "depthwise" else 8
    g = {"1": 1, "2": 2, "depthwise": c_in}[groups]
    net = Net()
    x = net.input((2, c_in) + (4,) * nd)
    y = net.bn(net.conv(x, c_in, c_out, nd=nd, k=2, groups=g, bias=bias, transpose=True,
                        strides=[2] * nd, output_padding=[1] * nd), c_out)
    net.output(y, nd + 2)
    model, out, _ = fold_ok(net, folded=1)
    assert op_types(out) == ["ConvTranspose"]
    w = numpy_helper.to_array(out.graph.initializer[0])
    assert w.shape == (c_in, c_out // g, *(2,) * nd)


def test_float64_conv_folds():
    """onnxruntime has no float64 Conv: only the fold itself is checked here."""
    net = Net(np.float64)
    y = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 5), 5)
    net.output(y, 4)
    fold_ok(net, folded=1, compare=False)


# ------------------------------------------------------------------ Gemm, MatMul


@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (), (3, 5), (3, 1)],
                         ids=["noC", "C(N)", "C(1,N)", "C()", "C(M,N)", "C(M,1)"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn(trans_b, c_shape):
    net = Net()
    x = net.input((3, 4), batch=None)
    w = net.const("w", RNG.standard_normal((5, 4) if trans_b else (4, 5)))
    inputs = [x, w] if c_shape is None else [x, w, net.const("c", RNG.standard_normal(c_shape))]
    y = net.bn(net.op("Gemm", inputs, transB=trans_b, alpha=0.75, beta=1.5), 5)
    net.output(y, 2)
    model, out, _ = fold_ok(net, folded=1)
    assert op_types(out) == ["Gemm"]
    gemm = out.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["alpha"] == 1.0 and attrs["beta"] == 1.0 and attrs["transB"] == trans_b


def test_gemm_trans_a():
    net = Net()
    x = net.input((4, 3), batch=None)  # A' = A.T is (3, 4)
    y = net.bn(net.op("Gemm", [x, net.const("w", RNG.standard_normal((4, 5))),
                               net.const("c", RNG.standard_normal(5))], transA=1), 5)
    net.output(y, 2)
    fold_ok(net, folded=1)


def test_gemm_float64():
    net = Net(np.float64)
    y = net.bn(net.op("Gemm", [net.input((3, 4)), net.const("w", RNG.standard_normal((5, 4))),
                               net.const("c", RNG.standard_normal(5))], transB=1), 5)
    net.output(y, 2)
    model, out, _ = fold_ok(net, folded=1)
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in out.graph.initializer)
    a, b = ort_run(model, net.feeds)[0], ort_run(out, net.feeds)[0]
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.abs(a).max())


def test_gemm_with_non_constant_c_is_kept():
    net = Net()
    x = net.input((3, 4), batch=None)
    c = net.input((3, 5), name="c", batch=None)
    y = net.bn(net.op("Gemm", [x, net.const("w", RNG.standard_normal((4, 5))), c]), 5)
    net.output(y, 2)
    fold_ok(net, folded=0, kept=["bias C 'c'", ])


def test_matmul_2d_becomes_gemm():
    net = Net()
    x = net.input((3, 4))
    y = net.bn(net.op("MatMul", [x, net.const("w", RNG.standard_normal((4, 6)))]), 6)
    net.output(y, 2)
    model, out, report = fold_ok(net, folded=1)
    assert op_types(out) == ["Gemm"]
    assert out.graph.node[0].input[0] == x and out.graph.node[0].output[0] == y
    assert "now a Gemm" in report.folded[0].producer


def test_matmul_rank3_is_kept():
    """(N, C, K) @ (K, C): BN over axis 1 is not MatMul's output axis, even though the
    channel counts match (a wrong fold would pass every shape check)."""
    net = Net()
    x = net.input((2, 5, 4))
    y = net.bn(net.op("MatMul", [x, net.const("w", RNG.standard_normal((4, 5)))]), 5)
    net.output(y, 3)
    fold_ok(net, folded=0, kept=["has rank 3"])


def test_matmul_unknown_rank_is_kept():
    net = Net()
    x = net.input((2, 12))
    shape = "shape"
    net.inputs.append(helper.make_tensor_value_info(shape, onnx.TensorProto.INT64, ["r"]))
    net.feeds[shape] = np.array([6, 4], np.int64)
    a = net.op("Reshape", [x, shape])
    y = net.bn(net.op("MatMul", [a, net.const("w", RNG.standard_normal((4, 5)))]), 5)
    net.output(y, 2)
    fold_ok(net, folded=0, kept=["rank of MatMul input", ])


def test_matmul_constant_first_operand_is_kept():
    net = Net()
    x = net.input((4, 3), batch=None)
    y = net.bn(net.op("MatMul", [net.const("w", RNG.standard_normal((5, 4))), x]), 3)
    net.output(y, 2)
    fold_ok(net, folded=0, kept=["weight 'x"])


# ------------------------------------------------------------------ graph shapes


def test_chain_conv_bn_relu_conv_bn():
    net = Net()
    h = net.op("Relu", [net.bn(net.conv(net.input((2, 3, 8, 8)), 3, 4, pads=[1] * 4), 4)])
    y = net.bn(net.conv(h, 4, 6, bias=False), 6)
    net.output(y, 4)
    _, out, _ = fold_ok(net, folded=2)
    assert op_types(out) == ["Conv", "Relu", "Conv"]


def test_two_batch_norms_in_a_row_fold_into_one_conv():
    net = Net()
    y = net.bn(net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 4), 4), 4)
    net.output(y, 4)
    _, out, report = fold_ok(net, folded=2)
    assert op_types(out) == ["Conv"]
    assert len(out.graph.initializer) == 2
    assert report.removed_initializers == 10


def test_branch_is_kept():
    net = Net()
    c = net.conv(net.input((2, 3, 6, 6)), 3, 4)
    y = net.bn(c, 4)
    z = net.op("Relu", [c])
    net.output(y, 4)
    net.output(z, 4)
    _, out, _ = fold_ok(net, folded=0, kept=["also used by Relu"])
    assert op_types(out) == ["Conv", "BatchNormalization", "Relu"]


def test_producer_output_is_graph_output_is_kept():
    net = Net()
    c = net.conv(net.input((2, 3, 6, 6)), 3, 4)
    y = net.bn(c, 4)
    net.output(y, 4)
    net.output(c, 4)
    fold_ok(net, folded=0, kept=["also a graph output"])


def test_unsupported_producer_and_graph_input_are_kept():
    net = Net()
    x = net.input((2, 3, 6, 6))
    y = net.bn(net.op("Relu", [net.bn(x, 3)]), 3)
    net.output(y, 4)
    fold_ok(net, folded=0, kept=["input 'x' is a graph input", "is not a Conv, ConvTranspose"])


def test_training_mode_is_kept():
    net = Net()
    y, _, _ = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 4), 4, n_out=3, training_mode=1)
    net.output(y, 4)
    fold_ok(net, folded=0, kept=["training_mode=1"])


def test_extra_outputs_are_training_mode_opset9():
    net = Net(opset=9)
    y, *_ = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 4), 4, n_out=5)
    net.output(y, 4)
    fold_ok(net, folded=0, kept=["5 outputs"], compare=False)


def test_opset9_inference_bn_folds():
    net = Net(opset=9)
    y = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 4), 4)
    net.output(y, 4)
    fold_ok(net, folded=1)


def test_spatial0_is_kept():
    net = Net(opset=7)
    y = net.bn(net.op("Gemm", [net.input((3, 4), batch=None),
                               net.const("w", RNG.standard_normal((4, 5))),
                               net.const("c", RNG.standard_normal(5))]), 5, spatial=0)
    net.output(y, 2)
    fold_ok(net, folded=0, kept=["spatial=0"])


def test_constant_nodes_for_params_and_weights():
    net = Net()
    h = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 4, node=True), 4, node=True)
    y = net.bn(net.conv(h, 4, 4, groups=4), 4, node=True)
    net.output(y, 4)
    _, out, report = fold_ok(net, folded=2)
    assert op_types(out) == ["Conv", "Conv"]
    assert report.removed_nodes == 10
    assert {t.name for t in out.graph.initializer} == {n for node in out.graph.node
                                                       for n in node.input[1:]}


def test_identity_of_initializers():
    """The TorchScript exporter shares equal initializers through Identity nodes."""
    net = Net()
    x = net.input((2, 3, 6, 6))
    c = net.conv(x, 3, 4)
    ones = net.const("ones", np.ones(4))
    zeros = net.const("zeros", np.zeros(4))
    var = net.op("Identity", [ones])
    mean = net.op("Identity", [zeros])
    net.nodes.insert(0, net.nodes.pop())
    net.nodes.insert(0, net.nodes.pop())
    y = net.op("BatchNormalization", [c, ones, zeros, mean, var], epsilon=0.25)
    net.output(y, 4)
    _, out, report = fold_ok(net, folded=1)
    assert op_types(out) == ["Conv"]
    assert report.removed_nodes == 2 and report.removed_initializers == 4


def test_shared_weight_and_shared_parameter():
    """Two convs share a weight, two BNs share gamma, which an Add also reads."""
    net = Net()
    x = net.input((2, 4, 6, 6))
    w = net.const("w", RNG.standard_normal((4, 4, 3, 3)))
    gamma = net.const("gamma", RNG.uniform(0.5, 1.5, 4))
    outs = []
    for _ in range(2):
        c = net.op("Conv", [x, w], pads=[1] * 4)
        outs.append(net.op("BatchNormalization", [
            c, gamma, net.const("beta", RNG.standard_normal(4)),
            net.const("mean", RNG.standard_normal(4)), net.const("var", RNG.uniform(1, 2, 4))]))
    y = net.op("Add", [outs[0], outs[1]])
    z = net.op("Add", [y, net.op("Reshape", [gamma, net.const("s", [1, 4, 1, 1],
                                                              dtype=np.int64)])])
    net.output(z, 4)
    _, out, _ = fold_ok(net, folded=2)
    names = {t.name for t in out.graph.initializer}
    assert w not in names and gamma in names
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]


def test_unused_initializer_and_value_info():
    net = Net()
    c = net.conv(net.input((2, 3, 6, 6)), 3, 4)
    y = net.bn(c, 4)
    net.output(y, 4)
    unused = net.const("unused", np.ones(3))
    model = net.model()
    model.graph.value_info.append(helper.make_tensor_value_info(c, net.elem, [2, 4, 4, 4]))
    out, _ = fold_model(model)
    assert unused in {t.name for t in out.graph.initializer}, "unrelated constants stay"
    assert c not in {v.name for v in out.graph.value_info}, "stale value_info must go"
    onnx.checker.check_model(out, full_check=True)


def test_non_constant_and_overridable_parameters_are_kept():
    net = Net()
    x = net.input((2, 3, 6, 6))
    gamma = net.input((4,), name="gamma", batch=None)
    c1 = net.conv(x, 3, 4)
    y1 = net.op("BatchNormalization", [c1, gamma, *(net.const(n, np.ones(4))
                                                    for n in ("b", "m", "v"))])
    y2 = net.bn(net.conv(x, 3, 4), 4)
    net.output(y1, 4)
    net.output(y2, 4)
    var = net.nodes[-1].input[4]  # an initializer that is also a graph input (IR >= 4)
    net.inputs.append(helper.make_tensor_value_info(var, net.elem, [4]))
    fold_ok(net, folded=0, kept=["scale ('gamma') is not a constant",
                                 "overridden at run time"])


def test_ir3_initializers_listed_as_inputs():
    net = Net(opset=7, ir_version=3)
    y = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 4), 4)
    net.output(y, 4)
    net.inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                   for t in net.inits]
    _, out, _ = fold_ok(net, folded=1)
    inputs = [i.name for i in out.graph.input]
    assert inputs[0] == "x"
    assert sorted(inputs[1:]) == sorted(t.name for t in out.graph.initializer)


def test_float16_weight_is_kept():
    net = Net(np.float16)
    y = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 4), 4)
    net.output(y, 4)
    fold_ok(net, folded=0, kept=["dtype float16"])


def test_what_bn_fast_refuses_is_kept():
    """epsilon=0 is valid ONNX; fold_conv_bn refuses it and the BN stays."""
    net = Net()
    y = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 4), 4, epsilon=0.0)
    net.output(y, 4)
    fold_ok(net, folded=0, kept=["bn_fast cannot fold it: eps=0.0 must be"])


def test_subgraph_use_is_kept_and_subgraph_bn_counted():
    net = Net()
    x = net.input((2, 3, 6, 6))
    c = net.conv(x, 3, 4)
    y = net.bn(c, 4)
    sub_bn = helper.make_node("BatchNormalization", [c, *net.nodes[-1].input[1:]], ["t"])
    then = helper.make_graph([sub_bn], "then", [], [
        helper.make_tensor_value_info("t", net.elem, ["a", "b", "c", "d"])])
    other = helper.make_graph([helper.make_node("Identity", [c], ["e"])], "else", [], [
        helper.make_tensor_value_info("e", net.elem, ["a", "b", "c", "d"])])
    cond = net.const("cond", np.array(True), dtype=np.bool_)
    z = net.op("If", [cond], then_branch=then, else_branch=other)
    net.output(y, 4)
    net.output(z, 4)
    _, _, report = fold_ok(net, folded=0, kept=["used inside a subgraph"])
    assert report.subgraph_batch_norms == 1
    assert "not visited: 1" in report.summary()


# ------------------------------------------------------------------ API


def _small_model():
    net = Net()
    y = net.op("Relu", [net.bn(net.conv(net.input((2, 3, 8, 8)), 3, 4, pads=[1] * 4), 4)])
    y = net.bn(net.conv(y, 4, 4), 4)
    net.output(y, 4)
    return net


def test_fold_model_path_inplace_and_progress(tmp_path):
    net = _small_model()
    model = net.model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calls = []
    from_path, report = fold_model(path, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 2), (1, 2), (2, 2)]
    from_str, _ = fold_model(str(path))
    assert from_path.SerializeToString() == from_str.SerializeToString()
    same, _ = fold_model(model, inplace=True)
    assert same is model and op_types(model) == ["Conv", "Relu", "Conv"]
    assert same.SerializeToString() == from_path.SerializeToString()
    with pytest.raises(TypeError, match="ModelProto or a file path"):
        fold_model(b"bytes")


def test_summary_text():
    _, report = fold_model(_small_model().model())
    text = report.summary(verbose=True)
    assert "nodes: 5 -> 3" in text
    assert "BatchNormalization: 2 -> 0" in text
    assert "folded: 2 (into Conv 2)" in text
    assert text.count(" -> Conv '") == 2


def test_check_models_detects_a_wrong_fold():
    net = _small_model()
    model = net.model()
    out, _ = fold_model(model)
    good = check_models(model, out)
    assert good.max_rel < 1e-5 and good.outputs == 1
    w = out.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    bad = check_models(model, out)
    assert bad.max_rel > 1e-3 and bad.max_abs > 0


def test_check_models_nan_against_a_number_is_inf():
    """sqrt(x) is NaN for x < 0 and sqrt(|x|) is not: a difference NaN must not hide."""
    models = []
    for ops in (["Sqrt"], ["Abs", "Sqrt"]):
        net = Net()
        y = net.input((2, 3))
        for op in ops:
            y = net.op(op, [y])
        net.nodes.append(helper.make_node("Identity", [y], ["y"]))
        net.output("y", 2)
        models.append(net.model())
    same = check_models(models[0], models[0])
    assert same.max_abs == 0 and same.nonfinite > 0
    differ = check_models(*models)
    assert differ.max_abs == np.inf and differ.max_rel == np.inf


def test_import_bn_fast_does_not_import_onnx():
    code = ("import sys, bn_fast, bn_fast.onnx; "
            "print('onnx' in sys.modules, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ command line


def cli(*args, env=None, code=None):
    cmd = CLI if code is None else [sys.executable, "-c", code]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture
def small_onnx(tmp_path):
    net = Net()
    h = net.op("Relu", [net.bn(net.conv(net.input((2, 3, 8, 8)), 3, 4, pads=[1] * 4), 4)])
    c = net.conv(h, 4, 4)
    y = net.bn(c, 4)
    z = net.op("Relu", [c])
    net.output(y, 4)
    net.output(z, 4)
    path = tmp_path / "small.onnx"
    onnx.save(net.model(), path)
    return path


def test_cli_fold_and_check(small_onnx, tmp_path):
    out_path = tmp_path / "folded.onnx"
    res = cli(small_onnx, out_path, "--check", "-v")
    assert res.returncode == 0, res.stderr
    assert "nodes: 6 -> 5" in res.stdout
    assert "folded: 1 (into Conv 1)" in res.stdout
    assert "kept: 1" in res.stdout
    assert re.search(r"also used by Relu 'relu\d+'", res.stdout)
    m = re.search(r"max abs diff (\S+), max rel diff (\S+) .*: ok", res.stdout)
    assert m, res.stdout
    assert float(m.group(2)) < 1e-5
    assert "fold [" not in res.stderr, "no progress line on a small model by default"
    folded = onnx.load(out_path)
    onnx.checker.check_model(folded)
    assert op_types(folded).count("BatchNormalization") == 1


def test_cli_progress_and_failed_check(small_onnx, tmp_path):
    res = cli(small_onnx, tmp_path / "f.onnx", "--check", "--tol", "0", "--progress")
    m = re.search(r"max rel diff (\S+)", res.stdout)
    assert m, res.stdout + res.stderr
    if float(m.group(1)) > 0:
        assert res.returncode == 1 and "FAILED" in res.stdout
    else:
        assert res.returncode == 0
    assert "fold [" in res.stderr and "2/2 BatchNormalization" in res.stderr


def test_cli_large_model_uses_external_data(tmp_path, monkeypatch, capsys):
    """Past protobuf's 2 GB limit the weights (tensors of 1 kB or more) go to OUTPUT.data;
    the limit is lowered here, in process, to take that path with a small model."""
    import bn_fast.__main__ as cli_main
    import bn_fast.onnx as bn_onnx

    net = Net()
    y = net.bn(net.conv(net.input((2, 3, 6, 6)), 3, 32), 32)
    net.output(y, 4)
    in_path, out_path = tmp_path / "model.onnx", tmp_path / "folded.onnx"
    onnx.save(net.model(), in_path)
    monkeypatch.setattr(bn_onnx, "EXTERNAL_DATA_BYTES", 0)
    for _ in range(2):  # the second run must replace the data file, not append to it
        assert cli_main.main(["fold", str(in_path), str(out_path), "--check"]) == 0
    assert ": ok" in capsys.readouterr().out
    data = tmp_path / "folded.onnx.data"
    folded = onnx.load(out_path)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(out_path, load_external_data=False).graph.initializer)
    weight = numpy_helper.to_array(folded.graph.initializer[0])
    assert weight.shape == (32, 3, 3, 3) and data.stat().st_size == weight.nbytes


def test_cli_errors(tmp_path):
    res = cli(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert res.returncode == 1 and "cannot read" in res.stderr
    res = cli("a.onnx", "b.onnx", "--dynamic-size", "0")
    assert res.returncode == 1 and "--dynamic-size=0" in res.stderr


def test_cli_without_onnx_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['onnx'] = None; "
            "from bn_fast.__main__ import main; sys.exit(main(['fold', *sys.argv[1:]]))")
    res = cli("a.onnx", "b.onnx", code=code)
    assert res.returncode == 1
    assert "pip install 'bn_fast[onnx]'" in res.stderr
    assert "'onnx' package" in res.stderr


# ------------------------------------------------------------------ a PyTorch model


def _torch_model(torch):
    nn = torch.nn

    def cbr(c_in, c_out, **kw):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, **kw), nn.BatchNorm2d(c_out),
                             nn.ReLU())

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a = cbr(c, c)
            self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(self.b(self.a(x)) + x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 8)
            self.block = Block(8)
            self.dw = cbr(8, 8, groups=8)
            self.up = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2),
                                    nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
                                      nn.BatchNorm1d(10))

        def forward(self, x):
            x = self.dw(self.block(self.stem(x)))
            x = nn.functional.adaptive_avg_pool2d(self.up(x), 4)
            return self.head(x)

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model.eval()


def test_torch_resnet_like(tmp_path):
    torch = pytest.importorskip("torch")
    model = _torch_model(torch)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "resnet.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=False, do_constant_folding=False,
                              input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    except Exception as exc:  # an exporter that needs what is not installed here
        pytest.skip(f"torch.onnx.export (TorchScript exporter) failed: {exc}")
    original = onnx.load(path)
    assert op_types(original).count("BatchNormalization") == 6
    out, report = fold_model(original)
    assert report.batch_norms_after == 0 and len(report.folded) == 6, report.summary()
    assert {f.producer_op for f in report.folded} == {"Conv", "ConvTranspose", "Gemm"}
    onnx.checker.check_model(out, full_check=True)
    assert_topologically_sorted(out)
    feeds = {"x": x.numpy()}
    assert_same_outputs(original, out, feeds)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(ort_run(out, feeds)[0], expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
    folded_path = tmp_path / "folded.onnx"
    res = cli(path, folded_path, "--check", "--dynamic-size", "3")
    assert res.returncode == 0, res.stderr
    assert "BatchNormalization: 6 -> 0" in res.stdout
    assert "dynamic dims = 3" in res.stdout and ": ok" in res.stdout
    assert os.path.getsize(folded_path) < os.path.getsize(path)
