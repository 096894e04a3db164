"""Can whole residual branches go instead of channels? A feasibility measurement for pruning.

For every residual Add of a shared model whose one input is produced by a Conv (the end of a
residual branch) and whose other input is the skip path, the branch is removed by zeroing that
Conv's weights (the block then adds only its bias), one branch at a time, and top-1 is measured
on the first ``--search`` images of the data spec's eval split. Branches are then dropped
greedily, least harmful first, while the search drop stays within ``--max-drop``; the result is
evaluated on the remaining (held-out) eval images.

Usage:
  python bench/bench_block_drop.py                                # CIFAR ResNet-56
  python bench/bench_block_drop.py --model cifar10_resnet20 --search 2000 --max-drop 1.0
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "models"
DATA = {"cifar10_resnet20": "cifar10_resnet.toml", "cifar10_resnet56": "cifar10_resnet.toml",
        "mobilenet_v2": "imagenet_mobilenet.toml", "mobilenet_v3_small": "imagenet_mobilenet.toml"}


def branch_ends(model: onnx.ModelProto) -> list[str]:
    """Names of the Convs that end a residual branch (one input of an Add, the other input
    produced by another node)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    ends = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for mine, other in ((0, 1), (1, 0)):
            p = producer.get(node.input[mine])
            if p is not None and p.op_type == "Conv" and node.input[other] in producer:
                ends.append(p.name)
                break
    return ends


def without_branches(model: onnx.ModelProto, convs: list[str]) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    nodes = {n.name: n for n in out.graph.node}
    inits = {t.name: t for t in out.graph.initializer}
    for name in convs:
        weight = inits[nodes[name].input[1]]
        weight.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(weight)), weight.name))
    return out


def top1(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, batch: int = 250) -> float:
    from hqpc.runtime import ort as ort_rt

    sess = ort_rt.session(model, threads=1)
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return 100.0 * float(np.mean(pred == y))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar10_resnet56", choices=sorted(DATA))
    parser.add_argument("--search", type=int, default=2000)
    parser.add_argument("--max-drop", type=float, default=1.0)
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"shared models not found at {SHARED}", file=sys.stderr)
        return 2
    from hqpc.runtime.data import DataSpec

    model = onnx.load(SHARED / f"{args.model}.onnx")
    x, y = DataSpec.load(REPO / "examples" / "data" / DATA[args.model]).split("eval").arrays()
    xs, ys, xh, yh = x[:args.search], y[:args.search], x[args.search:], y[args.search:]
    base_search, base_held = top1(model, xs, ys), top1(model, xh, yh)
    ends = branch_ends(model)
    print(f"{args.model}: {len(ends)} residual branches; top-1 search {base_search:.2f} % "
          f"({len(ys)} images), held-out {base_held:.2f} % ({len(yh)} images)")
    alone = {name: top1(without_branches(model, [name]), xs, ys) for name in ends}
    for name in sorted(ends, key=lambda n: -alone[n]):
        print(f"  without {name:45s} search {alone[name]:6.2f} %  (drop {base_search - alone[name]:5.2f})")
    dropped: list[str] = []
    for name in sorted(ends, key=lambda n: -alone[n]):
        trial = top1(without_branches(model, dropped + [name]), xs, ys)
        if base_search - trial <= args.max_drop:
            dropped.append(name)
            print(f"  dropped {len(dropped)}: {name} (search {trial:.2f} %)")
    held = top1(without_branches(model, dropped), xh, yh)
    print(f"greedy: {len(dropped)} of {len(ends)} branches within {args.max_drop} pt on the search images; "
          f"held-out {base_held:.2f} -> {held:.2f} % (drop {base_held - held:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
