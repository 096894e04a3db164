"""-O1 on the real shared models through the CLI: every pass guarded, logits unchanged on real
images (1e-4 relative to the logit scale), node count not growing."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from hqpc.cli import main
from hqpc.runtime.data import DataSpec
from hqpc.runtime.ort import run
from tests.conftest import REPO, SHARED_MODELS

SPECS = {
    "mobilenet_v2": "imagenet_mobilenet.toml",
    "mobilenet_v3_small": "imagenet_mobilenet.toml",
    "cifar10_resnet20": "cifar10_resnet.toml",
    "cifar10_resnet56": "cifar10_resnet.toml",
}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(SPECS))
def test_o1_keeps_logits_on_real_images(name, shared_models, tmp_path, capsys):
    source = shared_models / f"{name}.onnx"
    spec_path = REPO / "examples" / "data" / SPECS[name]
    out, report_path = tmp_path / "m.onnx", tmp_path / "r.json"
    code = main([str(source), "-O1", "-o", str(out), "--report", str(report_path), "--data", str(spec_path), "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["guard_inputs"] == "calibration"
    assert [p["name"] for p in report["passes"]] == report["pipeline"].split(",")
    for entry in report["passes"]:
        assert not entry["rolled_back"], entry
        if entry["modified"]:
            assert entry["checks"]["guard"]["ok"] and entry["checks"]["verify"]["ok"]
    assert report["summary"]["nodes_after"] <= report["summary"]["nodes_before"]

    x, _ = DataSpec.load(spec_path).split("eval").arrays(limit=16)
    reference = run(onnx.load(source), {"input": x})["logits"]
    compiled = run(onnx.load(out), {"input": x})["logits"]
    scale = np.abs(reference).max()
    assert np.abs(compiled - reference).max() <= 1e-4 * scale
    assert np.array_equal(compiled.argmax(1), reference.argmax(1))
