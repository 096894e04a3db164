"""Pass manager: selection rules, requirements, rollback by verification and by the guard."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hqpc.compiler import CompileOptions, compile_model
from hqpc.errors import PipelineError
from hqpc.ir import Model
from hqpc.passmanager import (NumericGuard, Pass, PassContext, PassInfo, PassManager, PrintIRAfter,
                              VerifyInstrument)
from hqpc.registry import parse_pipeline, register_pass, unregister_pass
from hqpc.runtime.compare import Tolerance
from hqpc.runtime.ort import random_feeds


def tiny_model() -> onnx.ModelProto:
    """x -> Relu -> Mul(w) -> y; 'w' is a constant scale of 2."""
    w = numpy_helper.from_array(np.full((1, 4), 2.0, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Mul", ["r", "w"], ["y"], name="mul")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class ScaleWeights(Pass):
    """Deliberately wrong 'exact' pass: multiplies the weight by `factor`."""

    info = PassInfo("test-scale-weights", opt_level=1)
    options = {"factor": 1.5}

    def run(self, model, ctx):
        for t in model.proto.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * self.config["factor"], t.name))
        return True


class BreakGraph(Pass):
    """Deliberately broken pass: points a node at a tensor nobody produces."""

    info = PassInfo("test-break-graph", opt_level=1)

    def run(self, model, ctx):
        model.proto.graph.node[1].input[0] = "missing_tensor"
        return True


class Crash(Pass):
    info = PassInfo("test-crash", opt_level=1)

    def run(self, model, ctx):
        raise RuntimeError("boom")


class LossyScale(ScaleWeights):
    """A lossy pass whose declared reference is itself scaled: the guard must accept it."""

    info = PassInfo("test-lossy-scale", opt_level=2, tolerance=Tolerance(atol=1e-6, rtol=1e-6))

    def reference(self, before, after, ctx):
        return after.copy()


class NeedsScale(Pass):
    info = PassInfo("test-needs-scale", opt_level=1, requires=("test-lossy-scale",), targets=("cpu",))

    def run(self, model, ctx):
        return False


@pytest.fixture
def registered():
    classes = [ScaleWeights, BreakGraph, Crash, LossyScale, NeedsScale]
    for cls in classes:
        register_pass(cls)
    yield
    for cls in classes:
        unregister_pass(cls.info.name)


def guarded_context(**kwargs) -> PassContext:
    return PassContext(instruments=[VerifyInstrument(), NumericGuard(lambda m: random_feeds(m.proto, seed=0))], **kwargs)


def test_guard_rolls_back_a_wrong_pass_and_reports_errors():
    model = Model.load(tiny_model())
    original = model.serialized()
    manager = PassManager([ScaleWeights()], guarded_context())
    manager.run(model)
    record = manager.records[0]
    assert record.rolled_back and not record.modified
    assert "numeric guard" in record.error
    guard = record.checks["guard"]
    assert guard["ok"] is False
    worst = guard["outputs"][0]
    assert worst["max_abs"] > 0.1 and worst["min_rtol"] >= 0.33  # |1.5x - x| / |x| = 0.5 where x != 0
    assert model.serialized() == original


def test_small_wrong_change_within_tolerance_passes():
    model = Model.load(tiny_model())
    manager = PassManager([ScaleWeights(factor=1.0 + 1e-7)], guarded_context())
    manager.run(model)
    assert not manager.records[0].rolled_back and manager.records[0].modified


def test_verifier_rolls_back_a_broken_graph():
    model = Model.load(tiny_model())
    manager = PassManager([BreakGraph()], guarded_context())
    manager.run(model)
    record = manager.records[0]
    assert record.rolled_back and record.checks["verify"]["ok"] is False
    assert model.proto.graph.node[1].input[0] == "r"


def test_crashing_pass_is_rolled_back_with_reproducer(tmp_path):
    model = Model.load(tiny_model())
    manager = PassManager([Crash()], guarded_context(), reproducer_dir=tmp_path)
    manager.run(model)
    assert manager.records[0].rolled_back and "RuntimeError: boom" in manager.records[0].error
    folder = tmp_path / "hqpc-crash-test-crash"
    assert (folder / "pipeline.txt").read_text().strip() == "test-crash"
    assert Model.load(folder / "input.onnx").node_count() == 2


def test_lossy_pass_is_compared_with_its_reference(registered):
    result = compile_model(CompileOptions(model=tiny_model(), pipeline="test-lossy-scale"))
    record = result.records[0]
    assert record.modified and not record.rolled_back
    assert record.checks["guard"]["tolerance"] == {"atol": 1e-6, "rtol": 1e-6}


def test_requirements_are_inserted_and_opt_level_gates(registered):
    result = compile_model(CompileOptions(model=tiny_model(), pipeline="test-needs-scale"))
    assert [r.name for r in result.records] == ["test-lossy-scale", "test-needs-scale"]
    assert result.pipeline == "test-lossy-scale,test-needs-scale"


def test_disabled_and_target_filtered_passes_are_skipped(registered):
    result = compile_model(CompileOptions(model=tiny_model(), pipeline="test-scale-weights,test-needs-scale",
                                          disabled=("test-scale-weights",), target="orin"))
    skipped = {r.name: r.skipped for r in result.records}
    assert skipped["test-scale-weights"] == "disabled"
    assert "not for target 'orin'" in skipped["test-needs-scale"]


def test_print_ir_after(registered):
    import io

    stream = io.StringIO()
    model = Model.load(tiny_model())
    ctx = guarded_context()
    ctx.instruments.append(PrintIRAfter({"test-lossy-scale"}, stream))
    PassManager([LossyScale()], ctx).run(model)
    assert "IR after test-lossy-scale" in stream.getvalue() and "Mul" in stream.getvalue()


def test_pipeline_text_and_options():
    specs = parse_pipeline("a, b{x=1,y=2.5,z=true,w='q r'},c{}")
    assert [s.name for s in specs] == ["a", "b", "c"]
    assert dict(specs[1].options) == {"x": 1, "y": 2.5, "z": "true", "w": "q r"}
    for bad in ("a,,b", "a{x}", "a{x=1", "a b", "{x=1}"):
        with pytest.raises(PipelineError, match="pipeline column"):
            parse_pipeline(bad)


def test_option_errors():
    with pytest.raises(PipelineError, match="has no option 'nope'"):
        ScaleWeights(nope=1)
    with pytest.raises(PipelineError, match="expects float"):
        ScaleWeights(factor="big")
    assert ScaleWeights(factor="2").config["factor"] == 2.0
    assert ScaleWeights(factor=2).spec() == "test-scale-weights{factor=2.0}"


def test_unknown_pass_suggests(registered):
    with pytest.raises(PipelineError, match="did you mean 'test-crash'"):
        compile_model(CompileOptions(model=tiny_model(), pipeline="test-crasj"))
