"""spec/README.md: every rule example parses and checks; models after them run guarded;
error examples produce exactly the documented message; the builtin table is complete."""
from __future__ import annotations

import pytest

from ._readme import README, examples
from .helpers import guarded_run, model_from_text
from hqpc.dsl.ast import Call, walk
from hqpc.dsl.builtins import BUILTINS
from hqpc.dsl.rewrite import is_op_call
from hqpc.dsl.checker import load_rules
from hqpc.dsl.compiler import RuleEngine, compile_text
from hqpc.dsl.errors import RuleError
from hqpc.dsl.parser import parse
from hqpc.dsl.printer import format_file

EXAMPLES = examples()
VALID = [e for e in EXAMPLES if e.rules.lang == "hqp"]
ERRORS = [e for e in EXAMPLES if e.rules.lang == "hqp-error"]
RUNNABLE = [e for e in VALID if e.model is not None]


def _id(example):
    return f"line{example.rules.line}"


def test_readme_has_examples():
    assert "# The hqpc rule language" in README.read_text().splitlines()
    assert len(VALID) >= 6 and len(ERRORS) >= 5 and len(RUNNABLE) >= 5


@pytest.mark.parametrize("example", VALID, ids=_id)
def test_example_checks_and_round_trips(example):
    rule_file, infos = load_rules(example.rules.text, "README.md")
    assert infos and len(infos) == len(rule_file.rules)
    assert parse(format_file(rule_file)) == rule_file


@pytest.mark.parametrize("example", RUNNABLE, ids=_id)
def test_example_runs_guarded(example):
    classes = compile_text(example.rules.text, "README.md")
    model = model_from_text(example.model.text, f"README.md:{example.model.line}")
    annotations = example.model.directives.get("annotations")
    if example.model.directives.get("expect") == "no-fire":
        tracer = RuleEngine(classes[0].rule_info, "README.md").run(model.copy())
        assert tracer.rewrites == 0
        if example.expected is not None:
            assert tracer.text().strip() == example.expected.text.strip()
        return
    records, logs = guarded_run(model, classes, annotations)
    assert not any(r.rolled_back for r in records), [(r.name, r.error) for r in records]
    assert any(r.modified for r in records), logs
    for record in records:
        if record.modified:
            assert record.checks["guard"]["ok"] and record.checks["verify"]["ok"]
    tags = {p.value for n in model.proto.graph.node for p in n.metadata_props if p.key == "hqpc.rule"}
    creates_nodes = any(isinstance(node, Call) and is_op_call(node)
                        for cls in classes for node in walk(cls.rule_info.rule.replace))
    if creates_nodes:
        assert tags, "nodes created by a rule carry the provenance tag"
    assert tags <= {cls.info.name for cls in classes}


@pytest.mark.parametrize("example", ERRORS, ids=_id)
def test_error_example_message(example):
    with pytest.raises(RuleError) as info:
        load_rules(example.rules.text, "my.hqp")
    assert example.expected is not None
    assert info.value.render().strip() == example.expected.text.strip()


def test_every_builtin_is_documented():
    text = README.read_text()
    missing = [name for name in BUILTINS if f"`{name}(" not in text]
    assert not missing, f"builtins missing from spec/README.md: {missing}"


def test_every_builtin_rule_is_documented():
    from hqpc.passes.dsl_rules import RULE_NAMES

    text = README.read_text()
    assert not [n for n in RULE_NAMES if f"`{n}`" not in text]
