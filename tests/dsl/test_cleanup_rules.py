"""The -O1 folding rules (spec/rules/batchnorm.hqp, conv_affine.hqp) case by case: what must
fold, what must be left alone. Every run goes through the PassManager with verification and
the numeric guard; folded models are compared once more on fresh inputs. Golden cases
(tests/golden/dsl_fold_*) show the resulting graphs."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import guarded_run, model_from_text
from hqpc.passes.dsl_rules import RULE_NAMES
from hqpc.registry import get_pass
from hqpc.runtime import ort as ort_rt
from hqpc.runtime.compare import EXACT, compare_outputs

BN_RULES = [n for n in RULE_NAMES if n.startswith("fold-bn-into-")]
AFFINE_RULES = [n for n in RULE_NAMES if re.fullmatch(r"fold-(mul|div|add|sub)-into-\w+", n)]
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def values(array) -> str:
    """ONNX text for the values of a float initializer: ``{1.0, 2.0}``."""
    return "{" + ", ".join(repr(float(v)) for v in np.asarray(array, np.float64).reshape(-1)) + "}"


def run_rules(text: str, names, key: str):
    """(model before, model after, records) of the named rules on the model ``text``; no rollback."""
    model = model_from_text(HEADER + text, key)
    before = model.copy()
    records, logs = guarded_run(model, [get_pass(n) for n in names])
    assert not [(r.name, r.error) for r in records if r.rolled_back], logs
    for record in records:
        if record.modified:
            assert record.checks["verify"]["ok"] and record.checks["guard"]["ok"], record.checks
    return before, model, records


def ops(model) -> list[str]:
    return [n.op_type for n in model.proto.graph.node]


def folds(text: str, names, key: str):
    """Run rules that must change the model; check the outputs again; return the result."""
    before, after, records = run_rules(text, names, key)
    assert any(r.modified for r in records), "expected a rewrite"
    feeds = ort_rt.random_feeds(before.proto, seed=7)
    result = compare_outputs(ort_rt.run(before.proto, feeds), ort_rt.run(after.proto, feeds), EXACT)
    assert result.ok, result.summary()
    assert [o.name for o in after.proto.graph.output] == [o.name for o in before.proto.graph.output]
    return after


def keeps(text: str, names, key: str) -> None:
    """Run rules that must not apply: no change reported, the graph untouched."""
    before, after, records = run_rules(text, names, key)
    assert not any(r.modified for r in records)
    assert after.proto.graph.SerializeToString() == before.proto.graph.SerializeToString()


# --------------------------------------------------------------------------- BatchNormalization
def conv_bn(transpose: bool, group: int, bias: bool, kernel: int = 3, eps: float = 1e-3,
            c_in: int = 4, c_out: int = 6) -> str:
    """x [1, c_in, 5, 5] -> Conv / ConvTranspose (stride 2) -> BatchNormalization -> y."""
    if transpose:
        op, weight, attrs, size = "ConvTranspose", [c_in, c_out // group, kernel, kernel], "strides = [2, 2], ", (5 - 1) * 2 + kernel
    else:
        op, weight, attrs, size = "Conv", [c_out, c_in // group, kernel, kernel], "", 5 - kernel + 1
    return f"""g (float[1, {c_in}, 5, 5] x) => (float[1, {c_out}, {size}, {size}] y)
<float{weight} w, {f"float[{c_out}] b, " if bias else ""}float[{c_out}] g, float[{c_out}] beta, float[{c_out}] mean, float[{c_out}] var>
{{
    h = {op} <{attrs}group = {group}> (x, w{", b" if bias else ""})
    y = BatchNormalization <epsilon = {eps}> (h, g, beta, mean, var)
}}"""


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("transpose", [False, True])
def test_fold_bn_into_conv_and_convtranspose(transpose, group, bias):
    text = conv_bn(transpose, group, bias)
    assert ops(folds(text, BN_RULES, text)) == ["ConvTranspose" if transpose else "Conv"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transpose=st.booleans(), group=st.sampled_from([1, 2, 3]), kernel=st.sampled_from([1, 3]),
       bias=st.booleans(), eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 2 ** 16))
def test_fold_bn_random_convs(transpose, group, kernel, bias, eps, seed):
    text = conv_bn(transpose, group, bias, kernel, eps, c_in=2 * group, c_out=2 * group + (group if group > 1 else 0))
    assert ops(folds(text, BN_RULES, f"{seed}")) == ["ConvTranspose" if transpose else "Conv"]


@pytest.mark.parametrize("trans_b, bias, beta", [(1, "[3]", 1.0), (0, "[3]", 0.5), (1, None, 1.0),
                                                 (0, "[1, 3]", 2.0), (1, "[1]", 1.0)])
def test_fold_bn_into_gemm(trans_b, bias, beta):
    text = f"""g (float[2, 5] a) => (float[2, 3] y)
<float{[3, 5] if trans_b else [5, 3]} w, {f"float{bias} c, " if bias else ""}float[3] g, float[3] be, float[3] m, float[3] v>
{{
    h = Gemm <alpha = 0.7, beta = {beta}, transB = {trans_b}> (a, w{", c" if bias else ""})
    y = BatchNormalization (h, g, be, m, v)
}}"""
    assert ops(folds(text, BN_RULES, text)) == ["Gemm"]


BN_PARAMS = "float[4] g, float[4] beta, float[4] mean, float[4] var"
BN_KEPT = {
    # the conv output has a second reader
    "two uses": f"""g (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y, float[1, 4, 4, 4] r)
<float[4, 3, 3, 3] w, {BN_PARAMS}>
{{ h = Conv <pads = [1, 1, 1, 1]> (x, w)  y = BatchNormalization (h, g, beta, mean, var)  r = Relu (h) }}""",
    # the conv output is a graph output itself
    "graph output": f"""g (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y, float[1, 4, 4, 4] h)
<float[4, 3, 3, 3] w, {BN_PARAMS}>
{{ h = Conv <pads = [1, 1, 1, 1]> (x, w)  y = BatchNormalization (h, g, beta, mean, var) }}""",
    # a BN parameter is a graph input (not a constant)
    "param input": """g (float[1, 3, 4, 4] x, float[4] g) => (float[1, 4, 4, 4] y)
<float[4, 3, 3, 3] w, float[4] beta, float[4] mean, float[4] var>
{ h = Conv <pads = [1, 1, 1, 1]> (x, w)  y = BatchNormalization (h, g, beta, mean, var) }""",
    # the weight is not a constant
    "weight input": f"""g (float[1, 3, 4, 4] x, float[4, 3, 3, 3] w) => (float[1, 4, 4, 4] y)
<{BN_PARAMS}>
{{ h = Conv <pads = [1, 1, 1, 1]> (x, w)  y = BatchNormalization (h, g, beta, mean, var) }}""",
    # BN after something that is no Conv / ConvTranspose / Gemm
    "standalone": f"""g (float[1, 4, 4, 4] x) => (float[1, 4, 4, 4] y)
<{BN_PARAMS}>
{{ h = Relu (x)  y = BatchNormalization (h, g, beta, mean, var) }}""",
}


@pytest.mark.parametrize("case", list(BN_KEPT))
def test_fold_bn_not_applied(case):
    keeps(BN_KEPT[case], BN_RULES, case)


def test_fold_bn_shared_weight_and_chained_bn():
    text = """g (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y1, float[1, 4, 4, 4] y2)
<float[4, 3, 1, 1] w, float[4] g1, float[4] b1, float[4] m1, float[4] v1, float[4] g2, float[4] b2, float[4] m2,
 float[4] v2, float[4] g3, float[4] b3, float[4] m3, float[4] v3>
{
    h1 = Conv (x, w)
    h2 = Conv (x, w)
    y1 = BatchNormalization (h1, g1, b1, m1, v1)
    c2 = BatchNormalization (h2, g2, b2, m2, v2)
    y2 = BatchNormalization (c2, g3, b3, m3, v3)
}"""
    after = folds(text, ["fold-bn-into-conv"], "shared")
    assert ops(after) == ["Conv", "Conv"]
    # each fold wrote a weight of its own (the shared one, now unread, is gone)
    assert len({n.input[1] for n in after.proto.graph.node} | {"w"}) == 3
    assert "w" not in after.initializers()


def test_fold_bn_weight_from_constant_node():
    weight = np.arange(12, dtype=np.float32).reshape(4, 3, 1, 1) / 10 - 0.5
    text = f"""g (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y)
<{BN_PARAMS}>
{{
    w = Constant <value = float[4, 3, 1, 1] {values(weight)}> ()
    h = Conv (x, w)
    y = BatchNormalization (h, g, beta, mean, var)
}}"""
    after = folds(text, ["fold-bn-into-conv", "eliminate-dead-code"], "constant")
    (conv,) = after.proto.graph.node
    assert conv.op_type == "Conv"
    assert set(after.initializers()) == {conv.input[1], conv.input[2]}


# --------------------------------------------------------------------------- constant Mul/Div/Add/Sub
def conv_then(*ops: tuple[str, str, str, bool], outputs: str = "") -> str:
    """x -> Conv(w, b) -> h0 -> op1(h0, c1) -> h1 -> ... -> y. Each op: (op type, constant name,
    its declaration, constant first)."""
    body = ["h0 = Conv <pads = [1, 1, 1, 1]> (x, w, b)"]
    for i, (op, name, _, first) in enumerate(ops, start=1):
        out = "y" if i == len(ops) else f"h{i}"
        args = f"{name}, h{i - 1}" if first else f"h{i - 1}, {name}"
        body.append(f"{out} = {op} ({args})")
    consts = "".join(f", {decl}" for _, _, decl, _ in ops)
    return f"""g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y{outputs})
<float[4, 3, 3, 3] w, float[4] b{consts}>
{{ {"  ".join(body)} }}"""


def test_fold_mul_then_add():
    text = conv_then(("Mul", "s", "float[4, 1, 1] s", False), ("Add", "t", "float[1, 4, 1, 1] t", True))
    assert ops(folds(text, AFFINE_RULES, "mul-add")) == ["Conv"]


@pytest.mark.parametrize("op, decl, first", [
    ("Mul", "float c = {1.7}", True),
    ("Div", "float[1] c = {2.5}", False),
    ("Div", f"float[4, 1, 1] c = {values([3.5, 2.0, -4.0, 0.5])}", False),
    ("Sub", "float[4, 1, 1] c", False),
    ("Add", "float c = {0.25}", False),
])
def test_fold_single_op(op, decl, first):
    assert ops(folds(conv_then((op, "c", decl, first)), AFFINE_RULES, decl)) == ["Conv"]


AFFINE_KEPT = {
    # varies along the width: not a per-channel affine map
    "spatial": conv_then(("Mul", "s", "float[1, 1, 1, 6] s", False)),
    "spatial_full": conv_then(("Add", "s", "float[4, 6, 6] s", False)),
    # broadcasting would add an axis
    "rank_grows": """g (float[1, 3, 4, 4] x) => (float[1, 1, 4, 4, 4] y)
<float[4, 3, 1, 1] w, float[1, 1, 4, 1, 1] s>
{ h = Conv (x, w)  y = Mul (h, s) }""",
    # c / h is not affine in h; c - h would negate the weights (not folded by the rules)
    "div_by_h": conv_then(("Div", "c", "float c = {2.0}", True)),
    "sub_from_const": conv_then(("Sub", "c", "float[1, 4, 1, 1] c", True)),
    "div_zero": conv_then(("Div", "c", "float[4, 1, 1] c = {1.0, 0.0, 2.0, 3.0}", False)),
    "two_uses": conv_then(("Mul", "s", "float[4, 1, 1] s", False), outputs=", float[1, 4, 6, 6] h0"),
    "non_constant": """g (float[1, 3, 4, 4] x, float[4, 1, 1] s) => (float[1, 4, 4, 4] y)
<float[4, 3, 1, 1] w>
{ h = Conv (x, w)  y = Mul (h, s) }""",
    "inf": conv_then(("Mul", "s", "float[4, 1, 1] s = {1.0, inf, 2.0, 3.0}", False)),
    "inf_add": conv_then(("Add", "s", "float[4, 1, 1] s = {1.0, -inf, 2.0, 3.0}", False)),
}


@pytest.mark.parametrize("case", list(AFFINE_KEPT))
def test_fold_affine_not_applied(case):
    keeps(AFFINE_KEPT[case], AFFINE_RULES, case)
