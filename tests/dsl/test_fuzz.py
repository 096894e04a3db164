"""Robustness: random and mutated text never crashes the parser or the checker (only clean
RuleErrors), and mutated rules that do check never crash when they run on a model."""
from __future__ import annotations

from importlib import resources

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ._readme import examples
from .helpers import model_from_text
from hqpc.dsl.checker import load_rules
from hqpc.dsl.compiler import NoFixedPoint, RuleEngine, compile_text
from hqpc.dsl.errors import RuleError

SEEDS = [e.read_text() for e in resources.files("hqpc.spec").joinpath("rules").iterdir() if e.name.endswith(".hqp")]
SEEDS += [e.rules.text for e in examples()]
TOKENS = ["rule", "match", "where", "let", "replace", "with", "{", "}", "(", ")", "[", "]", ",", ":", "?", "??",
          "..", "*", "**", "=", "==", "!=", "<", "-", "+", "/", "&", "and", "or", "not", "none", "true", "_",
          "x", "y", "w", "b", "s", "Conv", "Relu", "Mul", "Concat", "const", "scalar", "1", "0.5", "1e-5",
          "\"s\"", "\n", " ", "#", "sqrt", "bcast", "qdq", "shape", "select", "inf", "-", "Clip", "Identity",
          "*xs", "x?", "{..attrs}", "axis=0", "'", "$", "\\", "\""]

MODEL = '''<ir_version: 8, opset_import: ["" : 17]>
fuzz (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] out, float[1, 4, 6, 6] z)
<float[4, 3, 3, 3] w, float[4] b, float[4] g, float[4] beta, float[4] mean, float[4] var, float[4, 1, 1] s,
 float lo = {0.0}, float hi = {6.0}>
{
    i = Identity (x)
    y = Conv <pads = [1, 1, 1, 1]> (i, w, b)
    n = BatchNormalization (y, g, beta, mean, var)
    m = Mul (n, s)
    r = Relu (m)
    c = Clip (r, lo, hi)
    out = Relu (c)
    z = Add (y, s)
}
'''
_MODEL = model_from_text(MODEL, "fuzz")


def _check(text: str):
    try:
        return load_rules(text, "fuzz.hqp")
    except RuleError as exc:
        assert str(exc) and "\n" not in str(exc)
        exc.render()
        return None


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["delete", "insert", "replace", "cut"]))
        if action == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 3)):]
        elif action == "insert":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif action == "replace":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos + draw(st.integers(1, 6)):]
        else:
            text = text[:pos]
    return text


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text_never_crashes(text):
    _check(text)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_token_soup_never_crashes(text):
    _check(text)


@settings(max_examples=250, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_rules_never_crash(text):
    checked = _check(text)
    if checked is None:
        return
    for cls in compile_text(text, "fuzz.hqp"):
        try:
            RuleEngine(cls.rule_info, "fuzz.hqp").run(_MODEL.copy(), max_rewrites=50)
        except NoFixedPoint:
            pass
