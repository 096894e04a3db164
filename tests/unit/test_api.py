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
