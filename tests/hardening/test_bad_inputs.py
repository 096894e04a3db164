"""The bad-input corpus (tests/bad_inputs/, written by tools/make_bad_inputs.py) through the CLI.

Every case runs in-process through ``hqpc.cli.main`` on a private copy of the corpus:

* exit 2: exactly one stderr line, ``hqpc: error: ...`` containing the case's substrings (the
  file and the node/tensor/key at fault), no traceback, nothing on stdout, no output file;
* exit 0 (legal inputs: old opsets, dynamic dims, external data, zero-size tensors, ...): a
  valid output model that computes what the input computes;
* always: the corpus copy is byte-for-byte unchanged and has no new files.

A few cases also run as real processes, and the external-data cases are checked to read nothing
outside the model's folder (Python audit hook on ``open``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest

from hqpc.cli import main
from hqpc.ir import Model
from hqpc.runtime import ort as ort_rt
from tests.conftest import REPO

CORPUS = REPO / "tests" / "bad_inputs"
CASES = tomllib.loads((CORPUS / "EXPECTED.toml").read_text(encoding="utf-8"))["case"]


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if case.get("xfail") else []
        yield pytest.param(case, id=case["id"], marks=marks)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (symlinks not followed) with its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def corpus(tmp_path) -> Path:
    copy = tmp_path / "corpus"
    shutil.copytree(CORPUS, copy, symlinks=True)
    return copy


def expand(args: list[str], corpus: Path, out: Path) -> list[str]:
    return [a.replace("{corpus}", str(corpus)).replace("{out}", str(out)) for a in args]


def assert_one_line_error(err: str, needles) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    line = lines[0]
    assert line.startswith("hqpc: error: "), line
    assert "Traceback" not in err and "internal error" not in line, line
    missing = [n for n in needles if n not in line]
    assert not missing, f"message lacks {missing}: {line}"
    return line


def assert_same_function(input_path: Path, output_path: Path) -> None:
    """The compiled model computes what the (normalized) input computes, on seeded inputs."""
    reference = Model.load(input_path).proto
    compiled = onnx.load(output_path)
    onnx.checker.check_model(compiled)
    feeds = ort_rt.random_feeds(reference, seed=1, batch=2)
    expected = ort_rt.run(reference, feeds)
    got = ort_rt.run(compiled, {k: v for k, v in feeds.items() if k in {i.name for i in compiled.graph.input}})
    assert sorted(expected) == sorted(got)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_corpus_is_up_to_date():
    """The committed corpus is exactly what tools/make_bad_inputs.py writes."""
    spec = importlib.util.spec_from_file_location("make_bad_inputs", REPO / "tools" / "make_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_bad_inputs", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    expected = module.corpus()
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file()}
    assert on_disk == set(expected), "rerun python tools/make_bad_inputs.py"
    stale = [rel for rel, data in expected.items() if (CORPUS / rel).read_bytes() != data]
    assert not stale, f"rerun python tools/make_bad_inputs.py (stale: {stale})"
    assert sum(len(d) for d in expected.values()) < 200_000, "the corpus must stay commit-sized"


@pytest.mark.parametrize("case", list(_params()))
def test_corpus_case(case, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    args = expand(case["args"], corpus, out)
    if not case.get("own_output"):
        args += ["-o", str(out / "out.onnx"), "--report", str(out / "report.json")]
    before = snapshot(corpus)
    code = main(args)
    stdout, err = capsys.readouterr()
    assert snapshot(corpus) == before, "the corpus (inputs) changed or gained files"
    assert "Traceback" not in err and "internal error" not in err, err
    assert code == case["exit"], f"exit {code}, expected {case['exit']}; stderr: {err.strip()}"
    if code == 2:
        assert_one_line_error(err, case["message"])
        assert stdout == ""
        assert sorted(p.name for p in out.rglob("*")) == [], "an output was written despite the error"
        return
    report = json.loads((out / "report.json").read_text())
    for record in report["passes"]:
        assert not record["rolled_back"], f"{record['name']} rolled back: {record['error']}"
        if record["modified"]:
            assert record["checks"]["guard"]["status"] == "passed", record
    model_arg = Path(args[0])
    assert_same_function(model_arg, out / "out.onnx")


# --------------------------------------------------------------------------- reads outside the model folder
_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace"))))


sys.addaudithook(_audit)


def _external_model(folder: Path, location: str) -> Path:
    proto = onnx.load(CORPUS / "models" / "external_ok" / "model.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked-folder"])
def test_external_data_outside_the_model_folder_is_never_read(kind, tmp_path, capsys):
    global _OPENED
    secret = tmp_path / "secret.bin"
    shutil.copy(CORPUS / "models" / "external_ok" / "weights.bin", secret)  # valid data: only the check refuses it
    folder = tmp_path / "a" / "b"
    if kind == "dotdot":
        path = _external_model(folder, "../../secret.bin")
    elif kind == "absolute":
        path = _external_model(folder, str(secret))
    elif kind == "symlink":
        path = _external_model(folder, "weights.bin")
        (folder / "weights.bin").symlink_to(secret)
    else:
        path = _external_model(folder, "sub/secret.bin")
        (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
    out = tmp_path / "out"
    _OPENED = []
    try:
        code = main([str(path), "-o", str(out / "o.onnx"), "--report", str(out / "r.json")])
    finally:
        opened, _OPENED = _OPENED, None
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_line_error(err, ["model.onnx", "external data location", "not a file inside"])
    resolved = {str(Path(p).resolve()) for p in opened if p}
    assert str(secret.resolve()) not in resolved, "the file outside the model folder was opened"
    assert not out.exists()


def test_external_data_inside_the_folder_through_dotdot_is_fine(tmp_path, capsys):
    folder = tmp_path / "m"
    path = _external_model(folder, "sub/../weights.bin")
    shutil.copy(CORPUS / "models" / "external_ok" / "weights.bin", folder / "weights.bin")
    (folder / "sub").mkdir()
    code = main([str(path), "-o", str(tmp_path / "o.onnx"), "-q"])
    assert code == 0, capsys.readouterr().err
    assert_same_function(CORPUS / "models" / "external_ok" / "model.onnx", tmp_path / "o.onnx")


# --------------------------------------------------------------------------- the guard's inputs
def test_guard_never_passes_on_an_empty_batch(corpus, tmp_path, capsys):
    """A data spec with an empty calibration split ([split] calib = 0, the default): the guard
    falls back to seeded random inputs instead of comparing zero samples."""
    spec = corpus / "data" / "calib0.toml"
    spec.write_text('[data]\nimages = "images"\n')
    report = tmp_path / "r.json"
    code = main([str(corpus / "ok.onnx"), "--data", str(spec), "-o", str(tmp_path / "o.onnx"),
                 "--report", str(report), "-q"])
    assert code == 0, capsys.readouterr().err
    guarded = [p for p in json.loads(report.read_text())["passes"] if p["modified"]]
    assert guarded and all(p["checks"]["guard"]["status"] in ("passed", "skipped") for p in guarded)
    assert json.loads(report.read_text())["guard_inputs"].startswith("random")
    from hqpc.compiler import guard_feeds_factory
    from hqpc.runtime.data import DataSpec

    feeds, _ = guard_feeds_factory(DataSpec.load(spec), seed=0, batch=4)
    assert all(v.shape[0] > 0 for v in feeds(Model.load(corpus / "ok.onnx")).values())


# --------------------------------------------------------------------------- real processes
@pytest.mark.parametrize("case_id", ["external_escape", "truncated"])
def test_as_a_real_process(case_id, corpus, tmp_path):
    case = next(c for c in CASES if c["id"] == case_id)
    out = tmp_path / "out"
    args = expand(case["args"], corpus, out) + ["-o", str(out / "o.onnx")]
    proc = subprocess.run([sys.executable, "-m", "hqpc", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, case["message"])
    assert not out.exists()


# --------------------------------------------------------------------------- the DSL's bad-rule corpus, through the CLI
DSL_BAD = sorted((REPO / "tests" / "dsl" / "bad").glob("*.hqp"))


@pytest.mark.skipif(not DSL_BAD, reason="tests/dsl/bad/ (the DSL's bad-rule corpus) not present")
@pytest.mark.parametrize("rule_file", DSL_BAD, ids=lambda p: p.stem)
def test_dsl_bad_rule_files_through_the_cli(rule_file, tmp_path, capsys):
    """``hqpc MODEL --pass-file BAD.hqp``: exit 2, one line naming file:line:col and the problem,
    no output; ``hqpc rules check BAD.hqp``: exit 1 (check found errors), no traceback."""
    expect = rule_file.read_text(encoding="utf-8").splitlines()[0].removeprefix("# EXPECT: ").strip()
    out = tmp_path / "o.onnx"
    code = main([str(CORPUS / "ok.onnx"), "--pass-file", str(rule_file), "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert_one_line_error(err, [f"{rule_file}:", expect])
    assert not out.exists()
    code = main(["rules", "check", str(rule_file)])
    stdout, err = capsys.readouterr()
    assert code == 1, stdout + err
    assert "Traceback" not in stdout + err and "internal error" not in stdout + err


def test_output_symlinked_to_the_input_is_refused(corpus, tmp_path, capsys):
    link = tmp_path / "link.onnx"
    link.symlink_to(corpus / "ok.onnx")
    before = snapshot(corpus)
    code = main([str(corpus / "ok.onnx"), "-o", str(link)])
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_line_error(err, ["refusing to overwrite"])
    assert snapshot(corpus) == before and link.is_symlink()
