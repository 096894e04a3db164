"""Zoo sweep (fast CI subset; the full sweep is bench/zoo_sweep.py and the slow tests below).

Each run compiles a zoo model through the CLI; every pass of the pipeline must either apply with
its numeric guard passing, leave the model unchanged, or decline with a stated reason; nothing
may be rolled back and the exit code must be 0. The classification is bench/zoo_sweep.py's.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from hqpc.cli import main
from tests.conftest import REPO


def _load_sweep():
    spec = importlib.util.spec_from_file_location("zoo_sweep", REPO / "bench" / "zoo_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("zoo_sweep", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()
MODELS = sweep.zoo_models()


def compile_and_classify(model: Path, level: int, target: str, tmp_path: Path, capsys, data: Path | None = None):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    argv = [str(model), f"-O{level}", "--target", target, "-o", str(out), "--report", str(report)]
    if data is not None:
        argv += ["--data", str(data)]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err and "internal error" not in err
    outcomes = sweep.classify(json.loads(report.read_text()), err)
    assert outcomes, "no pass ran"
    return outcomes


def assert_contract(outcomes) -> None:
    rolled = {o.name: o.reason for o in outcomes if o.status == "ROLLED BACK"}
    assert not rolled, f"rolled back: {rolled}"
    for o in outcomes:
        assert o.status in ("applied", "applied*", "no change", "declined", "missing"), o
        if o.status == "declined":
            assert o.reason, f"{o.name} declined without a reason"


FAST = ["squeezenet", "shufflenet"]


@pytest.mark.parametrize("target", ["cpu", "orin"])
@pytest.mark.parametrize("name", FAST)
def test_fast_subset_O1(name, target, tmp_path, capsys):
    outcomes = compile_and_classify(MODELS[name], 1, target, tmp_path, capsys)
    assert_contract(outcomes)
    applied = {o.name for o in outcomes if o.status == "applied"}
    assert "fold-constants" in applied, outcomes  # the light models build their weights with ConstantOfShape


def test_fast_subset_O2_with_random_calibration_data(tmp_path, capsys):
    """A static batch of 1 (like every onnx zoo model) with --data batches: compiled with a free
    batch (hqpc/batch.py), so the data-driven passes run and none rolls back."""
    data = sweep.random_data_spec(MODELS["squeezenet"], tmp_path / "data")
    outcomes = compile_and_classify(MODELS["squeezenet"], 2, "cpu", tmp_path, capsys, data=data)
    assert_contract(outcomes)
    assert {o.name: o.status for o in outcomes}["calibrate"] in ("applied*", "no change")


def test_fast_subset_O3_with_random_calibration_data(tmp_path, capsys):
    """-O3 on random data: the labels are noise, so the pruning search measures agreement with
    the input model instead of reading 0 % -> 0 % top-1 as a free pass; nothing rolls back."""
    data = sweep.random_data_spec(MODELS["shufflenet"], tmp_path / "data")
    outcomes = compile_and_classify(MODELS["shufflenet"], 3, "orin", tmp_path, capsys, data=data)
    assert_contract(outcomes)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["contract"]["metric"] == "agreement" and "labels_ignored" in report["contract"]
    prune = report["annotations"].get("prune") or {}
    assert prune.get("metric", "agreement") == "agreement"


def test_classification_covers_every_outcome():
    report = {"passes": [
        {"name": "a", "skipped": "", "rolled_back": False, "modified": True, "checks": {"guard": {"status": "passed"}}},
        {"name": "b", "skipped": "", "rolled_back": False, "modified": True,
         "checks": {"guard": {"status": "skipped", "reason": "analysis pass"}}},
        {"name": "c", "skipped": "", "rolled_back": False, "modified": False, "checks": {}},
        {"name": "d", "skipped": "not for target 'cpu'", "rolled_back": False, "modified": False, "checks": {}},
        {"name": "e", "skipped": "", "rolled_back": True, "modified": False, "error": "numeric guard: y", "checks": {}},
    ], "missing_passes": ["f"]}
    got = [(o.name, o.status, o.reason) for o in sweep.classify(report, "c: nothing to fold\n")]
    assert got == [("a", "applied", ""), ("b", "applied*", "analysis pass"), ("c", "no change", "nothing to fold"),
                   ("d", "declined", "not for target 'cpu'"), ("e", "ROLLED BACK", "numeric guard: y"),
                   ("f", "missing", "not in this build")]


# --------------------------------------------------------------------------- the full sweep (slow)
def _full():
    for name in MODELS:
        for level in (1, 2, 3):
            for target in ("cpu", "orin"):
                yield pytest.param(name, level, target, id=f"{name}-O{level}-{target}")


@pytest.mark.slow
@pytest.mark.parametrize("name, level, target", list(_full()))
def test_full_sweep(name, level, target, tmp_path, capsys):
    model = MODELS[name]
    data = sweep.random_data_spec(model, tmp_path / "data")
    assert_contract(compile_and_classify(model, level, target, tmp_path, capsys, data=data))
