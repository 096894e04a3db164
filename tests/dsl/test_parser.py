"""Parser and printer: AST shape and positions, and the round trip parse -> print -> parse."""
from __future__ import annotations

from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings

from . import strategies as S
from hqpc.dsl import ast as A
from hqpc.dsl.parser import parse, parse_expr
from hqpc.dsl.printer import format_expr, format_file, format_rule

RULE_FILES = sorted(e for e in resources.files("hqpc.spec").joinpath("rules").iterdir() if e.name.endswith(".hqp"))

SAMPLE = '''# a comment
rule fold-bn-into-conv (opt=1, targets=[cpu, orin], atol=1e-4) "doc \\"quoted\\"" {
  match {
    y   = Conv(x, w: const, b?: const) {..attrs}  where single_use(y)
    out = BatchNormalization(y, g: const, beta: const, mean: const, var: const) {epsilon = eps ?? 1e-5, training_mode == 0}
  }
  where rank(x) == 4 and not has(b) or -x ** 2 >= (a - b) - c
  let s = g / sqrt(var + eps)
  let k = s[1:, :3, ::2][0]
  replace {
    t, _ = Split(Conv(x, w * bcast(s, like=w, axis=0), ((b ?? 0) - mean) * s + beta) {..attrs, -pads, group = 1})
    out = Concat(*xs, t) {axis = 1}
  }
}
'''


def test_sample_ast():
    rule_file = parse(SAMPLE, "sample.hqp")
    (rule,) = rule_file.rules
    assert rule.name == "fold-bn-into-conv" and rule.doc == 'doc "quoted"'
    assert [o.key for o in rule.options] == ["opt", "targets", "atol"]
    conv, bn = rule.match.patterns
    assert conv.op == "Conv" and [a.name for a in conv.args] == ["x", "w", "b"]
    assert conv.args[2].optional and conv.args[2].kinds == ("const",)
    assert isinstance(conv.attrs[0], A.AttrAll) and conv.guards[0] == A.Call("single_use", (A.Name("y"),))
    assert bn.attrs[0] == A.AttrBind("epsilon", "eps", A.Num(1e-5))
    assert bn.attrs[1] == A.AttrCmp("training_mode", "==", A.Num(0))
    where = rule.items[1]
    assert isinstance(where, A.Where) and where.cond.op == "or"
    replace = rule.replace
    assert replace.block and replace.assigns[0].targets == ("t", "_")
    assert replace.assigns[1].value.args[0] == A.Splat("xs")


def test_positions():
    rule_file = parse(SAMPLE, "sample.hqp")
    rule = rule_file.rules[0]
    assert (rule.pos.line, rule.pos.column) == (2, 6)
    conv = rule.match.patterns[0]
    assert (conv.pos.line, conv.pos.column) == (4, 5)
    assert (conv.op_pos.line, conv.op_pos.column) == (4, 11)
    w = conv.args[1]
    assert (w.pos.line, w.pos.column) == (4, 19)
    let = rule.items[2]
    assert (let.pos.line, let.pos.column) == (8, 7)
    # positions never take part in equality
    assert parse("\n\n" + SAMPLE) == rule_file


def test_operator_precedence():
    e = parse_expr("a or b and not c == d ?? e + f * -g ** h[0]")
    assert e.op == "or" and e.right.op == "and" and isinstance(e.right.right, A.Unary)
    cmp = e.right.right.operand
    assert cmp.op == "==" and cmp.right.op == "??" and cmp.right.right.op == "+"
    mul = cmp.right.right.right
    assert mul.op == "*" and mul.right == A.Unary("-", A.Binary("**", A.Name("g"), A.Subscript(A.Name("h"), (A.Num(0),))))
    assert parse_expr("a - b - c") == A.Binary("-", A.Binary("-", A.Name("a"), A.Name("b")), A.Name("c"))
    assert format_expr(parse_expr("a - (b - c)")) == "a - (b - c)"
    assert format_expr(parse_expr("(a ?? b) - c")) == "(a ?? b) - c"


def test_sample_round_trip():
    rule_file = parse(SAMPLE)
    printed = format_file(rule_file)
    assert parse(printed) == rule_file
    assert format_file(parse(printed)) == printed


@pytest.mark.parametrize("entry", RULE_FILES, ids=lambda e: e.name)
def test_builtin_rule_files_round_trip(entry):
    rule_file = parse(entry.read_text(), entry.name)
    assert rule_file.rules
    printed = format_file(rule_file)
    assert parse(printed) == rule_file
    assert format_file(parse(printed)) == printed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(S.exprs)
def test_expression_round_trip(expr):
    assert parse_expr(format_expr(expr)) == expr


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(S.rules)
def test_rule_round_trip(rule):
    text = format_rule(rule)
    parsed = parse(text).rules[0]
    assert parsed == rule, text
