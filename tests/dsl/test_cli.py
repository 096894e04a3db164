"""`hqpc rules list|check|show|explain` and load_pass_file."""
from __future__ import annotations

import contextlib
import io

import pytest

from .helpers import HERE, REPO
from hqpc.cli import main
from hqpc.dsl.cli import load_pass_file, main_rules
from hqpc.dsl.compiler import RulePass
from hqpc.dsl.errors import RuleError
from hqpc.errors import HqpcError
from hqpc.registry import get_pass, passes, unregister_pass

GOOD = '''rule cli-test-neg-neg "Neg(Neg(x)) is x" {
  match {
    n   = Neg(x) where single_use(n)
    out = Neg(n)
  }
  replace out with x
}
'''


def _run(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.hqp"
    path.write_text(GOOD)
    yield path
    unregister_pass("cli-test-neg-neg")


def test_list_shows_rules_and_passes_with_sources():
    code, out, _ = _run(main_rules, ["list"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "KIND", "OPT", "TARGETS", "SOURCE"]
    row = next(line for line in lines if line.startswith("fold-bn-into-conv "))
    assert " rule " in row and "spec/rules/batchnorm.hqp:" in row
    assert any(" pass " in line for line in lines[1:]) or len(passes()) == len(lines) - 1
    code, out, _ = _run(main_rules, ["list", "--rules-only"])
    assert code == 0 and all(" rule " in line for line in out.splitlines()[1:])


def test_list_with_pass_file(good_file):
    code, out, _ = _run(main_rules, ["list", "--rules-only", "--pass-file", str(good_file)])
    assert code == 0 and f"{good_file}:1" in out and "cli-test-neg-neg" in out


def test_check_good_and_bad(good_file, tmp_path):
    code, out, err = _run(main_rules, ["check", str(good_file)])
    assert code == 0 and "ok (1 rule: cli-test-neg-neg)" in out
    code, out, err = _run(main_rules, ["check"] + [str(p) for p in sorted((REPO / "spec" / "rules").glob("*.hqp"))])
    assert code == 0 and out.count(": ok (") == 4
    bad = HERE / "bad" / "misspelled_op.hqp"
    code, out, err = _run(main_rules, ["check", str(good_file), str(bad)])
    assert code == 1
    assert "did you mean 'BatchNormalization'?" in err and "^" in err and "1 error(s)" in err
    code, _, err = _run(main_rules, ["check", str(tmp_path / "missing.hqp")])
    assert code == 1 and "no such rule file" in err


def test_show_and_explain(good_file):
    code, out, _ = _run(main_rules, ["show", "merge-clips"])
    assert code == 0 and out.startswith("# spec/rules/activations.hqp:") and "rule merge-clips" in out
    code, _, err = _run(main_rules, ["show", "merge-clip"])
    assert code == 2 and "did you mean 'merge-clips'" in err
    digits = REPO / "examples" / "digits" / "digits_cnn.onnx"
    code, out, _ = _run(main_rules, ["explain", str(digits), "fold-bn-into-conv", "fold-mul-into-conv"])
    assert code == 0
    assert "rule fold-bn-into-conv: fired 9 time(s)" in out
    assert "rule fold-mul-into-conv: did not fire" in out and "failed:" in out
    code, out, _ = _run(main_rules, ["explain", str(digits), "cli-test-neg-neg", "--pass-file", str(good_file)])
    assert code == 0 and "no Neg node in the graph" in out


def test_usage_errors():
    assert _run(main_rules, [])[0] == 2
    assert _run(main_rules, ["frobnicate"])[0] == 2
    assert _run(main_rules, ["--help"])[0] == 0
    code, _, err = _run(main_rules, ["explain", "nope.onnx", "not-a-rule"])
    assert code == 2 and "no rule named 'not-a-rule'" in err


def test_main_cli_dispatches_rules():
    code, out, _ = _run(main, ["rules", "list", "--rules-only"])
    assert code == 0 and "eliminate-identity-op" in out


def test_load_pass_file_registers_once(good_file):
    (cls,) = load_pass_file(good_file)
    assert issubclass(cls, RulePass) and get_pass("cli-test-neg-neg") is cls
    assert cls.source == f"{good_file}:1" and cls.info.description == "Neg(Neg(x)) is x"
    assert load_pass_file(good_file) == [cls]  # loading the same file again is harmless


def test_load_pass_file_errors(tmp_path):
    clash = tmp_path / "clash.hqp"
    clash.write_text(GOOD.replace("cli-test-neg-neg", "fold-bn-into-conv"))
    with pytest.raises(RuleError) as info:
        load_pass_file(clash)
    assert isinstance(info.value, HqpcError)
    assert str(info.value).startswith(f"{clash}:1:6: rule 'fold-bn-into-conv' clashes with the existing pass")
    other = tmp_path / "other.hqp"
    other.write_text(GOOD.replace("cli-test-neg-neg", "eliminate-noop-ops"))  # a Python pass
    with pytest.raises(RuleError, match="clashes with the existing pass 'eliminate-noop-ops'"):
        load_pass_file(other)
    with pytest.raises(RuleError, match="no such rule file"):
        load_pass_file(tmp_path / "absent.hqp")
    broken = tmp_path / "broken.hqp"
    broken.write_text("rule x {\n  match { y = Relu(x) }\n  replace y x\n}\n")
    with pytest.raises(RuleError) as info:
        load_pass_file(broken)
    assert str(info.value) == (f"{broken}:3:13: expected 'with' after 'replace y' (write: replace y with NEW), "
                               "found 'x'")


def test_cli_pass_file_error_exit_code(tmp_path):
    broken = tmp_path / "broken.hqp"
    broken.write_text("rule x {\n  match { y = Relu(x) }\n  replace y x\n}\n")
    digits = REPO / "examples" / "digits" / "digits_cnn.onnx"
    code, _, err = _run(main, [str(digits), "--pass-file", str(broken), "--pipeline", "x"])
    assert code == 2 and f"{broken}:3:13: expected 'with'" in err
