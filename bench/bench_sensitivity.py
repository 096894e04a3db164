"""Do the sensitivity scores mean something? The acceptance experiments of annotate-sensitivity.

For every shared model, after running the pass on the calibration split (``--samples``, default
256, exactly what -O3 runs):

(a) channel zeroing: a fraction (``--fractions``, default 10 % and 2 %) of the channels is zeroed
    - the lowest-scored, a uniformly random one (5 draws, mean and spread) and the highest-scored -
    and top-1 and NLL are measured on the first ``--eval`` items of the eval split (disjoint from
    the calibration images). Four readings, all reported:
      unit "layer channel": one output channel of one Conv/Gemm, zeroed by setting its weight rows
          and bias to 0; its score is the pass's s_c = ½·E[(Σ_spatial a·∂ℓ/∂a)²], a being the
          tensor that this zeroes (the conv output, or after a zero-preserving activation).
          Pool: every Conv/Gemm except the final classifier and squeeze-excite *gate* convs
          (MobileNetV3's SE expand: conv -> hard-sigmoid -> Mul with the features): zeroing a gate
          conv's output does not remove a channel, it sets the gate to hsigmoid(0) = 0.5, far
          outside the second-order neighbourhood where the score applies (``--with-gates`` measures
          the pool with them too).
      unit "group channel": one channel of a prunable group of the channel-groups analysis; every
          Conv/Gemm output carrying it (all producers of a residual stream, the depthwise conv of
          an inverted residual block; not the SE gate convs) is zeroed, which removes the channel
          from the network exactly (checked against prune_channels.masked_model); its score is the
          sum Σ_p s_{p,c} of those convs' scores (the prune pass's convention).
      scope "global": the fraction of the whole pool, ranked across layers/groups, with two
          rankings for layer channels: raw (the scores as they are: estimates of the loss increase
          in one unit for every layer, so comparing across layers is what the theory says) and
          l2 (each layer's scores divided by their L2 norm, Molchanov et al. 2017);
      scope "per-block": max(1, round(fraction·size)) units inside every layer / group.
    The largest fraction of one layer/group inside the lowest set is recorded: a global ranking
    may empty whole layers, where the additive second-order estimate (Σ of single-channel
    scores, no cross terms) is least valid.
(b) per-layer quantization: ONE layer's weights at a time are replaced by their INT8 (and INT4)
    values - the quantizer of the pass and of insert-qdq, ``hqpc.passes.sensitivity.quantized_weight``
    (symmetric per output channel, MSE clipping, QAT grid kept) - and the mean KL(FP32 || quantized)
    of the softmax outputs and the top-1 drop are measured on the same eval items. Spearman rank
    correlation (scipy.stats.spearmanr) of the pass's predicted loss increase against both.
    The MobileNets were trained with quantization in the loop (their weights lie on an int8
    grid), so INT8 is exact for most of their layers (predicted and measured 0): INT4 is the
    informative case there.

Usage:
  python bench/bench_sensitivity.py                                   # the four shared models
  python bench/bench_sensitivity.py --models cifar10_resnet20 --eval 500 --json out.json --md out.md
Writes bench/results/sensitivity.md (markdown tables) and bench/results/sensitivity.json.
"""
from __future__ import annotations

from collections import Counter

import argparse
import copy
import hashlib
import os
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from hqpc.runtime import ort as ort_rt

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "models"
SPECS = {
    "cifar10_resnet20": REPO / "examples/data/cifar10_resnet.toml",
    "cifar10_resnet56": REPO / "examples/data/cifar10_resnet.toml",
    "mobilenet_v3_small": REPO / "examples/data/imagenet_mobilenet.toml",
    "mobilenet_v2": REPO / "examples/data/imagenet_mobilenet.toml",
}
EVAL_DEFAULT = {"cifar10_resnet20": 1000, "cifar10_resnet56": 1000, "mobilenet_v3_small": 500, "mobilenet_v2": 500}
DRAWS = 5


# --------------------------------------------------------------------------- evaluation
def logits(proto: onnx.ModelProto, x: np.ndarray, threads: int, batch: int = 100) -> np.ndarray:
    sess = ort_rt.session(proto, threads, "all")
    name = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name
    return np.concatenate([sess.run([out], {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.reshape(len(z), -1).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(other))."""
    a, b = log_softmax(reference), log_softmax(other)
    return float((np.exp(a) * (a - b)).sum(axis=1).mean())


def top1(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(z.reshape(len(z), -1).argmax(axis=1) == y))


def nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the labels (the loss the Fisher scores predict the increase of)."""
    return float(-log_softmax(z)[np.arange(len(y)), y].mean())


def metrics(z: np.ndarray, y: np.ndarray, base: np.ndarray) -> dict:
    return {"top1": top1(z, y), "nll": nll(z, y), "kl": kl(base, z)}


# --------------------------------------------------------------------------- model edits
def with_weights(proto: onnx.ModelProto, new: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = copy.deepcopy(proto)
    for t in out.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name].astype(np.float32), t.name))
    return out


def classifier(proto: onnx.ModelProto) -> str:
    """The Conv/Gemm producing the logits: walk back from the first graph output through
    single-data-input ops (Reshape, Flatten, Squeeze, ...) to the first Conv/Gemm."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    name = proto.graph.output[0].name
    while name in producer:
        node = producer[name]
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            return node.name
        data = [i for i in node.input if i and i not in inits and i in producer]
        if not data:
            break
        name = data[0]
    raise SystemExit("cannot find the classifier layer")


def out_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 0


def zeroed(proto: onnx.ModelProto, chosen: list[tuple[str, int]]) -> onnx.ModelProto:
    """Output channels set to zero: weight rows (output axis) and bias entries."""
    nodes = {n.name: n for n in proto.graph.node}
    inits = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    edited: dict[str, np.ndarray] = {}
    for node_name, c in chosen:
        node = nodes[node_name]
        w = edited.setdefault(node.input[1], inits[node.input[1]])
        np.moveaxis(w, out_axis(node), 0)[c] = 0.0
        if len(node.input) > 2 and node.input[2]:
            edited.setdefault(node.input[2], inits[node.input[2]])[c] = 0.0
    return with_weights(proto, edited)


# --------------------------------------------------------------------------- experiments
def run_pass(model_path: Path, spec_path: Path, samples: int, loss: str):
    from hqpc.ir import Model
    from hqpc.passes.sensitivity import AnnotateSensitivity
    from hqpc.passmanager import PassContext
    from hqpc.runtime.data import DataSpec
    from hqpc.target import load_target

    model = Model.load(model_path)
    ctx = PassContext(data=DataSpec.load(spec_path), target=load_target("cpu"), config={"verbosity": 0})
    wall, cpu = time.perf_counter(), time.process_time()
    AnnotateSensitivity(samples=samples, loss=loss).run(model, ctx)
    timing = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    return model, model.annotations["sensitivity"], timing


def cached_pass(folder: Path, model_path: Path, spec_path: Path, samples: int, loss: str):
    """:func:`run_pass`, the annotation kept in ``folder`` under a key of the model bytes, samples,
    loss and the pass's source file (development runs only; the timing is the stored one)."""
    from hqpc.ir import Model
    from hqpc.passes import sensitivity

    key = hashlib.sha256(model_path.read_bytes() + f"{samples}/{loss}".encode()
                         + Path(sensitivity.__file__).read_bytes()).hexdigest()[:16]
    path = folder / f"{model_path.stem}.{key}.json"
    if path.exists():
        data = json.loads(path.read_text())
        model = Model.load(model_path)
        model.annotations["sensitivity"] = data["ann"]
        return model, data["ann"], dict(data["timing"], cached=True)
    model, ann, timing = run_pass(model_path, spec_path, samples, loss)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ann": ann, "timing": timing}))
    return model, ann, timing


_PASS_THROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Expand")


def gate_layers(proto: onnx.ModelProto) -> set[str]:
    """Conv/Gemm nodes whose output, followed through single-consumer element-wise ops with
    constant operands, reaches a Mul with a non-constant operand and is NOT 0 there when the
    conv output is 0 (x -> hard-sigmoid / sigmoid -> Mul: squeeze-excite gates)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    gates = set()
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        name, v = node.output[0], 0.0
        for _ in range(10):
            users = consumers.get(name, [])
            if len(users) != 1:
                break
            c = users[0]
            others = [i for i in c.input[1:] if i] if c.op_type not in ("Add", "Mul") else \
                [i for i in c.input if i and i != name]
            if c.op_type == "Mul" and any(i not in inits for i in others):
                if abs(v) > 1e-6:
                    gates.add(node.name)
                break
            if c.op_type in _PASS_THROUGH:
                name = c.output[0]
                continue
            if any(i not in inits for i in others):
                break
            k = [float(np.asarray(inits[i]).reshape(-1)[0]) for i in others]
            a = {at.name: onnx.helper.get_attribute_value(at) for at in c.attribute}
            if c.op_type == "Add":
                v += k[0]
            elif c.op_type == "Sub":
                v -= k[0]
            elif c.op_type == "Mul":
                v *= k[0]
            elif c.op_type == "Div":
                v /= k[0]
            elif c.op_type == "Relu":
                v = max(v, 0.0)
            elif c.op_type == "Clip":
                v = min(max(v, k[0] if k else -np.inf), k[1] if len(k) > 1 else np.inf)
            elif c.op_type == "HardSigmoid":
                v = min(max(a.get("alpha", 0.2) * v + a.get("beta", 0.5), 0.0), 1.0)
            elif c.op_type == "Sigmoid":
                v = 1.0 / (1.0 + np.exp(-v))
            else:
                break
            name = c.output[0]
    return gates


def conv_units(proto, ann, exclude: set[str]) -> list[dict]:
    """One unit per output channel of every scored Conv/Gemm not in ``exclude``: zeroing it zeroes
    that channel's weight rows and bias; its score is the pass's s_c; its block is the layer."""
    return [{"block": node, "zero": [(node, c)], "score": float(s)}
            for node, scores in ann["channels"].items() if node not in exclude for c, s in enumerate(scores)]


def group_units(proto, ann, exclude: set[str]) -> tuple[list[dict], dict]:
    """One unit per channel of every prunable channel group (``hqpc.passes.channel_groups``).

    Zeroing a group channel zeroes the weight rows and biases of every Conv/Gemm whose output
    carries that channel (the group's producers - e.g. all convs adding into one residual
    stream - and depthwise convs inside the group), except squeeze-excite gate convs (the gated
    channel is then zero anyway). This is exactly the removal of the channel from the network
    (checked against ``prune_channels.masked_model`` by :func:`removal_check`). The unit's score
    is the sum of those convs' channel scores, Σ_p s_{p,c} (the convention of the prune pass; it
    leaves out the cross terms E[d_p d_q] of a residual group's producers). The block is the group."""
    from hqpc.passes.channel_groups import analyze

    nodes = {n.name: n for n in proto.graph.node}
    groups = analyze(proto)
    units, plan_of = [], {}
    for g in groups.prunable:
        for k in range(g.channels):
            zero = []
            for m in g.members:
                node = nodes.get(m.node)
                if (m.role != "act" or node is None or node.op_type not in ("Conv", "Gemm")
                        or m.tensor != node.output[0] or node.name in exclude):
                    continue
                zero += [(node.name, int(i)) for i in m.units[k]]
            if zero and all(n in ann["channels"] for n, _ in zero):
                units.append({"block": f"group {g.id}", "zero": zero, "score": float(sum(
                    ann["channels"][n][i] for n, i in zero)), "gid": g.id, "k": k})
    return units, {"groups": groups}


def removal_check(proto, groups, chosen_units, x) -> float:
    """max |logit difference| between zeroing the chosen group channels' conv outputs and
    removing them (``masked_model``: the consumers' input slices zeroed) on ``x``."""
    from hqpc.passes.prune_channels import masked_model

    drop: dict[int, set[int]] = {}
    for u in chosen_units:
        drop.setdefault(u["gid"], set()).add(u["k"])
    plan = {gid: tuple(i for i in range(groups.group(gid).channels) if i not in ks) for gid, ks in drop.items()}
    a = logits(zeroed(proto, [z for u in chosen_units for z in u["zero"]]), x, 2)
    b = logits(masked_model(proto, groups, plan), x, 2)
    return float(np.abs(a - b).max())


def channel_experiment(proto, ann, x, y, base, threads, fractions, log, with_gates=False) -> dict:
    skip = classifier(proto)
    gates = gate_layers(proto)
    out = {"classifier": skip, "gates": sorted(gates), "fp32": metrics(base, y, base), "classes": int(base.shape[1]),
           "variants": {}}
    layer_pool = conv_units(proto, ann, {skip} | gates)
    group_pool, info = group_units(proto, ann, {skip} | gates)
    pools = {"layers": layer_pool, "groups": group_pool}
    for fraction in fractions:  # all four readings at the first fraction, the global layer one at the others
        readings = (("layers", "global"), ("layers", "per-block"), ("groups", "global"), ("groups", "per-block"))
        for pool_name, scope in readings if fraction == fractions[0] else readings[:1]:
            key = f"{pool_name}/{scope}/{fraction}"
            rankings = ("raw", "l2") if (pool_name, scope) == ("layers", "global") else ("raw",)
            res = _zeroing(proto, pools[pool_name], x, y, base, threads, fraction, scope, rankings)
            res.update({"pool_name": pool_name, "scope": scope, "fraction": fraction})
            if pool_name == "groups" and fraction == fractions[0] and scope == "global":
                res["removal_max_abs_logit_diff"] = removal_check(proto, info["groups"], res["raw"]["lowest_units"],
                                                                  x[:50])
            for r in rankings:
                res[r].pop("lowest_units", None)
            out["variants"][key] = res
            rnd = res["random"]
            log(f"  {key}: {res['k']} of {res['pool']} units; top-1 / NLL  random {rnd['top1']:.4f} / {rnd['nll']:.3f}")
            for r in rankings:
                lo, hi = res[r]["lowest"], res[r]["highest"]
                log(f"    {r}: lowest {lo['top1']:.4f} / {lo['nll']:.3f}  highest {hi['top1']:.4f} / {hi['nll']:.3f}"
                    f"  (lowest: max block fraction {res[r]['lowest_max_block_fraction']:.2f})")
    if gates and with_gates:
        w = _zeroing(proto, conv_units(proto, ann, {skip}), x, y, base, threads, fractions[0], "global", ("raw",))
        w["raw"].pop("lowest_units", None)
        w["fraction"] = fractions[0]
        out["with_gates"] = w
        log(f"  with the gate convs in the pool ({w['k']} of {w['pool']}), top-1: raw lowest "
            f"{w['raw']['lowest']['top1']:.4f}  random {w['random']['top1']:.4f}  raw highest {w['raw']['highest']['top1']:.4f}")
    return out


def diagnose(proto, ann, x, y, base, threads, fraction, singles, log) -> dict:
    """Why a selection costs what it costs (layer channels, the global pool of part (a)):

    * single channels: ``singles`` units spread evenly over the score ranking, each zeroed
      ALONE; Spearman of the score with the measured KL(FP32 || zeroed) and NLL increase - the
      quantity the score estimates, free of the additivity assumption of the 10 % experiment;
    * the global lowest ``fraction`` split into squeeze-excite squeeze convs (Conv/Gemm whose
      output reaches only gate convs: their effect goes through the gate's hard-sigmoid), the
      layers where the lowest set takes more than half of the channels, and the rest, each part
      zeroed alone; plus the count of exactly-zero scores in the set."""
    from scipy.stats import spearmanr

    skip = classifier(proto)
    gates = gate_layers(proto)
    units = conv_units(proto, ann, {skip} | gates)
    order = np.argsort([u["score"] for u in units], kind="stable")
    picks = order[np.unique(np.linspace(0, len(units) - 1, singles).round().astype(int))]
    b_nll = nll(base, y)
    rows = []
    for i in picks:
        m = metrics(logits(zeroed(proto, units[i]["zero"]), x, threads), y, base)
        rows.append({"node": units[i]["block"], "channel": units[i]["zero"][0][1], "score": units[i]["score"],
                     "kl": m["kl"], "nll_increase": m["nll"] - b_nll, "top1": m["top1"]})
    out = {"singles": rows,
           "spearman_score_kl": _rho(spearmanr, np.array([r["score"] for r in rows]), np.array([r["kl"] for r in rows])),
           "spearman_score_nll": _rho(spearmanr, np.array([r["score"] for r in rows]),
                                      np.array([r["nll_increase"] for r in rows]))}
    log(f"  single channels ({len(rows)}): Spearman(score, KL) {out['spearman_score_kl']:.3f}, "
        f"(score, NLL increase) {out['spearman_score_nll']:.3f}")
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    conv_of = {n.name: n for n in proto.graph.node}

    def feeds_only_gates(node_name: str) -> bool:
        frontier, seen = [conv_of[node_name].output[0]], set()
        reached = set()
        while frontier:
            t = frontier.pop()
            for c in consumers.get(t, []):
                if c.op_type in ("Conv", "Gemm"):
                    reached.add(c.name)
                elif c.name not in seen:
                    seen.add(c.name)
                    frontier.extend(c.output)
        return bool(reached) and reached <= gates

    squeeze = {u["block"] for u in units if feeds_only_gates(u["block"])}
    low = [units[i] for i in order[:max(1, int(round(fraction * len(units))))]]
    size, taken = block_counts(units), block_counts(low)
    heavy = {b for b, n in taken.items() if n > size[b] / 2 and b not in squeeze}
    parts = {"se_squeeze": [u for u in low if u["block"] in squeeze],
             "layers_over_half_taken": [u for u in low if u["block"] in heavy],
             "rest": [u for u in low if u["block"] not in squeeze and u["block"] not in heavy]}
    out["lowest_parts"] = {}
    for key, chosen in parts.items():
        if not chosen:
            continue
        m = metrics(logits(zeroed(proto, [z for u in chosen for z in u["zero"]]), x, threads), y, base)
        out["lowest_parts"][key] = {"units": len(chosen), "zero_scores": sum(u["score"] == 0.0 for u in chosen),
                                    "score_sum": float(sum(u["score"] for u in chosen)), "layers": sorted(
                                        {u["block"] for u in chosen}) if key != "rest" else [], **m}
        log(f"  lowest {fraction:.0%}, part {key}: {len(chosen)} channels, top-1 {m['top1']:.4f}, NLL {m['nll']:.3f}")
    out["fraction"] = fraction
    return out


def _select(units, fraction, scope, keys=None, rng=None) -> list[int]:
    """Indices of the chosen units: ``fraction`` of the whole pool (global) or max(1, round(
    fraction·size)) of every block (per-block), the lowest keys (keys given, ascending; pass
    -keys for the highest) or uniformly at random (rng given)."""
    if scope == "global":
        blocks = {"all": list(range(len(units)))}
    else:
        blocks = {}
        for i, u in enumerate(units):
            blocks.setdefault(u["block"], []).append(i)
    chosen = []
    for members in blocks.values():
        k = max(1, int(round(fraction * len(members))))
        if rng is not None:
            chosen += [members[j] for j in rng.choice(len(members), size=k, replace=False)]
        else:
            order = np.argsort(np.asarray([keys[i] for i in members]), kind="stable")
            chosen += [members[j] for j in order[:k]]
    return chosen


def _zeroing(proto, units, x, y, base, threads, fraction: float, scope: str, rankings=("raw",)) -> dict:
    def run(idx):
        return metrics(logits(zeroed(proto, [z for i in idx for z in units[i]["zero"]]), x, threads), y, base)

    out = {"pool": len(units), "blocks": len({u["block"] for u in units})}
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(DRAWS):
        pick = _select(units, fraction, scope, rng=rng)
        draws.append(run(pick))
    out["k"] = len(pick)
    out["random"] = {m: float(np.mean([d[m] for d in draws])) for m in ("top1", "nll", "kl")}
    out["random"]["top1_std"] = float(np.std([d["top1"] for d in draws]))
    out["random"]["draws"] = draws
    norms: dict[str, float] = {}
    for u in units:
        norms[u["block"]] = norms.get(u["block"], 0.0) + u["score"] ** 2
    for ranking in rankings:
        keys = np.asarray([u["score"] if ranking == "raw" else u["score"] / (np.sqrt(norms[u["block"]]) or 1.0)
                           for u in units])
        low = _select(units, fraction, scope, keys=keys)
        high = _select(units, fraction, scope, keys=-keys)
        out[ranking] = {"lowest": run(low), "highest": run(high),
                        "lowest_score_sum": float(sum(units[i]["score"] for i in low)),
                        "highest_score_sum": float(sum(units[i]["score"] for i in high)),
                        "lowest_blocks": len({units[i]["block"] for i in low}),
                        "lowest_max_block_fraction": _max_block_fraction([units[i] for i in low], units),
                        "lowest_units": [units[i] for i in low]}
    return out


def block_counts(units) -> Counter:
    """Number of units per block (layer or channel group)."""
    return Counter(u["block"] for u in units)


def _max_block_fraction(chosen, units) -> float:
    size, counts = block_counts(units), block_counts(chosen)
    return max(counts[b] / size[b] for b in counts)


def quant_experiment(proto, ann, x, y, base_logits, threads, precisions, log) -> dict:
    from hqpc.passes.sensitivity import find_layers, quantized_weight

    layers = [layer for layer in find_layers(proto.graph) if layer.weight is not None]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    base_top1 = top1(base_logits, y)
    out = {}
    for p in precisions:
        rows = []
        for layer in layers:
            w = inits[layer.weight].astype(np.float32)
            q = quantized_weight(w, layer.node, layer.weight_slot, p)
            identical = bool(np.array_equal(q, w))
            # QAT weights on their own grid come back equal up to float rounding
            exact = identical or float(np.abs(q - w).max()) <= 1e-6 * float(np.abs(w).max())
            z = base_logits if identical else logits(with_weights(proto, {layer.weight: q}), x, threads)
            rows.append({"node": layer.name, "weight": layer.weight, "predicted": ann["tensors"][layer.weight][p],
                         "kl": 0.0 if identical else kl(base_logits, z),
                         "top1_drop": 0.0 if identical else base_top1 - top1(z, y), "exact": exact})
        out[p] = quant_stats(rows)
        log(f"  {p}: Spearman(predicted, KL) = {out[p]['spearman_kl']:.3f}, (predicted, top-1 drop) = "
            f"{out[p]['spearman_top1']:.3f} over {len(rows)} layers ({out[p]['exact_layers']} exact)")
    return out


def quant_stats(rows: list[dict]) -> dict:
    from scipy.stats import spearmanr

    pred = np.array([r["predicted"] for r in rows])
    meas = np.array([r["kl"] for r in rows])
    drop = np.array([r["top1_drop"] for r in rows])
    nonexact = np.array([not r["exact"] for r in rows])
    res = {"layers": len(rows), "exact_layers": int((~nonexact).sum()), "rows": rows,
           "spearman_kl": _rho(spearmanr, pred, meas), "spearman_top1": _rho(spearmanr, pred, drop)}
    if nonexact.sum() >= 3 and (~nonexact).sum():
        res["spearman_kl_nonexact"] = _rho(spearmanr, pred[nonexact], meas[nonexact])
    positive = (meas > 0) & (pred > 0)
    res["median_ratio_pred_over_kl"] = float(np.median(pred[positive] / meas[positive])) if positive.any() else None
    return res


def _rho(spearmanr, a, b) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


# --------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    commands = list(dict.fromkeys(c for r in results.values() for c in r.get("commands", [])))
    lines = ["# annotate-sensitivity: acceptance experiments", "",
             "Commands (in this order; later ones update their models' parts):", ""]
    lines += [f"    {c}" for c in commands]
    if any("--parts diagnose" in c for c in commands):
        lines += ["", "The `--parts diagnose` run wrote a separate file; only its `diagnostics` entry was merged into "
                  "these results (it re-runs the pass with the same settings; two runs of the pass give identical scores)."]
    lines += ["", "Pass: `annotate-sensitivity{samples=256}` (the -O3 defaults: batch 16, loss auto = cross_entropy "
              "with the dataset labels), target cpu, on the calibration split. Accuracy on the first N items of the "
              "eval split (disjoint from calibration). Machine: 2 cores shared with other jobs (load averages below), "
              "so wall times are inflated; CPU seconds are the process's user+system time.", "",
              "## Pass runtime", "", "| model | samples | batch | wall s | CPU s | peak RSS MB (bench process) | "
              "load average 1/5/15 min: before the pass, after the model's experiments |",
              "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r["timing"]
        load = r.get("load_average")
        load = f"{'/'.join(map(str, load[:3]))}, {'/'.join(map(str, load[3:]))}" if load else ""
        cached = " (cached annotation)" if t.get("cached") else ""
        lines.append(f"| {name} | {r['samples']} | {r['batch']} | {t['wall_s']}{cached} | {t['cpu_s']} | "
                     f"{r.get('rss_mb', '')} | {load} |")
    lines += ["", "## (a) Zeroing a fraction of the channels: lowest vs random vs highest Fisher score", "",
              "Four readings of \"zero 10 % of the channels\" (and 2 %). *Unit* = what is zeroed together, *scope* = "
              "where the fraction is taken:", "",
              "- **layer channels**: one output channel of one Conv/Gemm (weight rows and bias set to 0); score = the "
              "pass's s_c. Classifier and squeeze-excite gate convs excluded (zeroing a gate conv sets the gate to "
              "hsigmoid(0) = 0.5, it removes nothing; module docstring).",
              "- **group channels**: one channel of a prunable channel group (channel-groups analysis): every Conv/Gemm "
              "output carrying it is zeroed (all producers of a residual stream, the depthwise conv of an inverted "
              "residual, ...), which is exactly removing the channel (checked: max |logit difference| to "
              "`masked_model` in the last column); score = the sum of those convs' s_c.",
              "- **global**: the fraction of the whole pool, ranked across layers/groups (*raw* scores, the theory's "
              "one unit for all layers; *l2*: each layer's scores / their L2 norm, Molchanov et al. 2017). "
              "**per-block**: max(1, round(fraction x size)) lowest / random / highest units inside every layer (or "
              "group) - every layer thinned by the same fraction.", "",
              "Random = mean of 5 draws (± std of top-1). NLL = mean cross-entropy of the labels (the loss whose "
              "increase the scores estimate). *ordered*: lowest > random > highest in top-1 / lowest < random < "
              "highest in NLL; a tie is NO. *floor*: random top-1 within 3 binomial std of chance (1/classes): "
              "there top-1 cannot rank random against highest. *max blk*: the largest fraction of one layer/group "
              "in the lowest set.", "",
              "Verdict per model and reading (raw scores; top-1 / NLL; *NO (floor)*: random top-1 is at chance "
              "level, so top-1 cannot show random < highest even if the numbers happen to be ordered):", ""]
    keys = list(dict.fromkeys(k for r in results.values() for k in (r.get("channels") or {}).get("variants", {})))
    label = {"layers": "layer ch.", "groups": "group ch."}
    lines += ["| model | " + " | ".join(f"{label[k.split('/')[0]]} {k.split('/')[1]} {float(k.split('/')[2]):.0%}"
                                       for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in results.items():
        a = r.get("channels")
        if not a or "variants" not in a:
            continue
        chance = 1.0 / a["classes"]
        floor = chance + 3 * np.sqrt(chance * (1 - chance) / r["eval"])
        cells = []
        for k in keys:
            res = a["variants"].get(k)
            if res is None:
                cells.append("")
                continue
            cells.append(" / ".join(_verdicts(res["raw"]["lowest"], res["random"], res["raw"]["highest"],
                                              res["random"]["top1"] <= floor)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["",
              "| model (eval N, FP32 top-1 / NLL) | unit | scope | zeroed | ranking | lowest top-1 | random top-1 | "
              "highest top-1 | lowest NLL | random NLL | highest NLL | ordered top-1 / NLL | floor | max blk | removal check |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a = r.get("channels")
        if not a or "variants" not in a:
            continue
        head = f"{name} ({r['eval']}, {a['fp32']['top1']:.1%} / {a['fp32']['nll']:.3f})"
        chance = 1.0 / a["classes"]
        floor = chance + 3 * np.sqrt(chance * (1 - chance) / r["eval"])
        for key, res in a["variants"].items():
            rnd = res["random"]
            for ranking in ("raw", "l2"):
                if ranking not in res:
                    continue
                lo, hi = res[ranking]["lowest"], res[ranking]["highest"]
                v_top1, v_nll = _verdicts(lo, rnd, hi, rnd["top1"] <= floor)
                check = res.get("removal_max_abs_logit_diff")
                unit = "layer ch." if res["pool_name"] == "layers" else "group ch."
                lines.append(f"| {head} | {unit} | {res['scope']} | {res['fraction']:.0%}: {res['k']} of {res['pool']} | "
                             f"{ranking} | {lo['top1']:.2%} | {rnd['top1']:.2%} ± {rnd['top1_std']:.2%} | {hi['top1']:.2%} | "
                             f"{lo['nll']:.3f} | {rnd['nll']:.3f} | {hi['nll']:.3f} | "
                             f"{v_top1} / {v_nll} | "
                             f"{'floor' if rnd['top1'] <= floor else ''} | {res[ranking]['lowest_max_block_fraction']:.2f} | "
                             f"{'' if check is None else f'{check:.1e}'} |")
                head = ""
        w = a.get("with_gates")
        if w:
            lines.append(f"| {name}, gate convs kept in the pool | layer ch. | global | {w['fraction']:.0%}: {w['k']} of "
                         f"{w['pool']} | raw | {w['raw']['lowest']['top1']:.2%} | {w['random']['top1']:.2%} ± "
                         f"{w['random']['top1_std']:.2%} | {w['raw']['highest']['top1']:.2%} | "
                         f"{w['raw']['lowest']['nll']:.3f} | {w['random']['nll']:.3f} | {w['raw']['highest']['nll']:.3f} | "
                         f"{'yes' if w['raw']['lowest']['top1'] > w['random']['top1'] > w['raw']['highest']['top1'] else 'NO'}"
                         f" / {'yes' if w['raw']['lowest']['nll'] < w['random']['nll'] < w['raw']['highest']['nll'] else 'NO'}"
                         f" | | | |")
    diag = {name: r["diagnostics"] for name, r in results.items() if r.get("diagnostics")}
    if diag:
        lines += ["", "## (a, diagnostics) Single channels, and what the lowest set is made of", "",
                  "Layer channels spread evenly over the score ranking, each zeroed ALONE (what the score estimates, "
                  "no additivity involved): Spearman of the score with the measured KL(FP32 || zeroed) and NLL "
                  "increase. Then the global lowest set of part (a) split into: channels of squeeze-excite squeeze "
                  "convs (their effect goes only through a hard-sigmoid gate), channels of layers of which the set "
                  "takes more than half, and the rest; each part zeroed alone (top-1 / NLL; zero scores = channels "
                  "scored exactly 0).", "",
                  "| model | single channels | Spearman (score, KL) | Spearman (score, NLL increase) | lowest set part | "
                  "channels | zero scores | Σ scores | top-1 | NLL |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, d in diag.items():
            head = f"| {name} | {len(d['singles'])} | {d['spearman_score_kl']:.3f} | {d['spearman_score_nll']:.3f} "
            for key, part in d["lowest_parts"].items():
                lines.append(f"{head}| {key} ({d['fraction']:.0%} set) | {part['units']} | {part['zero_scores']} | "
                             f"{part['score_sum']:.3g} | {part['top1']:.2%} | {part['nll']:.3f} |")
                head = "| | | | "
    lines += ["", "## (b) Per-layer weight quantization: predicted vs measured", "",
              "One layer's weights quantized at a time with the quantizer of the pass and of insert-qdq (per output "
              "channel, symmetric, MSE clipping, an existing QAT grid kept), KL(FP32 || quantized) of the softmax and "
              "top-1 drop on the eval subset. Spearman rank correlation of the predicted loss increase ½E[(gᵀδ)²] "
              "with each. *exact*: layers whose quantized weights equal the FP32 ones within 1e-6 of max|w|. "
              "*pred/KL*: median ratio of the predicted loss increase to the measured KL (second-order theory: 1 "
              "with the true Fisher; the empirical Fisher of the dataset labels is larger).", "",
              "| model | precision | layers | exact | Spearman (pred, KL) | Spearman, non-exact layers | "
              "Spearman (pred, top-1 drop) | pred/KL |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for p, q in r.get("quant", {}).items():
            ne = q.get("spearman_kl_nonexact")
            ratio = q["median_ratio_pred_over_kl"]
            lines.append(f"| {name} | {p.upper()} | {q['layers']} | {q['exact_layers']} | {q['spearman_kl']:.3f} | "
                         f"{'' if ne is None else f'{ne:.3f}'} | {q['spearman_top1']:.3f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
    lines.append("")
    return "\n".join(lines)


def _verdicts(lo: dict, rnd: dict, hi: dict, at_floor: bool) -> tuple[str, str]:
    """("yes" | "NO" | "NO (floor)", "yes" | "NO"): lowest > random > highest in top-1 (NO (floor)
    when random is at chance level, where top-1 cannot rank it against highest), lowest < random
    < highest in NLL. Ties are NO."""
    top1 = lo["top1"] > rnd["top1"] > hi["top1"]
    nll_ok = lo["nll"] < rnd["nll"] < hi["nll"]
    return ("NO (floor)" if at_floor else ("yes" if top1 else "NO")), ("yes" if nll_ok else "NO")


def refresh_exact(proto: onnx.ModelProto, quant: dict) -> dict:
    """Recompute the exact flags (tolerance rule) and the statistics of stored quant rows."""
    from hqpc.passes.sensitivity import find_layers, quantized_weight

    layers = {layer.weight: layer for layer in find_layers(proto.graph) if layer.weight is not None}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for p, q in quant.items():
        for row in q["rows"]:
            layer = layers[row["weight"]]
            w = inits[row["weight"]].astype(np.float32)
            d = quantized_weight(w, layer.node, layer.weight_slot, p)
            row["exact"] = bool(float(np.abs(d - w).max()) <= 1e-6 * float(np.abs(w).max()))
        quant[p] = quant_stats(q["rows"])
    return quant


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--loss", default="auto")
    parser.add_argument("--eval", type=int, default=0, help="eval items (default: 1000 CIFAR, 500 ImageNet)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="int8,int4")
    parser.add_argument("--fractions", default="0.1,0.02",
                        help="fractions to zero: all four readings at the first, the global layer-channel one at the others")
    parser.add_argument("--parts", default="channels,quant",
                        help="experiments to run: channels, quant, diagnose (not in the default)")
    parser.add_argument("--singles", type=int, default=40, help="diagnose: channels zeroed one at a time")
    parser.add_argument("--ann-cache", type=Path, default=None,
                        help="development only: reuse the annotation stored in this folder (keyed by model bytes, "
                             "samples, loss and the pass source); results files say when it was used")
    parser.add_argument("--with-gates", action="store_true", help="also zero with the SE gate convs in the pool")
    parser.add_argument("--merge", action="store_true", help="update the models' entries of an existing --json")
    parser.add_argument("--md", type=Path, default=REPO / "bench/results/sensitivity.md")
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/sensitivity.json")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"shared models not found at {SHARED}", file=sys.stderr)
        return 2
    from hqpc.runtime.data import DataSpec

    def log(message):
        print(message, flush=True)

    parts = set(args.parts.split(","))
    results = json.loads(args.json.read_text()) if args.merge and args.json.exists() else {}
    command = ("python bench/bench_sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    for name in args.models:
        log(f"== {name}")
        load_before = os.getloadavg()
        if args.ann_cache:
            model, ann, timing = cached_pass(args.ann_cache, SHARED / f"{name}.onnx", SPECS[name], args.samples, args.loss)
        else:
            model, ann, timing = run_pass(SHARED / f"{name}.onnx", SPECS[name], args.samples, args.loss)
        proto = model.proto
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        log(f"  pass: {timing['wall_s']} s wall, {timing['cpu_s']} s CPU, {ann['samples']} samples, loss {ann['loss']}")
        n_eval = args.eval or EVAL_DEFAULT[name]
        x, y = DataSpec.load(SPECS[name]).split("eval").arrays(limit=n_eval)
        base = logits(proto, x, args.threads)
        log(f"  fp32 top-1 on {len(x)} eval items: {top1(base, y):.4f}")
        r = results.get(name, {})
        r.update({"samples": ann["samples"], "batch": ann["method"]["batch"], "loss": ann["loss"], "timing": timing,
                  "rss_mb": rss, "eval": len(x)})
        r["commands"] = r.get("commands", []) + [command]
        if "channels" in parts:
            fractions = [float(f) for f in args.fractions.split(",")]
            r["channels"] = channel_experiment(proto, ann, x, y, base, args.threads, fractions, log, args.with_gates)
        if "diagnose" in parts:
            r["diagnostics"] = diagnose(proto, ann, x, y, base, args.threads, float(args.fractions.split(",")[0]),
                                        args.singles, log)
        if "quant" in parts:
            r["quant"] = quant_experiment(proto, ann, x, y, base, args.threads, args.precisions.split(","), log)
        elif "quant" in r:
            r["quant"] = refresh_exact(proto, r["quant"])
        r["load_average"] = [round(v, 1) for v in (*load_before, *os.getloadavg())]
        results[name] = r
        del x, y, base
        args.json.parent.mkdir(parents=True, exist_ok=True)  # after every model: a long run keeps its results
        args.json.write_text(json.dumps(results, indent=1))
        args.md.write_text(markdown(results))
    log(f"wrote {args.md} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
