"""IR loading invariants, annotations, text form, atomic writes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

from hqpc.errors import ModelLoadError
from hqpc.ir import WORKING_OPSET, Model, atomic_write_bytes
from hqpc.runtime.ort import random_feeds, run


def old_opset_model(opset: int = 13) -> onnx.ModelProto:
    """Unnamed nodes, an initializer also listed as a graph input, opset 13."""
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["h2"]),
         helper.make_node("ReduceSum", ["h2"], ["y"], keepdims=1)],
        "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
                helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_load_normalizes_and_keeps_semantics():
    proto = old_opset_model()
    model = Model.load(proto)
    assert model.opset == WORKING_OPSET and model.proto.ir_version >= 8
    assert [i.name for i in model.proto.graph.input] == ["x"]
    names = [n.name for n in model.proto.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert {v.name for v in model.proto.graph.value_info} >= {"h", "h2"}
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)}
    np.testing.assert_allclose(run(model.proto, feeds)["y"], run(proto, feeds)["y"], rtol=1e-6)


def test_duplicate_node_names_are_made_unique():
    proto = old_opset_model()
    for node in proto.graph.node:
        node.name = "same"
    names = [n.name for n in Model.load(proto).proto.graph.node]
    assert names == ["same", "same_1", "same_2"]


def test_annotations_round_trip_through_metadata(tmp_path):
    model = Model.load(old_opset_model())
    model.annotations["sensitivity"] = {"w": [0.5, 1.25]}
    path = tmp_path / "m.onnx"
    model.save(path)
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["hqpc.sensitivity"] == '{"w":[0.5,1.25]}'
    assert Model.load(path).annotations == {"sensitivity": {"w": [0.5, 1.25]}}


def test_text_form_is_stable_and_parses_back():
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "big")
    b = numpy_helper.from_array(np.ones((2,), np.float32), "small")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"], name="mm"), helper.make_node("Add", ["h", "small"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w, b])
    model = Model.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    text = model.text()
    assert text == model.copy().text()
    assert "float[8,8] big" in text and "# big: sha256:" in text and "{1,1}" in text
    reparsed = onnx.parser.parse_model(text)
    assert [n.op_type for n in reparsed.graph.node] == ["MatMul", "Add"]


@pytest.mark.parametrize("mutate, needle", [
    (lambda g: g.node[1].input.__setitem__(0, "ghost"), "invalid ONNX model"),
    (lambda g: g.node.append(helper.make_node("Frobnicate", ["x"], ["z"], domain="com.unknown")), "invalid ONNX model"),
])
def test_invalid_graphs_are_clear_errors(mutate, needle):
    proto = old_opset_model()
    mutate(proto.graph)
    with pytest.raises(ModelLoadError, match=needle):
        Model.load(proto)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    class Boom(bytes):
        pass

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_dynamic_inputs_get_concrete_random_feeds():
    feeds = random_feeds(Model.load(old_opset_model()).proto, seed=3, batch=5)
    assert feeds["x"].shape == (5, 2) and feeds["x"].dtype == np.float32
    again = random_feeds(Model.load(old_opset_model()).proto, seed=3, batch=5)
    np.testing.assert_array_equal(feeds["x"], again["x"])


def test_external_data_is_loaded(tmp_path):
    proto = old_opset_model(opset=17)
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((2, 3), np.float32), "w"))
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    model = Model.load(path)
    np.testing.assert_array_equal(model.initializer_array("w"), np.ones((2, 3), np.float32))
