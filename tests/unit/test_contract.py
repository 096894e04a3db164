"""The -O3 accuracy contract (hqpc.contract): measured on held-out images, walked back when the
budget is broken, never a silent budget violation. Tiny generated classifiers + npz data specs,
so every test runs in well under a second."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hqpc import contract as C
from hqpc.compiler import CompileOptions, compile_model
from hqpc.ir import Model
from hqpc.runtime.data import DataSpec

IN, CLASSES, N_CALIB, N_EVAL = 8, 4, 20, 200


def classifier(w: np.ndarray) -> onnx.ModelProto:
    """x [N, 8] -> Gemm(W^T) -> logits [N, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc", transB=1)], "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def setup(tmp_path):
    """(base weights, data spec path, model path): labels are the base model's own predictions,
    so its top-1 is 100 %."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(CLASSES, IN)).astype(np.float32)
    x = rng.normal(size=(N_CALIB + N_EVAL, IN)).astype(np.float32)
    y = (x @ w.T).argmax(1).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "d.toml").write_text(f'[data]\nnpz = "d.npz"\n[split]\nseed = 0\ncalib = {N_CALIB}\neval = {N_EVAL}\n')
    np.savez(tmp_path / "u.npz", x=x)
    (tmp_path / "u.toml").write_text(f'[data]\nnpz = "u.npz"\n[split]\nseed = 0\ncalib = {N_CALIB}\neval = {N_EVAL}\n')
    path = tmp_path / "m.onnx"
    onnx.save(classifier(w), path)
    return w, tmp_path / "d.toml", path


def perturbed(w: np.ndarray, scale: float, seed: int = 1) -> Model:
    rng = np.random.default_rng(seed)
    return Model.load(classifier(w + scale * rng.normal(size=w.shape).astype(np.float32)))


def compiled(path: Path, data: Path | None, max_drop: float = 1.0, **extra):
    options = CompileOptions(model=path, opt_level=1, data=data, max_drop=max_drop,
                             extra={"contract_latency_runs": 3, **extra})
    return compile_model(options), options


def snapshots(cleaned: Model, before_quant: Model | None, specs=("calibrate", "assign-precision", "insert-qdq")):
    snap = C.SnapshotInstrument()
    snap.cleaned, snap.before_quant, snap.quant_specs = cleaned, before_quant, list(specs)
    return snap


def test_met_budget_keeps_the_compiled_model(setup):
    w, data, path = setup
    result, options = compiled(path, data)
    before = result.model
    c = C.enforce_contract(result, options)
    assert c["met"] and c["pipeline_met"] and not c["walked_back"] and c["emitted"] == "compiled"
    assert c["baseline_top1"] == 100.0 and c["final_top1"] == 100.0 and c["drop"] == 0.0
    assert c["eval_images"] == N_EVAL and c["calib_images"] == N_CALIB and c["metric"] == "top1"
    assert result.model is before and result.report["contract"] is c
    assert result.model.annotations["contract"]["met"] is True
    # measured timings stay out of the emitted model (same input + seed -> same bytes)
    assert not [k for k in result.model.annotations["contract"] if "latency" in k or "wall" in k or "load" in k]
    assert c["latency_speedup"] > 0 and c["size_ratio"] == pytest.approx(1.0, abs=0.05)
    assert set(c["budget_split"]) == {"pruning", "quantization"}


def test_cpu_timing_of_a_tensorrt_target_says_it_is_not_the_targets(setup):
    w, data, path = setup
    options = CompileOptions(model=path, opt_level=1, data=data, max_drop=1.0, target="orin",
                             extra={"contract_latency_runs": 3})
    result = compile_model(options)
    c = C.enforce_contract(result, options)
    assert "not the target's latency" in c["latency_note"] and "tensorrt" in c["latency_note"]
    cpu_result, cpu_options = compiled(path, data)
    assert "latency_note" not in C.enforce_contract(cpu_result, cpu_options)


def test_broken_budget_walks_back_to_pruned_float(setup):
    """Pipeline model breaks the budget; the pruned float snapshot is within it: emitted, said plainly."""
    w, data, path = setup
    result, options = compiled(path, data, max_drop=5.0)
    cleaned, pruned, broken = Model.load(str(path)), perturbed(w, 0.05), perturbed(w, 3.0, seed=2)
    result.model = broken
    c = C.enforce_contract(result, options, snapshots=snapshots(cleaned, pruned, specs=()))
    assert not c["pipeline_met"] and c["walked_back"] and c["met"]
    assert c["emitted"] == "pruned-fp32" and c["drop"] <= 5.0 and c["pipeline_top1"] < 95.0
    assert "could not meet the budget" in c["message"] and "pruned-fp32" in c["message"]
    assert [a["candidate"] for a in c["actions"]] == ["pruned-fp32"]
    assert c["budget_split"]["quantization"] == 0.0
    assert result.model is not broken and result.report["contract"]["emitted"] == "pruned-fp32"
    assert result.report["annotations"]["contract"]["walked_back"] is True


def test_requantize_is_tried_first_with_a_tighter_budget(setup, monkeypatch):
    w, data, path = setup
    result, options = compiled(path, data, max_drop=4.0)
    cleaned, pruned, broken = Model.load(str(path)), perturbed(w, 0.02), perturbed(w, 3.0, seed=2)
    result.model = broken
    calls = []

    def fake_recompile(model, opts, specs, max_drop, log, level=None):
        calls.append((specs, max_drop, level))
        return pruned.copy()

    monkeypatch.setattr(C, "_recompile", fake_recompile)
    c = C.enforce_contract(result, options, snapshots=snapshots(cleaned, pruned))
    assert c["emitted"] == "requantize" and c["met"] and c["walked_back"]
    specs, budget, _ = calls[0]
    assert specs == ["calibrate", "assign-precision", "insert-qdq"]
    assert budget <= (4.0 - c["budget_split"]["pruning"]) / 2 + 1e-6


def test_everything_over_budget_falls_back_to_cleanup(setup, monkeypatch):
    w, data, path = setup
    result, options = compiled(path, data, max_drop=0.0)
    cleaned, pruned, broken = Model.load(str(path)), perturbed(w, 2.0, seed=3), perturbed(w, 3.0, seed=2)
    result.model = broken
    monkeypatch.setattr(C, "_recompile", lambda model, opts, specs, max_drop, log, level=None: broken.copy())
    c = C.enforce_contract(result, options, snapshots=snapshots(cleaned, pruned))
    names = [a["candidate"] for a in c["actions"]]
    # no requantize: pruning alone already breaks a budget of 0
    assert names == ["pruned-fp32", "quantized-unpruned", "quantized-unpruned-tighter", "cleaned-fp32"]
    result.model = broken
    c = C.enforce_contract(result, options, snapshots=snapshots(cleaned, pruned))
    assert "recompile-tighter" not in [a["candidate"] for a in c["actions"]]  # off by default
    result.model = broken
    options.extra["contract_retry"] = True
    c = C.enforce_contract(result, options, snapshots=snapshots(cleaned, pruned))
    assert "recompile-tighter" in [a["candidate"] for a in c["actions"]]
    assert c["emitted"] == "cleaned-fp32" and c["drop"] == 0.0 and c["met"]
    assert all(not a["within_budget"] for a in c["actions"][:-1])


def test_without_snapshots_recompiles_the_cleanup(setup):
    w, data, path = setup
    result, options = compiled(path, data, max_drop=0.5)
    result.model = perturbed(w, 3.0, seed=2)
    c = C.enforce_contract(result, options)
    assert c["emitted"] == "cleaned-fp32" and c["met"] and c["final_top1"] == 100.0


def test_unlabeled_data_uses_agreement(setup):
    w, data, path = setup
    result, options = compiled(path, data.with_name("u.toml"))
    c = C.enforce_contract(result, options)
    assert c["metric"] == "agreement" and c["baseline_top1"] == 100.0 and c["met"]


def test_labels_at_chance_level_use_agreement(setup, tmp_path):
    """Labels the input model does not predict above chance (here: the model's own predictions
    shifted by one class) measure nothing; the contract measures agreement instead and says so."""
    w, data, path = setup
    d = np.load(tmp_path / "d.npz")
    np.savez(tmp_path / "s.npz", x=d["x"], y=(d["y"] + 1) % CLASSES)
    (tmp_path / "s.toml").write_text(data.read_text().replace("d.npz", "s.npz"))
    result, options = compiled(path, tmp_path / "s.toml")
    c = C.enforce_contract(result, options)
    assert c["metric"] == "agreement" and c["baseline_top1"] == 100.0 and "not above chance" in c["labels_ignored"]
    result, options = compiled(path, data)
    assert "labels_ignored" not in C.enforce_contract(result, options)


def test_no_data_is_not_checked(setup):
    w, data, path = setup
    result, options = compiled(path, None)
    c = C.enforce_contract(result, options)
    assert c["met"] is None and "no --data" in c["reason"]
    assert result.report["contract"]["met"] is None


def test_heldout_excludes_pruning_search_images(setup):
    w, data, path = setup
    spec = DataSpec.load(data)
    ds, text = C.heldout_dataset(spec, {"prune": {"images": {"search": 50}}})
    assert len(ds) == N_EVAL - 50 and "50" in text
    assert set(ds.indices).isdisjoint(spec.split("eval").indices[:50])
    assert set(ds.indices).isdisjoint(spec.split("calib").indices)
    assert len(C.heldout_dataset(spec, {})[0]) == N_EVAL
    # a search that recorded no images (no step accepted) used the pass's default: half the split
    assert len(C.heldout_dataset(spec, {"prune": {"history": [{"step": 0}], "plan": {}}})[0]) == N_EVAL // 2


def test_contract_applies():
    opts = CompileOptions(model="m.onnx", opt_level=3)
    assert C.contract_applies(opts)
    assert not C.contract_applies(CompileOptions(model="m.onnx", opt_level=2))
    assert C.contract_applies(CompileOptions(model="m.onnx", opt_level=2, data=Path("d.toml")))
    assert not C.contract_applies(CompileOptions(model="m.onnx", opt_level=1, data=Path("d.toml")))
    assert not C.contract_applies(CompileOptions(model="m.onnx", opt_level=3, pipeline="prune"))
    assert not C.contract_applies(CompileOptions(model="m.onnx", opt_level=3, extra={"contract": False}))


def test_snapshot_instrument_records_stages(setup):
    """Run a real pipeline with the instrument: cleaned before the first lossy/quant pass,
    before_quant before calibrate, and the quant specs that ran."""
    w, data, path = setup
    from hqpc.passmanager import PassContext, PassManager
    from hqpc.registry import get_pass
    from hqpc.target import load_target

    snap = C.SnapshotInstrument()
    ctx = PassContext(opt_level=2, target=load_target("cpu"), data=DataSpec.load(data), instruments=[snap],
                      config={"max_drop": 1.0})
    model = Model.load(str(path))
    PassManager([get_pass("eliminate-dead-code")(), get_pass("calibrate")()], ctx).run(model)
    assert snap.cleaned is not None and snap.before_quant is not None
    assert snap.quant_specs == ["calibrate"]
    assert "calibration" not in snap.before_quant.annotations and "calibration" in model.annotations


def test_fixed_batch_models_are_evaluated(tmp_path):
    """Models with a fixed batch dim of 1 are run one image at a time."""
    w = np.eye(CLASSES, IN, dtype=np.float32)
    proto = classifier(w)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    x = np.random.default_rng(0).normal(size=(7, IN)).astype(np.float32)
    pred = C.predictions(proto, x, threads=1)
    assert pred.tolist() == (x @ w.T).argmax(1).tolist()


# --------------------------------------------------------------------------- through the driver, CLI and API
from hqpc.passmanager import Pass, PassInfo  # noqa: E402
from hqpc.runtime.compare import Tolerance  # noqa: E402


class PerturbWeights(Pass):
    """A lossy test pass: adds seeded noise of ``scale`` (pipeline option, else the
    ``perturb_scale`` extra option) to every weight; its reference is its own result."""

    info = PassInfo("test-perturb-weights", opt_level=2, tolerance=Tolerance(atol=1e-6, rtol=1e-6))
    options = {"scale": -1.0}

    def run(self, model, ctx):
        scale = self.config["scale"] if self.config["scale"] >= 0 else float(ctx.config.get("perturb_scale", 0.0))
        if scale == 0:
            return False
        rng = np.random.default_rng(2)
        for t in model.proto.graph.initializer:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((a + scale * rng.normal(size=a.shape)).astype(a.dtype), t.name))
        return True

    def reference(self, before, after, ctx):
        return after.copy()


@pytest.fixture
def perturb(monkeypatch):
    """The test pass registered, and -O3 = fold-constants, test-perturb-weights, eliminate-dead-code."""
    from hqpc import registry

    registry.register_pass(PerturbWeights)
    monkeypatch.setitem(registry.PIPELINES, 3, ["fold-constants", "test-perturb-weights", "eliminate-dead-code"])
    yield
    registry.unregister_pass(PerturbWeights.info.name)


def _weights(path) -> np.ndarray:
    return numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])


def test_o3_cli_walks_back_and_says_so(setup, perturb, tmp_path, capsys):
    """The -O3 pipeline breaks the budget: the CLI emits the clean-up result, the report and the
    summary say plainly that the budget was not met by the pipeline and what was emitted."""
    from hqpc.cli import main

    w, data, path = setup
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    # the fixture's labels are the input's own predictions: any noticeable perturbation costs points
    code = main([str(path), "-O3", "--data", str(data), "--max-drop", "1.0", "-o", str(out), "--report", str(rep)])
    assert code == 0
    err = capsys.readouterr().err
    import json

    report = json.loads(rep.read_text())
    c = report["contract"]
    # the default perturb_scale is 0: nothing changed, budget met
    assert c["emitted"] == "compiled" and c["met"] and c["drop"] == 0.0
    # a perturbation that breaks the budget, in the -O3 pipeline, set through an API keyword option
    import hqpc

    result = hqpc.compile(path, level=3, data=data, max_drop=1.0, output=out, report=rep, perturb_scale=3.0,
                          contract_latency_runs=3)
    c = result.report["contract"]
    assert not c["pipeline_met"] and c["walked_back"] and c["met"] and c["emitted"] == "cleaned-fp32"
    assert c["pipeline_top1"] < 99.0 - 1.0 and c["final_top1"] == 100.0 and c["drop"] <= 1.0
    assert [a["candidate"] for a in c["actions"]] == ["cleaned-fp32"]
    np.testing.assert_array_equal(_weights(out), w)  # the emitted file is the model the contract chose
    saved = json.loads(rep.read_text())
    assert saved["contract"]["emitted"] == "cleaned-fp32" and saved["annotations"]["contract"]["emitted"] == "cleaned-fp32"
    assert "pipeline_annotations" in saved and saved["summary"]["bytes_after"] == len(result.model.serialized())
    assert err  # the first run printed its summary


def test_o3_cli_summary_names_the_emitted_model(setup, perturb, tmp_path, capsys):
    from hqpc.cli import main

    w, data, path = setup
    out = tmp_path / "o.onnx"
    assert main([str(path), "-O3", "--data", str(data), "--pipeline", "fold-constants,test-perturb-weights{scale=3}",
                 "--max-drop", "0.5", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "NOT MET by the pipeline's model" in err and "'cleaned-fp32' instead" in err
    assert "contract: the pipeline's model dropped" in err
    np.testing.assert_array_equal(_weights(out), w)
    # -q: nothing on stderr, same model
    assert main([str(path), "-O3", "--data", str(data), "--pipeline", "fold-constants,test-perturb-weights{scale=3}",
                 "--max-drop", "0.5", "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(_weights(out), w)


def test_explicit_pipeline_with_a_small_change_keeps_it(setup, perturb, tmp_path):
    import hqpc

    w, data, path = setup
    result = hqpc.compile(path, pipeline="test-perturb-weights{scale=0.001}", data=data, max_drop=1.0,
                          contract_latency_runs=0)
    c = result.report["contract"]
    assert c["met"] and c["emitted"] == "compiled" and not c["walked_back"]
    assert not np.array_equal(numpy_helper.to_array(result.model.proto.graph.initializer[0]), w)
    # no data, or the contract switched off: no contract in the report
    assert "contract" not in hqpc.compile(path, pipeline="test-perturb-weights{scale=3}").report
    off = hqpc.compile(path, pipeline="test-perturb-weights{scale=3}", data=data, contract=False)
    assert "contract" not in off.report
    # unlabelled data and an explicit pipeline: not applied (the brief: labelled eval split)
    assert "contract" not in hqpc.compile(path, pipeline="test-perturb-weights{scale=3}",
                                          data=data.with_name("u.toml")).report


def test_o3_without_data_reports_not_checked(setup, perturb):
    import hqpc

    w, data, path = setup
    c = hqpc.compile(path, level=3).report["contract"]
    assert c["met"] is None and "no --data" in c["reason"]


def test_o3_contract_on_a_real_pipeline_is_deterministic(setup, tmp_path):
    """The real -O3 pipeline (no test pass) on the tiny classifier: contract reported, same bytes twice."""
    import hqpc

    w, data, path = setup
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        result = hqpc.compile(path, level=3, data=data, max_drop=1.0, output=out, contract_latency_runs=3)
        outs.append(onnx.load(str(out)))
    c = result.report["contract"]
    assert c["met"] and c["eval_images"] > 0 and c["baseline_top1"] == 100.0
    for key in ("baseline_top1", "final_top1", "drop", "latency_ratio", "size_ratio", "budget_split", "actions"):
        assert key in c, key
    # same graph, and the contract's metadata holds no timings (the precision plan's annotation
    # records measured per-layer latencies, so whole-file bytes are compared elsewhere)
    assert outs[0].graph.SerializeToString(deterministic=True) == outs[1].graph.SerializeToString(deterministic=True)
    meta = [{p.key: p.value for p in o.metadata_props}["hqpc.contract"] for o in outs]
    assert meta[0] == meta[1] and "latency" not in meta[0] and "wall" not in meta[0]
