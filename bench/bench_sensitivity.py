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
FRACTION = 0.10
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


def channel_experiment(proto, ann, x, y, base_top1, threads, log) -> dict:
    skip = classifier(proto)
    gates = gate_layers(proto)
    out = {"classifier": skip, "gates": sorted(gates), "fp32": base_top1}
    out.update(_zeroing(proto, ann, x, y, threads, exclude={skip} | gates))
    log(f"  zero 10% ({out['k']} of {out['pool']} channels; classifier and {len(gates)} gate convs excluded): "
        f"random {out['random']['mean']:.4f}")
    for ranking in ("raw", "l2"):
        log(f"    {ranking}: lowest {out[ranking]['lowest']:.4f}  highest {out[ranking]['highest']:.4f}  "
            f"(fp32 {base_top1:.4f})")
    if gates:
        out["with_gates"] = _zeroing(proto, ann, x, y, threads, exclude={skip})
        w = out["with_gates"]
        log(f"  with the gate convs in the pool ({w['k']} of {w['pool']}): raw lowest {w['raw']['lowest']:.4f}  "
            f"random {w['random']['mean']:.4f}  raw highest {w['raw']['highest']:.4f}")
    return out


def _zeroing(proto, ann, x, y, threads, exclude: set[str]) -> dict:
    pool = [(node, c, s) for node, scores in ann["channels"].items() if node not in exclude
            for c, s in enumerate(scores)]
    k = max(1, int(round(FRACTION * len(pool))))
    out = {"pool": len(pool), "k": k}
    rng = np.random.default_rng(0)
    randoms = []
    for _ in range(DRAWS):
        pick = rng.choice(len(pool), size=k, replace=False)
        randoms.append(top1(logits(zeroed(proto, [pool[i][:2] for i in pick]), x, threads), y))
    out["random"] = {"mean": float(np.mean(randoms)), "std": float(np.std(randoms)), "draws": randoms}
    norms = {node: float(np.linalg.norm(scores)) or 1.0 for node, scores in ann["channels"].items()}
    for ranking in ("raw", "l2"):
        keyed = [s if ranking == "raw" else s / norms[node] for node, _, s in pool]
        order = np.argsort(np.asarray(keyed), kind="stable")
        low = [pool[i][:2] for i in order[:k]]
        high = [pool[i][:2] for i in order[-k:]]
        out[ranking] = {"lowest": top1(logits(zeroed(proto, low), x, threads), y),
                        "highest": top1(logits(zeroed(proto, high), x, threads), y),
                        "lowest_layers": len({n for n, _ in low}),
                        "lowest_max_layer_fraction": _max_layer_fraction(low, ann)}
    return out


def _max_layer_fraction(chosen, ann) -> float:
    counts: dict[str, int] = {}
    for node, _ in chosen:
        counts[node] = counts.get(node, 0) + 1
    return max(counts[n] / len(ann["channels"][n]) for n in counts)


def quant_experiment(proto, ann, x, y, base_logits, threads, precisions, log) -> dict:
    from scipy.stats import spearmanr

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
        out[p] = res
        log(f"  {p}: Spearman(predicted, KL) = {res['spearman_kl']:.3f}, (predicted, top-1 drop) = "
            f"{res['spearman_top1']:.3f} over {len(rows)} layers ({res['exact_layers']} exact)")
    return out


def _rho(spearmanr, a, b) -> float:
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)


# --------------------------------------------------------------------------- report
def markdown(results: dict, args) -> str:
    commands = sorted({r.get("command", "") for r in results.values()})
    lines = ["# annotate-sensitivity: acceptance experiments", "",
             "Commands: " + ", ".join(f"`{c}`" for c in commands), "",
             f"Pass: `annotate-sensitivity{{samples={args.samples}}}` on the calibration split (loss "
             f"{args.loss}; cross_entropy = dataset labels), target cpu. Accuracy on the first N items "
             "of the eval split (disjoint from calibration). Machine: 2 shared cores; times are wall "
             "(CPU) seconds of the pass alone, and depend on the load of the machine at the time.", "",
             "## Pass runtime", "", "| model | samples | batch | wall s | CPU s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r["timing"]
        lines.append(f"| {name} | {r['samples']} | {r['batch']} | {t['wall_s']} | {t['cpu_s']} | {r.get('rss_mb', '')} |")
    lines += ["", "## (a) Zeroing 10 % of the Conv/Gemm output channels", "",
              "Top-1 on the eval subset. Pool: every output channel of every Conv/Gemm except the final "
              "classifier's and squeeze-excite gate convs (zeroing a gate conv sets the gate to "
              "hsigmoid(0) = 0.5 instead of removing a channel; see the module docstring). *raw*: global "
              "ranking of the Fisher scores as they are (they estimate the loss increase in one unit for all "
              "layers); *l2*: each layer's scores divided by its L2 norm. Random: mean ± std of 5 draws. "
              "*ordered*: lowest > random > highest in top-1. Last column: the same experiment (raw) with "
              "the gate convs in the pool.", "",
              "| model | eval N | FP32 | channels zeroed | lowest raw | lowest l2 | random (5) | highest raw | highest l2 "
              "| ordered raw / l2 | with gates: lowest / random / highest |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a = r.get("channels")
        if not a:
            continue
        ok = [a[k]["lowest"] > a["random"]["mean"] > a[k]["highest"] for k in ("raw", "l2")]
        w = a.get("with_gates")
        gates = (f"{w['raw']['lowest']:.2%} / {w['random']['mean']:.2%} / {w['raw']['highest']:.2%}" if w
                 else "(no gate convs)")
        lines.append(f"| {name} | {r['eval']} | {a['fp32']:.2%} | {a['k']} of {a['pool']} | {a['raw']['lowest']:.2%} | "
                     f"{a['l2']['lowest']:.2%} | {a['random']['mean']:.2%} ± {a['random']['std']:.2%} | "
                     f"{a['raw']['highest']:.2%} | {a['l2']['highest']:.2%} | "
                     f"{'yes' if ok[0] else 'NO'} / {'yes' if ok[1] else 'NO'} | {gates} |")
    lines += ["", "## (b) Per-layer weight quantization: predicted vs measured", "",
              "One layer's weights quantized at a time (per-channel symmetric, MSE clipping, QAT grid kept), "
              "KL(FP32 || quantized) of the softmax and top-1 drop on the eval subset. Spearman rank correlation "
              "of the predicted loss increase ½E[(gᵀδ)²] with each. *exact*: layers whose quantized weights equal "
              "the FP32 ones within 1e-6 of max|w| (QAT grid) - predicted and measured ~0 for those. *pred/KL*: median ratio of the "
              "predicted loss increase to the measured KL (2nd-order theory: 1 with the true Fisher).", "",
              "| model | precision | layers | exact | Spearman (pred, KL) | Spearman non-exact only | Spearman (pred, top-1 drop) | pred/KL |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for p, q in r["quant"].items():
            ne = q.get("spearman_kl_nonexact")
            ratio = q["median_ratio_pred_over_kl"]
            lines.append(f"| {name} | {p.upper()} | {q['layers']} | {q['exact_layers']} | {q['spearman_kl']:.3f} | "
                         f"{'' if ne is None else f'{ne:.3f}'} | {q['spearman_top1']:.3f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--loss", default="auto")
    parser.add_argument("--eval", type=int, default=0, help="eval items (default: 1000 CIFAR, 500 ImageNet)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="int8,int4")
    parser.add_argument("--skip-channels", action="store_true")
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

    results = json.loads(args.json.read_text()) if args.merge and args.json.exists() else {}
    command = "python bench/bench_sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in args.models:
        log(f"== {name}")
        model, ann, timing = run_pass(SHARED / f"{name}.onnx", SPECS[name], args.samples, args.loss)
        proto = model.proto
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        log(f"  pass: {timing['wall_s']} s wall, {timing['cpu_s']} s CPU, {ann['samples']} samples, loss {ann['loss']}")
        n_eval = args.eval or EVAL_DEFAULT[name]
        x, y = DataSpec.load(SPECS[name]).split("eval").arrays(limit=n_eval)
        base = logits(proto, x, args.threads)
        base_top1 = top1(base, y)
        log(f"  fp32 top-1 on {len(x)} eval items: {base_top1:.4f}")
        r = {"samples": ann["samples"], "batch": ann["method"]["batch"], "loss": ann["loss"], "timing": timing,
             "rss_mb": rss, "eval": len(x), "command": command.strip()}
        if not args.skip_channels:
            r["channels"] = channel_experiment(proto, ann, x, y, base_top1, args.threads, log)
        r["quant"] = quant_experiment(proto, ann, x, y, base, args.threads, args.precisions.split(","), log)
        results[name] = r
        del x, y, base
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    args.md.write_text(markdown(results, args))
    log(f"wrote {args.md} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
