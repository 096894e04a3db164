"""The bad-rule corpus (tests/dsl/bad/*.hqp): each file states its expected message in a
``# EXPECT:`` header; errors are one line ``file:line:col: message`` and render with a caret."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hqpc.dsl.checker import load_rules
from hqpc.dsl.errors import RuleCheckError, RuleError, RuleSyntaxError
from hqpc.errors import HqpcError

BAD = sorted((Path(__file__).parent / "bad").glob("*.hqp"))
LOCATION = re.compile(r"^(?P<path>.+\.hqp):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")


def _expect(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# EXPECT: "), f"{path.name}: first line must be '# EXPECT: ...'"
    return first[len("# EXPECT: "):].strip()


def test_corpus_size():
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_rule_message(path):
    text = path.read_text()
    with pytest.raises(RuleError) as info:
        load_rules(text, str(path))
    error = info.value
    assert isinstance(error, HqpcError) and isinstance(error, (RuleSyntaxError, RuleCheckError))
    one_line = str(error)
    assert "\n" not in one_line
    found = LOCATION.match(one_line)
    assert found, one_line
    assert found["path"] == str(path)
    assert _expect(path) in found["message"], one_line
    line, col = int(found["line"]), int(found["col"])
    assert 1 <= line <= len(text.splitlines())
    rendered = error.render().splitlines()
    assert rendered[0] == error.first.one_line()
    # the offending line and a caret under the column
    assert rendered[1].strip() == text.splitlines()[line - 1].strip()
    assert rendered[2].rstrip().endswith("^") and len(rendered[2]) - 4 == col


def test_check_error_lists_all_problems():
    text = "rule r {\n  match { y = Cnv(x) }\n  let a = sqr(2)\n  replace y with x\n}\n"
    with pytest.raises(RuleCheckError) as info:
        load_rules(text, "many.hqp")
    assert len(info.value.diagnostics) == 2
    assert "(and 1 more error)" in str(info.value)
    assert "did you mean 'Conv'" in info.value.render() and "did you mean 'sqrt'" in info.value.render()
