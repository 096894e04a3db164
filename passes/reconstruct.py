"""reconstruct: refit the consumers of pruned channel groups by ridge least squares.

After a plan removed channels, every *terminal consumer* of a pruned group (Conv with group 1,
Gemm, MatMul reading the group's channels) sees fewer inputs. Following He et al. 2017
("Channel Pruning for Accelerating Very Deep Neural Networks", the least-squares reconstruction
step) and Kwon et al. 2022 (post-training mask tuning by layer-wise least squares, of which a
full refit is the unconstrained case), we refit each consumer's weights and bias so that its
output on calibration images matches the *unpruned* model's output of the same node:

    minimise ‖A·W − Z‖² + λ·‖W − W₀‖²   (bias row not regularised)

``A`` holds the consumer's inputs in the *pruned* model (im2col patches for k×k convolutions,
feature rows for Gemm/MatMul) plus a ones column, so errors accumulated upstream are corrected
too; ``Z`` is the unpruned model's consumer output; ``W₀`` the current (sliced) weights, so
λ → ∞ means "no refit". ``AᵀA`` and ``AᵀZ`` are accumulated over calibration batches at a
seeded random subset of output positions (memory bounded: at most ``rows`` rows per consumer).
The calibration images are split 80/20: λ is chosen on the held-out fifth from a small grid
(scaled by the mean diagonal of ``AᵀA``) *including* "no refit", and the chosen λ is then refit
on all rows. A consumer whose refit does not lower the held-out error keeps its weights.

Consumers are processed in topological order. ``mode="sequential"`` re-runs the (already
partly refit) pruned model for every consumer, so each refit sees its upstream refits;
``mode="parallel"`` takes all consumer inputs from one run (faster; used inside the search).
No training loop, no autograd: numpy/scipy only.

The pass needs the unpruned model: the ``prune`` pass leaves it in the compile context under
``annotations["prune"]["source_digest"]``; standalone runs pass it with ``original=PATH``.
Its numeric guard cannot compare with a reference (outputs change by design); the reference
is the input model with an infinite tolerance, so the guard checks only that the result runs,
keeps every output's shape and adds no NaN. The pass's own check is the held-out error above,
and it records top-1 on the evaluation images not used by the search (with and without
reconstruction, same plan) in ``annotations["reconstruct"]``.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import scipy.linalg
from onnx import numpy_helper

from hqpc.graphutil import GraphIndex, attributes
from hqpc.passmanager import Pass, PassInfo
from hqpc.registry import register_pass
from hqpc.runtime import ort as ort_rt
from hqpc.runtime.compare import Tolerance

LAMBDA_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0)
UNCHECKED = Tolerance(atol=float("inf"), rtol=float("inf"))


# --------------------------------------------------------------------------- consumer geometry
@dataclass
class _Consumer:
    name: str
    op: str
    x: str                    # input activation
    y: str                    # output
    weight: str
    bias: str | None
    attrs: dict
    w0: np.ndarray            # current weight in the (rows=d+1, cols=Cout) fit layout
    shape: tuple              # original weight shape
    alpha: float = 1.0
    beta: float = 1.0
    trans_b: int = 0


def _consumer(graph: onnx.GraphProto, index: GraphIndex, name: str) -> _Consumer | None:
    node = next((n for n in graph.node if n.name == name), None)
    if node is None or len(node.input) < 2:
        return None
    w = index.constant(node.input[1])
    if w is None or w.dtype != np.float32:
        return None
    attrs = attributes(node)
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = index.constant(bias_name) if bias_name else None
    if bias_name and bias is None:
        return None
    if node.op_type == "Conv":
        if w.ndim != 4 or int(attrs.get("group", 1)) != 1:
            return None
        cout = w.shape[0]
        mat = w.reshape(cout, -1).T.astype(np.float64)
        b = np.zeros(cout) if bias is None else bias.astype(np.float64).reshape(cout)
        return _Consumer(name, "Conv", node.input[0], node.output[0], node.input[1], bias_name, attrs,
                         np.vstack([mat, b[None, :]]), w.shape)
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or w.ndim != 2:
            return None
        trans_b = int(attrs.get("transB", 0))
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        mat = (w.T if trans_b else w).astype(np.float64) * alpha
        n = mat.shape[1]
        if bias is None:
            b = np.zeros(n)
        elif bias.size in (1, n) and bias.ndim <= 2:
            b = np.broadcast_to(bias.astype(np.float64).reshape(-1), (n,)) * beta
        else:
            return None
        c = _Consumer(name, "Gemm", node.input[0], node.output[0], node.input[1], bias_name, attrs,
                      np.vstack([mat, b[None, :]]), w.shape, alpha=alpha, beta=beta, trans_b=trans_b)
        return c
    if node.op_type == "MatMul" and w.ndim == 2:
        mat = w.astype(np.float64)
        return _Consumer(name, "MatMul", node.input[0], node.output[0], node.input[1], None, attrs,
                         np.vstack([mat, np.zeros((1, mat.shape[1]))]), w.shape)
    return None


def _conv_pads(c: _Consumer, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    kh, kw = c.shape[2], c.shape[3]
    sh, sw = c.attrs.get("strides", [1, 1])
    dh, dw = c.attrs.get("dilations", [1, 1])
    auto = c.attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "") or auto is None:
        p = list(c.attrs.get("pads", [0, 0, 0, 0]))
        return p[0], p[1], p[2], p[3]
    if auto == "VALID":
        return 0, 0, 0, 0
    pads = []
    for size, out, k, s, d in ((in_hw[0], out_hw[0], kh, sh, dh), (in_hw[1], out_hw[1], kw, sw, dw)):
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        pads.append((large, small) if auto == "SAME_LOWER" else (small, large))
    return pads[0][0], pads[1][0], pads[0][1], pads[1][1]


def _positions(c: _Consumer, n: int, out_hw: tuple[int, int], rng: np.random.Generator, per_image: int):
    """Sampled output positions (image, row, col) of a batch of ``n`` images."""
    if c.op in ("Gemm", "MatMul"):
        return np.arange(n), None, None
    ho, wo = out_hw
    count = min(per_image, ho * wo)
    picks = np.concatenate([rng.choice(ho * wo, count, replace=False) + i * ho * wo for i in range(n)])
    img, pos = picks // (ho * wo), picks % (ho * wo)
    return img, pos // wo, pos % wo


def _inputs(c: _Consumer, x: np.ndarray, picks, out_hw: tuple[int, int]) -> np.ndarray:
    """Input rows (im2col patches or features) at ``picks``, with a ones column (float64)."""
    img, oh, ow = picks
    if c.op in ("Gemm", "MatMul"):
        a = x.reshape(-1, x.shape[-1]).astype(np.float64)
        return np.hstack([a, np.ones((a.shape[0], 1))])
    _, cin, h, w = x.shape
    kh, kw = c.shape[2], c.shape[3]
    sh, sw = c.attrs.get("strides", [1, 1])
    dh, dw = c.attrs.get("dilations", [1, 1])
    pt, pl, pb, pr = _conv_pads(c, (h, w), out_hw)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    rows = (oh * sh)[:, None, None] + (np.arange(kh) * dh)[None, :, None]
    cols = (ow * sw)[:, None, None] + (np.arange(kw) * dw)[None, None, :]
    patches = xp[img[:, None, None, None], np.arange(cin)[None, :, None, None], rows[:, None, :, :],
                 cols[:, None, :, :]]
    a = patches.reshape(len(img), -1).astype(np.float64)
    return np.hstack([a, np.ones((a.shape[0], 1))])


def _outputs(c: _Consumer, y: np.ndarray, picks) -> np.ndarray:
    img, oh, ow = picks
    if c.op in ("Gemm", "MatMul"):
        return y.reshape(-1, y.shape[-1]).astype(np.float32)
    return y[img, :, oh, ow].astype(np.float32)


class _Normal:
    """Streaming normal equations of the fit and validation rows."""

    def __init__(self, d: int, n: int):
        self.g = np.zeros((d, d))
        self.r = np.zeros((d, n))
        self.gv = np.zeros((d, d))
        self.rv = np.zeros((d, n))
        self.zz_v = 0.0
        self.rows = 0

    def add(self, a: np.ndarray, z: np.ndarray, validation: bool) -> None:
        if validation:
            self.gv += a.T @ a
            self.rv += a.T @ z
            self.zz_v += float((z * z).sum())
        else:
            self.g += a.T @ a
            self.r += a.T @ z
        self.rows += a.shape[0]

    def val_error(self, w: np.ndarray) -> float:
        return float(np.einsum("ij,ij->", w, self.gv @ w) - 2.0 * np.einsum("ij,ij->", w, self.rv) + self.zz_v)

    def solver(self, w0: np.ndarray, full: bool) -> Callable[[float], np.ndarray]:
        """λ ↦ argmin ‖A·W − Z‖² + λ·s·‖W − W₀‖² with an unregularised bias row, s the mean
        diagonal of the centred Gram matrix. One eigendecomposition serves every λ."""
        g = self.g + self.gv if full else self.g
        r = self.r + self.rv if full else self.r
        n = max(g[-1, -1], 1.0)
        sa, sz = g[:-1, -1], r[-1]
        gc = g[:-1, :-1] - np.outer(sa, sa) / n
        rc = r[:-1] - np.outer(sa, sz) / n
        evals, evecs = np.linalg.eigh((gc + gc.T) / 2.0)
        evals = np.maximum(evals, 0.0)
        scale = max(float(evals.mean()), 1e-12)
        w0_body = w0[:-1]

        def solve(lam: float) -> np.ndarray:
            rhs = evecs.T @ (rc + lam * scale * w0_body)
            body = evecs @ (rhs / (evals + lam * scale)[:, None])
            bias = (sz - sa @ body) / n
            return np.vstack([body, bias[None, :]])

        return solve


def _fit(normal: _Normal, w0: np.ndarray) -> tuple[np.ndarray | None, dict]:
    base = normal.val_error(w0)
    solve = normal.solver(w0, full=False)
    best_err, best_lam = base, None
    for lam in LAMBDA_GRID:
        err = normal.val_error(solve(lam))
        if np.isfinite(err) and err < best_err:
            best_err, best_lam = err, lam
    info = {"rows": int(normal.rows), "val_error_before": base, "val_error_after": best_err,
            "lambda": best_lam}
    if best_lam is None:
        return None, info
    return normal.solver(w0, full=True)(best_lam), info


def _write_back(graph: onnx.GraphProto, c: _Consumer, w: np.ndarray, names) -> None:
    from hqpc.passes.prune_channels import _write_constant

    mat, b = w[:-1], w[-1]
    if c.op == "Conv":
        weight = mat.T.reshape(c.shape).astype(np.float32)
    elif c.op == "Gemm":
        m = mat / c.alpha
        weight = (m.T if c.trans_b else m).astype(np.float32)
        b = b / c.beta if c.beta else b
    else:
        weight = mat.astype(np.float32)
    _write_constant(graph, c.weight, weight)
    if c.op == "MatMul":
        return
    if c.bias:
        old = numpy_helper.to_array(next(t for t in graph.initializer if t.name == c.bias)) \
            if any(t.name == c.bias for t in graph.initializer) else None
        shape = old.shape if old is not None else (len(b),)
        value = np.broadcast_to(b.astype(np.float32), (len(b),)).reshape(shape) if old is not None and old.size == len(b) \
            else b.astype(np.float32)
        _write_constant(graph, c.bias, value)
    elif np.any(b != 0):
        name = names(f"{c.name}_bias")
        graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), name))
        node = next(n for n in graph.node if n.name == c.name)
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name


# --------------------------------------------------------------------------- driver
def _ancestors(proto: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """The sub-model computing ``tensors`` (their ancestor nodes only), with them as outputs."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    need, stack, keep = set(), list(tensors), set()
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        node = producer.get(t)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    out.graph.node.extend(n for n in graph.node if id(n) in keep)
    used = {i for n in out.graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    del out.graph.output[:]
    vi = {v.name: v for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
    for t in tensors:
        out.graph.output.append(copy.deepcopy(vi[t]) if t in vi else onnx.helper.make_empty_tensor_value_info(t))
    inputs = [i for i in graph.input if i.name in need]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def _run_batches(proto: onnx.ModelProto, names: list[str], batches: list[np.ndarray], input_name: str):
    model = _ancestors(proto, names)
    sess = ort_rt.session(model, optimization="all")
    for x in batches:
        yield dict(zip(names, sess.run(names, {input_name: x})))


def reconstruct_model(pruned: onnx.ModelProto, original: onnx.ModelProto, consumers: list[str],
                      images: np.ndarray, out_kept: dict[str, np.ndarray] | None = None,
                      mode: str = "sequential", rows: int = 8192, seed: int = 0, batch: int = 32,
                      target_cache: dict | None = None,
                      log: Callable[[str], None] = lambda m: None) -> tuple[onnx.ModelProto, list[dict]]:
    """Refit ``consumers`` of ``pruned`` to match ``original`` on ``images`` (see module doc).

    ``out_kept[c]`` are the original output channels consumer ``c`` still has (when its own
    outputs were pruned too). ``target_cache`` (a dict kept by the caller) holds the unpruned
    model's sampled outputs across calls with the same images, rows and seed.
    Returns the new model and one record per consumer."""
    from hqpc.graphutil import NameGenerator

    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    graph = out.graph
    out_kept = out_kept or {}
    order = {n.name: i for i, n in enumerate(graph.node)}
    consumers = sorted({c for c in consumers if c in order}, key=order.get)
    input_name = ort_rt.graph_inputs(pruned)[0].name
    n_images = len(images)
    batches = [images[i:i + batch] for i in range(0, n_images, batch)]
    n_val = max(1, n_images // 5)
    val_from = n_images - n_val
    names = NameGenerator(graph)
    records: list[dict] = []
    cache = target_cache if target_cache is not None else {}

    index = GraphIndex.build(graph)
    specs = {name: _consumer(graph, index, name) for name in consumers}
    for name, spec in specs.items():
        if spec is None:
            records.append({"node": name, "refit": False, "reason": "unsupported consumer"})
    active = [name for name in consumers if specs[name] is not None]
    if not active:
        return out, records
    from hqpc.passes._rewrite import ShapeTable

    shapes = ShapeTable(original)

    original_index = GraphIndex.build(original.graph)
    original_specs = {name: _consumer(original.graph, original_index, name) for name in active}

    def per_image(name: str) -> int:
        # sized by the *unpruned* consumer, so that cached targets and this call's inputs are
        # sampled at the same positions whatever the consumer's current output count
        c = original_specs[name] or specs[name]
        budget = max(1024, min(rows, 4_000_000 // max(1, c.w0.shape[1])))
        return max(1, int(np.ceil(budget / max(1, n_images))))

    def out_hw(name: str) -> tuple[int, int]:
        shape = shapes.shape(specs[name].y)
        return (int(shape[2]), int(shape[3])) if specs[name].op == "Conv" else (1, 1)

    def picks_for(name: str, b: int, n: int):
        digest = hashlib.sha256(f"{seed}:{name}:{b}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return _positions(specs[name], n, out_hw(name), rng, per_image(name))

    key_base = (hashlib.sha256(images[:4].tobytes()).hexdigest(), n_images, rows, seed, batch)
    missing = [n for n in active if (key_base, n) not in cache]
    if missing:
        collected = {n: [] for n in missing}
        for b, zb in enumerate(_run_batches(original, [specs[n].y for n in missing], batches, input_name)):
            for n in missing:
                collected[n].append(_outputs(specs[n], zb[specs[n].y], picks_for(n, b, len(batches[b]))))
        for n in missing:
            cache[(key_base, n)] = collected[n]

    def fit_group(names_: list[str], current: onnx.ModelProto) -> None:
        normals = {n: _Normal(specs[n].w0.shape[0], specs[n].w0.shape[1]) for n in names_}
        xs = _run_batches(current, [specs[n].x for n in names_], batches, input_name)
        for b, xb in enumerate(xs):
            start = b * batch
            for n in names_:
                c = specs[n]
                picks = picks_for(n, b, len(batches[b]))
                a = _inputs(c, xb[c.x], picks, out_hw(n))
                z = cache[(key_base, n)][b].astype(np.float64)
                if n in out_kept:
                    z = z[:, out_kept[n]]
                img = picks[0] + start
                val = img >= val_from
                if val.all() or not val.any():
                    normals[n].add(a, z, bool(val.all()))
                else:
                    normals[n].add(a[~val], z[~val], False)
                    normals[n].add(a[val], z[val], True)
        for n in names_:
            c = specs[n]
            w, info = _fit(normals[n], c.w0)
            info = {"node": n, "refit": w is not None, **info}
            records.append(info)
            if w is not None:
                _write_back(graph, c, w, names)

    if mode == "parallel":
        fit_group(active, pruned)
    else:
        for name in active:
            fit_group([name], out)
    improved = sum(1 for r in records if r.get("refit"))
    log(f"reconstruct: refit {improved} of {len(consumers)} consumers ({mode}, {n_images} images)")
    return out, records


def consumers_of_plan(groups, plan) -> tuple[list[str], dict[str, np.ndarray]]:
    """Terminal consumers of the planned groups and, for those whose own output channels are
    pruned too, the kept original output channel indices."""
    from hqpc.passes.prune_channels import _member_sizes, kept_indices

    consumers = sorted({c for gid in plan for c in groups.group(gid).consumers})
    kept = kept_indices(groups, plan, _member_sizes(groups))
    out_kept = {}
    outputs = {m.node: (m.tensor, m.axis) for g in groups.groups for m in g.members if m.role == "act"}
    for c in consumers:
        key = outputs.get(c)
        if key is not None and key in kept:
            out_kept[c] = kept[key]
    return consumers, out_kept


# --------------------------------------------------------------------------- the pass
ORIGINALS = "prune-original"  # ctx.analyses key prefix: (ORIGINALS, digest of the unpruned model)


@register_pass
class Reconstruct(Pass):
    """Refit the consumers of the pruned groups by ridge least squares on calibration images."""

    info = PassInfo("reconstruct", opt_level=3, tolerance=UNCHECKED,
                    description="refit consumers of pruned channels by least squares on calibration data")
    options = {"original": "", "mode": "sequential", "images": 384, "rows": 8192}

    def run(self, model, ctx) -> bool:
        from hqpc.ir import Model
        from hqpc.passes.channel_groups import analyze
        from hqpc.passes.prune_channels import normalize_plan, parse_plan

        info = model.annotations.get("prune") or model.annotations.get("prune_channels") or {}
        plan_json = info.get("plan")
        if not plan_json:
            ctx.log("reconstruct: no pruning plan in the model (run prune or prune-channels first); nothing to do")
            return False
        if ctx.data is None:
            ctx.log("reconstruct: needs --data (calibration images); skipped")
            return False
        if self.config["original"]:
            original = Model.load(self.config["original"])
        else:
            original = ctx.analyses.get((ORIGINALS, info.get("source_digest", "")))
            if original is None:
                ctx.log("reconstruct: the unpruned model is not available (give original=PATH); skipped")
                return False
        groups = analyze(original.proto)
        plan = normalize_plan(groups, parse_plan(__import__("json").dumps({"plan": plan_json})))
        from hqpc.passes.prune_search import RECONSTRUCTED, proto_digest, split_arrays

        consumers, out_kept = consumers_of_plan(groups, plan)
        x, _ = split_arrays(ctx, "calib", int(self.config["images"]))
        key = (RECONSTRUCTED, proto_digest(model.proto), self.config["mode"], int(len(x)), int(self.config["rows"]),
               ctx.seed)
        if key in ctx.analyses:  # the search already refit this very model with these settings
            new_proto, records = ctx.analyses[key], [{"node": c, "refit": True, "reused": True} for c in consumers]
            ctx.log("reconstruct: reusing the refit computed by the prune search")
        else:
            new_proto, records = reconstruct_model(model.proto, original.proto, consumers, x, out_kept=out_kept,
                                                   mode=self.config["mode"], rows=int(self.config["rows"]),
                                                   seed=ctx.seed, log=ctx.log)
        summary: dict[str, Any] = {"mode": self.config["mode"], "images": int(len(x)),
                                   "consumers": _jsonable(records)}
        try:
            from hqpc.passes.prune_search import heldout_top1

            before, after, source = heldout_top1(ctx, info, [model.proto, new_proto])
            summary.update({"heldout_metric": source, "top1_without": before, "top1_with": after})
            ctx.log(f"reconstruct: held-out {source} {before:.2f} -> {after:.2f}")
        except Exception as exc:  # the measurement is informative only
            summary["heldout_error"] = f"{type(exc).__name__}: {exc}"
        model.proto = new_proto
        model.annotations["reconstruct"] = summary
        return any(r.get("refit") for r in records)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else str(v)
    if isinstance(value, np.integer):
        return int(value)
    return value
