"""reconstruct: least-squares refit of the consumers of pruned groups."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hqpc.compiler import CompileOptions, compile_model
from hqpc.ir import Model
from hqpc.passes.channel_groups import analyze
from hqpc.passes.prune_channels import apply_plan
from hqpc.passes.reconstruct import _Normal, consumers_of_plan, reconstruct_model
from hqpc.runtime.ort import run
from tests.conftest import REPO


def correlated_model(seed: int = 0, gemm: bool = False) -> onnx.ModelProto:
    """x -> Conv(16) -> Relu -> Conv 3x3 (8) [-> GlobalAveragePool -> Flatten -> Gemm (5)]; the 16
    channels are mixtures of 6 sources, so removed channels are predictable from kept ones."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(16, 6)) @ rng.normal(size=(6, 3))
    w1 = mix.reshape(16, 3, 1, 1).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 16, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c"], pads=[1, 1, 1, 1])]
    out_shape = [None, 8, 8, 8]
    if gemm:
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (5, 8)).astype(np.float32), "wg"),
                  numpy_helper.from_array(np.zeros(5, np.float32), "bg")]
        nodes += [helper.make_node("Relu", ["c"], ["rc"]), helper.make_node("GlobalAveragePool", ["rc"], ["p"]),
                  helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1)]
        out_shape = [None, 5]
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return Model.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)).proto


def _error(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    return float(np.mean((run(a, {"x": x})["y"] - run(b, {"x": x})["y"]) ** 2))


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_refit_reduces_error_on_new_data(mode):
    proto = correlated_model()
    groups = analyze(proto)
    gid = [g.id for g in groups.prunable if g.channels == 16][0]
    plan = {gid: tuple(range(0, 16, 2))}
    pruned = apply_plan(proto, groups, plan)
    consumers, out_kept = consumers_of_plan(groups, plan)
    rng = np.random.default_rng(1)
    calib, test = rng.normal(size=(64, 3, 8, 8)).astype(np.float32), rng.normal(size=(32, 3, 8, 8)).astype(np.float32)
    refit, records = reconstruct_model(pruned, proto, consumers, calib, out_kept=out_kept, mode=mode, rows=4096)
    assert records and all(r["refit"] for r in records)
    before, after = _error(proto, pruned, test), _error(proto, refit, test)
    assert after < 0.25 * before, (before, after)
    onnx.checker.check_model(refit, full_check=True)


def test_refit_through_gemm_consumer():
    proto = correlated_model(seed=3, gemm=True)
    groups = analyze(proto)
    plan = {g.id: tuple(range(g.channels // 2)) for g in groups.prunable}
    pruned = apply_plan(proto, groups, plan)
    consumers, out_kept = consumers_of_plan(groups, plan)
    assert set(consumers) == {"Conv_2", "Gemm_6"} and "Conv_2" in out_kept  # conv2 loses outputs too
    rng = np.random.default_rng(2)
    calib, test = rng.normal(size=(256, 3, 8, 8)).astype(np.float32), rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    refit, records = reconstruct_model(pruned, proto, consumers, calib, out_kept=out_kept)
    assert _error(proto, refit, test) < _error(proto, pruned, test)


def test_ridge_solver_matches_lstsq():
    rng = np.random.default_rng(0)
    a = np.hstack([rng.normal(size=(500, 6)), np.ones((500, 1))])
    z = a @ rng.normal(size=(7, 3)) + 0.01 * rng.normal(size=(500, 3))
    normal = _Normal(7, 3)
    normal.add(a, z, False)
    w = normal.solver(np.zeros((7, 3)), full=False)(1e-10)
    expected = np.linalg.lstsq(a, z, rcond=None)[0]
    assert np.allclose(w, expected, atol=1e-6)
    # lambda -> infinity keeps the starting weights (bias row excepted)
    w0 = rng.normal(size=(7, 3))
    assert np.allclose(normal.solver(w0, full=False)(1e8)[:-1], w0[:-1], atol=1e-4)


def test_pass_pipeline_on_digits(tmp_path):
    """prune-channels then reconstruct (the unpruned model comes from the compile context):
    the refit is guarded (runs, shapes, no NaN) and records held-out top-1 with and without."""
    result = compile_model(CompileOptions(
        model=str(REPO / "examples" / "digits" / "digits_cnn.onnx"), data=REPO / "examples" / "digits" / "digits.toml",
        pipeline="prune-channels{fraction=0.5},reconstruct{images=96,rows=2048}",
        extra={"contract": False}))  # the passes' own result, not the model the accuracy contract emits
    prune_record, recon_record = result.records
    assert prune_record.modified and not prune_record.rolled_back
    assert recon_record.modified and not recon_record.rolled_back, recon_record.error
    info = result.model.annotations["reconstruct"]
    assert info["heldout_metric"] == "top1"
    assert info["top1_with"] >= info["top1_without"] - 2.0
    assert any(r["refit"] for r in info["consumers"])
