"""The terminal summary (hqpc.summary): pass table, result block, contract lines, -q silence."""
from __future__ import annotations

import io
import json

import onnx

import hqpc
from hqpc.cli import main
from hqpc.summary import pass_rows, print_summary, result_lines
from tests.unit.test_passmanager import tiny_model


def _report(**extra) -> dict:
    report = hqpc.compile(tiny_model(), level=1).report
    report.update(extra)
    return report


def _text(report, verbosity=1) -> str:
    stream = io.StringIO()
    print_summary(report, stream, verbosity)
    return stream.getvalue()


def test_pass_table_folds_unchanged_passes():
    report = _report()
    changed = [r["name"] for r in report["passes"] if r["modified"]]
    rows = pass_rows(report)
    assert [r[0] for r in rows if r[1] == "changed"] == changed
    assert rows[-1][0].startswith("(") and rows[-1][1] == "no change"
    assert len(pass_rows(report, verbose=True)) == len(report["passes"])
    text = _text(report)
    assert "passes" in text and "result (-O1, target cpu)" in text and "\x1b[" not in text  # no colour off a tty
    assert all(name in _text(report, verbosity=2) for name in (r["name"] for r in report["passes"]))


def test_quiet_prints_nothing():
    assert _text(_report(), verbosity=0) == ""


def test_rolled_back_pass_is_named_with_its_reason():
    report = _report()
    report["passes"][0].update(rolled_back=True, modified=False, error="guard: output y differs")
    report["summary"]["rolled_back"] = [report["passes"][0]["name"]]
    text = _text(report)
    assert "ROLLED BACK" in text and "guard: output y differs" in text


def test_contract_lines_met_and_walked_back():
    contract = {"metric": "top1", "baseline_top1": 71.8, "final_top1": 70.6, "drop": 1.2, "max_drop": 1.5,
                "met": True, "pipeline_met": True, "walked_back": False, "eval_images": 250, "calib_images": 300,
                "latency_ms": {"baseline": 10.0, "final": 3.0}, "latency_ratio": 0.3, "latency_speedup": 3.33,
                "size_ratio": 0.25, "budget_split": {"pruning": 0.9, "quantization": 0.3}, "actions": []}
    text = _text(_report(contract=contract))
    for needle in ("71.80", "70.60", "1.20 pt (budget 1.50 pt: met)", "250 held-out", "3.33× faster",
                   "75.0 % smaller", "pruning 0.90 pt, quantization 0.30 pt"):
        assert needle in text, needle
    assert "NOT MET" not in text and "emitted" not in text
    contract.update(pipeline_met=False, walked_back=True, emitted="pruned-fp32", pipeline_top1=69.4,
                    message="the pipeline's model dropped 2.40 pt > 1.50 pt; could not meet the budget",
                    actions=[{"candidate": "requantize", "what": "quantization again", "top1": 69.9, "drop": 1.9,
                              "within_budget": False},
                             {"candidate": "pruned-fp32", "what": "the pruned model without quantization",
                              "top1": 70.6, "drop": 1.2, "within_budget": True}])
    lines = {label: (value, style) for label, value, style in result_lines(_report(contract=contract))}
    assert lines["budget"][0] == "NOT MET by the pipeline's model (drop 2.40 pt > 1.50 pt)"
    assert lines["emitted"][0].startswith("'pruned-fp32' instead: the pruned model without quantization")
    assert "within the budget" in lines["emitted"][0] and lines["drop"][1] == "yellow"
    assert lines["tried"][0] == "requantize 1.90 pt, pruned-fp32 1.20 pt"
    text = _text(_report(contract=contract))
    assert "NOT MET by the pipeline" in text and "'pruned-fp32' instead" in text
    contract.update(latency_speedup=0.8, latency_ratio=1.25)
    assert "1.25× slower" in _text(_report(contract=contract))
    contract["latency_note"] = "not the target's latency: laid out for tensorrt"
    lines = {label: value for label, value, _ in result_lines(_report(contract=contract))}
    assert "batch 1); not the target's latency: laid out for tensorrt" in lines["latency"]
    unchecked = {label: value for label, value, _ in result_lines(_report(contract={"met": None, "reason": "no --data"}))}
    assert "not checked: no --data" in unchecked["accuracy contract"]


def test_annotation_lines_without_contract():
    report = _report()
    report["annotations"] = {"precision": {"plan": {"a": "int8", "b": "int8", "c": "fp32"}},
                             "prune": {"metric": "top1", "final": {"speedup": 2.5, "heldout_top1_original": 90.0,
                                                                   "heldout_top1_reconstructed": 89.2,
                                                                   "heldout_images": 250}}}
    labels = {label: value for label, value, _ in result_lines(report)}
    assert labels["precision"] == "2 int8, 1 fp32"
    assert "2.50×" in labels["pruning"] and "90.00 → 89.20" in labels["pruning"]


def test_cli_prints_summary_and_q_silences_it(tmp_path, capsys):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), path)
    assert main([str(path), "-o", str(tmp_path / "o.onnx")]) == 0
    err = capsys.readouterr().err
    assert "passes" in err and "result (-O1" in err and "wrote" in err
    assert main([str(path), "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_summary_of_a_saved_report(tmp_path, capsys):
    from hqpc.summary import main as summary_main

    path = tmp_path / "r.json"
    path.write_text(json.dumps(_report()))
    assert summary_main([str(path)]) == 0
    assert "result (-O1" in capsys.readouterr().out
