"""Quantization math (hqpc.runtime.quant) and the calibrate pass."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from hqpc.golden import build_model_from_text
from hqpc.ir import Model
from hqpc.passes.calibrate import Calibrate, activation_conventions
from hqpc.passmanager import PassContext
from hqpc.runtime import quant as Q
from hqpc.target import load_target

SMALL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] out)
<float[4, 3, 3, 3] w, float[4] b, float[4, 4, 1, 1] w2>
{
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    r = Relu (c)
    out = Conv (r, w2)
}"""


# --------------------------------------------------------------------------- math
def test_qparams_zero_exact_scale_positive():
    for lo, hi in [(-1.0, 3.0), (0.5, 2.0), (-2.0, -1.0), (0.0, 0.0)]:
        s, z = Q.qparams_from_range(lo, hi, "uint8", symmetric=False)
        assert s > 0 and 0 <= z <= 255
        assert Q.fake_quant(np.zeros(1, np.float32), s, z, "uint8")[0] == 0.0
    s, z = Q.qparams_from_range(-3.0, 1.0, "int8", symmetric=True)
    assert z == 0 and np.isclose(s, 3.0 / 127)


def test_quantize_matches_onnxruntime_including_blocked_int4():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    wq = Q.weight_quant(w, axis=1, dtype="int4", block_size=32)
    assert wq.scale.shape == (4, 2) and wq.q.min() >= -7 and wq.q.max() <= 7
    codes = helper.make_tensor("c", T.INT4, [4, 64], wq.q.ravel().tolist())
    zeros = helper.make_tensor("z", T.INT4, [4, 2], [0] * 8)
    node = helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"], axis=1, block_size=32)
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", T.FLOAT, [4, 64])],
                          [codes, numpy_helper.from_array(wq.scale, "s"), zeros])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(y, wq.dequantized())
    # per-tensor uint8 activations vs QuantizeLinear
    x = rng.standard_normal((2, 5)).astype(np.float32) * 3
    s, z = Q.qparams_from_range(x.min(), x.max(), "uint8", False)
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    g = helper.make_graph([q], "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 5])],
                          [helper.make_tensor_value_info("q", T.UINT8, [2, 5])],
                          [numpy_helper.from_array(np.float32(s), "s"), numpy_helper.from_array(np.uint8(z), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, Q.quantize(x, s, z, "uint8"))


def test_weight_mse_clipping_beats_minmax_and_honours_qat_grid():
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(8, 64)).astype(np.float32)  # heavy tails
    mse = Q.weight_quant(w, 0, "int4", method="mse")
    mm = Q.weight_quant(w, 0, "int4", method="minmax")
    assert np.sum((mse.dequantized() - w) ** 2) < np.sum((mm.dequantized() - w) ** 2)
    grid = np.round(w * 20).clip(-100, 100) / 20  # a QAT-style grid, step 0.05
    assert Q.grid_step(grid) == pytest.approx(0.05, rel=1e-4)
    np.testing.assert_allclose(Q.weight_quant(grid, 0, "int8").dequantized(), grid, atol=1e-6)


def test_histogram_grows_exactly_and_range_methods_order():
    rng = np.random.default_rng(2)
    h = Q.Histogram(bins=512)
    data = [rng.standard_normal(10000).astype(np.float32) * k for k in (1, 4, 16)]
    for d in data:
        h.add(d)
    assert h.counts.sum() == sum(min(len(d), 1 << 16) for d in data)
    allv = np.concatenate(data)
    assert (h.min, h.max) == (float(allv.min()), float(allv.max()))
    lo_mm, hi_mm = Q.range_minmax(h)
    for method in ("percentile", "entropy", "mse"):
        lo, hi = Q.activation_range(h, method, "uint8", False)
        assert lo_mm <= lo <= 0 <= hi <= hi_mm, method
        assert hi - lo < hi_mm - lo_mm, f"{method} should clip the heavy tails"


def test_fp16_round():
    assert Q.fp16_round(np.float32(1 + 2 ** -12)) == 1.0
    assert Q.fp16_round(np.float32(1e6)) == 65504.0


# --------------------------------------------------------------------------- the pass
def test_calibrate_without_data_uses_seeded_random_inputs_and_says_so():
    model = Model.load(build_model_from_text(SMALL, seed_base="cal"))
    ctx = PassContext(opt_level=2, target=load_target("cpu"), seed=3)
    assert not Calibrate().run(model, ctx)  # analysis: graph unchanged, annotation set
    cal = model.annotations["calibration"]
    assert cal["source"].startswith("random: N(0,1) inputs, seed 3")
    assert cal["activation_type"] == "uint8" and cal["symmetric"] is False
    assert cal["method"] in Q.RANGE_METHODS and set(cal["method_scores"]) == set(Q.RANGE_METHODS)
    assert {"x", "c", "r", "out"} <= set(cal["tensors"])
    r = cal["tensors"]["r"]
    assert r["lo"] == 0.0 and r["zero_point"] == 0 and r["scale"] > 0  # post-ReLU: zero point 0
    again = Model.load(build_model_from_text(SMALL, seed_base="cal"))
    Calibrate().run(again, PassContext(opt_level=2, target=load_target("cpu"), seed=3))
    assert again.annotations["calibration"] == cal  # deterministic


def test_calibrate_for_tensorrt_is_symmetric_int8_and_fixed_method():
    model = Model.load(build_model_from_text(SMALL, seed_base="cal"))
    ctx = PassContext(opt_level=2, target=load_target("orin"))
    Calibrate(method="percentile").run(model, ctx)
    cal = model.annotations["calibration"]
    assert (cal["activation_type"], cal["symmetric"], cal["method"]) == ("int8", True, "percentile")
    assert all(t["zero_point"] == 0 for t in cal["tensors"].values())
    assert activation_conventions(load_target("cpu")) == ("uint8", False)


def test_calibrate_on_digits_data(digits_spec):
    from hqpc.compiler import CompileOptions, compile_model

    result = compile_model(CompileOptions(model=digits_spec["model"], data=digits_spec["toml"],
                                          pipeline="calibrate"))
    cal = result.model.annotations["calibration"]
    assert cal["source"].startswith("calibration split: 150 samples of digits.toml")
    assert result.model.proto.graph == Model.load(digits_spec["model"]).proto.graph  # analysis only


@pytest.fixture
def digits_spec():
    from tests.conftest import REPO

    return {"model": REPO / "examples/digits/digits_cnn.onnx", "toml": REPO / "examples/digits/digits.toml"}


def test_gptq_halves_the_output_error_of_round_to_nearest_int4():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 128)) @ rng.standard_normal((128, 128)) * 0.3  # correlated inputs
    w = rng.standard_normal((32, 128)).astype(np.float32)
    h = x.T @ x / len(x)
    for block in (None, 32):
        rtn = Q.weight_quant(w, 1 if block else 0, "int4", block_size=block, grid=False)
        g = Q.gptq(w, h, "int4", block_size=block)
        assert g.scale.shape == rtn.scale.shape and g.q.min() >= -7 and g.q.max() <= 7
        err_rtn = np.mean((x @ (rtn.dequantized() - w).T) ** 2)
        err_gptq = np.mean((x @ (g.dequantized() - w).T) ** 2)
        assert err_gptq < 0.7 * err_rtn


HEAD = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 64, 64] x) => (float[1, 16384] out)
<float[4, 3, 3, 3] w, float[4] b, int64[2] shape, float k>
{
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    logits = Mul (c, k)
    out = Reshape (logits, shape)
}"""


def test_graph_outputs_and_their_copies_are_never_clipped():
    """A classifier's largest logit is what a clipping range saturates (ties at the top code):
    a graph output and the tensors it is a pure copy of get the min-max range, other tensors the
    method's."""
    from hqpc.passes.calibrate import output_tensors

    proto = build_model_from_text(HEAD, seed_base="cal")
    for init in proto.graph.initializer:
        if init.name == "shape":
            init.CopyFrom(numpy_helper.from_array(np.array([1, 16384], np.int64), "shape"))
        if init.name == "k":
            init.CopyFrom(numpy_helper.from_array(np.array(2.0, np.float32), "k"))
    model = Model.load(proto)
    assert output_tensors(model) == {"out", "logits"}
    Calibrate(method="percentile").run(model, PassContext(opt_level=2, target=load_target("cpu"), seed=1))
    cal = model.annotations["calibration"]["tensors"]
    for name in ("out", "logits"):
        t = cal[name]
        # 131072 values: the 99.99 % percentile alone would clip them
        assert t["ranges"]["percentile"][1] < t["ranges"]["minmax"][1]
        assert [t["lo"], t["hi"]] == t["ranges"]["minmax"] and t["hi"] == pytest.approx(t["max"])
        assert t["unclipped"].startswith("graph output")
    c = cal["c"]
    assert c["ranges"]["percentile"][1] < c["ranges"]["minmax"][1]
    assert [c["lo"], c["hi"]] == c["ranges"]["percentile"] and "unclipped" not in c
