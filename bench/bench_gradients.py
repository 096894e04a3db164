"""Forward+backward time per batch: hqpc gradient graph on ONNX Runtime vs torch autograd.

For each model the same ONNX weights are loaded into

* ours: ``build_gradient_model`` (mean cross-entropy, gradients w.r.t. every
  Conv/Gemm weight and bias) run by one ONNX Runtime CPU session with all
  graph optimisations, and
* torch: a small ONNX->torch interpreter (the ops of the shared models) with
  the same tensors as leaf parameters; ``torch.autograd.grad`` of the same
  loss.

Both use the same number of threads (default: all cores) and the same random
batch; ours and torch are run alternately (so both see the same background
load) and the median of ``--repeat`` timed iterations (after warm-up) is
reported, together with the agreement of the two sets of gradients.  torch is
used only here, never by the library or the tests.

    python bench/bench_gradients.py [--models mobilenet_v2 cifar10_resnet56] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "data" / "models"
DEFAULT_MODELS = ["mobilenet_v2", "cifar10_resnet56"]
INPUT_HW = {"mobilenet_v2": 224, "mobilenet_v3_small": 224, "cifar10_resnet20": 32, "cifar10_resnet56": 32}


# ---------------------------------------------------------------- torch side
def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class TorchInterpreter:
    """Executes an ONNX graph with torch ops (only what the shared models use)."""

    def __init__(self, model: onnx.ModelProto, params: list[str]):
        import torch

        self.torch = torch
        self.model = model
        self.consts = {}
        self.params = {}
        for t in model.graph.initializer:
            arr = numpy_helper.to_array(t).copy()
            ten = torch.from_numpy(arr)
            if t.name in params:
                ten = ten.clone().requires_grad_(True)
                self.params[t.name] = ten
            self.consts[t.name] = ten
        self.nodes = list(model.graph.node)

    def _pads2d(self, pads, n):
        # ONNX [b1..bn, e1..en] -> F.pad order (last dim first): [b_n, e_n, ..., b_1, e_1]
        out = []
        for i in reversed(range(n)):
            out += [pads[i], pads[n + i]]
        return out

    def __call__(self, x):
        torch = self.torch
        F = torch.nn.functional
        env = dict(self.consts)
        env[self.model.graph.input[0].name] = x
        for n in self.nodes:
            a = _attrs(n)
            ins = [env[i] if i else None for i in n.input]
            op = n.op_type
            if op == "Conv":
                x_, w = ins[0], ins[1]
                b = ins[2] if len(ins) > 2 else None
                k = w.shape[2:]
                pads = list(a.get("pads", [0] * (2 * len(k))))
                ap = a.get("auto_pad", b"NOTSET")
                assert ap in (b"NOTSET", "NOTSET", b"VALID", "VALID"), ap
                if pads[: len(k)] == pads[len(k):]:
                    y = F.conv2d(x_, w, b, stride=a.get("strides", 1), padding=pads[: len(k)],
                                 dilation=a.get("dilations", 1), groups=a.get("group", 1))
                else:
                    x_ = F.pad(x_, self._pads2d(pads, len(k)))
                    y = F.conv2d(x_, w, b, stride=a.get("strides", 1), dilation=a.get("dilations", 1),
                                 groups=a.get("group", 1))
            elif op == "Relu":
                y = F.relu(ins[0])
            elif op == "Clip":
                lo = float(ins[1]) if len(ins) > 1 and ins[1] is not None else None
                hi = float(ins[2]) if len(ins) > 2 and ins[2] is not None else None
                y = F.hardtanh(ins[0], lo, hi) if lo is not None and hi is not None else torch.clamp(ins[0], lo, hi)
            elif op == "HardSigmoid":
                y = torch.clamp(ins[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0, 1)
            elif op == "HardSwish":
                y = F.hardswish(ins[0])
            elif op in ("Add", "Mul", "Sub", "Div"):
                y = {"Add": torch.add, "Mul": torch.mul, "Sub": torch.sub, "Div": torch.div}[op](ins[0], ins[1])
            elif op == "AveragePool":
                k = a["kernel_shape"]
                pads = list(a.get("pads", [0] * (2 * len(k))))
                assert pads[: len(k)] == pads[len(k):]
                y = F.avg_pool2d(ins[0], k, a.get("strides", k), pads[: len(k)],
                                 ceil_mode=bool(a.get("ceil_mode", 0)),
                                 count_include_pad=bool(a.get("count_include_pad", 0)))
            elif op == "GlobalAveragePool":
                y = ins[0].mean(dim=(2, 3), keepdim=True)
            elif op == "Reshape":
                shape = [int(s) for s in ins[1].tolist()]
                shape = [ins[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
                y = ins[0].reshape(shape)
            elif op == "Flatten":
                y = torch.flatten(ins[0], a.get("axis", 1))
            elif op == "Gemm":
                A, B = ins[0], ins[1]
                if a.get("transA", 0):
                    A = A.t()
                if a.get("transB", 0):
                    B = B.t()
                y = a.get("alpha", 1.0) * (A @ B)
                if len(ins) > 2 and ins[2] is not None:
                    y = y + a.get("beta", 1.0) * ins[2]
            elif op == "Slice":
                starts, ends = ins[1].tolist(), ins[2].tolist()
                axes = ins[3].tolist() if len(ins) > 3 else list(range(len(starts)))
                steps = ins[4].tolist() if len(ins) > 4 else [1] * len(starts)
                idx = [slice(None)] * ins[0].dim()
                for ax, s, e, st in zip(axes, starts, ends, steps):
                    idx[ax] = slice(s, min(e, ins[0].shape[ax]), st)
                y = ins[0][tuple(idx)]
            elif op == "Pad":
                pads = ins[1].tolist()
                cv = float(ins[2]) if len(ins) > 2 and ins[2] is not None else 0.0
                y = F.pad(ins[0], self._pads2d(pads, ins[0].dim()), value=cv)
            else:
                raise NotImplementedError(f"bench interpreter: op {op}")
            env[n.output[0]] = y
        return env[self.model.graph.output[0].name]


# ------------------------------------------------------------------ helpers
def params_of(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            out += [i for i in n.input[1:3] if i in inits]
    return list(dict.fromkeys(out))


def interleaved(fns: dict, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Time each callable ``repeat`` times, alternating between them so that
    both see the same machine load; returns all wall-clock times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def bench_model(name: str, batch: int, threads: int, warmup: int, repeat: int, options: dict) -> dict:
    import torch
    from hqpc.passes.gradients import build_gradient_model

    path = MODELS / f"{name}.onnx"
    model = onnx.load(str(path))
    model17 = onnx.version_converter.convert_version(model, 17)  # as the compiler does
    model17.ir_version = 8
    wrt = params_of(model17)
    hw = INPUT_HW[name]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch, 3, hw, hw)).astype(np.float32)

    t0 = time.perf_counter()
    gm = build_gradient_model(model17, wrt, options=options)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    sess = gm.session(threads=threads)
    t_session = time.perf_counter() - t0
    ncls = sess.run([gm.logits_output], gm.feeds({"input": x[:1]}, labels=np.zeros(1, np.int64)))[0].shape[1]
    labels = rng.integers(0, ncls, size=batch)
    feeds = gm.feeds({"input": x}, labels=labels)
    out_names = [gm.loss_output] + [gm.grad_outputs[w] for w in wrt]
    ours = sess.run(out_names, feeds)

    # forward only (same ORT settings), for context
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    fsess = ort.InferenceSession(model17.SerializeToString(), so, providers=["CPUExecutionProvider"])

    torch.set_num_threads(threads)
    interp = TorchInterpreter(model17, wrt)
    xt = torch.from_numpy(x)
    lt = torch.from_numpy(labels.astype(np.int64))
    plist = [interp.params[w] for w in wrt]

    def torch_step():
        logits = interp(xt)
        loss = torch.nn.functional.cross_entropy(logits.reshape(batch, -1), lt)
        return loss, torch.autograd.grad(loss, plist)

    times = interleaved({"ours": lambda: sess.run(out_names, feeds), "torch": torch_step,
                         "fwd": lambda: fsess.run(None, {"input": x})}, warmup, repeat)
    t_ours, t_torch, t_fwd = (statistics.median(times[k]) for k in ("ours", "torch", "fwd"))
    ts_ours, ts_torch = times["ours"], times["torch"]
    loss_t, grads_t = torch_step()
    loss_t = loss_t.detach()

    def rel(a, b):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    grad_err = max(rel(g, gt.numpy()) for g, gt in zip(ours[1:], grads_t))
    return {
        "model": name, "batch": batch, "threads": threads, "params": len(wrt),
        "ours_s": t_ours, "torch_s": t_torch, "ratio": t_ours / t_torch,
        "ort_forward_s": t_fwd, "build_s": t_build, "session_s": t_session,
        "loss_ours": float(np.asarray(ours[0])), "loss_torch": float(loss_t),
        "max_grad_rel_diff": grad_err, "nodes": len(gm.model.graph.node),
        "ours_all_s": ts_ours, "torch_all_s": ts_torch,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--conv-input-grad", default="auto", choices=["auto", "conv_transpose"])
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if not MODELS.exists():
        print(f"models not found at {MODELS}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    results = []
    print(f"{'model':<20} {'ours (ms)':>10} {'torch (ms)':>11} {'ratio':>6} {'ORT fwd (ms)':>13} {'grad diff':>10}")
    for name in args.models:
        r = bench_model(name, args.batch, args.threads, args.warmup, args.repeat,
                        {"conv_input_grad": args.conv_input_grad})
        results.append(r)
        print(f"{name:<20} {1e3 * r['ours_s']:>10.1f} {1e3 * r['torch_s']:>11.1f} {r['ratio']:>6.2f} "
              f"{1e3 * r['ort_forward_s']:>13.1f} {r['max_grad_rel_diff']:>10.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
