"""Shared fixtures and the golden-graph collector (tests/golden/*.onnxtxt)."""
from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_MODELS = SHARED_DATA / "models"


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite the .expected files of golden cases that store a full expected graph")


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".onnxtxt":
        return GoldenFile.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True, scope="session")
def measurement_cache(tmp_path_factory):
    """Latency measurements that passes reuse (passes/precision.py, ``$HQPC_MEASURE_CACHE``) go
    to a folder of this session, never to the user's ``~/.cache``; subprocesses inherit it."""
    import os

    folder = tmp_path_factory.mktemp("measurements")
    previous = os.environ.get("HQPC_MEASURE_CACHE")
    os.environ["HQPC_MEASURE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("HQPC_MEASURE_CACHE", None)
    else:
        os.environ["HQPC_MEASURE_CACHE"] = previous


@pytest.fixture
def shared_models() -> Path:
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"real models not available: {SHARED_MODELS} is absent")
    return SHARED_MODELS


class GoldenFile(pytest.File):
    def collect(self):
        yield GoldenItem.from_parent(self, name=self.path.stem)


class GoldenItem(pytest.Item):
    """Build the case's model, run its RUN line in-process, check exit code, rollbacks, CHECKs."""

    def runtest(self):
        from hqpc.cli import main
        from hqpc.golden import GoldenCase, filecheck

        case = GoldenCase.parse(self.path)
        tmp = Path(self.config._tmp_path_factory.mktemp(self.path.stem))
        model_path = tmp / f"{self.path.stem}.onnx"
        model_path.write_bytes(case.build_model().SerializeToString())
        argv = [arg.replace("%s", str(model_path)) for arg in shlex.split(case.run)]
        if not argv or argv[0] != "hqpc":
            raise AssertionError(f"{self.path}: RUN line must start with 'hqpc'")
        report_path = tmp / "report.json"
        argv = argv[1:] + ["--report", str(report_path), "-q"]
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
        if code != case.expect_exit:
            raise AssertionError(f"exit code {code}, expected {case.expect_exit}; stderr: {stderr.getvalue().strip()}")
        if report_path.exists():
            report = json.loads(report_path.read_text())
            rolled = [p["name"] for p in report["passes"] if p["rolled_back"]]
            if sorted(rolled) != sorted(case.expect_rollback):
                details = {p["name"]: p["error"] for p in report["passes"] if p["rolled_back"]}
                raise AssertionError(f"rolled back {rolled}, expected {case.expect_rollback}: {details}")
            guarded = [p for p in report["passes"] if p["modified"]]
            for p in guarded:
                assert p["checks"].get("guard", {}).get("ok"), f"pass {p['name']} modified without a passing guard"
        filecheck(stdout.getvalue() + stderr.getvalue() if case.expect_exit else stdout.getvalue(),
                  case.checks, source=str(self.path))
        expected = self.path.with_suffix(".expected")
        if expected.exists():
            if self.config.getoption("--update-goldens"):
                expected.write_text(stdout.getvalue())
            elif stdout.getvalue() != expected.read_text():
                raise AssertionError(f"output differs from {expected.name} (pytest --update-goldens accepts it)")

    def repr_failure(self, excinfo):
        return f"{self.path.name}: {excinfo.value}"

    def reportinfo(self):
        return self.path, 0, f"golden: {self.path.name}"
