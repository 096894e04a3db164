"""prune: latency-aware structural pruning search within the accuracy budget (part of -O3).

Loop (every quantity recorded in ``model.annotations["prune"]["history"]``):

1. **Scores** (option ``scores``; ``score_source`` in the report says which were used):

   * ``fisher`` — the Fisher channel scores of ``annotate-sensitivity``
     (``annotations["sensitivity"]["channels"][node] = [score per output channel]``; a group
     channel's score is the sum over the group's producers). Moves are ranked by the sum of the
     removed channels' scores per µs saved (the additive second-order estimate of the loss
     increase); re-scored every ``rescore_every`` accepted steps by running
     ``annotate-sensitivity`` on the current model.
   * ``probe`` (``kl-probe``) — measured, no Fisher needed: each group's next chunk is removed,
     the group's consumers are refit by ridge least squares from cached Gram matrices, and the
     increase of KL(original ‖ probe) on calibration images is the move's cost; channels inside
     a group are ranked by the layer-wise OBS saliency ``tr(W_Iᵀ[(H⁻¹)_II]⁻¹W_I)/tr(WᵀHW)``
     (see :class:`Prober`). A data-driven proxy, not a Fisher score.
   * ``fisher+probe`` (the default when Fisher scores exist; ``auto`` falls back to ``probe``
     without them) — Fisher scores choose *which* channels of a group go, the measured probe
     prices the move. Reason: Fisher scores ignore the least-squares reconstruction that
     follows and rank some moves as cheap that cost several points (MobileNetV2: 4 of the
     first 10 pure-Fisher moves dropped 2.4-3.6 top-1 points each), while within a group they
     select channels as well as greedy OBS (ResNet-56, every inner group halved and
     reconstructed: Fisher 74.5 %, greedy OBS 74.5 %, one-shot OBS 73.2 %, weight L2 66.0 %).
2. **Latency saved** by a move (group g keeps k' < k channels) from a per-node cost model:
   each node's measured latency (ONNX Runtime profiling for ``cpu``; the roofline model of
   :mod:`hqpc.runtime.latency` for other targets) scaled by its channel-block work
   (``⌈C_in/B⌉·⌈C_out/B⌉`` for dense convolutions, ``⌈C/B⌉`` for channel-wise ops, ``C_in·C_out``
   for Gemm/MatMul; ``B`` = :func:`hqpc.runtime.latency.channel_block`). Kept counts are
   multiples of the target's ``channel_multiple`` and at least ``min_keep`` of the group; a
   group's moves are the counts where the modelled saving grows (block-aligned for blocked
   kernels, option ``moves=blocks``; ``moves=chunks`` steps by ``chunk`` × the group size).
3. **Step**: apply the moves with the lowest score per µs saved until the estimated latency
   falls by ``step`` × the original latency; build the pruned model (one ``prune-channels``
   rewrite of the original), ``reconstruct`` it (same routine as the pass), evaluate top-1 on
   the search images (or top-1 agreement with the original model without labels) and measure
   the latency side by side with the original.
4. **Accept** when both ``estimate + confidence·σ`` and ``drop + confidence·σ_drop`` stay
   within the budget. The estimate (option ``estimate``, :class:`DropEstimate`) never reads the
   search images' labels: by default (``flips``) every changed prediction costs a fixed
   ``flip_ratio`` (0.5); ``estimate=posterior`` prices a change a₀ → a₁ at p(a₀) − p(a₁) under
   the original model's softmax, temperature-scaled on the calibration labels (not safe on
   every model, see :class:`DropEstimate`). ``raw_confidence`` (default: ``confidence``) is the
   z of the raw-drop check. Reason: a search deciding on the
   measured top-1 drop of a fixed image set drifts (a MobileNetV3 search "improved" by 2
   points on its 250 search images and lost 10 on the held-out ones). The raw paired drop has
   σ_drop = √(discordant)/n. Then re-score and re-profile on the accepted model; otherwise
   halve the step and retry from the last accepted plan; below ``min_step`` one move at a
   time, a rejected single move bans its group, and ``patience`` consecutive rejections end
   the search; so do ``max_steps`` steps and ``time_limit`` seconds of the pass (default 90:
   a step costs a rebuild, a refit, an evaluation and a timing, 10–50 s on MobileNetV2 on
   2 cores, and the early steps, taken in order of cost per saving, carry most of what the
   search finds; ``time_limit=0`` searches without a clock). The time at which each step ended
   is, like the layer profiles and timings, taken on the first compile of an input on a
   machine and reused after (``measure_cache``, as in ``assign-precision``), so the limit stops
   the search at the same step every time and the same input and seed compile to the same
   bytes. The report's ``stopped`` says which ended it.

The budget is ``--max-drop`` minus the share reserved for quantization
(``quant_reserve`` × max-drop, default 0.3, when ``insert-qdq`` will run). Images: the
calibration split for scores and reconstruction; the first ``search_images`` of the evaluation
split for the search; the rest of the evaluation split ("held-out", used by nothing else)
for the final accuracy, recorded with and without reconstruction.

``heldout_curve=true`` (diagnostics, off by default) also records in every *accepted* step's
history entry its model's accuracy on the held-out images (``heldout_top1`` or
``heldout_agreement``): the accuracy/latency frontier of the search as seen by images it never
used. The search's decisions never read it (they are identical with and without the option);
it costs one held-out evaluation per accepted step.

The pass outputs the pruned model *without* reconstruction (its reference: the masked model,
1e-5), plans and all; the ``reconstruct`` pass that follows in -O3 refits the consumers
(reusing the search's result for the final plan).
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from hqpc.ir import Model
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes.channel_groups import ChannelGroups, channel_groups
from hqpc.passes.prune_channels import (PRUNE_TOLERANCE, _member_sizes, apply_plan, kept_indices, masked_model,
                                        plan_to_json)
from hqpc.passes.reconstruct import ORIGINALS, _consumer, _inputs, _positions, consumers_of_plan, reconstruct_model
from hqpc.registry import register_pass
from hqpc.runtime import latency as lat
from hqpc.runtime import ort as ort_rt
from hqpc.runtime.measure_cache import cached_compare, cached_measurement, measurement_cache_dir
from hqpc.runtime.metrics import labels_carry_signal

RECONSTRUCTED = "prune-reconstructed"  # ctx.analyses key: (RECONSTRUCTED, proto digest, settings)


def proto_digest(proto: onnx.ModelProto) -> str:
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


# --------------------------------------------------------------------------- data and metrics
def split_arrays(ctx, split: str, limit: int | None = None):
    key = ("prune-data", str(ctx.data.path), split, limit)
    if key not in ctx.analyses:
        ctx.analyses[key] = ctx.data.split(split).arrays(limit=limit)
    return ctx.analyses[key]


def predictions(proto: onnx.ModelProto, x: np.ndarray, batch: int = 64) -> np.ndarray:
    sess = ort_rt.session(proto, optimization="all")
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    logits = np.concatenate(out)
    return logits.reshape(len(x), -1).argmax(axis=1)


def accuracy(pred: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None) -> float:
    """Top-1 in percent against labels, or agreement with ``reference`` predictions."""
    truth = reference if labels is None else labels
    return 100.0 * float(np.mean(pred == truth))


def paired_sigma(pred: np.ndarray, base_pred: np.ndarray, labels: np.ndarray | None) -> float:
    """Standard error (points) of the accuracy difference of two models on the same images."""
    truth = base_pred if labels is None else labels
    discordant = np.sum((pred == truth) != (base_pred == truth))
    return 100.0 * math.sqrt(float(discordant)) / max(1, len(pred))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.reshape(len(logits), -1).astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the negative log-likelihood of ``labels`` under softmax(logits/T)
    (golden-section search on log T in [-3, 3]); used on the calibration split only."""
    z = logits.reshape(len(logits), -1).astype(np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    ok = (labels >= 0) & (labels < z.shape[1])
    z, labels = z[ok], labels[ok]
    if len(z) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        p = softmax(z, math.exp(log_t))
        return float(-np.mean(np.log(np.maximum(p[np.arange(len(z)), labels], 1e-12))))

    lo, hi = -3.0, 3.0
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2.0))


PROBE_BATCH = 32                 # images per ORT run when collecting reconstruction statistics ...
PROBE_BATCH_BYTES = 192 << 20    # ... unless their activations would exceed this (MobileNetV2 at 224²: 3)

class DropEstimate:
    """Selection-robust estimate of a candidate's top-1 drop, used for the accept decision.

    The raw paired drop on the search images, ``(b − c)/n`` (b: images the original model gets
    right and the candidate wrong, c: the reverse), has standard error ``√(b + c)/n`` and, worse,
    a search that accepts step after step on it selects favourable noise: the accepted models
    look good on exactly those images. Measured on the shared models (changed predictions d,
    ratio γ = net harmful flips / d):

        MobileNetV3-Small, 250 search images: search γ = −0.11, held-out γ = +0.50 (drop 10.4)
        CIFAR ResNet-56, 2000 search images:  search γ = +0.11, held-out γ = +0.31 (drop 1.3)

    so a γ learned from the search images' labels is biased towards zero. The estimate therefore
    never reads the search images' labels; two forms (option ``estimate``):

    * ``flips`` (default) — the label-free share of changed predictions with a fixed
      conservative ratio ``γ₀`` (option ``flip_ratio``, default 0.5): ``drop ≈ γ₀ · d/n``,
      ``σ = γ₀ · √d / n``. Every flip costs γ₀ whatever the original model's confidence, which
      over-charges flips of uncertain predictions (CIFAR ResNet-56: raw drop 0.35, flip
      estimate 1.45).
    * ``posterior`` (option; needs calibration labels) — the original model's
      softmax, temperature-scaled to fit the *calibration* labels, is taken as the distribution
      of the true label of each search image. A changed prediction a₀ → a₁ then costs the
      expected loss ``c = p(a₀) − p(a₁) ≥ 0`` (a flip between two classes the original model
      found equally likely costs nothing, a flip of a confident prediction costs nearly one
      image)::

          drop ≈ mean(c),   σ = std(c) / √n

      It is never negative (a candidate cannot "improve" on it), so accepting on it does not
      select favourable label noise. It is only as good as the calibration, and one global
      temperature was not enough for CIFAR ResNet-56: T = 3.2 (a strongly softened posterior;
      likely because the NLL fit is driven by the confidently wrong 17 %, which also makes
      flips of correct predictions look cheap); the search accepted at estimate 0.49 ± 0.07
      (raw 0.40 ± 0.38) and the held-out drop was 1.28 on 2500 images. Hence not the default.

    The raw drop (and its σ) must pass the budget too and is recorded for every step, as is the
    flip estimate. Without labels the metric is agreement and the drop is the disagreement
    itself (γ₀ = 1).
    """

    def __init__(self, labeled: bool, ratio: float = 0.5, posterior: np.ndarray | None = None):
        self.labeled = labeled
        self.ratio = ratio if labeled else 1.0
        self.posterior = posterior if labeled else None
        self.form = "flips" if self.posterior is None else "posterior"

    def add(self, pred: np.ndarray, base_pred: np.ndarray, labels: np.ndarray | None) -> dict:
        n = max(1, len(pred))
        changed = pred != base_pred
        d = float(np.sum(changed))
        out = {"flips_est": 100.0 * self.ratio * d / n, "flips_sigma": 100.0 * self.ratio * math.sqrt(d) / n,
               "changed": d / n, "flip_ratio": self.ratio}
        if self.posterior is None:
            out.update(drop_est=out["flips_est"], sigma_est=out["flips_sigma"], estimate="flips")
            return out
        rows = np.arange(len(pred))
        c = np.where(changed, self.posterior[rows, base_pred] - self.posterior[rows, pred], 0.0)
        sd = float(np.std(c, ddof=1)) if len(c) > 1 else 0.0
        out.update(drop_est=100.0 * float(np.mean(c)), sigma_est=100.0 * sd / math.sqrt(n), estimate="posterior")
        return out


def heldout_truth(ctx, m0: onnx.ModelProto | None, n_search: int, labeled: bool) -> tuple[np.ndarray, np.ndarray]:
    """The held-out images of a prune run (the evaluation split after its ``n_search`` search
    images) and what a prediction must match there: the labels, or without them the input
    model ``m0``'s predictions (top-1 agreement; ``m0`` is only read then). Score with
    ``accuracy(pred, truth, None)``."""
    x, y = split_arrays(ctx, "eval")
    hx = x[n_search:]
    return hx, (y[n_search:] if labeled and y is not None else predictions(m0, hx))


def heldout_top1(ctx, info: dict, protos: list[onnx.ModelProto]) -> tuple[float, ...]:
    """Accuracy of ``protos`` on the held-out evaluation images of a prune run (the evaluation
    split after its search images), and the metric's name. Without labels: agreement with the
    unpruned model."""
    n_search = int((info.get("images") or {}).get("search", 0))
    x, y = split_arrays(ctx, "eval")
    labeled = y is not None and info.get("metric", "top1") == "top1"  # the search may have set labels aside
    if len(x) <= n_search:
        raise ValueError("no held-out evaluation images")
    original = None if labeled else ctx.analyses[(ORIGINALS, info["source_digest"])].proto
    hx, truth = heldout_truth(ctx, original, n_search, labeled)
    values = [accuracy(predictions(p, hx), truth, None) for p in protos]
    return (*values, "top1" if labeled else "agreement")


# --------------------------------------------------------------------------- cost model
class CostModel:
    """Per-node latency for any plan, scaled from a measured (or roofline) base plan."""

    def __init__(self, groups: ChannelGroups, proto: onnx.ModelProto, block: int):
        self.groups = groups
        self.block = block
        self.sizes = _member_sizes(groups)
        self.nodes = []  # (name, kind, in_dim, out_dim)
        axes = groups.axes
        touched: dict[tuple[str, int], list[int]] = defaultdict(list)
        for node in proto.graph.node:
            x = node.input[0] if node.input else ""
            y = node.output[0] if node.output else ""
            in_dim = (x, axes[x]) if x in axes and (x, axes[x]) in self.sizes else None
            out_dim = (y, axes[y]) if y in axes and (y, axes[y]) in self.sizes else None
            if in_dim is None and out_dim is None:
                continue
            group = 1
            for a in node.attribute:
                if a.name == "group":
                    group = a.i
            if node.op_type in ("Conv", "ConvTranspose") and group == 1:
                kind = "dense"
            elif node.op_type in ("Gemm", "MatMul"):
                kind = "linear"
            else:
                kind = "channelwise"
            index = len(self.nodes)
            self.nodes.append((node.name, kind, in_dim, out_dim))
            for dim in (in_dim, out_dim):
                if dim is not None:
                    touched[dim].append(index)
        self.group_nodes: dict[int, list[int]] = {}
        self.group_dims: dict[int, list[tuple[tuple[str, int], list[int]]]] = {}
        for g in groups.groups:
            dims = [((m.tensor, m.axis), [len(u) for u in m.units]) for m in g.members]
            self.group_dims[g.id] = dims
            self.group_nodes[g.id] = sorted({i for d, _ in dims for i in touched.get(d, [])})
        self.base: dict[str, float] = {}
        self.base_sizes: dict[tuple[str, int], int] = {}

    def dim_sizes(self, plan: dict[int, tuple[int, ...]]) -> dict[tuple[str, int], int]:
        sizes = dict(self.sizes)
        for gid, kept in plan.items():
            keep = set(kept)
            for dim, widths in self.group_dims[gid]:
                sizes[dim] -= sum(w for k, w in enumerate(widths) if k not in keep)
        return sizes

    def work(self, index: int, sizes) -> float:
        _, kind, in_dim, out_dim = self.nodes[index]
        cin = sizes[in_dim] if in_dim else None
        cout = sizes[out_dim] if out_dim else None
        if kind == "dense" and cin and cout:
            return float(lat.blocks(cin, self.block) * lat.blocks(cout, self.block))
        if kind == "linear" and cin and cout:
            return float(cin * cout)
        c = cout or cin or 0
        return float(lat.blocks(c, self.block))

    def rebase(self, node_latency: dict[str, float], plan) -> None:
        """Set the measured per-node latency of the model pruned by ``plan``."""
        self.base = dict(node_latency)
        self.base_sizes = self.dim_sizes(plan)

    def node_latency(self, index: int, sizes) -> float:
        name = self.nodes[index][0]
        base = self.base.get(name, 0.0)
        w0 = self.work(index, self.base_sizes)
        return 0.0 if w0 <= 0 else base * self.work(index, sizes) / w0

    def total(self, plan) -> float:
        sizes = self.dim_sizes(plan)
        covered = sum(self.node_latency(i, sizes) for i in range(len(self.nodes)))
        names = {n[0] for n in self.nodes}
        return covered + sum(v for k, v in self.base.items() if k not in names)

    def saving(self, gid: int, plan, new_kept: tuple[int, ...]) -> float:
        before = self.dim_sizes(plan)
        after_plan = dict(plan)
        after_plan[gid] = new_kept
        after = self.dim_sizes(after_plan)
        return sum(self.node_latency(i, before) - self.node_latency(i, after) for i in self.group_nodes[gid])


# --------------------------------------------------------------------------- scores
def fisher_scores(groups: ChannelGroups, sensitivity: dict, plan, prunable: list[int]) -> dict[int, np.ndarray] | None:
    """Per-group channel scores from Fisher annotations of the *current* model (pruned by
    ``plan``; node names are stable, channel indices are positions among the kept ones)."""
    kept = kept_indices(groups, plan, _member_sizes(groups))
    out = {}
    for gid in prunable:
        g = groups.group(gid)
        acts = [m for m in g.members if m.role == "act" and m.node in g.producers]
        if not acts or any(m.node not in sensitivity for m in acts):
            return None
        score = np.zeros(g.channels)
        for m in acts:
            values = np.asarray(sensitivity[m.node], dtype=np.float64).reshape(-1)
            dim_kept = kept.get((m.tensor, m.axis))
            for u, idx in enumerate(m.units):
                pos = np.searchsorted(dim_kept, idx) if dim_kept is not None else np.asarray(idx)
                if dim_kept is not None and not np.all(dim_kept[np.minimum(pos, len(dim_kept) - 1)] == idx):
                    continue  # unit already removed
                if np.max(pos) < len(values):
                    score[u] += float(values[pos].sum())
        out[gid] = score
    return out


def _kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(logits)) over rows."""
    a = reference_logits.reshape(len(reference_logits), -1).astype(np.float64)
    b = logits.reshape(len(logits), -1).astype(np.float64)
    la = a - a.max(axis=1, keepdims=True)
    la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
    lb = b - b.max(axis=1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
    return float((np.exp(la) * (la - lb)).sum(axis=1).mean())


def _logits(proto: onnx.ModelProto, x: np.ndarray, batch: int = 64) -> np.ndarray:
    sess = ort_rt.session(proto, optimization="all")
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _ridge(g: np.ndarray, r: np.ndarray, w0: np.ndarray, lam: float) -> np.ndarray:
    """Ridge towards ``w0`` from augmented normal equations (last row/col = ones column; the
    bias is not regularised): the same estimator as ``reconstruct``."""
    n = max(g[-1, -1], 1.0)
    sa, sz = g[:-1, -1], r[-1]
    gc = g[:-1, :-1] - np.outer(sa, sa) / n
    rc = r[:-1] - np.outer(sa, sz) / n
    d = gc.shape[0]
    scale = max(float(np.trace(gc)) / max(d, 1), 1e-12)
    body = np.linalg.solve(gc + np.eye(d) * lam * scale, rc + lam * scale * w0[:-1])
    bias = (sz - sa @ body) / n
    return np.vstack([body, bias[None, :]])


class Prober:
    """Measured move costs ("kl-probe"; with Fisher scores: "fisher+probe").

    Per consumer of a prunable group, the Gram matrix ``AᵀA`` of its inputs in the *current*
    model and ``AᵀZ`` against the *unpruned* model's outputs are accumulated on the probe
    (calibration) images at sampled positions. From them:

    * **unit ranking** inside a group: the layer-wise OBS saliency of each channel's input
      slice, ``tr(W_Iᵀ [(H⁻¹)_II]⁻¹ W_I) / tr(Wᵀ H W)`` (H the centred Gram matrix), summed
      over the group's consumers — the output error left after removing the channel and
      refitting the rest;
    * **move cost** of a group (drop its next chunk): those channels are removed, the group's
      consumers are refit by ridge least squares from the cached matrices, and the model's
      logits are compared with the unpruned model's on *other* calibration images
      (``eval_images``; a refit judged on its own fitting images looks perfect where rows are
      few, e.g. a 1280-channel 1x1 layer on 64 images): the cost is the increase of the mean
      KL divergence. This is measured, not a Fisher estimate.
    """

    def __init__(self, groups: ChannelGroups, m0: onnx.ModelProto, images: np.ndarray, prunable: list[int],
                 rows: int = 4096, seed: int = 0, eval_images: np.ndarray | None = None):
        self.groups = groups
        self.m0 = m0
        self.images = images                      # Gram matrices (the local refit) ...
        self.eval_images = images if eval_images is None else eval_images  # ... and KL on other images
        self.prunable = prunable
        self.rows = rows
        self.seed = seed
        self.consumers = sorted({c for gid in prunable for c in groups.group(gid).consumers})
        self.reference = _logits(m0, self.eval_images)
        self.targets: dict[str, list[np.ndarray]] = {}
        self.current = None
        self.batch_size: int | None = None
        self._m0_specs: dict | None = None

    def _specs(self, proto):
        from hqpc.graphutil import GraphIndex

        index = GraphIndex.build(proto.graph)
        specs = {c: _consumer(proto.graph, index, c) for c in self.consumers}
        return {c: s for c, s in specs.items() if s is not None}

    def _picks(self, spec, name: str, b: int, n: int, hw):
        """Sampled positions of batch ``b``: seeded per (consumer, batch) and sized by the
        *unpruned* consumer, so the cached targets and every later model's inputs line up."""
        digest = hashlib.sha256(f"{self.seed}:probe:{name}:{b}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        if self._m0_specs is None:
            self._m0_specs = self._specs(self.m0)
        width = self._m0_specs.get(name, spec).w0.shape[1]
        budget = max(512, min(self.rows, 2_000_000 // max(1, width)))
        per_image = max(1, int(np.ceil(budget / max(1, len(self.images)))))
        return _positions(spec, n, hw, rng, per_image)

    def _batch_size(self, shapes) -> int:
        """Images per ORT run so that the requested activations (every consumer's input and
        output, float32, unpruned shapes) stay within ``PROBE_BATCH_BYTES``; fixed for the
        search, since the sampled positions are seeded per batch index."""
        if self.batch_size is None:
            per_image = 0
            for s in self._specs(self.m0).values():
                for tensor in (s.x, s.y):
                    shape = shapes.shape(tensor)
                    if shape and all(isinstance(d, int) and d > 0 for d in shape[1:]):
                        per_image += 4 * int(np.prod(shape[1:]))
            self.batch_size = int(max(1, min(PROBE_BATCH, PROBE_BATCH_BYTES // max(1, per_image))))
        return self.batch_size

    def prepare(self, current: onnx.ModelProto, plan) -> None:
        """Accumulate the matrices for the model pruned by ``plan`` (and refit)."""
        from hqpc.passes._rewrite import ShapeTable
        from hqpc.passes.reconstruct import _outputs, _run_batches

        specs = self._specs(current)
        shapes = ShapeTable(self.m0)
        hw = {}
        for c, s in specs.items():
            shape = shapes.shape(s.y)
            hw[c] = (int(shape[2]), int(shape[3])) if s.op == "Conv" else (1, 1)
        input_name = ort_rt.graph_inputs(current)[0].name
        size = self._batch_size(shapes)
        batches = [self.images[i:i + size] for i in range(0, len(self.images), size)]
        names = sorted(specs)
        missing = [c for c in names if c not in self.targets]
        if missing:
            collected = {c: [] for c in missing}
            for b, zb in enumerate(_run_batches(self.m0, [specs[c].y for c in missing], batches, input_name)):
                for c in missing:
                    collected[c].append(_outputs(specs[c], zb[specs[c].y], self._picks(specs[c], c, b, len(batches[b]), hw[c])))
            self.targets.update(collected)
        kept = kept_indices(self.groups, plan, _member_sizes(self.groups))
        out_dims = {m.node: (m.tensor, m.axis) for g in self.groups.groups for m in g.members if m.role == "act"}
        grams = {c: np.zeros((s.w0.shape[0], s.w0.shape[0])) for c, s in specs.items()}
        cross = {c: np.zeros(s.w0.shape) for c, s in specs.items()}
        for b, xb in enumerate(_run_batches(current, [specs[c].x for c in names], batches, input_name)):
            for c in names:
                s = specs[c]
                a = _inputs(s, xb[s.x], self._picks(s, c, b, len(batches[b]), hw[c]), hw[c])
                z = self.targets[c][b].astype(np.float64)
                key = out_dims.get(c)
                if key in kept:
                    z = z[:, kept[key]]
                grams[c] += a.T @ a
                cross[c] += a.T @ z
        self.current = current
        self.plan = dict(plan)
        self.kept = kept
        self.specs = specs
        self.grams = grams
        self.cross = cross
        self.current_kl = _kl(self.reference, _logits(current, self.eval_images))
        self._hinv: dict[str, tuple] = {}

    def _positions_of(self, member, units) -> np.ndarray | None:
        """Current input-channel positions of ``units`` of an ``in`` member (None if removed)."""
        dim_kept = self.kept.get((member.tensor, member.axis))
        idx = np.asarray([i for u in units for i in member.units[u]])
        if dim_kept is None:
            return idx
        pos = np.searchsorted(dim_kept, idx)
        if np.any(pos >= len(dim_kept)) or np.any(dim_kept[np.minimum(pos, len(dim_kept) - 1)] != idx):
            return None
        return pos

    def _rows_of(self, c: str, positions: np.ndarray) -> np.ndarray:
        spec = self.specs[c]
        k2 = int(np.prod(spec.shape[2:])) if spec.op == "Conv" else 1
        return (positions[:, None] * k2 + np.arange(k2)[None, :]).reshape(-1)

    def unit_saliency(self, gid: int, units: list[int]) -> dict[int, float]:
        """OBS saliency of each (kept, original-numbered) unit of group ``gid``."""
        g = self.groups.group(gid)
        out = {u: 0.0 for u in units}
        for m in g.members:
            if m.role != "in" or m.node not in self.specs:
                continue
            if m.node not in self._hinv:
                gram = self.grams[m.node]
                n = max(gram[-1, -1], 1.0)
                sa = gram[:-1, -1]
                h = gram[:-1, :-1] - np.outer(sa, sa) / n
                d = h.shape[0]
                h = h + np.eye(d) * (1e-3 * max(np.trace(h) / max(d, 1), 1e-12))
                w = self.specs[m.node].w0[:-1]
                energy = max(float(np.einsum("ij,ij->", w, h @ w)), 1e-12)
                self._hinv[m.node] = (np.linalg.inv(h), w, energy)
            hinv, w, energy = self._hinv[m.node]
            for u in units:
                pos = self._positions_of(m, [u])
                if pos is None:
                    continue
                rows = self._rows_of(m.node, pos)
                block = hinv[np.ix_(rows, rows)]
                wi = w[rows]
                try:
                    inv_block = np.linalg.inv(block)
                except np.linalg.LinAlgError:
                    inv_block = np.linalg.pinv(block)
                out[u] += float(np.einsum("ij,ij->", wi, inv_block @ wi)) / energy
        return out

    def move_cost(self, gid: int, new_kept: tuple[int, ...]) -> float:
        """KL increase on the probe images when group ``gid`` keeps ``new_kept`` (original
        numbering) and its consumers are refit locally."""
        from hqpc.passes.reconstruct import _write_back

        g = self.groups.group(gid)
        kept_now = list(self.plan.get(gid, range(g.channels)))
        positions = [kept_now.index(u) for u in new_kept]
        cur_groups = self._current_groups()
        if cur_groups is None:
            return float("inf")
        probe = apply_plan(self.current, cur_groups, {gid: tuple(positions)})
        from hqpc.graphutil import GraphIndex, NameGenerator

        index = GraphIndex.build(probe.graph)
        names = NameGenerator(probe.graph)
        drop = sorted(set(kept_now) - set(new_kept))
        for m in g.members:
            if m.role != "in" or m.node not in self.specs:
                continue
            pos = self._positions_of(m, drop)
            if pos is None:
                continue
            spec = self.specs[m.node]
            remove = set(self._rows_of(m.node, pos).tolist())
            keep_rows = np.array([i for i in range(spec.w0.shape[0]) if i not in remove])
            gram = self.grams[m.node][np.ix_(keep_rows, keep_rows)]
            w = _ridge(gram, self.cross[m.node][keep_rows], spec.w0[keep_rows], 1e-2)
            target = _consumer(probe.graph, index, m.node)
            if target is not None:
                _write_back(probe.graph, target, w, names)
        return _kl(self.reference, _logits(probe, self.eval_images)) - self.current_kl

    def _current_groups(self):
        if getattr(self, "_cur_groups_for", None) is not self.current:
            from hqpc.passes.channel_groups import analyze

            groups = analyze(self.current)
            ok = len(groups.groups) == len(self.groups.groups) and all(
                {m.tensor for m in a.members} == {m.tensor for m in b.members}
                for a, b in zip(groups.groups, self.groups.groups))
            self._cur_groups = groups if ok else None
            self._cur_groups_for = self.current
        return self._cur_groups


# --------------------------------------------------------------------------- the pass
@register_pass
class Prune(Pass):
    """Latency-aware channel pruning search within the accuracy budget (module docstring)."""

    info = PassInfo("prune", opt_level=3, tolerance=PRUNE_TOLERANCE,
                    description="search the largest channel pruning within the accuracy budget")
    options = {"step": 0.06, "min_step": 0.015, "max_steps": 40, "search_images": 0, "recon_images": 384,
               "recon_rows": 8192, "recon_mode": "sequential", "score_images": 64, "confidence": 1.0,
               "min_keep": 0.125, "chunk": 0.125, "reconstruct": "auto", "rescore_every": 3, "time_limit": 90.0,
               "latency_runs": 30, "patience": 6, "scores": "auto", "measure_cache": "auto",
               "flip_ratio": 0.5, "estimate": "flips",
               "moves": "blocks", "raw_confidence": "auto", "heldout_curve": False}

    def __init__(self, **options: Any):
        super().__init__(**options)
        from hqpc.registry import passes

        if "annotate-sensitivity" in passes():
            self.info = replace(type(self).info, requires=("annotate-sensitivity",))
        self._plan: dict = {}

    def reference(self, before, after, ctx):
        groups = channel_groups(before, ctx)
        return Model(proto=masked_model(before.proto, groups, self._plan), annotations={})

    # ----------------------------------------------------------------- helpers
    def _budget(self, ctx) -> tuple[float, float]:
        from hqpc.registry import passes

        max_drop = float(ctx.config.get("max_drop", 1.0))
        qdq = ctx.opt_level >= 2 and "insert-qdq" not in ctx.disabled and "insert-qdq" in passes()
        reserve = float(ctx.config.get("quant_reserve", 0.3)) * max_drop if qdq else 0.0
        return max_drop - reserve, reserve

    def _use_reconstruct(self, ctx) -> bool:
        choice = str(self.config["reconstruct"]).lower()
        if choice in ("true", "1", "yes", "on"):
            return True
        if choice in ("false", "0", "no", "off"):
            return False
        return ctx.opt_level >= 3 and "reconstruct" not in ctx.disabled

    # ----------------------------------------------------------------- run
    def run(self, model, ctx) -> bool:
        start_time = time.perf_counter()
        if ctx.data is None:
            ctx.log("prune: needs --data (calibration and evaluation images); skipped")
            return False
        if len(ort_rt.graph_inputs(model.proto)) != 1:
            ctx.log("prune: only single-input models are supported; skipped")
            return False
        cfg = self.config
        groups = channel_groups(model, ctx)
        multiple = max(1, int(getattr(ctx.target, "channel_multiple", 8) or 8))
        prunable = [g.id for g in groups.prunable if g.channels > multiple]
        if not prunable:
            ctx.log("prune: no prunable channel group larger than the channel multiple")
            return False
        budget, reserve = self._budget(ctx)
        use_recon = self._use_reconstruct(ctx)
        original = model.copy()
        source_digest = original.digest()
        ctx.analyses[(ORIGINALS, source_digest)] = original
        m0 = original.proto

        # images
        calib_x, _ = split_arrays(ctx, "calib", int(cfg["recon_images"]))
        score_x = calib_x[: int(cfg["score_images"])]
        eval_len = ctx.data.eval
        n_search = int(cfg["search_images"]) or min(max(eval_len // 2, 1), 2000)
        n_search = min(n_search, eval_len)
        search_x, search_y = split_arrays(ctx, "eval", n_search)
        base_pred = predictions(m0, search_x)
        if search_y is not None and not labels_carry_signal(base_pred, search_y):
            ctx.log(f"prune: the input model's top-1 on the {len(search_y)} search images is "
                    f"{accuracy(base_pred, search_y, base_pred):.1f} %, not above chance: the labels carry no "
                    "signal, so the search measures top-1 agreement with the input model")
            search_y = None
        metric = "top1" if search_y is not None else "agreement"
        base_acc = accuracy(base_pred, search_y, base_pred)

        # latency
        backend_cpu = getattr(ctx.target, "backend", "onnxruntime") == "onnxruntime"
        block = lat.channel_block(ctx.target)
        cost = CostModel(groups, m0, block)

        def node_latency(proto):
            if backend_cpu:
                return self._measured("prune-profile", [proto], {}, lambda: lat.profile_layers(proto))
            return lat.roofline_layers(proto, ctx.target)

        cost.rebase(node_latency(m0), {})
        base_est = cost.total({})
        runs = int(cfg["latency_runs"])
        base_meas = self._measured("prune-latency", [m0], {"runs": runs},
                                   lambda: lat.measure(m0, runs=runs)["median_ms"])
        score_source = "kl-probe"
        sensitivity = (model.annotations.get("sensitivity") or {}).get("channels")
        choice = str(cfg["scores"]).lower()
        if choice == "auto":  # Fisher ranks the channels of a group, measured probes rank the groups
            choice = "fisher+probe"
        if choice not in ("auto", "fisher", "probe", "fisher+probe"):
            from hqpc.errors import PipelineError

            raise PipelineError(f"pass 'prune': scores must be auto, fisher, probe or fisher+probe, "
                                f"got {cfg['scores']!r}")
        fisher = fisher_scores(groups, sensitivity, {}, prunable) if sensitivity and choice != "probe" else None
        if choice != "probe" and fisher is None:
            ctx.log("prune: no usable Fisher channel scores (annotate-sensitivity did not cover every group's "
                    "producers); using measured KL probes")
        prober = None
        if fisher is not None:
            score_source = "fisher+probe" if choice == "fisher+probe" else "fisher"
        if fisher is None or choice == "fisher+probe":  # (probe alone when there are no Fisher scores)
            n_score = int(cfg["score_images"])
            prober = Prober(groups, m0, calib_x[:n_score], prunable, seed=ctx.seed,
                            eval_images=calib_x[n_score:2 * n_score] if len(calib_x) > n_score else None)
            prober.prepare(m0, {})
        ctx.log(f"prune: scores from {score_source}; budget {budget:.2f} pt ({metric} on {n_search} search images), "
                f"reconstruction {'on' if use_recon else 'off'}")
        recon_cache: dict = {}

        def build(plan):
            pruned = apply_plan(m0, groups, plan)
            if not use_recon:
                return pruned, pruned
            consumers, out_kept = consumers_of_plan(groups, plan)
            recon, _ = reconstruct_model(pruned, m0, consumers, calib_x, out_kept=out_kept,
                                         mode=cfg["recon_mode"], rows=int(cfg["recon_rows"]), seed=ctx.seed,
                                         target_cache=recon_cache)
            return pruned, recon

        history = [{"step": 0, "accepted": True, "channels_removed": 0, "groups_pruned": 0,
                    "latency_est_us": round(base_est, 1), "latency_ms": round(base_meas, 4), "speedup": 1.0,
                    metric: round(base_acc, 3), "drop": 0.0, "sigma": 0.0}]
        curve = heldout_truth(ctx, m0, n_search, metric == "top1") if cfg["heldout_curve"] and eval_len > n_search \
            else None
        if curve is not None:
            history[0][f"heldout_{metric}"] = round(accuracy(predictions(m0, curve[0]), curve[1], None), 3)
        plan: dict[int, tuple[int, ...]] = {}
        best = {"plan": {}, "pruned": m0, "model": m0, "acc": base_acc}
        self._search = {"fisher": fisher, "prober": prober, "costs": {}, "banned": set(), "saliency": {}}
        step_frac = float(cfg["step"])
        steps = 0
        accepted_steps = 0
        rejected: list[dict] = []
        misses = 0
        estimator, temperature = self._estimator(ctx, m0, search_x, search_y)
        rounds = 0
        stopped = "no further candidate"
        limit = float(cfg["time_limit"])
        marks: list[float] = []  # seconds into the pass at which each step ended (timed once per machine)
        while True:
            if steps >= int(cfg["max_steps"]) or rounds >= 10 * int(cfg["max_steps"]):
                stopped = f"max_steps ({int(cfg['max_steps'])})"
                break
            if misses >= int(cfg["patience"]):
                stopped = f"patience ({int(cfg['patience'])} rejected single moves in a row)"
                break
            rounds += 1
            if limit > 0 and steps > len(marks):
                marks.append(self._clock_mark(steps, time.perf_counter() - start_time, m0, search_x))
                if marks[-1] > limit:
                    stopped = (f"time_limit ({limit:g} s: step {steps} ended at {marks[-1]:.1f} s on this machine's "
                               "first such compile; prune{time_limit=0} searches on)")
                    break
            single = step_frac < float(cfg["min_step"]) - 1e-12  # below the smallest step: one move at a time
            candidate, moves = self._propose(groups, cost, plan, prunable, multiple,
                                             0.0 if single else step_frac * base_est)
            if candidate is None:
                break
            if candidate in rejected:  # a smaller step that proposes the same plan: no new information
                step_frac /= 2.0
                continue
            steps += 1
            pruned, recon = build(candidate)
            pred = predictions(recon, search_x)
            acc = accuracy(pred, search_y, base_pred)
            drop = base_acc - acc
            sigma = paired_sigma(pred, base_pred, search_y)
            est = estimator.add(pred, base_pred, search_y)
            timing = self._timing({"original": m0, "candidate": recon}, runs)
            speedup = timing["original"] / timing["candidate"]
            z = float(cfg["confidence"])
            z_raw = z if cfg["raw_confidence"] in (None, "", "auto") else float(cfg["raw_confidence"])
            ok = (est["drop_est"] + z * est["sigma_est"] <= budget + 1e-9
                  and drop + z_raw * sigma <= budget + 1e-9)
            removed = sum(groups.group(g).channels - len(k) for g, k in candidate.items())
            entry = {"step": steps, "accepted": ok, "channels_removed": int(removed), "groups_pruned": len(candidate),
                     "moves": [{"group": g, "kept": len(k), "cost": round(c, 6), "saving_us": round(sv, 2)}
                               for g, k, c, sv in moves],
                     "latency_est_us": round(cost.total(candidate), 1),
                     "latency_ms": round(timing["candidate"], 4),
                     "latency_original_ms": round(timing["original"], 4),
                     "speedup": round(speedup, 4), metric: round(acc, 3), "drop": round(drop, 3),
                     "sigma": round(sigma, 3), "drop_est": round(est["drop_est"], 3),
                     "sigma_est": round(est["sigma_est"], 3), "changed": round(est["changed"], 4),
                     "flip_ratio": round(est["flip_ratio"], 4), "flips_est": round(est["flips_est"], 3),
                     "flips_sigma": round(est["flips_sigma"], 3), "estimate": est["estimate"],
                     "step_fraction": round(step_frac, 4)}
            history.append(entry)
            ctx.log(f"prune: step {steps}: {len(moves)} moves ({', '.join(f'g{g}->{len(k)}' for g, k, _, _ in moves)}), "
                    f"{metric} {acc:.2f} (drop {drop:.2f} ± {sigma:.2f}; estimate {est['drop_est']:.2f} ± "
                    f"{est['sigma_est']:.2f}), speedup {speedup:.3f} "
                    f"({'accepted' if ok else 'rejected'})")
            if ok:
                rejected = []
                misses = 0
                changed = {g for g, _, _, _ in moves}
                plan = candidate
                best = {"plan": candidate, "pruned": pruned, "model": recon, "acc": acc}
                if curve is not None:
                    entry[f"heldout_{metric}"] = round(accuracy(predictions(recon, curve[0]), curve[1], None), 3)
                accepted_steps += 1
                cost.rebase(node_latency(recon), plan)
                rescore_all = accepted_steps % max(1, int(cfg["rescore_every"])) == 0
                self._rescore(ctx, groups, recon, plan, prunable, changed, rescore_all)
            else:
                rejected.append(candidate)
                misses += 1 if single else 0
                if len(moves) == 1:
                    self._search["banned"].add(moves[0][0])  # this group cannot go further within budget
                else:
                    step_frac /= 2.0

        ctx.log(f"prune: search stopped after {steps} steps: {stopped}")
        self._plan = dict(best["plan"])
        if not best["plan"]:
            model.annotations["prune"] = {"score_source": score_source, "metric": metric, "history": history,
                                          "plan": {}, "budget": round(budget, 4), "reserve": round(reserve, 4),
                                          "stopped": stopped}
            ctx.log("prune: no pruning step stayed within the budget")
            return False
        final = self._final(ctx, m0, best, groups, n_search, search_y is not None, use_recon)
        model.proto = best["pruned"]
        if use_recon:
            key = (RECONSTRUCTED, proto_digest(best["pruned"]), cfg["recon_mode"], int(len(calib_x)),
                   int(cfg["recon_rows"]), ctx.seed)
            ctx.analyses[key] = best["model"]
        model.annotations["prune"] = {
            "score_source": score_source, "metric": metric, "budget": round(budget, 4), "reserve": round(reserve, 4),
            "max_drop": float(ctx.config.get("max_drop", 1.0)), "target": ctx.target_name,
            "latency_source": "ort-profile" if backend_cpu else "roofline", "channel_block": block,
            "channel_multiple": multiple, "reconstruct": use_recon, "source_digest": source_digest,
            "images": {"calib_reconstruct": int(len(calib_x)), "calib_scores": int(len(score_x)),
                       "search": int(n_search), "heldout": int(eval_len - n_search),
                       "note": "search = eval split [0:search]; held-out = eval split [search:]"},
            "estimate": {"form": estimator.form,
                         "temperature": None if temperature is None else round(temperature, 4),
                         "flip_ratio": estimator.ratio, "confidence": float(cfg["confidence"]),
                         "raw_confidence": cfg["raw_confidence"]},
            "history": history, "plan": plan_to_json(best["plan"]),
            "kept": {str(g): len(k) for g, k in sorted(best["plan"].items())},
            "channels": {str(g): groups.group(g).channels for g in sorted(best["plan"])},
            "final": final, "stopped": stopped}
        return True

    def _estimator(self, ctx, m0, search_x, search_y) -> tuple[DropEstimate, float | None]:
        """The accept rule's drop estimate (:class:`DropEstimate`); ``posterior`` needs labels on
        the calibration split (the temperature is fitted there, never on evaluation images)."""
        choice = str(self.config["estimate"]).lower()
        if choice not in ("posterior", "flips"):
            from hqpc.errors import PipelineError

            raise PipelineError(f"pass 'prune': estimate must be flips or posterior, got {choice!r}")
        ratio = float(self.config["flip_ratio"])
        if choice == "flips" or search_y is None:
            return DropEstimate(search_y is not None, ratio), None
        calib_x, calib_y = split_arrays(ctx, "calib", int(self.config["recon_images"]))
        if calib_y is None:
            ctx.log("prune: estimate=posterior needs calibration labels; using flips")
            return DropEstimate(True, ratio), None
        temperature = fit_temperature(_logits(m0, calib_x), calib_y)
        posterior = softmax(_logits(m0, search_x), temperature)
        ctx.log(f"prune: drop estimate from the original model's posterior (temperature {temperature:.3f}, "
                f"fitted on {len(calib_x)} calibration labels)")
        return DropEstimate(True, ratio, posterior), temperature

    def _unit_order(self, groups, gid: int, kept: list[int]) -> list[int]:
        """Kept units of ``gid``, least important first."""
        fisher = self._search["fisher"]
        if fisher is not None:
            return sorted(kept, key=lambda u: (fisher[gid][u], u))
        cache = self._search["saliency"]
        if gid not in cache:
            cache[gid] = self._search["prober"].unit_saliency(gid, kept)
        sal = cache[gid]
        return sorted(kept, key=lambda u: (sal.get(u, 0.0), u))

    def _options(self, groups, cost: CostModel, plan, gid: int, multiple: int):
        """Moves of one group: (new kept units, µs saved), smallest first, up to 4.

        ``moves=blocks`` (default): kept counts are walked down one ``multiple`` at a time and a
        count becomes a move only where the cost model's saving grows, at least ``min(chunk,
        channel block)`` below the previous move: with blocked kernels (ONNX Runtime's NCHWc
        convolutions work on blocks of 16 channels with AVX-512) only block-aligned counts save
        anything, so a move never removes channels that buy no latency (MobileNetV2, 192
        channels: 176, 160, 144, 128 instead of 184 (no saving), 160, 136, 112).
        ``moves=chunks``: counts ``top, top − chunk, …`` (``chunk`` × the group's size)."""
        g = groups.group(gid)
        kept = list(plan.get(gid, range(g.channels)))
        floor = max(multiple, int(math.ceil(float(self.config["min_keep"]) * g.channels / multiple)) * multiple)
        chunk = max(multiple, int(math.ceil(float(self.config["chunk"]) * g.channels / multiple)) * multiple)
        order = self._unit_order(groups, gid, kept)
        current = len(kept)
        top = (current // multiple) * multiple
        if top == current:
            top -= multiple
        out = []

        def move(new):
            new_kept = tuple(sorted(set(kept) - set(order[: current - new])))
            return new_kept, cost.saving(gid, plan, new_kept)

        if str(self.config["moves"]).lower() == "chunks":
            for j, new in enumerate(range(top, floor - 1, -chunk)):
                if j >= 4:
                    break
                new_kept, gain = move(new)
                if gain > 1e-9:
                    out.append((new_kept, gain))
            return out
        min_step = max(multiple, min(chunk, (max(1, cost.block) // multiple) * multiple))
        last_kept, last_gain = current, 0.0
        for new in range(top, floor - 1, -multiple):
            if len(out) >= 4:
                break
            if last_kept - new < min_step:
                continue
            new_kept, gain = move(new)
            if gain > last_gain + 1e-9:
                out.append((new_kept, gain))
                last_kept, last_gain = new, gain
        return out

    def _move_cost(self, groups, plan, gid: int, new_kept) -> float:
        fisher = self._search["fisher"]
        if self._search["prober"] is None:
            kept = set(plan.get(gid, range(groups.group(gid).channels)))
            return float(sum(fisher[gid][u] for u in kept - set(new_kept)))
        key = (gid, new_kept)
        costs = self._search["costs"]
        if key not in costs:
            costs[key] = self._search["prober"].move_cost(gid, new_kept)
        return costs[key]

    def _propose(self, groups, cost: CostModel, plan, prunable, multiple, target_saving):
        """Moves with the lowest cost per µs saved until ``target_saving`` µs (each group at most
        once per step with probes; Fisher scores are additive, so groups may move repeatedly)."""
        plan = dict(plan)
        saved = 0.0
        moves = []
        used: set[int] = set()
        repeat = self._search["prober"] is None
        while not moves or saved < target_saving:
            best = None
            for gid in prunable:
                if gid in self._search["banned"] or (gid in used and not repeat):
                    continue
                options = self._options(groups, cost, plan, gid, multiple)
                if not repeat:
                    options = options[:1]
                for new_kept, gain in options:
                    value = self._move_cost(groups, plan, gid, new_kept)
                    ratio = max(value, 1e-9) / gain
                    if best is None or ratio < best[0]:
                        best = (ratio, gid, new_kept, gain, value)
            if best is None:
                break
            _, gid, new_kept, gain, value = best
            plan[gid] = new_kept
            saved += gain
            used.add(gid)
            moves.append((gid, new_kept, value, gain))
        return (plan, moves) if moves else (None, [])

    def _rescore(self, ctx, groups, current, plan, prunable, changed: set[int], everything: bool) -> None:
        search = self._search
        search["saliency"] = {}
        if search["prober"] is not None:
            search["prober"].prepare(current, plan)
            if everything:
                search["costs"] = {}
            else:
                search["costs"] = {k: v for k, v in search["costs"].items() if k[0] not in changed}
        if search["fisher"] is not None:
            if not everything:
                return
            try:
                from hqpc.registry import get_pass

                probe = Model(proto=current, annotations={})
                samples = int(self.config["score_images"]) * 2
                get_pass("annotate-sensitivity")(samples=samples, precisions="fp16").run(probe, ctx)
                fresh = fisher_scores(groups, (probe.annotations.get("sensitivity") or {}).get("channels") or {},
                                      plan, prunable)
                if fresh is not None:
                    search["fisher"] = fresh
            except Exception as exc:  # keep the previous scores
                ctx.log(f"prune: re-scoring with annotate-sensitivity failed ({type(exc).__name__}); keeping scores")

    # ------------------------------------------------------------- measurements (once per machine)
    def _measured(self, kind: str, protos: list, settings: dict, compute, feeds: dict | None = None):
        """``compute()``, or the value the same measurement gave on this machine before
        (:mod:`hqpc.runtime.measure_cache`): layer costs, timings and the step budget taken from
        the clock decide the search, so reusing them makes two compiles of one input identical."""
        return cached_measurement(measurement_cache_dir(self.config["measure_cache"]), kind, protos,
                                  feeds or {}, settings, compute)

    def _timing(self, models: dict[str, onnx.ModelProto], runs: int) -> dict[str, float]:
        """Median end-to-end latency in ms per model (1 thread, batch 1), measured side by side."""
        return cached_compare(measurement_cache_dir(self.config["measure_cache"]), "prune-compare", models, runs)

    def _clock_mark(self, step: int, elapsed: float, m0, search_x) -> float:
        """Seconds into the pass at which ``step`` ended, as timed on the first compile of this input
        on this machine (``elapsed`` then) and reused after: the time limit then ends the search
        at the same step every time."""
        settings = {k: v for k, v in sorted(self.config.items()) if isinstance(v, (int, float, str, bool))}
        return float(self._measured(f"prune-clock-{step}", [m0], settings, lambda: elapsed, feeds={"search": search_x}))

    def _final(self, ctx, m0, best, groups, n_search, labeled, use_recon) -> dict:
        out: dict[str, Any] = {"kept_channels": int(sum(len(k) for k in best["plan"].values())),
                               "search_" + ("top1" if labeled else "agreement"): round(best["acc"], 3)}
        if ctx.data.eval > n_search:
            hx, truth = heldout_truth(ctx, m0, n_search, labeled)
            metric = "top1" if labeled else "agreement"
            out[f"heldout_{metric}_original"] = round(accuracy(predictions(m0, hx), truth, None), 3)
            out[f"heldout_{metric}_pruned"] = round(accuracy(predictions(best["pruned"], hx), truth, None), 3)
            if use_recon:
                out[f"heldout_{metric}_reconstructed"] = round(accuracy(predictions(best["model"], hx), truth, None), 3)
            out["heldout_images"] = int(len(hx))
        timing = self._timing({"original": m0, "pruned": best["model"]}, int(self.config["latency_runs"]) * 2)
        out["latency_original_ms"] = round(timing["original"], 4)
        out["latency_pruned_ms"] = round(timing["pruned"], 4)
        out["speedup"] = round(timing["original"] / timing["pruned"], 4)
        return out
