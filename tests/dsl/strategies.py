"""Hypothesis strategies for rule-language ASTs (for the grammar round-trip property)."""
from __future__ import annotations

from hypothesis import strategies as st

from hqpc.dsl import ast as A
from hqpc.dsl.parser import KEYWORDS

_first = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_rest = _first + "0123456789"

names = st.builds(lambda a, b: a + b, st.sampled_from(_first), st.text(_rest, max_size=6)).filter(
    lambda s: s not in KEYWORDS)
lower_names = names.map(lambda s: "f" + s.lower()).filter(lambda s: s not in KEYWORDS)
op_names = st.sampled_from(["Conv", "Relu", "Mul", "Add", "Clip", "Concat", "Gemm", "BatchNormalization"])
rule_names = st.lists(st.text("abcdefghij0123456789_", min_size=1, max_size=5), min_size=1, max_size=4).map(
    lambda parts: "r" + "-".join(parts))
numbers = st.one_of(st.integers(0, 10 ** 12), st.floats(0, 1e30, allow_nan=False, allow_infinity=False))
strings = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=8)

BINARY_OPS = ["or", "and", "==", "!=", "<", "<=", ">", ">=", "??", "+", "-", "*", "/", "%", "@", "**"]

atoms = st.one_of(
    numbers.map(lambda v: A.Num(v)),
    strings.map(lambda v: A.Str(v)),
    st.booleans().map(lambda v: A.Bool(v)),
    st.just(A.NoneLit()),
    names.map(lambda v: A.Name(v)),
)


def _extend(children):
    slices = st.builds(A.Slice, st.none() | children, st.none() | children, st.none() | children)
    keywords = st.builds(A.Keyword, names, children)
    return st.one_of(
        st.builds(A.ListExpr, st.lists(children, max_size=3).map(tuple)),
        st.builds(A.Unary, st.sampled_from(["-", "+", "not"]), children),
        st.builds(A.Binary, st.sampled_from(BINARY_OPS), children, children),
        st.builds(A.Subscript, children, st.lists(children | slices, min_size=1, max_size=3).map(tuple)),
        st.builds(A.Call, lower_names, st.lists(children, max_size=3).map(tuple),
                  st.lists(keywords, max_size=2).map(tuple)),
    )


exprs = st.recursive(atoms, _extend, max_leaves=12)

op_attrs = st.one_of(
    names.map(A.AttrSpread), names.map(A.AttrDrop), st.builds(A.AttrSet, names, exprs))
op_calls = st.builds(A.Call, op_names, st.lists(exprs | names.map(A.Splat), max_size=3).map(tuple),
                     st.just(()), st.lists(op_attrs, max_size=3).map(tuple))

pat_args = st.builds(A.PatArg, names, st.booleans(), st.just(False),
                     st.lists(st.sampled_from(["const", "scalar", "input"]), max_size=2).map(tuple))
pat_attrs = st.one_of(names.map(A.AttrAll),
                      st.builds(A.AttrBind, names, names, st.none() | exprs),
                      st.builds(A.AttrCmp, names, st.sampled_from(["==", "!=", "<", ">="]), exprs))
patterns = st.builds(A.Pattern, st.lists(st.builds(A.OutName, names, st.booleans()), min_size=1, max_size=2).map(tuple),
                     op_names, st.lists(pat_args, max_size=3).map(tuple), st.lists(pat_attrs, max_size=2).map(tuple),
                     st.lists(exprs, max_size=2).map(tuple))
assigns = st.builds(A.Assign, st.lists(names, min_size=1, max_size=2).map(tuple), op_calls | exprs)
replaces = st.one_of(
    st.builds(lambda a: A.Replace((a,), block=False), assigns),
    st.builds(lambda items: A.Replace(tuple(items), block=True), st.lists(assigns, max_size=3)))
items = st.one_of(st.builds(A.Where, exprs), st.builds(A.Let, names, exprs))
options = st.builds(A.RuleOption, names, exprs)
rules = st.builds(
    lambda name, opts, doc, match, middle, replace: A.Rule(name, tuple(opts), doc, (match, *middle, replace)),
    rule_names, st.lists(options, max_size=2), st.none() | strings,
    st.builds(A.MatchBlock, st.lists(patterns, min_size=1, max_size=3).map(tuple)),
    st.lists(items, max_size=3), replaces)
