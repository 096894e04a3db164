"""Built-in rules and engine behaviour through the PassManager API (verification + numeric
guard), on small graphs, the digits model and (when present) the shared real models."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from .helpers import REPO, guarded_run, model_from_text
from hqpc.dsl.compiler import NoFixedPoint, RuleEngine, RulePass, compile_text
from hqpc.ir import Model
from hqpc.passes.dsl_rules import BUILTIN_RULES, RULE_NAMES
from hqpc.registry import get_pass, passes
from hqpc.runtime import ort as ort_rt

DIGITS = REPO / "examples" / "digits" / "digits_cnn.onnx"
SHARED = REPO.parent / "shared" / "data" / "models"
REAL_MODELS = ["cifar10_resnet20.onnx", "cifar10_resnet56.onnx", "mobilenet_v2.onnx", "mobilenet_v3_small.onnx"]
PYTHON_CLEANUP = {"fold-constants", "eliminate-noop-ops", "eliminate-dead-code"}


def _rule(name):
    return get_pass(name)


def _tags(model):
    return [p.value for n in model.proto.graph.node for p in n.metadata_props if p.key == "hqpc.rule"]


def _ops(model):
    return [n.op_type for n in model.proto.graph.node]


def test_builtin_rules_registered_with_sources():
    registered = passes()
    assert len(RULE_NAMES) >= 12
    assert not set(RULE_NAMES) & PYTHON_CLEANUP
    for cls in BUILTIN_RULES:
        assert registered[cls.info.name] is cls and issubclass(cls, RulePass)
        assert re.fullmatch(r"spec/rules/\w+\.hqp:\d+", cls.source)
        assert cls.info.opt_level == 1 and cls.info.tolerance is None and cls.info.description


def test_every_builtin_rule_fires_guarded_in_a_golden_case():
    """Each tests/golden/dsl_*.onnxtxt case through the PassManager API (verification and
    numeric guard): no rollback, and every built-in rule rewrites something in some case."""
    from hqpc.golden import GoldenCase

    fired = set()
    cases = sorted((REPO / "tests" / "golden").glob("dsl_*.onnxtxt"))
    assert cases
    for path in cases:
        case = GoldenCase.parse(path)
        names = re.search(r"--pipeline=(\S+)", case.run).group(1).split(",")
        model = Model.load(case.build_model())
        records, logs = guarded_run(model, [_rule(n) for n in names])
        assert not [(r.name, r.error) for r in records if r.rolled_back], path.name
        for record in records:
            if record.modified:
                assert record.checks["guard"]["ok"], (path.name, record.name)
                fired.add(record.name)
    assert not set(RULE_NAMES) - fired


def test_digits_model_bn_folding():
    model = Model.load(DIGITS)
    before = ort_rt.run(model.proto, ort_rt.random_feeds(model.proto, seed=3))
    records, logs = guarded_run(model, [_rule(n) for n in RULE_NAMES])
    assert not [r.name for r in records if r.rolled_back]
    assert "BatchNormalization" not in _ops(model)
    assert _tags(model).count("fold-bn-into-conv") == 9
    assert any("fold-bn-into-conv: fired 9 time(s)" in line for line in logs)
    # the tags survive saving, onnxruntime accepts them and the numbers match
    reloaded = onnx.load_from_string(model.to_proto().SerializeToString())
    assert sum(1 for n in reloaded.graph.node for p in n.metadata_props if p.key == "hqpc.rule") == 9
    onnx.checker.check_model(reloaded, full_check=True)
    after = ort_rt.run(reloaded, ort_rt.random_feeds(model.proto, seed=3))
    np.testing.assert_allclose(after["logits"], before["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared real models absent")
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_models_all_rules_guarded(name):
    model = Model.load(SHARED / name)
    records, _ = guarded_run(model, [_rule(n) for n in RULE_NAMES])
    assert not [(r.name, r.error) for r in records if r.rolled_back]
    for record in records:
        if record.modified:
            assert record.checks["guard"]["ok"] and record.checks["verify"]["ok"]


CONV_BN = '''<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] out)
<float[4, 3, 3, 3] w, float[4] g, float[4] beta, float[4] mean, float[4] var>
{
    [conv] y = Conv <pads = [1, 1, 1, 1]> (x, w)
    [bn] out = BatchNormalization (y, g, beta, mean, var)
}
'''


def test_wrong_rule_is_rolled_back_by_the_guard():
    (bad,) = compile_text('''
rule bad-bn-fold "forgets the BN shift" {
  match {
    y   = Conv(x, w: const) {..attrs} where single_use(y)
    out = BatchNormalization(y, g: const, beta: const, mean: const, var: const) {epsilon = eps}
  }
  replace out with Conv(x, w * bcast(g / sqrt(var + eps), like=w, axis=0)) {..attrs}
}''', "bad.hqp")
    model = model_from_text(CONV_BN)
    records, _ = guarded_run(model, [bad])
    assert records[0].rolled_back and "numeric guard" in records[0].error
    assert "BatchNormalization" in _ops(model)


def test_rule_without_fixed_point_is_rolled_back():
    (loop,) = compile_text('''
rule relu-forever (max_rewrites=20) {
  match { out = Relu(x) }
  replace out with Relu(x)
}''', "loop.hqp")
    model = model_from_text('''<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] out) { out = Relu (x) }''')
    with pytest.raises(NoFixedPoint):
        RuleEngine(loop.rule_info).run(model.copy())
    records, _ = guarded_run(model, [loop])
    assert records[0].rolled_back and "fixed point" in records[0].error


def test_variadic_and_replace_block_with_locals():
    (rule,) = compile_text('''
rule fold-concat-of-constants {
  match { out = Concat(*xs: const) {axis = a} }
  replace out with Identity(concat(xs, axis=a))
}''')
    (split,) = compile_text('''
rule concat-split-relu {
  match { out = Concat(x, *rest) {axis = a} where rank(x) == 2 and producer(x) != "Identity" }
  replace {
    r   = Neg(x)
    n   = Identity(Neg(r))
    out = Concat(n, *rest) {axis = a}
  }
}''')
    model = model_from_text('''<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 5] out, float[4, 2] k)
<float[2, 2] c1 = {1, 2, 3, 4}, float[2, 2] c2 = {5, 6, 7, 8}, float[2, 2] c3>
{
    k = Concat <axis = 0> (c1, c2)
    out = Concat <axis = 1> (x, c3)
}''')
    records, _ = guarded_run(model, [rule])
    assert records[0].modified and not records[0].rolled_back
    assert "Identity" in _ops(model)
    const = {t.name: onnx.numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    folded = next(v for k, v in const.items() if v.shape == (4, 2))
    np.testing.assert_array_equal(folded, np.arange(1, 9, dtype=np.float32).reshape(4, 2))
    records, logs = guarded_run(model, [split])
    assert records[0].modified and not records[0].rolled_back, logs
    ops = _ops(model)
    assert ops.count("Neg") == 2 and ops.count("Identity") == 2 and ops.count("Concat") == 1


def test_commutative_inputs_and_attribute_defaults():
    (rule,) = compile_text('''
rule leaky-to-relu {
  match {
    t   = LeakyRelu(x) {alpha = a ?? 0.5}
    out = Add(k: const, t) where all(k == 0) and a == 0
  }
  replace out with Relu(x)
}''')
    model = model_from_text('''<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] out)
<float zero = {0.0}>
{
    t = LeakyRelu <alpha = 0.0> (x)
    out = Add (t, zero)
}''')
    records, logs = guarded_run(model, [rule])
    assert records[0].modified and _ops(model) == ["Relu"], logs


def test_refused_rewrites_are_explained():
    dropout = _rule("eliminate-dropout")
    model = model_from_text('''<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 4] out, bool[2, 4] mask)
{
    d, mask = Dropout (x)
    out = Relu (d)
}''')
    records, logs = guarded_run(model, [dropout])
    assert not records[0].modified
    text = "\n".join(logs)
    assert "did not fire" in text and "uses(mask) == 0" in text
    identity = _rule("eliminate-identity-op")
    model = model_from_text('''<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 4] x) => (float[2, 4] out) { out = Identity (x) }''')
    records, logs = guarded_run(model, [identity])
    assert not records[0].modified
    assert "graph output 'out' cannot be forwarded to 'x' (a graph input)" in "\n".join(logs)


def test_trace_points_at_the_failing_guard():
    model = model_from_text(CONV_BN.replace("[bn] out = BatchNormalization (y,",
                                            "[bn] out = BatchNormalization <training_mode = 1> (y,"), "trace")
    tracer = RuleEngine(_rule("fold-bn-into-conv").rule_info, "spec/rules/batchnorm.hqp").run(model.copy())
    text = tracer.text()
    assert tracer.rewrites == 0
    assert "closest match: anchored at 'bn', matched 0/2" in text
    assert "training_mode is 1, the pattern needs training_mode == 0" in text
    assert "spec/rules/batchnorm.hqp:" in text


def test_annotation_guards():
    (rule,) = compile_text('''
rule drop-relu-if-int8 {
  match { out = Relu(x) where precision(out) == "int8" and bits(out) == 8 and (sensitivity(out) ?? 1) < 0.5 }
  replace out with Clip(x, 0.0, none)
}''')
    text = '''<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] out) { out = Relu (x) }'''
    plain = model_from_text(text)
    assert RuleEngine(rule.rule_info).run(plain).rewrites == 0
    tagged = model_from_text(text)
    tagged.annotations.update({"precision": {"out": "int8"}, "sensitivity": {"Relu_0": 0.1}})
    records, _ = guarded_run(tagged, [rule])
    assert records[0].modified and _ops(tagged) == ["Clip"]
    node = tagged.proto.graph.node[0]
    assert len(node.input) == 2 and node.input[0] == "x"  # 'none' max: trailing absent input dropped


def test_tensors_read_in_subgraphs_are_respected():
    from onnx import TensorProto, helper

    then_g = helper.make_graph([helper.make_node("Relu", ["y"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Identity", ["x"], ["y"]),
             helper.make_node("If", ["c"], ["out"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = Model.load(proto)
    records, logs = guarded_run(model, [_rule("eliminate-identity-op")])
    assert not records[0].modified and "read inside a subgraph" in "\n".join(logs)
