"""The Python API mirrors the CLI."""
from __future__ import annotations

import json

import onnx
import pytest

import hqpc
from hqpc.errors import OutputError, TargetError
from tests.unit.test_passmanager import tiny_model


def test_compile_in_memory_and_to_files(tmp_path):
    result = hqpc.compile(tiny_model(), level=1)
    assert result.output_path is None and result.report["summary"]["nodes_after"] == 2
    onnx.checker.check_model(result.model.to_proto())
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    result = hqpc.compile(tiny_model(), level=1, output=out, report=report)
    assert result.output_path == out and onnx.load(out).graph.node
    assert json.loads(report.read_text())["output"]["path"] == str(out)


def test_compile_errors_are_hqpc_errors(tmp_path):
    with pytest.raises(TargetError):
        hqpc.compile(tiny_model(), target="nope")
    path = tmp_path / "m.onnx"
    onnx.save(tiny_model(), path)
    with pytest.raises(OutputError):
        hqpc.compile(path, output=path)


def test_bad_arguments_raise_hqpc_errors(tmp_path):
    from hqpc.errors import HqpcError

    for kwargs in ({"level": 4}, {"max_drop": -1}, {"max_drop": float("nan")}, {"seed": -1}, {"emit": "plan"}):
        with pytest.raises(HqpcError):
            hqpc.compile(tiny_model(), **kwargs)
    with pytest.raises(OutputError):
        hqpc.compile(tiny_model(), output=tmp_path / "x", report=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_disable_accepts_a_comma_separated_string():
    result = hqpc.compile(tiny_model(), level=1, disable="fold-constants,eliminate-dead-code")
    skipped = {r["name"] for r in result.report["passes"] if r["skipped"] == "disabled"}
    assert {"fold-constants", "eliminate-dead-code"} <= skipped


def _readme_python_blocks() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def _run_readme_block(block: str, tmp_path, monkeypatch) -> dict:
    from pathlib import Path

    (tmp_path / "examples").symlink_to(Path(__file__).resolve().parents[2] / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    return namespace


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    blocks = _readme_python_blocks()
    assert len(blocks) == 2 and "level=1" in blocks[0] and "level=3" in blocks[1]
    namespace = _run_readme_block(blocks[0], tmp_path, monkeypatch)
    assert (tmp_path / "digits.hqp.onnx").exists() and json.loads((tmp_path / "digits_report.json").read_text())
    assert namespace["proto"].graph.node and "nodes_after" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_o3_api_example_meets_the_contract(tmp_path, monkeypatch, capsys):
    """The README's -O3 example (about 30 s): contract reported, budget met or said plainly."""
    namespace = _run_readme_block(_readme_python_blocks()[1], tmp_path, monkeypatch)
    c = namespace["contract"]
    assert c["met"] is True and c["drop"] <= 1.5 and c["eval_images"] > 0
    assert c["walked_back"] == (c["emitted"] != "compiled")
    assert (tmp_path / "digits_report.html").read_text().startswith("<!DOCTYPE html>")
    saved = json.loads((tmp_path / "digits_report.json").read_text())
    assert saved["contract"]["emitted"] == c["emitted"] and saved["output"]["path"] == "digits.hqp.onnx"
