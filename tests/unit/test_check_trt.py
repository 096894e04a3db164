"""check-trt: every TensorRT rule is reported per node, and each rule is caught by a graph that
breaks it; insert-qdq's TensorRT placement passes the lint."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from hqpc.passes.check_trt import RULES, lint

C = 4


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


class G:
    """A tiny graph builder: float input x [1, C, 8, 8], output y."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def q(self, x, out, zp=np.int8(0), scale=np.float32(0.05)):
        s, z = f"{out}_s", f"{out}_z"
        self.inits += [_init(s, scale), _init(z, zp)]
        self.nodes += [helper.make_node("QuantizeLinear", [x, s, z], [out + "_q"], name=f"Q_{out}"),
                       helper.make_node("DequantizeLinear", [out + "_q", s, z], [out], name=f"DQ_{out}")]
        return out

    def wdq(self, name, shape=(C, C, 3, 3), axis=0, scale=None, zp=None, block=None, dtype=np.int8):
        codes = np.random.default_rng(0).integers(-7, 8, shape).astype(dtype)
        n = shape[axis] if block is None else None
        sc = scale if scale is not None else np.full(n if n else (shape[0], shape[1] // block) if axis == 1 else n, 0.01, np.float32)
        zz = zp if zp is not None else np.zeros(np.shape(sc), dtype)
        self.inits += [_init(name + "_c", codes), _init(name + "_s", sc), _init(name + "_z", zz)]
        attrs = {"axis": axis}
        if block:
            attrs["block_size"] = block
        self.nodes.append(helper.make_node("DequantizeLinear", [name + "_c", name + "_s", name + "_z"], [name], name=f"DQ_{name}", **attrs))
        return name

    def conv(self, x, w, out, bias=None):
        inputs = [x, w] + ([bias] if bias else [])
        self.nodes.append(helper.make_node("Conv", inputs, [out], name=f"conv_{out}", pads=[1, 1, 1, 1]))
        return out

    def model(self, out):
        g = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info(out, T.FLOAT, None)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        return m


def _clean():
    g = G()
    x = g.q("x", "xq")
    g.inits.append(_init("b", np.zeros(C, np.float32)))
    y = g.conv(x, g.wdq("w"), "y", bias="b")
    return g, y


def violated(model) -> set[str]:
    return {v["rule"] for v in lint(model)["violations"]}


def test_clean_graph_passes_and_reports_each_rule_per_node():
    g, y = _clean()
    result = lint(g.model(y))
    assert result["ok"], result["violations"]
    assert set(result["rules"]) == set(RULES)
    assert result["nodes"]["conv_y"] == {"qdq-inputs": "ok", "weight-axis": "ok", "qdq-weights": "ok", "bias-float": "ok"}
    assert result["nodes"]["Q_xq"] == {"positive-scales": "ok", "symmetric": "ok"}


def test_qdq_inputs_rule():
    g = G()
    y = g.conv("x", g.wdq("w"), "y")
    assert violated(g.model(y)) == {"qdq-inputs"}


def test_qdq_weights_rule():
    g = G()
    g.inits.append(_init("w", np.ones((C, C, 3, 3), np.float32)))
    y = g.conv(g.q("x", "xq"), "w", "y")
    assert violated(g.model(y)) == {"qdq-weights"}


def test_residual_add_rule():
    g, y = _clean()
    g.nodes.append(helper.make_node("Add", [y, "x"], ["z"], name="add"))
    assert violated(g.model("z")) == {"residual-add"}
    g2, y2 = _clean()
    skip = g2.q("x", "skip")
    g2.nodes.append(helper.make_node("Add", [g2.q(y2, "yq"), skip], ["z"], name="add"))
    assert violated(g2.model("z")) == set()


def test_pool_commute_rule():
    g = G()
    x = g.q("x", "xq")
    g.nodes.append(helper.make_node("MaxPool", [x], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    y = g.conv(g.q("p", "pq"), g.wdq("w"), "y")
    assert violated(g.model(y)) == {"pool-commute"}


def test_bias_float_rule():
    g = G()
    x = g.q("x", "xq")
    g.inits += [_init("b_c", np.zeros(C, np.int32)), _init("b_s", np.full(C, 1e-4, np.float32))]
    g.nodes.append(helper.make_node("DequantizeLinear", ["b_c", "b_s"], ["b"], name="DQ_b", axis=0))
    y = g.conv(x, g.wdq("w"), "y", bias="b")
    assert violated(g.model(y)) == {"bias-float"}


@pytest.mark.parametrize("zp", [np.uint8(128), np.int8(3)])
def test_symmetric_rule(zp):
    g = G()
    y = g.conv(g.q("x", "xq", zp=zp), g.wdq("w"), "y")
    assert violated(g.model(y)) == {"symmetric"}


def test_weight_axis_rule():
    g = G()
    y = g.conv(g.q("x", "xq"), g.wdq("w", axis=1), "y")
    assert violated(g.model(y)) == {"weight-axis"}
    g2 = G()
    y2 = g2.conv(g2.q("x", "xq"), g2.wdq("w", shape=(C, 32, 1, 1), axis=1, block=16,
                                          scale=np.full((C, 2, 1, 1), 0.01, np.float32)), "y")
    assert "weight-axis" in violated(g2.model(y2))


@pytest.mark.parametrize("scale", [np.float32(0.0), np.float32(-0.1)])
def test_positive_scales_rule(scale):
    g = G()
    y = g.conv(g.q("x", "xq", scale=scale), g.wdq("w"), "y")
    assert violated(g.model(y)) == {"positive-scales"}


def test_fp16_cast_rule():
    g = G()
    g.inits.append(_init("w16", np.ones((C, C, 3, 3), np.float16)))
    y = g.conv("x", "w16", "y")
    assert violated(g.model(y)) == {"fp16-cast"}
    g2 = G()
    g2.inits.append(_init("w16", np.ones((C, C, 3, 3), np.float16)))
    g2.nodes.append(helper.make_node("Cast", ["x"], ["x16"], name="cast", to=T.FLOAT16))
    assert violated(g2.model(g2.conv("x16", "w16", "y"))) == set()


def test_insert_qdq_for_orin_obeys_every_rule(tmp_path):
    """A residual block with pooling and a Gemm head, through calibrate + insert-qdq for orin."""
    from hqpc.compiler import CompileOptions, compile_model
    from hqpc.golden import build_model_from_text

    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 16, 16] x) => (float[1, 10] out)
    <float[8, 3, 3, 3] w1, float[8] b1, float[8, 8, 3, 3] w2, float[8] b2, float[8, 8, 3, 3] w3, float[8] b3,
     float[8, 10] wf, float[10] bf>
    {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
        c2 = Conv <pads = [1, 1, 1, 1]> (p1, w2, b2)
        r2 = Relu (c2)
        c3 = Conv <pads = [1, 1, 1, 1]> (r2, w3, b3)
        s = Add (c3, p1)
        r3 = Relu (s)
        g1 = GlobalAveragePool (r3)
        f = Flatten (g1)
        out = Gemm (f, wf, bf)
    }"""
    model = build_model_from_text(text, seed_base="trt")
    result = compile_model(CompileOptions(model=model, target="orin",
                                          pipeline="calibrate,insert-qdq,check-trt"))
    assert not result.rolled_back, [r.error for r in result.records]
    lint_result = result.model.annotations["check_trt"]
    assert lint_result["ok"], lint_result["violations"]
    ops = [n.op_type for n in result.model.proto.graph.node]
    assert ops.count("Conv") == 3 and "Gemm" in ops
    gemm = next(n for n in result.model.proto.graph.node if n.op_type == "Gemm")
    assert onnx.helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "transB")) == 1
