"""Feasibility measurement (not a pass): how much of a training-free pruning loss a short
knowledge distillation on the calibration images would win back.

A fixed plan (``prune-channels{fraction=F}``: F of every prunable group's channels by weight
magnitude, after the -O1 clean-up; ``--groups inner``: only the groups with one producer, i.e.
the inner width of residual blocks) is reconstructed (``reconstruct``, ridge least squares on the
calibration split), then its weights are trained for ``--epochs`` epochs to match the FP32
model's softened outputs on the calibration images (``--train-images calib+search``: also the
search images of the evaluation split, labels unused; the held-out images are never trained
on), with a random crop (4-pixel reflect padding) and a random horizontal flip:

    L = T² · KL(softmax(z_FP32 / T) ‖ softmax(z / T))   (up to a constant: −T²·Σ_c p_c·log q_c)

with Adam (β = 0.9, 0.999) and a cosine learning-rate schedule. Gradients come from hqpc's own
reverse-mode autodiff (:func:`hqpc.gradients`, loss ``scalar``: the model's weights are fed as
graph inputs and the KD loss is appended to the graph), run by ONNX Runtime; no torch.

Reported: CPU-time speed-up of the plan against the FP32 model (1 thread, batch 1, interleaved),
top-1 on the held-out evaluation images (the evaluation split after its first ``--search``
images, as the prune search splits it) for FP32, the plan without and with reconstruction, and
after every ``--report-every`` epochs of distillation.

Usage::

    python bench/bench_distill.py cifar10_resnet56 --fraction 0.25 --epochs 10 --lr 1e-4
    python bench/bench_distill.py cifar10_resnet56 --groups inner --fraction 0.5 --train-images calib+search
    python bench/bench_distill.py mobilenet_v3_small --student OUT/mobilenet_v3_small.pruned.onnx --batch 32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prune  # noqa: E402  (fixed_plan, timed, SHARED, SPECS)


def inner_plan_file(name: str, fraction: float, path: Path) -> Path:
    """Write the magnitude plan removing ``fraction`` of the channels of every prunable group with
    a single producer (the inner width of a residual block; residual streams, fed by several
    convolutions, keep theirs) of the -O1 model to ``path`` (JSON)."""
    from hqpc.passes.channel_groups import analyze
    from hqpc.passes.prune_channels import magnitude_plan, plan_to_json
    from hqpc.target import load_target

    clean = bench_prune.cleaned(name)
    groups = analyze(clean)
    inner = [g for g in groups.prunable if len(g.producers) == 1]
    plan = magnitude_plan(clean, inner, fraction, load_target("cpu").channel_multiple)
    path.write_text(json.dumps(plan_to_json(plan)))
    return path


def with_kd_loss(model: onnx.ModelProto, temperature: float) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with its float weights turned into graph inputs (static shapes) and its only
    output the KD loss −T²·C·mean(p ⊙ log_softmax(z/T)) against a ``teacher_p`` input [N, C]
    (the mean over N·C elements times C is the batch mean of the per-sample sum)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    weights = [i for i in g.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) >= 1]
    names = [w.name for w in weights]
    keep = [i for i in g.initializer if i.name not in set(names)]
    g.input.extend(helper.make_tensor_value_info(w.name, TensorProto.FLOAT, list(w.dims)) for w in weights)
    del g.initializer[:]
    g.initializer.extend(keep)
    logits = g.output[0].name
    classes = g.output[0].type.tensor_type.shape.dim[1].dim_value
    g.input.append(helper.make_tensor_value_info("teacher_p", TensorProto.FLOAT, ["N", classes]))
    g.initializer.extend([numpy_helper.from_array(np.array(temperature, np.float32), "kd_t"),
                          numpy_helper.from_array(np.array(-classes * temperature ** 2, np.float32), "kd_scale")])
    g.node.extend([helper.make_node("Div", [logits, "kd_t"], ["kd_zt"]),
                   helper.make_node("LogSoftmax", ["kd_zt"], ["kd_logq"], axis=1),
                   helper.make_node("Mul", ["kd_logq", "teacher_p"], ["kd_plogq"]),
                   helper.make_node("ReduceMean", ["kd_plogq"], ["kd_mean"], keepdims=0),
                   helper.make_node("Mul", ["kd_mean", "kd_scale"], ["kd_loss"])])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("kd_loss", TensorProto.FLOAT, []))
    return m, names


def augment(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop from a reflect-padded image and a random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = np.empty_like(x)
    for i in range(n):
        dy, dx = rng.integers(0, 2 * pad + 1, 2)
        img = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = img[:, :, ::-1] if rng.random() < 0.5 else img
    return out


def distill(student: onnx.ModelProto, teacher: onnx.ModelProto, x: np.ndarray, epochs: int, lr: float,
            temperature: float, batch: int, seed: int, on_epoch) -> onnx.ModelProto:
    """Adam on the KD loss over ``x`` (see the module docstring); ``on_epoch(epoch, model)``
    after every epoch. Returns the distilled student."""
    import hqpc
    from hqpc.runtime import ort as ort_rt

    loss_model, names = with_kd_loss(student, temperature)
    params = {i.name: numpy_helper.to_array(i).copy() for i in student.graph.initializer if i.name in set(names)}
    first, second = ({k: np.zeros_like(v) for k, v in params.items()} for _ in range(2))
    teacher_sess = ort_rt.session(teacher, 2, "all")
    teacher_in = teacher_sess.get_inputs()[0].name
    student_in = student.graph.input[0].name
    rng = np.random.default_rng(seed)
    steps = epochs * int(np.ceil(len(x) / batch))
    step = 0

    def soft(images):
        z = teacher_sess.run(None, {teacher_in: images})[0].astype(np.float64) / temperature
        e = np.exp(z - z.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    def current() -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(student)
        for init in m.graph.initializer:
            if init.name in params:
                init.CopyFrom(numpy_helper.from_array(params[init.name].astype(np.float32), init.name))
        return m

    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        for s in range(0, len(x), batch):
            images = augment(x[order[s:s + batch]], rng)
            grads = hqpc.gradients(loss_model, {student_in: images, "teacher_p": soft(images), **params},
                                   names, loss="scalar")
            step += 1
            rate = lr * 0.5 * (1.0 + np.cos(np.pi * step / steps))
            for k in names:
                first[k] = 0.9 * first[k] + 0.1 * grads[k]
                second[k] = 0.999 * second[k] + 0.001 * grads[k] ** 2
                m_hat, v_hat = first[k] / (1 - 0.9 ** step), second[k] / (1 - 0.999 ** step)
                params[k] = params[k] - rate * m_hat / (np.sqrt(v_hat) + 1e-8)
        on_epoch(epoch, current)
    return current()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(bench_prune.SPECS))
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--groups", choices=("all", "inner"), default="all",
                        help="prune every prunable group, or only single-producer (inner) groups")
    parser.add_argument("--train-images", choices=("calib", "calib+search"), default="calib",
                        help="distil on the calibration images, or also on the search images (their labels "
                             "unused; the held-out images stay unseen)")
    parser.add_argument("--student", type=Path, default=None,
                        help="distil this pruned model (e.g. a prune search's output) instead of a fixed plan")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--search", type=int, default=2000,
                        help="evaluation images the prune search uses (at most half the split, as the search)")
    parser.add_argument("--report-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not bench_prune.SHARED.is_dir():
        print(f"skipped: {bench_prune.SHARED} is absent", file=sys.stderr)
        return 0
    from hqpc.runtime.data import DataSpec

    name = args.model
    original = onnx.load(bench_prune.SHARED / f"{name}.onnx")
    if args.student:  # an already pruned (and reconstructed) model, e.g. a prune search's output
        plain, refit, pipeline = None, onnx.load(args.student), f"given: {args.student}"
    else:
        plan_file = None
        if args.groups == "inner":
            import tempfile

            plan_file = inner_plan_file(name, args.fraction, Path(tempfile.mkdtemp()) / "plan.json")
        plain, refit, pipeline = bench_prune.fixed_plan(name, args.fraction, plan_file)
    spec = DataSpec.load(bench_prune.REPO / bench_prune.SPECS[name])
    cx, _ = spec.split("calib").arrays()
    ex, ey = spec.split("eval").arrays()
    search = min(args.search, len(ex) // 2)
    hx, hy = ex[search:], ey[search:]
    train = cx if args.train_images == "calib" else np.concatenate([cx, ex[:search]])
    timing = bench_prune.timed({"original": original, "plan": refit}, runs=200)
    speedup = timing["original"]["cpu_median_ms"] / timing["plan"]["cpu_median_ms"]
    result = {"model": name, "pipeline": pipeline, "fraction": args.fraction, "groups": args.groups,
              "cpu_speedup": round(speedup, 3), "train_images": f"{args.train_images} ({len(train)})",
              "heldout_images": int(len(hx)), "epochs": args.epochs,
              "lr": args.lr, "temperature": args.temperature, "batch": args.batch,
              "top1_fp32": round(bench_prune.top1(original, hx, hy), 2),
              "top1_plan": None if plain is None else round(bench_prune.top1(plain, hx, hy), 2),
              "top1_reconstructed": round(bench_prune.top1(refit, hx, hy), 2), "distilled": []}
    print(json.dumps({k: v for k, v in result.items() if k != "distilled"}), flush=True)
    start = time.perf_counter()

    def on_epoch(epoch, current):
        if epoch % args.report_every == 0 or epoch == args.epochs:
            row = {"epoch": epoch, "wall_s": round(time.perf_counter() - start, 1),
                   "top1": round(bench_prune.top1(current(), hx, hy), 2)}
            result["distilled"].append(row)
            print(json.dumps(row), flush=True)

    distill(refit, original, train, args.epochs, args.lr, args.temperature, args.batch, args.seed, on_epoch)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
