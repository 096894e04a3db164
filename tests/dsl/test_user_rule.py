"""Acceptance: a user rule written from the reference works through --pass-file and is
guarded numerically (a broken variant is rolled back)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from .helpers import HERE, model_from_text
from hqpc.cli import main
from hqpc.registry import unregister_pass

RULES = HERE / "user_rules" / "channel_mul.hqp"
MODEL = '''<ir_version: 8, opset_import: ["" : 17]>
conv_mul (float[2, 3, 8, 8] x) => (float[2, 4, 8, 8] out)
<float[4, 3, 3, 3] w, float[4] b, float[1, 4, 1, 1] s>
{
    [conv] y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    [scale] out = Mul (s, y)
}
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "conv_mul.onnx"
    model_from_text(MODEL, "user-rule").save(path)
    yield path
    for name in ("user-fold-channel-mul", "user-fold-channel-mul-wrong"):
        unregister_pass(name)


def _hqpc(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_user_rule_through_pass_file(model_file, tmp_path):
    report = tmp_path / "report.json"
    code, out, err = _hqpc(model_file, "--pass-file", RULES, "--pipeline", "user-fold-channel-mul",
                           "--emit=text", "--report", report)
    assert code == 0, err
    assert "[conv] out = Conv <pads: ints = [1, 1, 1, 1]> (x," in out and "Mul" not in out
    passes = json.loads(report.read_text())["passes"]
    (record,) = [p for p in passes if p["name"] == "user-fold-channel-mul"]
    assert record["modified"] and not record["rolled_back"]
    assert record["checks"]["guard"]["ok"] and record["checks"]["verify"]["ok"]


def test_broken_user_rule_is_rolled_back(model_file, tmp_path):
    report = tmp_path / "report.json"
    code, out, err = _hqpc(model_file, "--pass-file", RULES, "--pipeline", "user-fold-channel-mul-wrong",
                           "--emit=text", "--report", report)
    assert "Mul (s, y)" in out  # unchanged model emitted
    passes = json.loads(report.read_text())["passes"]
    (record,) = [p for p in passes if p["name"] == "user-fold-channel-mul-wrong"]
    assert record["rolled_back"] and "numeric guard" in record["error"]


def test_verbose_trace_for_a_rule_that_does_not_fire(tmp_path):
    path = tmp_path / "no_bias.onnx"
    model_from_text(MODEL.replace("(x, w, b)", "(x, w)").replace(", float[4] b", ""), "no-bias").save(path)
    try:
        code, out, err = _hqpc(path, "--pass-file", RULES, "--pipeline", "user-fold-channel-mul-wrong",
                               "--emit=text", "-v")
    finally:
        for name in ("user-fold-channel-mul", "user-fold-channel-mul-wrong"):
            unregister_pass(name)
    assert code == 0
    assert "rule user-fold-channel-mul-wrong: did not fire (1 Mul candidate(s))" in err
    assert "has no input 2 ('b')" in err and "channel_mul.hqp:18:" in err
