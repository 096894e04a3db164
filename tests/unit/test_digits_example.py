"""Checks on the small real model shipped in ``examples/digits``.

The model and data are produced by ``examples/digits/train_digits.py``; these
tests only read the committed artefacts (no torch needed).
"""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

DIGITS_DIR = Path(__file__).resolve().parents[2] / "examples/digits"
MODEL_PATH = DIGITS_DIR / "digits_cnn.onnx"
SPEC_PATH = DIGITS_DIR / "digits.toml"


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    """The shipped ONNX model."""
    return onnx.load(str(MODEL_PATH))


@pytest.fixture(scope="module")
def spec() -> dict:
    """The shipped data spec (TOML)."""
    with SPEC_PATH.open("rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="module")
def data(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """The shipped, already preprocessed held-out images and labels."""
    with np.load(DIGITS_DIR / spec["data"]["npz"]) as npz:
        return npz["x"], npz["y"]


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Map each tensor name to the node producing it."""
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Map each tensor name to the nodes consuming it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _ancestors(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> set[str]:
    """Names of all nodes upstream of ``node``."""
    seen: set[str] = set()
    stack = [node]
    while stack:
        for name in stack.pop().input:
            parent = producers.get(name)
            if parent is not None and parent.name not in seen:
                seen.add(parent.name)
                stack.append(parent)
    return seen


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}


def test_files_are_small() -> None:
    total = sum(p.stat().st_size for p in DIGITS_DIR.rglob("*") if p.is_file())
    assert MODEL_PATH.stat().st_size < 1_000_000
    assert total < 3_000_000


def test_model_is_valid_and_loadable(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 13  # loadable by onnxruntime
    opsets = {op.domain: op.version for op in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 17


def test_io_signature(model: onnx.ModelProto) -> None:
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param  # dynamic batch
    assert [d.dim_value for d in in_dims[1:]] == [3, 32, 32]
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == 10


def test_has_unfolded_batchnorm(model: onnx.ModelProto) -> None:
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bns
    producers = _producers(model.graph)
    assert any(producers[bn.input[0]].op_type == "Conv" for bn in bns)


def test_has_depthwise_conv(model: onnx.ModelProto) -> None:
    inits = _initializers(model.graph)
    depthwise = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = inits[node.input[1]]
        in_channels = weight.shape[1] * group
        if group > 1 and group == in_channels == weight.shape[0]:
            depthwise.append(node)
    assert depthwise


def test_has_residual_add(model: onnx.ModelProto) -> None:
    producers = _producers(model.graph)
    residuals = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        parents = [producers.get(name) for name in node.input]
        if any(p is None for p in parents) or parents[0].name == parents[1].name:
            continue  # an input is an initializer / graph input, or same branch twice
        a, b = parents
        # A skip connection: one operand is upstream of the other's branch.
        if a.name in _ancestors(b, producers) or b.name in _ancestors(a, producers):
            residuals.append(node)
    assert residuals


def test_has_hard_activations(model: onnx.ModelProto) -> None:
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"HardSigmoid", "HardSwish"}


def test_has_squeeze_excitation(model: onnx.ModelProto) -> None:
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    pools = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    se_pools = [p for p in pools
                if any(c.op_type == "Conv" for c in consumers.get(p.output[0], []))]
    assert se_pools
    # The gate (HardSigmoid) must rescale the feature map the pool read.
    gated_muls = []
    for node in graph.node:
        if node.op_type != "Mul":
            continue
        parents = [producers.get(name) for name in node.input]
        if any(p is not None and p.op_type == "HardSigmoid" for p in parents):
            gated_muls.append(node)
    assert gated_muls
    pooled_inputs = {p.input[0] for p in se_pools}
    assert any(set(m.input) & pooled_inputs for m in gated_muls)


def test_spec_matches_data(spec: dict, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    assert x.dtype == np.float32 and x.shape[1:] == (3, 32, 32)
    assert y.dtype == np.int64 and y.shape == (x.shape[0],)
    assert spec["split"]["calib"] + spec["split"]["eval"] <= x.shape[0]
    assert set(np.unique(y)) == set(range(10))


def test_onnxruntime_accuracy(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    assert logits.shape == (x.shape[0], 10)
    accuracy = float((logits.argmax(axis=1) == y).mean())
    assert accuracy > 0.9


def _contract_run(tmp_path: Path, level: str, *extra: str) -> tuple[dict, str]:
    import json

    from hqpc.cli import main

    out, report, page = tmp_path / "d.onnx", tmp_path / "d.json", tmp_path / "d.html"
    code = main([str(MODEL_PATH), level, "--target", "cpu", "--data", str(SPEC_PATH), "-o", str(out),
                 "--report", str(report), "--report-html", str(page), *extra])
    assert code == 0
    assert page.read_text().startswith("<!DOCTYPE html>")
    return json.loads(report.read_text()), str(out)


def _check_contract(report: dict, out: str, max_drop: float) -> dict:
    c = report["contract"]
    assert c["metric"] == "top1" and c["eval_images"] > 0 and c["calib_images"] == 150
    assert c["met"] is True and c["drop"] <= max_drop + 1e-9 and c["max_drop"] == max_drop
    assert c["walked_back"] == (c["emitted"] != "compiled") and c["message"]
    assert c["latency_ratio"] > 0 and c["size_ratio"] > 0 and set(c["budget_split"]) >= {"pruning", "quantization"}
    # the emitted file is the model the contract measured: re-measure its top-1 on the same images
    from hqpc import contract as C
    from hqpc.ir import Model
    from hqpc.runtime.data import DataSpec

    ds, _ = C.heldout_dataset(DataSpec.load(SPEC_PATH), Model.load(out).annotations)
    x, y = ds.arrays()
    assert len(x) == c["eval_images"]
    top1, _ = C.evaluate(onnx.load(out), x, y, None, threads=1)
    assert round(top1, 3) == c["final_top1"]
    return c


def test_o2_with_data_runs_the_contract(tmp_path: Path, capsys) -> None:
    """-O2 with --data on the shipped model (a few seconds): contract measured and reported."""
    report, out = _contract_run(tmp_path, "-O2", "--max-drop", "1.0")
    _check_contract(report, out, 1.0)
    assert "baseline top-1" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_o3_command_meets_the_budget(tmp_path: Path, capsys) -> None:
    """The README's first command (-O3, default budget 1.0): the drop on the held-out images is within
    the budget, or the summary says plainly what was emitted instead."""
    report, out = _contract_run(tmp_path, "-O3")
    c = _check_contract(report, out, 1.0)
    err = capsys.readouterr().err
    assert ("NOT MET by the pipeline" in err) == (not c["pipeline_met"])
