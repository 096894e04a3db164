"""Do the sensitivity scores mean something? The acceptance experiments of annotate-sensitivity.

For every shared model, after running the pass on the calibration split (``--samples``, default
256, exactly what -O3 runs):

(a) channel zeroing: all output channels of every Conv/Gemm except the final classifier's and
    except squeeze-excite *gate* convs form one pool; 10 % of the pool is zeroed (that channel's weights and bias set to 0, so its
    activation is 0: the quantity the Fisher score predicts) - the lowest-scored 10 %, a
    uniformly random 10 % (5 draws, mean and spread) and the highest-scored 10 % - and top-1 is
    measured on the first ``--eval`` items of the eval split (disjoint from the calibration
    images). Channels are chosen globally across layers, with two rankings:
      raw   the Fisher score itself: it is an estimate of the loss increase, in the same unit
            for every layer, so comparing across layers is what the theory says;
      l2    scores divided by the layer's L2 norm (Molchanov et al. 2017): guards against one
            layer's scale dominating; shown for comparison.
    Gate convs (MobileNetV3's SE expand: conv -> hard-sigmoid -> Mul with the features) are
    left out: zeroing their output does not remove a channel, it sets the gate to
    hsigmoid(0) = 0.5, far outside the second-order neighbourhood where the score applies (the
    gate is mostly saturated, so its gradient and score are ~0). The prune pass never removes
    them alone either: they share a channel group with the gated features. The pool with them
    is measured too (column "with gates").
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
  python bench/bench_sensitivity.py --models cifar10_resnet20 --eval 500 --json out.json
Writes bench/results/sensitivity.md (markdown tables) and bench/results/sensitivity.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

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
def session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def logits(proto: onnx.ModelProto, x: np.ndarray, threads: int, batch: int = 100) -> np.ndarray:
    sess = session(proto, threads)
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


def channel_experiment(proto, ann, x, y, base, threads, fractions, log) -> dict:
    skip = classifier(proto)
    gates = gate_layers(proto)
    out = {"classifier": skip, "gates": sorted(gates), "fp32": metrics(base, y, base), "fractions": {}}
    for fraction in fractions:
        res = _zeroing(proto, ann, x, y, base, threads, {skip} | gates, fraction)
        out["fractions"][str(fraction)] = res
        log(f"  zero {fraction:.0%} ({res['k']} of {res['pool']} channels; classifier and {len(gates)} gate convs "
            f"excluded), top-1 / NLL: random {res['random']['top1']:.4f} / {res['random']['nll']:.3f}")
        for ranking in ("raw", "l2"):
            lo, hi = res[ranking]["lowest"], res[ranking]["highest"]
            log(f"    {ranking}: lowest {lo['top1']:.4f} / {lo['nll']:.3f}  highest {hi['top1']:.4f} / {hi['nll']:.3f}")
    if gates:
        out["with_gates"] = _zeroing(proto, ann, x, y, base, threads, {skip}, fractions[0])
        out["with_gates"]["fraction"] = fractions[0]
        w = out["with_gates"]
        log(f"  with the gate convs in the pool ({w['k']} of {w['pool']}), top-1: raw lowest "
            f"{w['raw']['lowest']['top1']:.4f}  random {w['random']['top1']:.4f}  raw highest {w['raw']['highest']['top1']:.4f}")
    return out


def _zeroing(proto, ann, x, y, base, threads, exclude: set[str], fraction: float) -> dict:
    pool = [(node, c, s) for node, scores in ann["channels"].items() if node not in exclude
            for c, s in enumerate(scores)]
    k = max(1, int(round(fraction * len(pool))))
    out = {"pool": len(pool), "k": k}
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(DRAWS):
        pick = rng.choice(len(pool), size=k, replace=False)
        draws.append(metrics(logits(zeroed(proto, [pool[i][:2] for i in pick]), x, threads), y, base))
    out["random"] = {m: float(np.mean([d[m] for d in draws])) for m in ("top1", "nll", "kl")}
    out["random"]["top1_std"] = float(np.std([d["top1"] for d in draws]))
    out["random"]["draws"] = draws
    norms = {node: float(np.linalg.norm(scores)) or 1.0 for node, scores in ann["channels"].items()}
    for ranking in ("raw", "l2"):
        keyed = [s if ranking == "raw" else s / norms[node] for node, _, s in pool]
        order = np.argsort(np.asarray(keyed), kind="stable")
        low = [pool[i][:2] for i in order[:k]]
        high = [pool[i][:2] for i in order[-k:]]
        out[ranking] = {"lowest": metrics(logits(zeroed(proto, low), x, threads), y, base),
                        "highest": metrics(logits(zeroed(proto, high), x, threads), y, base),
                        "lowest_layers": len({n for n, _ in low}),
                        "lowest_max_layer_fraction": _max_layer_fraction(low, ann)}
    return out


def _max_layer_fraction(chosen, ann) -> float:
    counts: dict[str, int] = {}
    for node, _ in chosen:
        counts[node] = counts.get(node, 0) + 1
    return max(counts[n] / len(ann["channels"][n]) for n in counts)


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
    lines += ["", "Pass: `annotate-sensitivity{samples=256}` (the -O3 defaults: batch 16, loss auto = cross_entropy "
              "with the dataset labels), target cpu, on the calibration split. Accuracy on the first N items of the "
              "eval split (disjoint from calibration). Machine: 2 cores shared with other jobs (load average 7-10 "
              "during these runs), so wall times are inflated; CPU seconds are the process's user+system time.", "",
              "## Pass runtime", "", "| model | samples | batch | wall s | CPU s | peak RSS MB (bench process) |",
              "|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r["timing"]
        lines.append(f"| {name} | {r['samples']} | {r['batch']} | {t['wall_s']} | {t['cpu_s']} | {r.get('rss_mb', '')} |")
    lines += ["", "## (a) Zeroing a fraction of the Conv/Gemm output channels", "",
              "Pool: every output channel of every Conv/Gemm except the final classifier's and squeeze-excite gate "
              "convs (zeroing a gate conv sets the gate to hsigmoid(0) = 0.5 instead of removing a channel; see the "
              "module docstring). Channels chosen globally: *raw* = the Fisher scores as they are (an estimate of the "
              "loss increase, one unit for all layers), *l2* = each layer's scores divided by its L2 norm. Random = "
              "mean of 5 draws (± std of top-1). NLL = mean cross-entropy of the true labels (FP32 value in the "
              "model column); it keeps separating the cases when top-1 is at chance level (0.1 % on ImageNet). "
              "*ordered*: lowest > random > highest in top-1 (ties at the floor count as not ordered) / lowest < "
              "random < highest in NLL.", "",
              "| model (eval N, FP32 top-1 / NLL) | zeroed | ranking | lowest top-1 | random top-1 | highest top-1 "
              "| lowest NLL | random NLL | highest NLL | ordered top-1 / NLL |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a = r.get("channels")
        if not a:
            continue
        head = f"{name} ({r['eval']}, {a['fp32']['top1']:.1%} / {a['fp32']['nll']:.3f})"
        for fraction, res in a["fractions"].items():
            rnd = res["random"]
            for ranking in ("raw", "l2"):
                lo, hi = res[ranking]["lowest"], res[ranking]["highest"]
                ok_top1 = lo["top1"] > rnd["top1"] > hi["top1"]
                ok_nll = lo["nll"] < rnd["nll"] < hi["nll"]
                lines.append(f"| {head} | {float(fraction):.0%} ({res['k']} of {res['pool']}) | {ranking} | "
                             f"{lo['top1']:.2%} | {rnd['top1']:.2%} ± {rnd['top1_std']:.2%} | {hi['top1']:.2%} | "
                             f"{lo['nll']:.3f} | {rnd['nll']:.3f} | {hi['nll']:.3f} | "
                             f"{'yes' if ok_top1 else 'NO'} / {'yes' if ok_nll else 'NO'} |")
                head = ""
        w = a.get("with_gates")
        if w:
            lines.append(f"| {name}, gate convs kept in the pool | {w['fraction']:.0%} ({w['k']} of {w['pool']}) | raw | "
                         f"{w['raw']['lowest']['top1']:.2%} | {w['random']['top1']:.2%} ± {w['random']['top1_std']:.2%} | "
                         f"{w['raw']['highest']['top1']:.2%} | {w['raw']['lowest']['nll']:.3f} | {w['random']['nll']:.3f} | "
                         f"{w['raw']['highest']['nll']:.3f} | "
                         f"{'yes' if w['raw']['lowest']['top1'] > w['random']['top1'] > w['raw']['highest']['top1'] else 'NO'}"
                         f" / {'yes' if w['raw']['lowest']['nll'] < w['random']['nll'] < w['raw']['highest']['nll'] else 'NO'} |")
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
    parser.add_argument("--fractions", default="0.1,0.02", help="fractions of the channel pool to zero")
    parser.add_argument("--parts", default="channels,quant", help="experiments to run: channels, quant")
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
            r["channels"] = channel_experiment(proto, ann, x, y, base, args.threads, fractions, log)
        if "quant" in parts:
            r["quant"] = quant_experiment(proto, ann, x, y, base, args.threads, args.precisions.split(","), log)
        elif "quant" in r:
            r["quant"] = refresh_exact(proto, r["quant"])
        results[name] = r
        del x, y, base
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    args.md.write_text(markdown(results))
    log(f"wrote {args.md} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
