"""TensorRT backends: layer-dump parsing, precision checks, build_plan.sh, verify-trt.

Three groups:
* always run: the layer-dump parser on a dump captured from a real TensorRT-RTX build
  (``tests/fixtures/trt/mixed_layers.log``; regenerate with ``python -m tests.unit.test_tensorrt``),
  the graph-side diagnosis, ``build_plan.sh`` and ``write_target_artifacts`` without TensorRT;
* TensorRT-RTX (``pip install hqpc[trt-check]``): real parser/AOT builds of hand-made FP32 and
  Q/DQ graphs, including one graph per TensorRT rule; skipped with the reason when missing;
* full TensorRT + a CUDA GPU: build, run and compare a plan with ONNX Runtime; skipped here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from hqpc.errors import HqpcError
from hqpc.runtime import tensorrt as trt_rt
from hqpc.target import load_target

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trt"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RTX_MISSING = trt_rt.rtx_missing_reason()
needs_rtx = pytest.mark.skipif(RTX_MISSING is not None, reason=f"TensorRT-RTX unavailable: {RTX_MISSING}")
TRT_MISSING = trt_rt.tensorrt_missing_reason()
GPU_MISSING = None if TRT_MISSING else trt_rt.gpu_missing_reason()
needs_trt_gpu = pytest.mark.skipif(TRT_MISSING is not None or GPU_MISSING is not None,
                                   reason=f"full TensorRT path needs `tensorrt` and a CUDA GPU: {TRT_MISSING or GPU_MISSING}")


# =========================================================================== model builders
def _model(nodes, inits, inputs, outputs, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10  # onnxruntime 1.31 refuses onnx 1.23's default (14)
    onnx.checker.check_model(model)
    return model


def _weights(rng, cout, cin, k=3):
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    scale = (np.abs(w).reshape(cout, -1).max(1) / 127).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
    return q, scale


def qdq_conv(kind: str = "ok", cin: int = 8, cout: int = 16) -> onnx.ModelProto:
    """x -> Q/DQ (int8, zero point 0) -> Conv(DQ weights per channel axis 0, float bias) -> Relu.

    ``kind`` breaks one TensorRT rule: ``int32_bias``, ``nonzero_zp``, ``nonzero_weight_zp``,
    ``negative_scale``, ``zero_scale``, ``negative_weight_scale``, ``per_channel_activation``,
    ``weight_axis``, ``weights_only`` (no activation Q/DQ)."""
    rng = np.random.default_rng(0)
    wq, ws = _weights(rng, cout, cin)
    wz = np.zeros(cout, np.int8)
    waxis = 0
    xs, xz = np.array(0.05, np.float32), np.array(0, np.int8)
    if kind == "nonzero_zp":
        xz = np.array(3, np.int8)
    elif kind == "nonzero_weight_zp":
        wz = np.full(cout, 2, np.int8)
    elif kind == "negative_scale":
        xs = np.array(-0.05, np.float32)
    elif kind == "zero_scale":
        xs = np.array(0.0, np.float32)
    elif kind == "negative_weight_scale":
        ws = ws.copy()
        ws[3] = -ws[3]
    elif kind == "per_channel_activation":
        xs, xz = np.full(cin, 0.05, np.float32), np.zeros(cin, np.int8)
    elif kind == "weight_axis":
        w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        ws = (np.abs(w).transpose(1, 0, 2, 3).reshape(cin, -1).max(1) / 127).astype(np.float32)
        wq = np.clip(np.round(w / ws[None, :, None, None]), -127, 127).astype(np.int8)
        wz, waxis = np.zeros(cin, np.int8), 1
    inits = [numpy_helper.from_array(wq, "w_q"), numpy_helper.from_array(ws, "w_scale"),
             numpy_helper.from_array(wz, "w_zp"), numpy_helper.from_array(xs, "x_scale"),
             numpy_helper.from_array(xz, "x_zp")]
    nodes = []
    act_axis = {"axis": 1} if xs.ndim else {}
    if kind == "weights_only":
        act = "x"
    else:
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x", **act_axis),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x", **act_axis)]
        act = "x_dq"
    nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="dq_w", axis=waxis))
    if kind == "int32_bias":
        inits += [numpy_helper.from_array(rng.integers(-100, 100, cout).astype(np.int32), "b_q"),
                  numpy_helper.from_array((0.05 * ws).astype(np.float32), "b_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b"], name="dq_b", axis=0))
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
    nodes += [helper.make_node("Conv", [act, "w_dq", "b"], ["y"], name="conv_q", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["y"], ["out"], name="relu")]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TP.FLOAT, [1, cin, 16, 16])],
                  [helper.make_tensor_value_info("out", TP.FLOAT, [1, cout, 16, 16])])


def fp32_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv_fp32", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["out"], name="relu")]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("out", TP.FLOAT, ["N", 8, 16, 16])])


def fp8_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    inits = [helper.make_tensor("w_f8", TP.FLOAT8E4M3FN, [16, 8, 3, 3], w.flatten().tolist()),
             numpy_helper.from_array(np.full(16, 0.1, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             helper.make_tensor("x_zp", TP.FLOAT8E4M3FN, [], [0.0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x_fp8"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale"], ["x_dq"], name="dq_x_fp8"),
             helper.make_node("DequantizeLinear", ["w_f8", "w_scale"], ["w_dq"], name="dq_w_fp8", axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq"], ["out"], name="conv_fp8", pads=[1, 1, 1, 1])]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TP.FLOAT, [1, 8, 16, 16])],
                  [helper.make_tensor_value_info("out", TP.FLOAT, [1, 16, 16, 16])], opset=21)


def mixed_model() -> onnx.ModelProto:
    """The fixture graph: an INT8 conv, a conv whose weights are dequantized on the wrong axis
    (silent FP32), an FP16 conv (Cast), an INT8 Gemm (transB=1) and an INT4 weight-only MatMul."""
    rng = np.random.default_rng(3)
    cin, cout = 8, 16
    wq, ws = _weights(rng, cout, cin)
    w2 = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    ws2 = (np.abs(w2).transpose(1, 0, 2, 3).reshape(cin, -1).max(1) / 127).astype(np.float32)
    wq2 = np.clip(np.round(w2 / ws2[None, :, None, None]), -127, 127).astype(np.int8)
    wh = rng.standard_normal((cout, cin, 3, 3)).astype(np.float16)
    gq = rng.integers(-127, 128, (10, cout)).astype(np.int8)
    w4 = rng.integers(-7, 8, (10, 32)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"), numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(wq, "a_wq"), numpy_helper.from_array(ws, "a_ws"),
        numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "a_b"),
        numpy_helper.from_array(wq2, "b_wq"), numpy_helper.from_array(ws2, "b_ws"),
        numpy_helper.from_array(wh, "c_w"),
        numpy_helper.from_array(np.array(0.02, np.float32), "g_xs"),
        numpy_helper.from_array(gq, "g_wq"), numpy_helper.from_array(np.full(10, 0.01, np.float32), "g_ws"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "g_b"),
        helper.make_tensor("m_wq", TP.INT4, [10, 32], w4.flatten().tolist()),
        numpy_helper.from_array(np.full((1, 32), 0.01, np.float32), "m_ws"),
        numpy_helper.from_array(np.array([1, 10], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zp"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["a_wq", "a_ws"], ["a_w"], name="dq_a_w", axis=0),
        helper.make_node("Conv", ["x_dq", "a_w", "a_b"], ["a_y"], name="conv_int8", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a_y"], ["a_r"], name="relu_a"),
        helper.make_node("DequantizeLinear", ["b_wq", "b_ws"], ["b_w"], name="dq_b_w", axis=1),
        helper.make_node("Conv", ["x_dq", "b_w"], ["b_y"], name="conv_axis1", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["x"], ["x_h"], name="cast_fp16", to=TP.FLOAT16),
        helper.make_node("Conv", ["x_h", "c_w"], ["c_h"], name="conv_fp16", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["c_h"], ["c_y"], name="cast_fp32", to=TP.FLOAT),
        helper.make_node("Add", ["a_r", "b_y"], ["ab"], name="add_ab"),
        helper.make_node("Add", ["ab", "c_y"], ["abc"], name="add_abc"),
        helper.make_node("GlobalAveragePool", ["abc"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("QuantizeLinear", ["flat", "g_xs", "zp"], ["flat_q"], name="q_flat"),
        helper.make_node("DequantizeLinear", ["flat_q", "g_xs", "zp"], ["flat_dq"], name="dq_flat"),
        helper.make_node("DequantizeLinear", ["g_wq", "g_ws"], ["g_w"], name="dq_g_w", axis=0),
        helper.make_node("Gemm", ["flat_dq", "g_w", "g_b"], ["logits"], name="gemm_int8", transB=1),
        helper.make_node("DequantizeLinear", ["m_wq", "m_ws"], ["m_w"], name="dq_m_w", axis=0, block_size=10),
        helper.make_node("MatMul", ["logits", "m_w"], ["emb"], name="matmul_int4"),
    ]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TP.FLOAT, [1, cin, 16, 16])],
                  [helper.make_tensor_value_info("logits", TP.FLOAT, [1, 10]),
                   helper.make_tensor_value_info("emb", TP.FLOAT, [1, 32])], opset=21)


def capture_fixture() -> Path:
    """Rebuild ``mixed_layers.log`` from a real TensorRT-RTX build (SM 8.6)."""
    result = trt_rt.check_with_tensorrt_rtx(mixed_model(), "8.6")
    path = FIXTURES / "mixed_layers.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# captured with {result.builder}, SM 8.6, from tests/unit/test_tensorrt.py:mixed_model()\n"
                    + result.log + "\n", encoding="utf-8")
    return path


# =========================================================================== parser (no TensorRT)
@pytest.fixture(scope="module")
def fixture_table() -> trt_rt.LayerTable:
    return trt_rt.parse_layer_dump((FIXTURES / "mixed_layers.log").read_text(encoding="utf-8"))


def test_fixture_is_a_real_capture():
    head = (FIXTURES / "mixed_layers.log").read_text(encoding="utf-8").splitlines()[0]
    assert "tensorrt-rtx 1.7.1.116" in head


def test_layer_dump_parser_reads_every_layer(fixture_table):
    layers = fixture_table.layers
    assert len(layers) >= 5
    assert all(layer.name and layer.layer_type for layer in layers)
    conv = fixture_table.compute_layer("conv_int8")
    assert conv is not None and conv.layer_type == "correlation"
    assert "conv_int8" in conv.onnx_nodes and "dq_x" in conv.onnx_nodes  # entries split on 0x1F
    assert conv.inputs[0].dtype == "Int8" and conv.inputs[0].dims == (1, 8, 16, 16)
    assert conv.weight((16, 8, 3, 3)).dtype == "Int8"
    assert conv.precision((16, 8, 3, 3)) == "int8"


def test_layer_dump_parser_shows_silent_fp32_fallback(fixture_table):
    layer = fixture_table.compute_layer("conv_axis1")
    assert layer.precision((16, 8, 3, 3)) == "fp32"
    assert fixture_table.compute_layer("conv_fp16").precision((16, 8, 3, 3)) == "fp16"
    assert fixture_table.compute_layer("gemm_int8").layer_type == "gemm"
    assert fixture_table.compute_layer("gemm_int8").precision((10, 16)) == "int8"
    assert fixture_table.compute_layer("matmul_int4").precision((10, 32)) == "int4-weights"


def test_compare_precisions_on_fixture(fixture_table):
    rows, problems = trt_rt.compare_precisions(mixed_model(), fixture_table)
    by_node = {r["node"]: r for r in rows}
    assert by_node["conv_int8"]["ok"] and by_node["conv_int8"]["engine"] == "int8"
    assert by_node["gemm_int8"]["ok"]
    assert by_node["matmul_int4"]["expected"] == "int4-weights" and by_node["matmul_int4"]["ok"]
    assert by_node["conv_fp16"]["expected"] == "fp16" and by_node["conv_fp16"]["engine"] == "fp16"
    assert not by_node["conv_axis1"]["ok"] and by_node["conv_axis1"]["engine"] == "fp32"
    assert [(p.node, p.rule) for p in problems] == [("conv_axis1", "trt-weight-axis")]
    assert "axis 1" in problems[0].message and "axis 0" in problems[0].message


def test_layer_line_with_awkward_names():
    line = ("Name: a/b;c,d_myl0_3, LayerType: correlation, Inputs: [ { Name: t[0], Dimensions: [1,4,2,2], "
            "Strides: [16,1,8,4], StrideOrder: [3,0,2,1], Datatype: Int8, Format: (NHWC) Channel major format }], "
            "Constants: [ { Name: w, Dimensions: [4,4,1,1], Strides: [4,1,4,4], StrideOrder: [3,0,2,1], "
            "Datatype: Int8, Format: (NHWC) Channel major format }], Outputs: [ { Name: o, Dimensions: [1,4,2,2], "
            "Strides: [16,1,8,4], StrideOrder: [3,0,2,1], Datatype: Half, Format: (NHWC) Channel major format }], "
            "TacticName: __myelin_CASK_STUB, StreamId: 0, Metadata: [ONNX Layer: a/b;c,d]\x1f[ONNX Layer: q[1]]")
    layer = trt_rt.parse_layer_line(line)
    assert layer.name == "a/b;c,d_myl0_3"
    assert layer.onnx_nodes == ["a/b;c,d", "q[1]"]
    assert [t.dtype for t in layer.inputs + layer.constants + layer.outputs] == ["Int8", "Int8", "Half"]
    assert layer.precision() == "int8"


def test_inspector_json_parser():
    # Hand-written in the documented engine-inspector JSON format of full TensorRT (not a capture:
    # no full TensorRT can be installed here).
    info = {"Layers": [
        {"Name": "conv_q + relu", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "x_q", "Dimensions": [1, 8, 16, 16],
                     "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Name": "y", "Dimensions": [1, 16, 16, 16], "Format/Datatype": "Row major linear FP32"}],
         "Weights": {"Type": "Int8", "Count": 1152}, "Bias": {"Type": "Float", "Count": 16},
         "Metadata": "[ONNX Layer: conv_q]\x1f[ONNX Layer: relu]", "TacticValue": "0x1"},
        "reformat_only_name"]}
    table = trt_rt.parse_inspector_json(json.dumps(info))
    layer = table.compute_layer("conv_q")
    assert layer.is_compute and layer.weights_dtype == "Int8" and layer.inputs[0].dtype == "Int8"
    assert layer.precision() == "int8"
    assert table.layers[1].name == "reformat_only_name"


# =========================================================================== graph side (no TensorRT)
@pytest.mark.parametrize("kind, rule", [
    ("per_channel_activation", "trt-per-tensor-activation"),
    ("weight_axis", "trt-weight-axis"),
    ("nonzero_zp", "trt-zero-point"),
    ("negative_weight_scale", "trt-positive-scale"),
    ("weights_only", "trt-int8-both-inputs"),
])
def test_diagnose_node_names_the_rule(kind, rule):
    found, why = trt_rt.diagnose_node(qdq_conv(kind), "conv_q")
    assert found == rule, why


def test_expected_precisions():
    assert [(e.node, e.expected) for e in trt_rt.expected_precisions(qdq_conv())] == [("conv_q", "int8")]
    assert trt_rt.expected_precisions(qdq_conv("weights_only"))[0].expected == "int8-weights"
    assert trt_rt.expected_precisions(fp32_conv())[0].expected == "fp32"
    assert {e.node: e.expected for e in trt_rt.expected_precisions(mixed_model())} == {
        "conv_int8": "int8", "conv_axis1": "int8", "conv_fp16": "fp16", "gemm_int8": "int8",
        "matmul_int4": "int4-weights"}


def test_check_capability_per_target():
    assert trt_rt.check_capability(load_target("orin"))[0] == "8.6"
    assert trt_rt.check_capability(load_target("rtx"))[0] == "8.6"
    cc, note = trt_rt.check_capability(load_target("t4"))
    assert cc == "8.6" and "checks at 8.6" in note


# =========================================================================== build_plan.sh
def _result(model):
    from hqpc.ir import Model

    return SimpleNamespace(model=Model.load(model), report={})


def test_build_plan_script(tmp_path):
    target = load_target("orin")
    out = tmp_path / "net.hqp.onnx"
    out.write_bytes(b"")
    written = trt_rt.write_target_artifacts(_result(mixed_model()), out, target,
                                            SimpleNamespace(emit="onnx", extra={"dla_core": 1}))
    script = Path(written["build_plan"])
    assert script.name == "build_plan.sh" and script.parent == tmp_path
    assert script.stat().st_mode & 0o111
    text = script.read_text()
    assert "--onnx=net.hqp.onnx" in text and "--saveEngine=net.hqp.plan" in text
    assert "--stronglyTyped" in text and "--profilingVerbosity=detailed" in text
    assert "--exportLayerInfo=net.hqp.layers.json" in text
    assert "--useDLACore=1 --allowGPUFallback" in text
    assert "#   conv_int8: int8" in text and "#   gemm_int8: int8" in text and "conv_fp16" not in text.split("set -euo")[0]
    assert "--fp16" not in text.replace("add --int8 --fp16", "")  # strongly typed: no precision flags
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_build_plan_script_dynamic_batch_and_no_dla(tmp_path):
    out = tmp_path / "m.onnx"
    trt_rt.write_target_artifacts(_result(fp32_conv()), out, load_target("orin"),
                                  SimpleNamespace(emit="onnx", extra={"max_batch": 8}))
    text = (tmp_path / "build_plan.sh").read_text()
    assert "--minShapes=x:1x3x16x16" in text and "--maxShapes=x:8x3x16x16" in text
    assert "--useDLACore" not in text.split("set -euo")[1]


def test_build_plan_checker_reads_layer_info(tmp_path):
    """The device-side checker embedded in build_plan.sh, run on a layer-info JSON."""
    text = trt_rt.build_plan_script("m.onnx", load_target("orin"), {"conv_q": "int8", "gemm": "int8"})
    checker = text.split("<<'HQPC_CHECK'\n")[1].split("HQPC_CHECK")[0]
    layers = {"Layers": [
        {"Name": "conv_q", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Format/Datatype": "Channel major INT8 format where channel % 16 == 0"}],
         "Weights": {"Type": "Int8"}, "Metadata": "[ONNX Layer: conv_q]"},
        {"Name": "gemm", "LayerType": "CaskGemm", "ParameterType": "Gemm",
         "Inputs": [{"Format/Datatype": "Row major linear FP32"}], "Weights": {"Type": "Float"},
         "Metadata": "[ONNX Layer: gemm]"}]}
    path = tmp_path / "layers.json"
    path.write_text(json.dumps(layers))
    (tmp_path / "check.py").write_text(checker)
    run = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(path),
                          json.dumps({"conv_q": "int8", "gemm": "int8"})], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "ok       conv_q" in run.stdout and "MISMATCH gemm" in run.stdout and "1 of 2" in run.stdout


def test_emit_plan_for_orin_without_tensorrt(tmp_path):
    if TRT_MISSING is None and GPU_MISSING is None:
        pytest.skip("TensorRT and a GPU are present: the plan would really be built")
    # refused before anything is written: exit 2 never leaves output files behind
    with pytest.raises(HqpcError, match="needs TensorRT and the device .* run the build_plan.sh"):
        trt_rt.write_target_artifacts(_result(qdq_conv()), tmp_path / "m.onnx", load_target("orin"),
                                      SimpleNamespace(emit="plan", extra={}))
    assert not (tmp_path / "build_plan.sh").exists()


def test_target_artifacts_errors(tmp_path):
    with pytest.raises(HqpcError, match="needs a TensorRT target"):
        trt_rt.write_target_artifacts(_result(fp32_conv()), tmp_path / "m.onnx", load_target("cpu"),
                                      SimpleNamespace(emit="plan", extra={}))
    with pytest.raises(HqpcError, match="has no DLA"):
        trt_rt.write_target_artifacts(_result(fp32_conv()), tmp_path / "m.onnx", load_target("t4"),
                                      SimpleNamespace(emit="onnx", extra={"dla_core": 0}))
    with pytest.raises(HqpcError, match="DLA cores 0..1"):
        trt_rt.write_target_artifacts(_result(fp32_conv()), tmp_path / "m.onnx", load_target("orin"),
                                      SimpleNamespace(emit="onnx", extra={"dla_core": 2}))
    assert trt_rt.write_target_artifacts(_result(fp32_conv()), tmp_path / "m.onnx", load_target("cpu"),
                                         SimpleNamespace(emit="onnx", extra={})) == {}


def test_preflight_rejects_bad_backend_options():
    opts = lambda emit="onnx", **extra: SimpleNamespace(emit=emit, extra=extra)  # noqa: E731
    trt_rt.preflight_target_artifacts(load_target("orin"), opts("onnx", dla_core=1))  # build_plan.sh with DLA 1
    if TRT_MISSING is not None or GPU_MISSING is not None:
        with pytest.raises(HqpcError, match="needs TensorRT and the device"):
            trt_rt.preflight_target_artifacts(load_target("orin"), opts("plan", dla_core=1))
    with pytest.raises(HqpcError, match="needs a TensorRT target"):
        trt_rt.preflight_target_artifacts(load_target("cpu"), opts("plan"))
    with pytest.raises(HqpcError, match="has no DLA"):
        trt_rt.preflight_target_artifacts(load_target("rtx"), opts(dla_core=0))


# =========================================================================== verify-trt pass
def _run_verify(model, target="orin", pipeline="verify-trt", **config):
    from hqpc.ir import Model
    from hqpc.passmanager import PassContext, PassManager
    from hqpc.registry import parse_pipeline

    logs: list[str] = []
    ctx = PassContext(opt_level=2, target=load_target(target), config=config, log=logs.append)
    m = Model.load(model)
    manager = PassManager([spec.instantiate() for spec in parse_pipeline(pipeline)], ctx)
    manager.run(m)
    return m, manager.records[0], logs


def test_verify_trt_skips_without_tensorrt_rtx(monkeypatch):
    monkeypatch.setattr(trt_rt, "rtx_missing_reason", lambda: "tensorrt-rtx not installed (test)")
    model, record, logs = _run_verify(qdq_conv())
    assert not record.rolled_back
    assert model.annotations["trt"] == {"status": "skipped: tensorrt-rtx not installed (pip install hqpc[trt-check])"}
    assert any("skipped: tensorrt-rtx not installed" in line for line in logs)
    model, record, _ = _run_verify(qdq_conv(), pipeline="verify-trt{require=true}")
    assert record.rolled_back and "required" in record.error
    _, record, _ = _run_verify(qdq_conv(), trt_check="require")
    assert record.rolled_back


def test_verify_trt_is_not_for_cpu():
    _, record, _ = _run_verify(qdq_conv(), target="cpu")
    assert record.skipped.startswith("not for target 'cpu'")


# =========================================================================== real TensorRT-RTX
@needs_rtx
def test_rtx_fp32_and_int8_builds():
    fp32 = trt_rt.check_with_tensorrt_rtx(fp32_conv(), "8.6")
    assert fp32.ok and fp32.engine and fp32.nodes[0]["engine"] == "fp32"
    q = trt_rt.check_with_tensorrt_rtx(qdq_conv(), "8.6")
    assert q.ok, [str(p) for p in q.problems]
    assert q.summary() == {"quantized": 1, "as_assigned": 1, "int8_pct": 100.0}
    row = q.nodes[0]
    assert (row["node"], row["engine"], row["input"], row["weight"]) == ("conv_q", "int8", "Int8", "Int8")
    assert any("conv_q" in r["onnx_nodes"] and r["precision"] == "int8" for r in q.annotation()["layers"])


@needs_rtx
@pytest.mark.parametrize("kind, node, rule, words", [
    ("int32_bias", "dq_b", "trt-float-bias", "int32 bias of Conv 'conv_q'"),
    ("nonzero_zp", "q_x", "trt-zero-point", "Non-zero zero point"),
    ("nonzero_weight_zp", "dq_w", "trt-zero-point", "Non-zero zero point"),
    ("negative_scale", "q_x", "trt-positive-scale", "must all be positive"),
    ("zero_scale", "q_x", "trt-positive-scale", "must all be positive"),
    ("negative_weight_scale", "dq_w", "trt-positive-scale", "must all be positive"),
    ("per_channel_activation", "conv_q", "trt-per-tensor-activation", "per-channel scale"),
    ("weight_axis", "conv_q", "trt-weight-axis", "uses axis 1; Conv needs axis 0"),
])
def test_rtx_catches_each_rule(kind, node, rule, words):
    result = trt_rt.check_with_tensorrt_rtx(qdq_conv(kind), "8.6")
    assert not result.ok
    problem = result.problems[0]
    assert (problem.node, problem.rule) == (node, rule), str(problem)
    text = str(problem)
    assert f"node '{node}'" in text and rule in text and words in text


@needs_rtx
def test_rtx_fp8_needs_sm89():
    result = trt_rt.check_with_tensorrt_rtx(fp8_conv(), "8.6")
    assert result.parsed and not result.built
    assert result.problems[0].rule == "trt-fp8-capability" and result.problems[0].node == "q_x_fp8"
    assert trt_rt.check_with_tensorrt_rtx(fp8_conv(), "8.9").built


@needs_rtx
def test_rtx_mixed_model_matches_fixture(tmp_path):
    result = trt_rt.check_with_tensorrt_rtx(mixed_model(), "8.6", log_path=tmp_path / "build.log")
    assert (tmp_path / "build.log").read_text().count("LayerType:") == len(result.table.layers)
    assert [(p.node, p.rule) for p in result.problems] == [("conv_axis1", "trt-weight-axis")]
    fixture = trt_rt.parse_layer_dump((FIXTURES / "mixed_layers.log").read_text(encoding="utf-8"))
    assert [l.name for l in result.table.layers] == [l.name for l in fixture.layers]


@needs_rtx
def test_verify_trt_pass_real(tmp_path):
    model, record, logs = _run_verify(qdq_conv())
    assert not record.rolled_back, record.error
    trt = model.annotations["trt"]
    assert trt["status"] == "ok" and trt["compute_capability"] == "8.6" and trt["int8_pct"] == 100.0
    assert trt["nodes"][0]["node"] == "conv_q" and "sm_87" in trt["note"]
    _, record, logs = _run_verify(qdq_conv("weight_axis"))
    assert record.rolled_back
    assert "node 'conv_q' (Conv) breaks trt-weight-axis" in record.error
    model, record, logs = _run_verify(qdq_conv("weight_axis"), pipeline="verify-trt{warn=true}")
    assert not record.rolled_back and model.annotations["trt"]["status"] == "warned"
    assert any("MISMATCH" in line for line in logs)


@needs_rtx
def test_rtx_emit_plan_writes_engine(tmp_path):
    out = tmp_path / "m.hqp.onnx"
    result = _result(qdq_conv())
    written = trt_rt.write_target_artifacts(result, out, load_target("rtx"), SimpleNamespace(emit="plan", extra={}))
    plan = Path(written["plan"])
    assert plan == tmp_path / "m.hqp.plan" and plan.stat().st_size > 10_000
    assert result.report["artifacts"]["plan"] == str(plan)
    assert "build_plan" not in written  # rtx engines are built here, no device script


@needs_rtx
def test_rtx_check_on_golden_models():
    """Every golden case's model, cleaned up by -O1 for orin, parses and builds for SM 8.6, except
    graphs that are not inference graphs on purpose (a training-mode Dropout kept by a rule test),
    which must fail with a problem naming the node and the rule."""
    from hqpc.compiler import CompileOptions, compile_model
    from hqpc.golden import GoldenCase

    cases = sorted(GOLDEN.glob("*.onnxtxt"))
    if not cases:
        pytest.skip("no golden cases")
    failures = []
    for path in cases:
        proto = GoldenCase.parse(path).build_model()
        model = compile_model(CompileOptions(model=proto, opt_level=1, target="orin", verbosity=0)).model
        result = trt_rt.check_with_tensorrt_rtx(model.proto, "8.6")
        if result.ok:
            continue
        problem = result.problems[0] if result.problems else None
        if problem is not None and problem.node and problem.rule in trt_rt.RULES and "training mode" in problem.message:
            continue  # not deployable by design; the message names node and rule
        failures.append(f"{path.name}: {problem or 'failed'}")
    assert not failures, failures


@needs_rtx
def test_rtx_check_small_real_model(shared_models):
    """CIFAR ResNet-20 (FP32) parses and builds; every layer is in the table."""
    from hqpc.ir import Model

    model = Model.load(shared_models / "cifar10_resnet20.onnx")
    result = trt_rt.check_with_tensorrt_rtx(model.proto, "8.6")
    assert result.ok, [str(p) for p in result.problems]
    assert len(result.nodes) == 20 and all(r["engine"] == "fp32" for r in result.nodes)


@needs_rtx
@pytest.mark.parametrize("name, size", [
    ("cifar10_resnet20", 32),  # the small real model CI checks on every run (about 1.5 s)
    pytest.param("cifar10_resnet56", 32, marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", 224, marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_small", 224, marks=pytest.mark.slow)])
def test_rtx_int8_on_quantized_shared_models(shared_models, tmp_path, name, size):
    """Stand-in for `hqpc M -O2 --target orin` until hqpc's own Q/DQ passes land: ONNX Runtime's
    QDQ quantizer (symmetric int8, per-channel weights, float bias) then verify-trt."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.items = iter([{"input": rng.standard_normal((1, 3, size, size)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.items, None)

    out = tmp_path / f"{name}.qdq.onnx"
    quantize_static(str(shared_models / f"{name}.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    model, record, _ = _run_verify(onnx.load(str(out)))
    assert not record.rolled_back, record.error
    trt = model.annotations["trt"]
    assert trt["quantized"] >= 20 and trt["int8_pct"] == 100.0


# =========================================================================== full TensorRT (device)
def test_full_tensorrt_reason_is_clear():
    if TRT_MISSING is None:
        pytest.skip("tensorrt is installed")
    assert "tensorrt" in TRT_MISSING and "not installed" in TRT_MISSING
    with pytest.raises(trt_rt.TensorRTUnavailable, match="tensorrt"):
        trt_rt.build_tensorrt_plan(qdq_conv())


@needs_trt_gpu
def test_tensorrt_plan_matches_onnxruntime():
    from hqpc.runtime.compare import Tolerance

    model = qdq_conv()
    plan, check = trt_rt.build_tensorrt_plan(model)
    assert check.nodes[0]["engine"] == "int8", check.format_table()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(4)]
    result = trt_rt.compare_plan_with_ort(model, plan, batches, {"out": Tolerance(atol=0.05, rtol=0.05)})
    assert result["ok"] and result["batches"] == 4, result


@needs_trt_gpu
def test_tensorrt_plan_on_dla():
    import tensorrt as trt

    if trt.Builder(trt.Logger()).num_DLA_cores == 0:
        pytest.skip("this GPU has no DLA")
    plan, check = trt_rt.build_tensorrt_plan(qdq_conv(), dla_core=0)
    assert plan


if __name__ == "__main__":  # python -m tests.unit.test_tensorrt  → recapture the fixture
    print(capture_fixture())


# =========================================================================== pooling before an INT8 conv
POOL_CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 8, 16, 16] x) => (float[1, 16, 1, 1] out)
<float[16, 8, 3, 3] w1, float[16] b1, float[16, 16, 1, 1] w2, float[16] b2>
{{
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    p = {pool} (r1)
    c2 = Conv (p, w2, b2)
    out = GlobalAveragePool (c2)
}}"""
POOLS = {"MaxPool": "MaxPool <kernel_shape = [2, 2], strides = [2, 2]>",
         "AveragePool": "AveragePool <kernel_shape = [2, 2], strides = [2, 2]>",
         "GlobalAveragePool": "GlobalAveragePool"}


def _orin_pool_model(pool: str):
    from hqpc.golden import build_model_from_text
    from hqpc.ir import Model
    from hqpc.passes.calibrate import Calibrate
    from hqpc.passes.check_trt import CheckTRT
    from hqpc.passes.qdq import InsertQDQ
    from hqpc.passmanager import PassContext

    model = Model.load(build_model_from_text(POOL_CHAIN.format(pool=POOLS[pool]), seed_base="pool"))
    ctx = PassContext(opt_level=2, target=load_target("orin"))
    Calibrate(method="minmax").run(model, ctx)
    assert InsertQDQ().run(model, ctx)
    CheckTRT().run(model, ctx)
    return model


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_orin_placement_around_pools_obeys_check_trt(pool):
    """Q/DQ goes on a max pool's input (DQ commutes with max) and on an average pool's output
    (DQ→AveragePool→Q is TensorRT's INT8 pool; a conv behind an average pool over a DQ without
    its own Q/DQ stays FP32: mobilenet_v2's Logits conv, mobilenet_v3_small's SE convs)."""
    model = _orin_pool_model(pool)
    graph = model.proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    conv2 = [n for n in graph.node if n.op_type == "Conv"][1]
    expected = "MaxPool" if pool == "MaxPool" else "DequantizeLinear"
    assert producer[conv2.input[0]].op_type == expected
    assert model.annotations["check_trt"]["ok"], model.annotations["check_trt"]["violations"]
    expectation = {e.node: e.expected for e in trt_rt.expected_precisions(model.proto)}
    assert expectation[conv2.name] == "int8"


@needs_rtx
@pytest.mark.parametrize("pool", sorted(POOLS))
def test_rtx_conv_behind_a_pool_is_int8(pool):
    """TensorRT-RTX (SM 8.6) runs both convs INT8 for every pool placement above."""
    result = trt_rt.check_with_tensorrt_rtx(_orin_pool_model(pool).proto, "8.6")
    assert result.parsed and result.built, result.problems
    assert result.summary()["quantized"] == 2 and result.summary()["as_assigned"] == 2, result.problems
    assert result.ok, result.problems


@needs_rtx
def test_report_shows_the_engine_precision_table():
    """verify-trt's per-layer table reaches the terminal summary and report.html."""
    from hqpc.report_html import render_report_html
    from hqpc.summary import result_lines

    model, record, _ = _run_verify(mixed_model(), pipeline="verify-trt{warn=true}")
    assert not record.rolled_back
    report = {"annotations": {"trt": model.annotations["trt"]}, "summary": {}}
    lines = {label: (value, style) for label, value, style in result_lines(report)}
    value, style = lines["tensorrt"]
    assert "SM 8.6: parsed and built" in value and style == "red"  # conv_axis1 falls back to fp32
    quantized = model.annotations["trt"]["quantized"]
    assert f"{quantized - 1}/{quantized} quantized layers as assigned" in value
    page = render_report_html(report)
    assert "<h2>TensorRT check</h2>" in page and "trt-weight-axis" in page
    assert page.count("<tr><td>conv_") >= 3 and '<td class="warn">fp32</td>' in page
