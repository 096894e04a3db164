"""prune (the search) and its cost model, on the shipped digits CNN (fast) and the latency
helpers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from hqpc.compiler import CompileOptions, compile_model
from hqpc.ir import Model
from hqpc.passes.channel_groups import analyze
from hqpc.passes.prune_channels import apply_plan
from hqpc.passes.prune_search import CostModel, Prune, fisher_scores, paired_sigma
from hqpc.passmanager import PassContext
from hqpc.runtime import latency as lat
from hqpc.target import load_target
from tests.conftest import REPO

DIGITS = REPO / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = REPO / "examples" / "digits" / "digits.toml"
SENS = "annotate-sensitivity{samples=64,precisions=fp16},"
NO_CONTRACT = {"contract": False}  # the pass's own result, not the model the -O3 accuracy contract emits
FAST = "prune{max_steps=2,latency_runs=5,recon_rows=2048,recon_images=96,score_images=32,reconstruct=true}"


def test_search_on_digits_stays_within_budget():
    result = compile_model(CompileOptions(model=str(DIGITS), data=DIGITS_DATA, max_drop=2.0, extra=NO_CONTRACT,
                                          pipeline=SENS + FAST + ",reconstruct{rows=2048,images=96}"))
    records = {r.name: r for r in result.records}
    prune, recon = records["prune"], records["reconstruct"]
    assert not prune.rolled_back and not recon.rolled_back, (prune.error, recon.error)
    info = result.model.annotations["prune"]
    from hqpc.registry import passes

    expected = "fisher+probe" if "annotate-sensitivity" in passes() else "kl-probe"
    assert info["score_source"] == expected and info["metric"] == "top1"
    if info.get("plan"):
        assert info["estimate"]["form"] == "flips" and info["estimate"]["temperature"] is None
    history = info["history"]
    assert history[0]["step"] == 0 and len(history) >= 2
    for entry in history[1:]:
        assert {"step", "accepted", "channels_removed", "latency_est_us", "latency_ms", "speedup", "top1", "drop",
                "sigma", "drop_est", "sigma_est", "changed", "flip_ratio", "flips_est", "estimate",
                "moves"} <= set(entry)
        if entry["accepted"]:
            assert entry["drop_est"] + entry["sigma_est"] <= 2.0 + 1e-3
            assert entry["drop"] + entry["sigma"] <= 2.0 + 1e-3
    if prune.modified:
        assert prune.checks["guard"]["ok"]
        multiple = load_target("cpu").channel_multiple
        assert all(k % multiple == 0 for k in info["kept"].values())
        assert info["images"]["search"] + info["images"]["heldout"] == 250
        onnx.checker.check_model(result.model.proto, full_check=True)
        assert "top1_with" in result.model.annotations["reconstruct"]


def test_heldout_curve_records_without_changing_decisions():
    """heldout_curve=true adds the held-out top-1 of every accepted step (the frontier bench reads
    it) and nothing else: the same steps are proposed and accepted."""
    runs = []
    for extra in ("", ",heldout_curve=true"):
        result = compile_model(CompileOptions(model=str(DIGITS), data=DIGITS_DATA, max_drop=2.0, extra=NO_CONTRACT,
                                              pipeline=SENS + FAST.replace("}", extra + "}")))
        runs.append(result.model.annotations["prune"])
    plain, curve = runs
    assert [(e["accepted"], e.get("moves")) for e in plain["history"]] == \
        [(e["accepted"], e.get("moves")) for e in curve["history"]]
    assert not any("heldout_top1" in e for e in plain["history"])
    accepted = [e for e in curve["history"] if e["accepted"]]
    assert accepted and all(0.0 <= e["heldout_top1"] <= 100.0 for e in accepted)
    assert not any("heldout_top1" in e for e in curve["history"] if not e["accepted"])
    if curve.get("plan"):  # the last accepted step is the final model: same held-out figure as the report's
        assert accepted[-1]["heldout_top1"] == pytest.approx(curve["final"]["heldout_top1_reconstructed"], abs=1e-3)
    assert curve["history"][0]["heldout_top1"] == pytest.approx(
        curve["final"].get("heldout_top1_original", curve["history"][0]["heldout_top1"]), abs=1e-3)


def test_labels_carry_signal():
    from hqpc.runtime.metrics import labels_carry_signal

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, 200)
    assert not labels_carry_signal(rng.integers(0, 1000, 200), labels)          # random: chance level
    assert labels_carry_signal(np.where(rng.random(200) < 0.3, labels, 0), labels)  # 30 % right
    assert not labels_carry_signal(np.array([3, 4]), np.array([5, 6]), classes=1000)  # 0 of 2
    assert not labels_carry_signal(np.array([1, 0]), np.array([1, 1]), classes=2)  # 50 % of 2 classes


def test_search_with_random_labels_measures_agreement(tmp_path):
    """Random labels (zoo models with random calibration data): the search must not read 0 % ->
    0 % as "no drop" and prune freely; it measures agreement with the input model."""
    d = np.load(DIGITS_DATA.with_name("digits.npz"))
    np.savez(tmp_path / "r.npz", x=d["x"], y=np.random.default_rng(0).permutation(d["y"]))
    spec = tmp_path / "r.toml"
    spec.write_text(DIGITS_DATA.read_text().replace("digits.npz", "r.npz"))
    logs: list[str] = []
    result = compile_model(CompileOptions(model=str(DIGITS), data=spec, max_drop=2.0, extra=NO_CONTRACT,
                                          pipeline=FAST.replace("max_steps=2", "max_steps=1")), log=logs.append)
    info = result.model.annotations["prune"]
    assert info["metric"] == "agreement" and info["history"][0]["agreement"] == 100.0
    assert any("labels carry no signal" in line for line in logs)


def test_search_with_probes_on_digits():
    result = compile_model(CompileOptions(model=str(DIGITS), data=DIGITS_DATA, max_drop=2.0, extra=NO_CONTRACT,
                                          pipeline=SENS.replace("64", "16") + FAST.replace("}", ",scores=probe,max_steps=1}")))
    record = result.records[-1]
    assert record.name == "prune" and not record.rolled_back, record.error
    assert result.model.annotations["prune"]["score_source"] == "kl-probe"


def test_posterior_estimate_option_on_digits():
    result = compile_model(CompileOptions(model=str(DIGITS), data=DIGITS_DATA, max_drop=2.0, extra=NO_CONTRACT,
                                          pipeline=SENS.replace("64", "16")
                                          + FAST.replace("}", ",max_steps=1,estimate=posterior,moves=chunks}")))
    record = result.records[-1]
    assert record.name == "prune" and not record.rolled_back, record.error
    info = result.model.annotations["prune"]
    assert all(e["estimate"] == "posterior" for e in info["history"][1:])
    if info.get("plan"):
        assert info["estimate"]["form"] == "posterior" and info["estimate"]["temperature"] > 0


def test_block_aligned_moves_never_remove_channels_that_save_nothing():
    proto = Model.load(DIGITS).proto
    groups = analyze(proto)
    cost = CostModel(groups, proto, block=16)
    cost.rebase({name: 1.0 for name, *_ in cost.nodes}, {})
    prune = Prune()
    prune._search = {"fisher": None, "prober": None, "saliency": {}, "banned": set(), "costs": {}}
    prune._unit_order = lambda groups, gid, kept: kept
    for group in groups.prunable:
        gains = [0.0]
        for kept, gain in prune._options(groups, cost, {}, group.id, 8):
            assert len(kept) % 8 == 0 and gain > gains[-1]
            more = tuple(range(len(kept) + 8))  # keeping 8 more channels ...
            if len(more) < group.channels and len(kept) % 16 == 0:
                assert cost.saving(group.id, {}, more) < gain  # ... saves less
            gains.append(gain)


def test_search_without_data_is_a_no_op():
    result = compile_model(CompileOptions(model=str(DIGITS), pipeline="prune"))
    assert not result.records[0].modified and not result.records[0].rolled_back


def test_quantization_reserve():
    p = Prune()
    ctx = PassContext(opt_level=3, config={"max_drop": 1.0})
    budget, reserve = p._budget(ctx)
    from hqpc.registry import passes

    if "insert-qdq" in passes():
        assert (budget, reserve) == pytest.approx((0.7, 0.3))
    ctx = PassContext(opt_level=3, config={"max_drop": 1.0}, disabled=frozenset({"insert-qdq"}))
    assert p._budget(ctx) == (1.0, 0.0)
    ctx = PassContext(opt_level=3, config={"max_drop": 2.0, "quant_reserve": 0.5})
    if "insert-qdq" in passes():
        assert p._budget(ctx) == pytest.approx((1.0, 1.0))


def test_cost_model_savings_follow_channel_blocks():
    proto = Model.load(DIGITS).proto
    groups = analyze(proto)
    cost = CostModel(groups, proto, block=16)
    cost.rebase({n.name: 10.0 for n in proto.graph.node}, {})
    big = max(groups.prunable, key=lambda g: g.channels)
    half = tuple(range(big.channels // 2))
    assert cost.saving(big.id, {}, half) > 0
    assert cost.saving(big.id, {}, tuple(range(big.channels - 8))) == 0  # same number of 16-blocks
    assert cost.total({big.id: half}) < cost.total({})


def test_fisher_scores_follow_the_annotation_contract():
    """The mapping from annotations["sensitivity"]["channels"][node] (one score per output
    channel of the *current* model) to group channels, before and after pruning."""
    proto = Model.load(DIGITS).proto
    groups = analyze(proto)
    group = [g for g in groups.prunable if len(g.producers) == 1][0]
    node = group.producers[0]
    scores = {node: list(np.arange(group.channels, dtype=float))}
    for g in groups.prunable:
        for p in g.producers:
            scores.setdefault(p, [1.0] * g.channels)
    got = fisher_scores(groups, scores, {}, [group.id])
    assert np.allclose(got[group.id], np.arange(group.channels))
    plan = {group.id: tuple(range(1, group.channels, 2))}
    pruned_scores = {**scores, node: list(np.arange(len(plan[group.id])) * 10.0)}
    got = fisher_scores(groups, pruned_scores, plan, [group.id])
    assert got[group.id][1] == 0.0 and got[group.id][3] == 10.0  # kept unit k -> current position
    assert fisher_scores(groups, {}, {}, [group.id]) is None


def test_drop_estimate_uses_changed_predictions():
    from hqpc.passes.prune_search import DropEstimate

    labels = np.ones(100, int)
    base = np.zeros(100, int)           # the original model is wrong everywhere ...
    pred = np.zeros(100, int)
    pred[:16] = 1                       # ... and the candidate fixes 16 images: raw drop -16
    out = DropEstimate(labeled=True).add(pred, base, labels)
    assert out["estimate"] == "flips"
    assert out["drop_est"] == pytest.approx(8.0) and out["sigma_est"] == pytest.approx(2.0)
    assert out["changed"] == pytest.approx(0.16)
    unlabeled = DropEstimate(labeled=False).add(pred, base, None)
    assert unlabeled["drop_est"] == pytest.approx(16.0) and unlabeled["sigma_est"] == pytest.approx(4.0)


def test_posterior_drop_estimate_prices_flips_by_confidence():
    from hqpc.passes.prune_search import DropEstimate

    n = 100
    posterior = np.zeros((n, 3))
    posterior[:, 0] = 0.9
    posterior[:, 1] = 0.1
    posterior[:50] = [0.5, 0.5, 0.0]    # the original model cannot tell class 0 from 1 here
    base = np.zeros(n, int)
    labels = np.ones(n, int)            # labels are never read by the estimate
    uncertain = base.copy()
    uncertain[:10] = 1                  # 10 flips of coin-toss predictions: no expected loss
    out = DropEstimate(True, 0.5, posterior).add(uncertain, base, labels)
    assert out["estimate"] == "posterior" and out["drop_est"] == pytest.approx(0.0)
    assert out["flips_est"] == pytest.approx(5.0)  # the flip rule charges 0.5 per flip
    confident = base.copy()
    confident[50:60] = 1                # 10 flips of 0.9-confident predictions: 0.8 each
    out = DropEstimate(True, 0.5, posterior).add(confident, base, labels)
    c = np.zeros(n)
    c[50:60] = 0.8
    assert out["drop_est"] == pytest.approx(8.0)
    assert out["sigma_est"] == pytest.approx(100 * np.std(c, ddof=1) / np.sqrt(n))
    # without labels the metric is agreement and the disagreement itself is the drop
    assert DropEstimate(False, 0.5, posterior).add(confident, base, None)["drop_est"] == pytest.approx(10.0)


def test_fit_temperature_recovers_a_known_scale():
    from hqpc.passes.prune_search import fit_temperature, softmax

    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 5)) * 2.0
    probs = softmax(true_logits)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)   # overconfident
    assert fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def test_paired_sigma():
    base = np.array([0, 1, 1, 0])
    labels = np.array([0, 1, 0, 0])
    assert paired_sigma(base, base, labels) == 0.0
    assert paired_sigma(np.array([1, 1, 1, 0]), base, labels) == pytest.approx(100 * 1 / 4)


def test_profile_layers_maps_to_nodes():
    proto = Model.load(DIGITS).proto
    layers = lat.profile_layers(proto, runs=3, warmup=1)
    names = {n.name for n in proto.graph.node}
    assert set(layers) - {"<other>"} <= names
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    assert sum(layers.get(c, 0.0) for c in convs) > 0
    assert lat.profile_layers(proto, runs=3, warmup=1) == layers  # cached per digest


def test_kernel_times_average_the_fastest_runs():
    """A kernel's time is the mean of its fastest 20 % of post-warm-up runs: preemption spikes
    drop out, and integer-µs durations average to sub-µs resolution."""
    durations = [100.0] * 3 + [5.0, 5.0, 5.0, 4.0, 5.0, 5.0, 5.0, 5.0, 90.0, 5.0]  # 3 warm-up runs
    events = [{"cat": "Node", "name": "conv_kernel_time", "dur": d} for d in durations]
    events.append({"cat": "Session", "name": "model_run", "dur": 1000.0})
    times = lat.kernel_times(events, runs=len(durations) - 3)
    assert times == {"conv": pytest.approx(4.5)}  # fastest 20 % of 10 runs: {4, 5}
    assert lat.fastest_mean([]) == 0.0 and lat.fastest_mean([7.0]) == 7.0


def test_profile_run_count_fits_slow_models_into_the_budget():
    assert lat.profile_run_count(1e-4) == lat.PROFILE_RUNS
    assert lat.profile_run_count(10.0) == lat.PROFILE_MIN_RUNS
    middle = lat.profile_run_count(lat.PROFILE_SECONDS / 50)
    assert middle == 50 and lat.profile_run_count(lat.PROFILE_SECONDS / 100, models=2) == 50


def test_roofline_and_compare():
    proto = Model.load(DIGITS).proto
    orin = load_target("orin")
    layers = lat.roofline_layers(proto, orin)
    assert all(v >= 0 for v in layers.values()) and max(layers.values()) > 0
    assert lat.channel_block(orin) == orin.channel_multiple
    groups = analyze(proto)
    big = max(groups.prunable, key=lambda g: g.channels)
    pruned = apply_plan(proto, groups, {big.id: tuple(range(big.channels // 2))})
    assert sum(lat.roofline_layers(pruned, orin).values()) < sum(layers.values())
    timing = lat.compare({"a": proto, "b": pruned}, runs=3, warmup=1)
    assert set(timing) == {"a", "b"} and timing["a"]["runs"] == 3


def _wide_consumer_model() -> onnx.ModelProto:
    """x[N,4,12,12] -> conv a (16) -> relu -> conv b (1x1, 1000) -> relu -> conv c (4) -> GAP:
    b consumes a's group and has a wide output group of its own, so the probe's position budget
    for b (which depends on b's output count) changes when b's outputs are pruned."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
             helper.make_node("Conv", ["ar", "wb", "bb"], ["b"], name="conv_b"),
             helper.make_node("Relu", ["b"], ["br"], name="relu_b"),
             helper.make_node("Conv", ["br", "wc", "bc"], ["c"], name="conv_c"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["y"], name="flatten")]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w("wa", 16, 4, 3, 3), w("ba", 16), w("wb", 1000, 16, 1, 1), w("bb", 1000), w("wc", 4, 1000, 1, 1), w("bc", 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_prober_samples_the_same_positions_after_a_consumer_loses_outputs():
    from hqpc.passes.prune_search import Prober

    proto = _wide_consumer_model()
    groups = analyze(proto)
    wide = next(g.id for g in groups.groups if g.prunable and g.channels == 1000)
    narrow = next(g.id for g in groups.groups if g.prunable and g.channels == 16)
    images = np.random.default_rng(1).standard_normal((16, 4, 12, 12)).astype(np.float32)
    prober = Prober(groups, proto, images, [narrow, wide], seed=0)
    prober.prepare(proto, {})
    plan = {wide: tuple(range(992))}
    prober.prepare(apply_plan(proto, groups, plan), plan)  # raised a row-count mismatch before
    assert prober.cross["conv_b"].shape[1] == 992 and prober.grams["conv_b"].shape == (17, 17)

