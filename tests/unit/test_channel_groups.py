"""channel-groups: structure on generated patterns, the shipped digits CNN and the shared
models; never a crash, unprunable with a reason when something is not understood."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hqpc.compiler import CompileOptions, compile_model
from hqpc.ir import Model
from hqpc.passes.channel_groups import analyze, reshape_rule
from tests.conftest import REPO
from tests.unit.test_prune_patterns import PATTERNS, build

SHARED = ["cifar10_resnet20", "cifar10_resnet56", "mobilenet_v2", "mobilenet_v3_small"]


def _index_partition_is_exact(groups) -> None:
    """Every index of every member dimension belongs to exactly one unit of one group."""
    seen: dict[tuple[str, int], list[int]] = {}
    sizes = {}
    for g in groups.groups:
        for m in g.members:
            sizes[(m.tensor, m.axis)] = m.size
            assert len(m.units) == g.channels
            seen.setdefault((m.tensor, m.axis), []).extend(i for u in m.units for i in u)
    for key, indices in seen.items():
        assert sorted(indices) == list(range(sizes[key])), key


@pytest.mark.parametrize("kind", PATTERNS)
def test_patterns_partition_and_io(kind):
    proto = Model.load(build(kind, np.random.default_rng(11))).proto
    groups = analyze(proto)
    _index_partition_is_exact(groups)
    for g in groups.groups:
        names = {m.tensor for m in g.members}
        if "x" in names:
            assert not g.prunable and "model input 'x'" in g.reason
        if "y" in names:
            assert not g.prunable and "model output 'y'" in g.reason
    assert groups.prunable, kind
    json.dumps(groups.to_json())  # serialisable


def test_digits_cnn_groups():
    groups = analyze(Model.load(REPO / "examples" / "digits" / "digits_cnn.onnx").proto)
    _index_partition_is_exact(groups)
    assert len(groups.groups) == 9 and len(groups.prunable) == 7
    se = [g for g in groups.groups if any(m.tensor.endswith("se/Mul_output_0") for m in g.members)]
    assert len(se) == 2 and all(len(g.producers) == 2 for g in se)  # expand conv + SE excite conv
    gemm = [g for g in groups.groups if "/classifier/Gemm" in g.consumers]
    assert len(gemm) == 1 and gemm[0].prunable
    assert any(m.tensor == "/Flatten_output_0" for m in gemm[0].members)


def test_pass_annotates_groups():
    result = compile_model(CompileOptions(model=str(REPO / "examples" / "digits" / "digits_cnn.onnx"),
                                          pipeline="channel-groups"))
    data = result.model.annotations["channel_groups"]
    assert [g["id"] for g in data["groups"]] == list(range(len(data["groups"])))
    assert set(data["groups"][0]) == {"id", "channels", "members", "producers", "consumers", "prunable", "reason"}
    assert not result.records[0].modified


def _model(nodes, inits, out_shape, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _w(name, *shape):
    return numpy_helper.from_array(np.random.default_rng(0).normal(size=shape).astype(np.float32), name)


@pytest.mark.parametrize("op, attrs, extra", [
    ("LRN", {"size": 3}, []),                      # mixes neighbouring channels
    ("Softmax", {"axis": 1}, []),                  # normalises over channels
    ("InstanceNormalization", {}, ["s", "b"]),     # channel-wise: understood (control)
    ("DepthToSpace", {"blocksize": 2}, []),        # moves channels into space
])
def test_unknown_ops_make_groups_unprunable(op, attrs, extra):
    inits = [_w("w1", 8, 3, 1, 1), _w("w2", 4, 8, 1, 1), _w("s", 8), _w("b", 8)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]),
             helper.make_node(op, ["a"] + extra, ["h"], **attrs)]
    if op == "DepthToSpace":
        nodes.append(helper.make_node("Identity", ["h"], ["y"]))
        proto = _model(nodes, inits, [1, 2, 16, 16])
    else:
        nodes.append(helper.make_node("Conv", ["h", "w2"], ["y"]))
        proto = _model(nodes, inits, [1, 4, 8, 8])
    groups = analyze(Model.load(proto).proto)
    produced = [g for g in groups.groups if any(m.tensor == "a" for m in g.members)][0]
    if op == "InstanceNormalization":
        assert produced.prunable and produced.consumers
    else:
        assert not produced.prunable and op in produced.reason


def test_shape_reader_is_not_understood():
    inits = [_w("w1", 8, 3, 1, 1)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    groups = analyze(Model.load(proto).proto)
    group = [g for g in groups.groups if any(m.tensor == "a" for m in g.members)][0]
    assert not group.prunable and "Shape" in group.reason


def test_reshape_rule():
    assert reshape_rule(["N", 16, 1, 1], ["N", 1, 1, 16], 1, np.array([0, 1, 1, 16]), 0) == (3, 1)
    assert reshape_rule(["N", 16, 2, 2], ["N", 64], 1, np.array([0, -1]), 0) == (1, 4)
    assert reshape_rule(["N", 16, 2, 2], ["N", 16, 4], 1, np.array([0, 16, 4]), 0) == (1, 1)
    assert reshape_rule(["N", 16, 2, 2], ["N", 4, 16], 1, np.array([0, 4, 16]), 0) is None  # splits channels
    assert reshape_rule(["N", 16, 4], ["N", 2, 8, 4], 1, np.array([0, 2, 8, 4]), 0) is None


def test_resnet20_option_a_groups(shared_models):
    """Stage residuals are coupled through Slice + Pad at channel offsets 8 (stage 2) and 16
    (stage 3); the padded channels form their own groups; inner block channels are separate."""
    groups = analyze(Model.load(shared_models / "cifar10_resnet20.onnx").proto)
    _index_partition_is_exact(groups)
    assert len(groups.groups) == 14 and len(groups.prunable) == 12
    stage1 = [g for g in groups.groups if "/conv1/Conv" in g.producers][0]
    assert stage1.channels == 16 and len(stage1.producers) == 10  # conv1 + every block's conv2
    members = [m.describe() for m in stage1.members]
    assert "/layer2/layer2.0/shortcut/Pad_output_0:1[8:24]" in members
    assert "/layer3/layer3.0/shortcut/Pad_output_0:1[24:40]" in members
    inner = [g for g in groups.groups if len(g.producers) == 1 and len(g.consumers) == 1 and g.prunable]
    assert len(inner) == 9


@pytest.mark.parametrize("name", SHARED)
def test_shared_models_groups(name, shared_models):
    groups = analyze(Model.load(shared_models / f"{name}.onnx").proto)
    _index_partition_is_exact(groups)
    assert groups.prunable
    assert not groups.group(0).prunable and "model input" in groups.group(0).reason
    assert not groups.groups[-1].prunable and "model output" in groups.groups[-1].reason
    json.dumps(groups.to_json())


def test_weight_read_elsewhere_is_never_cut():
    """A weight that is also read by another op (here: Shape, whose value would change) cannot
    be sliced; its groups become unprunable."""
    inits = [_w("w1", 8, 3, 1, 1), _w("w2", 4, 8, 1, 1)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c"]), helper.make_node("Shape", ["w1"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["sf"], ["k"], keepdims=1),
             helper.make_node("Mul", ["c", "k"], ["y"])]
    proto = _model(nodes, inits, [1, 4, 8, 8])
    groups = analyze(Model.load(proto).proto)
    group = [g for g in groups.groups if any(m.tensor == "a" for m in g.members)][0]
    assert not group.prunable and "'w1' is also read by Shape" in group.reason


def test_outer_scope_reads_are_never_cut():
    """A tensor read inside an If body (outer scope) is not visible as a node input: it must
    not be cut."""
    inits = [_w("w1", 8, 3, 1, 1), _w("w2", 4, 8, 1, 1),
             numpy_helper.from_array(np.array(True), "cond")]
    then_graph = helper.make_graph([helper.make_node("Identity", ["r"], ["t_out"])], "then", [],
                                   [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 8, 8, 8])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["r"], ["e_out"])], "else", [],
                                   [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 8, 8, 8])])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("If", ["cond"], ["f"], then_branch=then_graph, else_branch=else_graph),
             helper.make_node("Conv", ["f", "w2"], ["y"])]
    proto = _model(nodes, inits, [1, 4, 8, 8])
    groups = analyze(Model.load(proto).proto)
    group = [g for g in groups.groups if any(m.tensor == "a" for m in g.members)][0]
    assert not group.prunable and "subgraph" in group.reason
