"""CLI contract: exit codes, one-line errors, no output on failure, the input never overwritten."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from hqpc.cli import main
from hqpc.registry import register_pass, unregister_pass
from tests.unit.test_passmanager import ScaleWeights, tiny_model


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), path)
    return path


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hqpc: error:")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_compiles_and_writes_report(model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    report = tmp_path / "r.json"
    code, _, err = run_cli([model_file, "-O1", "-o", out, "--report", report], capsys)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(out))
    data = json.loads(report.read_text())
    assert data["schema"] == 1 and data["input"]["path"] == str(model_file)
    assert data["output"]["path"] == str(out) and data["summary"]["nodes_after"] <= data["summary"]["nodes_before"]


def test_default_output_is_beside_the_input(model_file, capsys):
    code, _, _ = run_cli([model_file, "-q"], capsys)
    assert code == 0 and (model_file.parent / "tiny.hqp.onnx").exists()


@pytest.mark.parametrize("content, needle", [
    (b"this is not a protobuf at all \x00\xff\xfe", "not an ONNX model"),
    (b"", "empty file"),
])
def test_non_onnx_input(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    code, _, err = run_cli([path, "-o", tmp_path / "o.onnx"], capsys)
    assert code == 2
    assert_one_line_error(err, str(path), needle)
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_input(model_file, tmp_path, capsys):
    data = model_file.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli([path, "-o", tmp_path / "o.onnx"], capsys)
    assert code == 2
    assert_one_line_error(err, str(path))
    assert not (tmp_path / "o.onnx").exists()


def test_missing_input(tmp_path, capsys):
    code, _, err = run_cli([tmp_path / "nope.onnx"], capsys)
    assert code == 2
    assert_one_line_error(err, "nope.onnx", "no such file")


def test_unknown_target(model_file, tmp_path, capsys):
    code, _, err = run_cli([model_file, "--target", "tpu9", "-o", tmp_path / "o.onnx"], capsys)
    assert code == 2
    assert_one_line_error(err, "unknown target 'tpu9'", "cpu", "orin")
    assert not (tmp_path / "o.onnx").exists()


def test_malformed_data_toml(model_file, tmp_path, capsys):
    toml = tmp_path / "d.toml"
    toml.write_text("[data]\nnpz = \n")
    code, _, err = run_cli([model_file, "--data", toml, "-o", tmp_path / "o.onnx"], capsys)
    assert code == 2
    assert_one_line_error(err, "d.toml")
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(model_file, capsys):
    before = model_file.read_bytes()
    code, _, err = run_cli([model_file, "-o", model_file], capsys)
    assert code == 2
    assert_one_line_error(err, "refusing to overwrite")
    assert model_file.read_bytes() == before


def test_output_equal_to_input_through_another_spelling(model_file, capsys):
    before = model_file.read_bytes()
    other = model_file.parent / "." / model_file.name
    code, _, err = run_cli([model_file, "-o", other], capsys)
    assert code == 2 and model_file.read_bytes() == before


def test_bad_arguments_are_one_line(model_file, capsys):
    code, _, err = run_cli([model_file, "-O7"], capsys)
    assert code == 2
    assert_one_line_error(err, "-O")
    code, _, err = run_cli([model_file, "--pipeline", "fold-bn{"], capsys)
    assert code == 2
    assert_one_line_error(err, "pipeline column")
    code, _, err = run_cli([model_file, "--disable-pass", "no-such-pass"], capsys)
    assert code == 2
    assert_one_line_error(err, "unknown pass 'no-such-pass'")


def test_strict_turns_a_rollback_into_exit_1(model_file, tmp_path, capsys):
    register_pass(ScaleWeights)
    try:
        out, report = tmp_path / "o.onnx", tmp_path / "r.json"
        code, _, err = run_cli([model_file, "--pipeline", "test-scale-weights", "-o", out, "--report", report], capsys)
        assert code == 0 and "rolled back" in err
        entry = json.loads(report.read_text())["passes"][0]
        assert entry["rolled_back"] and entry["checks"]["guard"]["ok"] is False
        # the emitted model is the input model: the failing pass never reaches the output
        assert onnx.load(out).graph.initializer[0].float_data or onnx.load(out).graph.initializer[0].raw_data
        code, _, err = run_cli([model_file, "--pipeline", "test-scale-weights", "-o", out, "--strict"], capsys)
        assert code == 1 and "test-scale-weights" in err
    finally:
        unregister_pass("test-scale-weights")


def test_emit_text_to_stdout(model_file, capsys):
    code, out, _ = run_cli([model_file, "--emit", "text", "-q"], capsys)
    assert code == 0 and "Relu" in out and "ir_version" in out


def test_console_script_runs_as_a_process(model_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hqpc", str(tmp_path / "missing.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such file" in proc.stderr
