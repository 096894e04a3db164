"""The Python passes of the -O1 clean-up: fold-constants, eliminate-noop-ops, eliminate-dead-code,
and the whole -O1 pipeline (whose other steps are the rules of spec/rules/*.hqp, tested case by
case in tests/dsl/test_cleanup_rules.py and tests/golden/dsl_*).

Every rewrite runs through a PassManager with verification and the numeric guard; tests check
what changed, that nothing rolled back, and (again, directly with ONNX Runtime) that outputs
match the input model within the EXACT tolerance. Do-not-apply cases check the pass reports no
change and leaves the graph as it was.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hqpc.ir import Model
from hqpc.passmanager import NumericGuard, PassContext, PassManager, VerifyInstrument
from hqpc.registry import CLEANUP, get_pass, level_pipeline
from hqpc.runtime import ort as ort_rt
from hqpc.runtime.compare import EXACT, compare_outputs
from hqpc.runtime.ort import random_feeds

F = TensorProto.FLOAT
SHARED_MODELS = Path(__file__).resolve().parents[2].parent / "shared/data/models"
RNG = np.random.default_rng(1234)


# --------------------------------------------------------------------------- helpers
def init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def randn(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def bn_params(prefix: str, channels: int) -> list[onnx.TensorProto]:
    """gamma, beta, mean, var (positive) initializers named prefix_{g,b,m,v}."""
    return [init(f"{prefix}_g", randn(channels)), init(f"{prefix}_b", randn(channels)),
            init(f"{prefix}_m", randn(channels)),
            init(f"{prefix}_v", RNG.uniform(0.5, 1.5, channels).astype(np.float32))]


def bn_node(x: str, y: str, prefix: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=f"{prefix}_bn", **attrs)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, value_info=()) -> onnx.ModelProto:
    """A model from (name, shape) inputs/outputs (float) or ValueInfoProtos; ir_version 8."""
    def vi(spec):
        return spec if isinstance(spec, onnx.ValueInfoProto) else helper.make_tensor_value_info(spec[0], F, spec[1])

    graph = helper.make_graph(nodes, "test", [vi(i) for i in inputs], [vi(o) for o in outputs],
                              list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run_passes(proto: onnx.ModelProto, names, **options):
    """Load ``proto``, run the named passes (options go to every pass) under verification and
    the guard. Returns (input Model, output Model, records)."""
    names = [names] if isinstance(names, str) else list(names)
    model = Model.load(proto)
    before = model.copy()
    ctx = PassContext(instruments=[VerifyInstrument(), NumericGuard(lambda m: random_feeds(m.proto, seed=0))])
    manager = PassManager([get_pass(n)(**options) for n in names], ctx)
    manager.run(model)
    for record in manager.records:
        assert not record.rolled_back, f"{record.name} rolled back: {record.error}"
        if record.modified:
            assert record.checks["verify"]["ok"]
            assert record.checks["guard"]["ok"], record.checks["guard"]
    return before, model, manager.records


def assert_same_outputs(before: Model, after: Model, seed: int = 7) -> None:
    """Outputs equal within EXACT on fresh random inputs, and output names/types unchanged."""
    assert [o.name for o in before.proto.graph.output] == [o.name for o in after.proto.graph.output]
    assert [i.name for i in before.proto.graph.input] == [i.name for i in after.proto.graph.input]
    for a, b in zip(list(before.proto.graph.input) + list(before.proto.graph.output),
                    list(after.proto.graph.input) + list(after.proto.graph.output)):
        assert a.type.tensor_type.elem_type == b.type.tensor_type.elem_type, a.name
    feeds = random_feeds(before.proto, seed=seed)
    result = compare_outputs(ort_rt.run(before.proto, feeds), ort_rt.run(after.proto, feeds), EXACT)
    assert result.ok, result.summary()


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.proto.graph.node]


def applied(proto, names, **options) -> tuple[Model, Model]:
    """Run passes that must change the model; check the change is exact."""
    before, after, records = run_passes(proto, names, **options)
    assert any(r.modified for r in records), "expected a change"
    assert_same_outputs(before, after)
    return before, after


def not_applied(proto, name, **options) -> Model:
    """Run a pass that must not apply: reports no change and leaves the graph as it was."""
    before, after, records = run_passes(proto, name, **options)
    assert [r.modified for r in records] == [False], records
    assert after.proto.graph.SerializeToString() == before.proto.graph.SerializeToString()
    return after


# --------------------------------------------------------------------------- registry
def test_cleanup_passes_registered_and_exact():
    assert level_pipeline(1) == CLEANUP
    for name in CLEANUP:
        cls = get_pass(name)
        assert cls.info.tolerance is None and cls.info.opt_level == 1 and cls.__doc__


# --------------------------------------------------------------------------- fold-constants
def test_fold_constants_add_of_initializers_feeding_mul():
    proto = make_model(
        [helper.make_node("Add", ["a", "b"], ["s"], name="add"), helper.make_node("Mul", ["x", "s"], ["y"], name="mul")],
        [("x", [2, 4])], [("y", [2, 4])], [init("a", randn(4)), init("b", randn(4))])
    before, after = applied(proto, "fold-constants")
    assert ops(after) == ["Mul"]
    assert after.initializer_array("s") == pytest.approx(
        before.initializer_array("a") + before.initializer_array("b"))
    assert set(after.initializers()) == {"a", "b", "s"}  # inputs left for eliminate-dead-code


def test_fold_constants_constant_nodes_and_chain():
    nodes = [
        helper.make_node("Constant", [], ["c"], name="c", value=numpy_helper.from_array(np.array([2, 8], np.int64))),
        helper.make_node("Constant", [], ["k"], name="k", value_float=0.5),
        helper.make_node("Cast", ["c"], ["cf"], name="cast", to=F),
        helper.make_node("Mul", ["cf", "k"], ["half"], name="half"),
        helper.make_node("Cast", ["half"], ["shape"], name="cast2", to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape"),
    ]
    proto = make_model(nodes, [("x", [2, 2])], [("y", [1, 4])])
    _, after = applied(proto, "fold-constants")
    assert ops(after) == ["Reshape"]
    assert after.initializer_array("shape").tolist() == [1, 4]
    # intermediate results this pass created and nothing reads are not kept
    assert set(after.initializers()) == {"shape"}


def test_fold_constants_static_shape():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    proto = make_model(nodes, [("x", [2, 3, 4])], [("y", [2, 12])],
                       [init("zero", np.array(0, np.int64)), init("axes0", np.array([0], np.int64)),
                        init("minus1", np.array([-1], np.int64))])
    _, after = applied(proto, "fold-constants")
    assert ops(after) == ["Reshape"]
    assert after.initializer_array("target").tolist() == [2, -1]


def test_fold_constants_shape_partially_static():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=1),
             helper.make_node("Shape", ["x"], ["all"], name="shape_all"),
             helper.make_node("Concat", ["s", "all"], ["y"], name="concat", axis=0)]
    proto = make_model(nodes, [("x", ["N", 3, 4])], [helper.make_tensor_value_info("y", TensorProto.INT64, [5])])
    _, after = applied(proto, "fold-constants")
    assert ops(after) == ["Shape", "Concat"]  # the full shape has a dynamic dim
    assert after.initializer_array("s").tolist() == [3, 4]


def test_fold_constants_skips_random_quantization_and_graph_outputs():
    nodes = [
        helper.make_node("RandomUniformLike", ["c"], ["r"], name="random", seed=1.0),
        helper.make_node("Add", ["x", "r"], ["y"], name="add"),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["w"], name="dq"),
        helper.make_node("Mul", ["x", "w"], ["z"], name="mul"),
        helper.make_node("Add", ["c", "c"], ["const_out"], name="const_out"),
    ]
    proto = make_model(nodes, [("x", [4])], [("y", [4]), ("z", [4]), ("const_out", [4])],
                       [init("c", randn(4)), init("q", np.arange(4, dtype=np.int8)), init("scale", np.float32(0.1))])
    after = not_applied(proto, "fold-constants")
    assert ops(after) == ["RandomUniformLike", "Add", "DequantizeLinear", "Mul", "Add"]


def test_fold_constants_size_cap():
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="cos",
                              value=numpy_helper.from_array(np.array([1.5], np.float32))),
             helper.make_node("Add", ["x", "big"], ["y"], name="add")]
    proto = make_model(nodes, [("x", [16, 16])], [("y", [16, 16])], [init("shape", np.array([16, 16], np.int64))])
    not_applied(proto, "fold-constants", **{"max-elements": 100})
    _, after = applied(proto, "fold-constants")
    assert ops(after) == ["Add"]
    assert after.initializer_array("big").shape == (16, 16)


def test_fold_constants_leaves_if_nodes():
    then_graph = helper.make_graph([helper.make_node("Identity", ["c"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", F, [4])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", F, [4])])
    nodes = [helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_graph, else_branch=else_graph),
             helper.make_node("Add", ["x", "branch"], ["y"], name="add")]
    proto = make_model(nodes, [("x", [4])], [("y", [4])], [init("cond", np.array(True)), init("c", randn(4))])
    not_applied(proto, "fold-constants")


# --------------------------------------------------------------------------- eliminate-noop-ops
def test_eliminate_noop_ops_keeps_interface_nodes():
    nodes = [helper.make_node("Transpose", ["x"], ["y"], name="input_to_output", perm=[0]),
             helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["z"], name="output_to_output", to=F)]
    proto = make_model(nodes, [("x", [3])], [("y", [3]), ("r", [3]), ("z", [3])])
    not_applied(proto, "eliminate-noop-ops")


@pytest.mark.parametrize("target, removed", [
    ([0, 4, 8, 8], True),
    ([-1, 4, 8, 8], True),
    ([0, 4, 0, 0], True),
    ([0, 4, 64], False),
    ([0, 8, 4, 8], False),
    ([0, 4, 8, -1], False),  # -1 next to a dynamic batch: not provably the same size
])
def test_eliminate_noop_reshape(target, removed):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Reshape", ["a", "shape"], ["b"], name="reshape"),
             helper.make_node("Neg", ["b"], ["y"], name="neg")]
    out_shape = ["N"] + [d for d in target[1:] if d != 0] if len(target) == 3 else ["N", "C", "H", "W"]
    proto = make_model(nodes, [("x", ["N", 4, 8, 8])], [("y", out_shape)], [init("shape", np.array(target, np.int64))])
    if removed:
        _, after = applied(proto, "eliminate-noop-ops")
        assert ops(after) == ["Relu", "Neg"]
    else:
        not_applied(proto, "eliminate-noop-ops")


def test_eliminate_noop_cast_transpose_pad_slice_concat():
    nodes = [helper.make_node("Cast", ["x"], ["a"], name="cast", to=F),
             helper.make_node("Transpose", ["a"], ["b"], name="transpose", perm=[0, 1, 2]),
             helper.make_node("Pad", ["b", "zeros"], ["c"], name="pad", mode="reflect"),
             helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["d"], name="slice"),
             helper.make_node("Slice", ["d", "starts2", "ends2"], ["e"], name="slice_static"),
             helper.make_node("Concat", ["e"], ["f"], name="concat", axis=1),
             helper.make_node("CastLike", ["f", "x"], ["g"], name="castlike"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    proto = make_model(nodes, [("x", ["N", 3, 5])], [("y", ["N", 3, 5])], [
        init("zeros", np.zeros(6, np.int64)),
        init("starts", np.array([0, -100], np.int64)), init("ends", np.array([2 ** 63 - 1, 5], np.int64)),
        init("axes", np.array([0, 2], np.int64)),
        init("starts2", np.array([0, 0, 0], np.int64)), init("ends2", np.array([2 ** 31 - 1, 3, 7], np.int64))])
    _, after = applied(proto, "eliminate-noop-ops")
    assert ops(after) == ["Relu"]


def test_eliminate_noop_ops_keeps_real_changes():
    nodes = [helper.make_node("Cast", ["x"], ["a"], name="cast", to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["a"], ["b"], name="cast_back", to=F),
             helper.make_node("Transpose", ["b"], ["c"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("Pad", ["c", "pads"], ["d"], name="pad"),
             helper.make_node("Slice", ["d", "starts", "ends"], ["e"], name="slice"),
             helper.make_node("Slice", ["e", "starts", "ends2", "axes", "steps"], ["y"], name="slice_step")]
    proto = make_model(nodes, [("x", [2, 3, 5])], [("y", [1, 6, 2])], [
        init("pads", np.array([0, 0, 0, 0, 1, 0], np.int64)),
        init("starts", np.array([0], np.int64)), init("ends", np.array([1], np.int64)),
        init("ends2", np.array([100], np.int64)), init("axes", np.array([2], np.int64)),
        init("steps", np.array([2], np.int64))])
    not_applied(proto, "eliminate-noop-ops")


def test_eliminate_noop_ops_respects_subgraph_reads():
    body = helper.make_graph([helper.make_node("Neg", ["b"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", F, [3])])
    other = helper.make_graph([helper.make_node("Abs", ["b"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, [3])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Transpose", ["a"], ["b"], name="noop", perm=[0]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body, else_branch=other)]
    proto = make_model(nodes, [("x", [3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [("y", [3])])
    not_applied(proto, "eliminate-noop-ops")


# --------------------------------------------------------------------------- eliminate-dead-code
def test_eliminate_dead_code():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["dead1"], name="sigmoid"),
             helper.make_node("Mul", ["dead1", "w"], ["dead2"], name="mul"),
             helper.make_node("Add", ["a", "bias"], ["y"], name="add")]
    proto = make_model(nodes, [("x", [2, 4]), ("unused_input", [3])], [("y", [2, 4])],
                       [init("w", randn(4)), init("bias", randn(4)), init("orphan", randn(2))],
                       value_info=[helper.make_tensor_value_info("gone", F, [1])])
    _, after = applied(proto, "eliminate-dead-code")
    assert ops(after) == ["Relu", "Add"]
    assert set(after.initializers()) == {"bias"}
    assert [i.name for i in after.proto.graph.input] == ["x", "unused_input"]
    names = {v.name for v in after.proto.graph.value_info}
    assert "gone" not in names and "dead1" not in names
    not_applied(after.proto, "eliminate-dead-code")


def test_eliminate_dead_code_keeps_subgraph_reads():
    body = helper.make_graph([helper.make_node("Neg", ["a"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", F, [3])])
    other = helper.make_graph([helper.make_node("Abs", ["c"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, [3])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body, else_branch=other)]
    proto = make_model(nodes, [("x", [3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [("y", [3])], [init("c", randn(3))])
    not_applied(proto, "eliminate-dead-code")


# --------------------------------------------------------------------------- the -O1 pipeline
def test_cleanup_pipeline_on_small_net():
    nodes = [helper.make_node("Constant", [], ["s"], name="s", value=numpy_helper.from_array(randn(4, 1, 1))),
             helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("h", "b", "bn"),
             helper.make_node("Mul", ["b", "s"], ["m"], name="mul"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["rs"], name="reshape"),
             helper.make_node("Identity", ["rs"], ["out"], name="identity"),
             helper.make_node("Add", ["w2", "w2"], ["h2"], name="const_add"),
             helper.make_node("Exp", ["h2"], ["dead"], name="dead")]
    inits = [init("w", randn(4, 3, 3, 3)), init("shape", np.array([0, 4, 6, 6], np.int64)),
             init("w2", randn(3))] + bn_params("bn", 4)
    proto = make_model(nodes, [("x", ["N", 3, 6, 6])], [("out", ["N", 4, 6, 6])], inits)
    _, after = applied(proto, level_pipeline(1))
    assert ops(after) == ["Conv", "Relu"]
    assert [o.name for o in after.proto.graph.output] == ["out"]
    conv = [n for n in after.proto.graph.node if n.op_type == "Conv"][0]
    assert set(after.initializers()) == {conv.input[1], conv.input[2]}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["cifar10_resnet20", "cifar10_resnet56", "mobilenet_v2", "mobilenet_v3_small"])
def test_cleanup_pipeline_on_real_models(name):
    path = SHARED_MODELS / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"real model not available: {path} is absent (needs ../shared/data next to the repo)")
    before, after, records = run_passes(Model.load(path).proto, level_pipeline(1))
    assert [r.name for r in records] == level_pipeline(1)
    assert after.node_count() <= before.node_count()
    feeds = random_feeds(before.proto, seed=3)
    expected, got = ort_rt.run(before.proto, feeds), ort_rt.run(after.proto, feeds)
    for key, ref in expected.items():
        relative = float(np.max(np.abs(got[key] - ref)) / max(float(np.max(np.abs(ref))), 1e-12))
        assert relative <= 1e-4, (key, relative)
    assert compare_outputs(expected, got, EXACT).ok


def test_dropping_initializers_keeps_the_others_in_place():
    """Dead initializers are deleted in place, the others keep their order and values."""
    from onnx import helper, numpy_helper

    from hqpc.graphutil import drop_initializers

    graph = helper.make_graph([], "g", [], [], [numpy_helper.from_array(np.full(4, i, np.float32), f"t{i}")
                                               for i in range(5)])
    assert drop_initializers(graph, lambda t: t.name in ("t1", "t2")) == 2
    assert [t.name for t in graph.initializer] == ["t0", "t3", "t4"]
    assert [float(numpy_helper.to_array(t)[0]) for t in graph.initializer] == [0.0, 3.0, 4.0]
    assert drop_initializers(graph, lambda t: False) == 0
