"""report.html (hqpc.report_html): a static page with tables and embedded charts; matplotlib
optional; written by --report-html and write_outputs."""
from __future__ import annotations

import base64
import html.parser
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hqpc
from hqpc import report_html as R
from hqpc.cli import main
from tests.unit.test_passmanager import tiny_model

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits" / "digits_cnn.onnx"


class _Checker(html.parser.HTMLParser):
    """Counts tags and checks that every opened table/tr/td/th/h*/p is closed."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.srcs = [], {}, []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def parse(text: str) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    assert checker.stack == []
    return checker


def conv_models():
    """(original, compiled): a Conv with 8 output channels; the compiled one keeps 6 and reads
    its weight through DequantizeLinear (as insert-qdq emits it)."""
    def model(nodes, inits, c):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    original = model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                     [numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w")], 8)
    compiled = model([helper.make_node("DequantizeLinear", ["wq", "s"], ["wd"], name="dq", axis=0),
                      helper.make_node("Conv", ["x", "wd"], ["y"], name="conv")],
                     [numpy_helper.from_array(np.ones((6, 3, 1, 1), np.int8), "wq"),
                      numpy_helper.from_array(np.ones(6, np.float32), "s")], 6)
    return original, compiled


def rich_report() -> dict:
    report = hqpc.compile(tiny_model(), level=1).report
    report["annotations"] = {
        "sensitivity": {"channels": {"conv": [0.1] * 8}, "tensors": {"w": {"int8": 2e-6, "int4": 1e-4, "fp16": 0.0}},
                        "method": {"layers": {"conv": {"weight": "w"}}}},
        "precision": {"plan": {"conv": "int8"}, "reasons": {}, "latency": {"conv": {"int8": 0.25, "fp32": 0.5}},
                      "latency_source": "ORT profiler"},
        "prune": {"metric": "top1", "budget": 1.0,
                  "history": [{"step": 0, "accepted": True, "speedup": 1.0, "top1": 90.0},
                              {"step": 1, "accepted": True, "speedup": 1.4, "top1": 89.6},
                              {"step": 2, "accepted": False, "speedup": 1.9, "top1": 87.0}]}}
    report["contract"] = {"metric": "top1", "baseline_top1": 90.0, "final_top1": 89.4, "drop": 0.6, "max_drop": 1.0,
                          "met": True, "pipeline_met": True, "walked_back": False, "emitted": "compiled",
                          "eval_images": 100, "latency_ms": {"baseline": 2.0, "final": 0.8}, "latency_ratio": 0.4,
                          "latency_speedup": 2.5, "size_ratio": 0.3, "budget_split": {"pruning": 0.4, "quantization": 0.2},
                          "actions": []}
    return report


def test_layer_rows_channels_precision_sensitivity_latency():
    original, compiled = conv_models()
    (row,) = R.layer_rows(rich_report(), compiled, original)
    assert row["name"] == "conv" and row["op"] == "Conv"
    assert (row["channels"], row["channels_original"]) == (6, 8)
    assert row["precision"] == "int8" and row["sens_int8"] == 2e-6 and row["channel_score"] == pytest.approx(0.1)
    assert row["latency_ms"] == 0.25 and row["latency_share"] == 1.0
    # without protos: layers from the annotations, original channels from the Fisher scores
    (row,) = R.layer_rows(rich_report())
    assert row["channels"] is None and row["channels_original"] == 8


@pytest.mark.skipif(not R.matplotlib_available(), reason="matplotlib not installed")
def test_full_page_with_charts():
    original, compiled = conv_models()
    text = R.render_report_html(rich_report(), compiled, original)
    page = parse(text)
    assert page.tags["img"] == 3  # pruning curve, bitwidths, Pareto (from the contract's measurements)
    for src in page.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "6 / 8" in text and "int8" in text and "89.40" in text and "matplotlib is not installed" not in text
    assert not re.search(r"(src|href)=\"(https?:)?//", text)  # nothing fetched from a server


def test_page_without_matplotlib_has_tables_and_a_note(monkeypatch):
    monkeypatch.setattr(R, "_matplotlib", lambda: None)
    original, compiled = conv_models()
    text = R.render_report_html(rich_report(), compiled, original)
    page = parse(text)
    assert "img" not in page.tags and "matplotlib is not installed" in text
    assert page.tags["table"] >= 3 and "6 / 8" in text
    assert R.pareto_figure_png({"m": [{"label": "a", "latency_ms": 1, "top1": 2}]}) is None


def test_bench_points_make_the_pareto_plot(tmp_path):
    points = [{"label": "fp32", "latency_ms": 10.0, "top1": 71.0}, {"label": "int8", "latency_ms": 6.0, "top1": 70.0},
              {"label": "bad", "latency_ms": 12.0, "top1": 69.0}, {"label": "hqpc", "latency_ms": 3.0, "top1": 70.2}]
    assert [p["label"] for p in R.pareto_front(points)] == ["hqpc", "fp32"]
    if R.matplotlib_available():
        png = tmp_path / "p.png"
        assert R.pareto_figure_png({"mobilenet": points}, png) is not None
        assert png.read_bytes()[:4] == b"\x89PNG"
        text = R.render_report_html(rich_report(), bench=points)
        assert "Pareto" in text


def test_cli_writes_report_html_for_the_digits_model(tmp_path, capsys):
    out, page = tmp_path / "d.onnx", tmp_path / "sub" / "report.html"
    assert main([str(DIGITS), "-O1", "-o", str(out), "--report-html", str(page), "-q"]) == 0
    text = page.read_text()
    parse(text)
    assert "/features/features.0/features.0.0/Conv" in text and "fold-bn-into-conv" in text
    assert main([str(DIGITS), "-o", str(out), "--report-html", str(out)]) == 2
    assert "same file" in capsys.readouterr().err


def test_api_writes_report_html_when_outputs_are_written(tmp_path):
    page = tmp_path / "r.html"
    hqpc.compile(tiny_model(), level=1, output=tmp_path / "o.onnx", report_html=page)
    parse(page.read_text())


def test_api_writes_report_html_alone(tmp_path):
    """report_html is enough to write something (like --report-html), and it is checked like an output."""
    page = tmp_path / "only.html"
    result = hqpc.compile(tiny_model(), level=1, report_html=page)
    parse(page.read_text())
    assert result.output_path is None and not (tmp_path / "o.onnx").exists()


def test_page_of_a_walked_back_contract():
    report = rich_report()
    report["contract"] = {"metric": "top1", "baseline_top1": 90.0, "final_top1": 89.5, "pipeline_top1": 87.0,
                          "drop": 0.5, "max_drop": 1.0, "met": True, "pipeline_met": False, "walked_back": True,
                          "emitted": "pruned-fp32", "eval_images": 100, "calib_images": 20,
                          "message": "the pipeline's model dropped 3.00 pt > 1.00 pt; could not meet the budget",
                          "actions": [{"candidate": "pruned-fp32", "what": "the pruned model without quantization",
                                       "top1": 89.5, "drop": 0.5, "within_budget": True, "latency_ms": 1.0}],
                          "latency_ms": {"baseline": 2.0, "final": 1.0}, "latency_ratio": 0.5, "latency_speedup": 2.0}
    text = R.render_report_html(report)
    parse(text)
    assert "NOT MET by the pipeline" in text and "Accuracy contract: walk-back" in text
    assert "&#x27;pruned-fp32&#x27; instead" in text or "'pruned-fp32' instead" in text
