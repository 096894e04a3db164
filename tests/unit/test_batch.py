"""Fixed batch dims: relaxed for compilation only when the graph is batch-polymorphic, restored on output."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hqpc.batch import BATCH_PARAM, relax_fixed_batch, restore_fixed_batch
from hqpc.ir import Model
from hqpc.runtime import ort as ort_rt


def fixed_batch_classifier(reshape_target: list[int]) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(4) -> Relu -> Reshape(target) -> Gemm(10) -> y[1,10]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.asarray(reshape_target, np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((10, 4 * 8 * 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def leading(values) -> list:
    return [ort_rt.input_shape(v)[0] for v in values]


def test_flatten_reshape_is_relaxed_and_restored():
    model = Model.load(fixed_batch_classifier([1, 256]))
    messages: list[str] = []
    relaxed, fixed = relax_fixed_batch(model, log=messages.append)
    assert fixed is not None and fixed.inputs == {"x": 1} and fixed.outputs == {"y": 1}
    assert leading(relaxed.proto.graph.input) == [BATCH_PARAM] and "1 Reshape target" in messages[0]
    stacked = np.random.default_rng(3).standard_normal((5, 3, 8, 8)).astype(np.float32)
    got = ort_rt.run(relaxed.proto, {"x": stacked})["y"]
    one_by_one = np.concatenate([ort_rt.run(model.proto, {"x": stacked[i:i + 1]})["y"] for i in range(5)])
    np.testing.assert_allclose(got, one_by_one, rtol=1e-5, atol=1e-5)
    restored = restore_fixed_batch(relaxed, fixed)
    onnx.checker.check_model(restored.proto, full_check=True)
    assert leading(restored.proto.graph.input) == [1] and leading(restored.proto.graph.output) == [1]


def test_batch_mixing_graph_is_left_fixed_with_the_reason():
    """Reshape [2, 128] folds half the channels into the batch axis: not the same per sample."""
    model = Model.load(fixed_batch_classifier([2, 128]))
    # the Gemm needs 256 features: make it read 128 so the fixed model is valid
    proto = model.proto
    for t in proto.graph.initializer:
        if t.name == "fc":
            t.CopyFrom(numpy_helper.from_array(np.ones((10, 128), np.float32), "fc"))
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    del proto.graph.value_info[:]
    messages: list[str] = []
    relaxed, fixed = relax_fixed_batch(Model.load(proto), log=messages.append)
    assert fixed is None and leading(relaxed.proto.graph.input) == [1]
    assert "not every output" in messages[0] or "not batch-polymorphic" in messages[0]


def test_dynamic_batch_model_is_untouched():
    proto = fixed_batch_classifier([1, 256])
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    relaxed, fixed = relax_fixed_batch(Model.load(proto))
    assert fixed is None and leading(relaxed.proto.graph.input) == ["batch"]


def test_fixed_batch_model_compiles_with_calibration_data(tmp_path):
    """-O2 with a 12-sample npz on a batch-1 model: the data-driven passes run (calibration,
    sensitivity, a precision plan for both layers), none rolls back, the output keeps batch 1."""
    from hqpc.cli import main

    model_path, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    model_path.write_bytes(fixed_batch_classifier([1, 256]).SerializeToString())
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((12, 3, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 12).astype(np.int64))
    (tmp_path / "d.toml").write_text('[data]\nnpz = "d.npz"\n[split]\nseed = 0\ncalib = 8\neval = 4\n')
    code = main([str(model_path), "-O2", "--data", str(tmp_path / "d.toml"), "-o", str(out), "--report",
                 str(report), "-q"])
    assert code == 0
    records = json.loads(report.read_text())["passes"]
    assert not [r["name"] for r in records if r.get("rolled_back")]
    annotations = json.loads(report.read_text())["annotations"]
    assert {"calibration", "sensitivity", "precision"} <= set(annotations)
    emitted = onnx.load(str(out))
    assert leading(emitted.graph.input) == [1] and leading(emitted.graph.output) == [1]
