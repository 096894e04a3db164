"""prune-channels: remove the channels a plan names, in one rewrite, and its masked reference.

A **plan** is ``{group id: [kept channel indices]}`` over the groups of the ``channel-groups``
analysis of the model the plan is applied to (JSON-serialisable; group ids are stable for a
given model). Groups not named keep every channel. Each named group must be prunable and keep
at least one channel.

The rewrite (:func:`apply_plan`) slices every member of every planned group at once:

* initializers (and Constant nodes) along their member axes — producers' output-channel axis and
  biases, consumers' input-channel axis, BatchNormalization / depthwise / per-channel constants;
* node attributes and constant inputs that encode channel counts: ``group`` of grouped and
  depthwise convolutions, Pad's channel-axis padding, Slice's channel-axis start/end, Split's
  sizes and Reshape's shape constant (shared constants are copied, never edited under another
  reader);
* value_info: re-inferred from scratch; the result must pass strict shape inference and every
  member dimension must have exactly the planned size, or the rewrite raises.

**Masked reference** (:func:`masked_model`): the unpruned model in which every removed channel's
*contribution to its terminal consumers* is removed — the consumer weights' input-channel slices
(Conv with group 1, ConvTranspose, Gemm, MatMul: the group's ``in`` members) are zeroed. Masking at
the producers instead would not be equivalent: a zeroed channel does not stay zero through
BatchNormalization shifts, biases, HardSigmoid(0) = 0.5 or a Pad value, while every op between a
group's producers and its terminal consumers is channel-wise, so cutting the consumer slices is
exactly what removal does. Hence pruned == masked up to float rounding; the guard checks it with
``atol = rtol = 1e-5`` (an element fails only where both are exceeded).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from hqpc.errors import HqpcError, PipelineError
from hqpc.graphutil import GraphIndex, NameGenerator, attributes, set_attribute
from hqpc.ir import infer_shapes
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes._rewrite import constant, outer_reads, write_constant_input
from hqpc.passes.channel_groups import ChannelGroups, Group, _Builder, channel_groups, pad_spec, slice_spec
from hqpc.registry import register_pass
from hqpc.runtime.compare import Tolerance

# exact up to float32 sum order: 1e-5 relative, the absolute part scaled by each output's magnitude
PRUNE_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-5, atol_per_scale=True)
Plan = dict[int, tuple[int, ...]]


class PlanError(HqpcError):
    """A plan does not fit the model's channel groups."""


# --------------------------------------------------------------------------- plans
def parse_plan(text: str) -> dict[int, list[int]]:
    """A plan from a JSON file path, JSON text (``{"3": [0, 1, 2]}`` or ``{"plan": {...}}``), or
    the compact form ``3:0-7,9;5:0,1`` (group: kept indices and ranges, inclusive)."""
    text = str(text).strip()
    if not text:
        return {}
    if not text.startswith("{") and (os.path.sep in text or text.endswith(".json")) and Path(text).exists():
        text = Path(text).read_text(encoding="utf-8")
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan: invalid JSON ({exc})") from None
        if "plan" in data and isinstance(data["plan"], dict):
            data = data["plan"]
        return {int(k): [int(i) for i in v] for k, v in data.items()}
    plan: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        match = re.fullmatch(r"(\d+)\s*:\s*([\d,\-\s]+)", part)
        if not match:
            raise PlanError(f"plan: cannot parse '{part}' (expected GROUP:I,J-K)")
        kept: list[int] = []
        for item in filter(None, (s.strip() for s in match.group(2).split(","))):
            if "-" in item:
                lo, hi = (int(v) for v in item.split("-", 1))
                kept.extend(range(lo, hi + 1))
            else:
                kept.append(int(item))
        plan[int(match.group(1))] = kept
    return plan


def normalize_plan(groups: ChannelGroups, plan: dict) -> Plan:
    """Validated plan with sorted unique indices; groups that keep everything are dropped."""
    out: Plan = {}
    for key, kept in plan.items():
        gid = int(key)
        if gid < 0 or gid >= len(groups.groups):
            raise PlanError(f"plan: no channel group {gid} (the model has {len(groups.groups)})")
        group = groups.group(gid)
        if not group.prunable:
            raise PlanError(f"plan: group {gid} is not prunable ({group.reason})")
        indices = sorted({int(i) for i in kept})
        if not indices:
            raise PlanError(f"plan: group {gid} would keep no channel")
        if indices[0] < 0 or indices[-1] >= group.channels:
            raise PlanError(f"plan: group {gid} has {group.channels} channels; index {indices[-1]} is out of range")
        if len(indices) < group.channels:
            out[gid] = tuple(indices)
    return out


def plan_to_json(plan: Plan) -> dict[str, list[int]]:
    return {str(k): list(v) for k, v in sorted(plan.items())}


def round_keep(count: float, channels: int, multiple: int) -> int:
    """Kept channel count honouring ``multiple``: rounded up to a multiple, at least one
    multiple, at most ``channels`` (a group smaller than the multiple keeps everything)."""
    multiple = max(1, int(multiple))
    if channels <= multiple:
        return channels
    keep = int(np.ceil(max(count, 1) / multiple) * multiple)
    return min(max(keep, multiple), channels)


def removed_indices(groups: ChannelGroups, plan: Plan) -> dict[tuple[str, int], set[int]]:
    """(tensor, axis) -> indices removed by ``plan``."""
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for gid, kept in plan.items():
        group = groups.group(gid)
        drop = sorted(set(range(group.channels)) - set(kept))
        for member in group.members:
            for k in drop:
                removed[(member.tensor, member.axis)].update(member.units[k])
    return removed


def kept_indices(groups: ChannelGroups, plan: Plan, sizes: dict[tuple[str, int], int]) -> dict[tuple[str, int], np.ndarray]:
    out = {}
    for key, drop in removed_indices(groups, plan).items():
        out[key] = np.array([i for i in range(sizes[key]) if i not in drop], dtype=np.int64)
    return out


def _member_sizes(groups: ChannelGroups) -> dict[tuple[str, int], int]:
    return {(m.tensor, m.axis): m.size for g in groups.groups for m in g.members}


# --------------------------------------------------------------------------- constants
def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    index = GraphIndex.build(graph)
    for node in graph.node:
        if node.op_type == "Constant":
            value = index.constant(node.output[0])
            if value is not None:
                values[node.output[0]] = value
    return values


def _write_constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    """Replace the value of initializer or Constant-node output ``name`` in place."""
    for i, tensor in enumerate(graph.initializer):
        if tensor.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
            return
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            keep = [a for a in node.attribute if not a.name.startswith("value")]
            del node.attribute[:]
            node.attribute.extend(keep)
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(value, name)))
            return
    raise PlanError(f"'{name}' is not a constant")


# --------------------------------------------------------------------------- rewrite
def apply_plan(proto: onnx.ModelProto, groups: ChannelGroups, plan: Plan) -> onnx.ModelProto:
    """The model with ``plan``'s channels removed (a new proto; ``proto`` is not changed)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    if not plan:
        return out
    graph = out.graph
    sizes = _member_sizes(groups)
    kept = kept_indices(groups, plan, sizes)
    # node rewrites read the original graph (shapes and constants before slicing)
    builder = _Builder(proto)
    index = GraphIndex.build(graph)
    names = NameGenerator(graph)
    outer = outer_reads(graph)
    axes = groups.axes

    def kept_of(tensor: str) -> np.ndarray | None:
        axis = axes.get(tensor)
        return None if axis is None else kept.get((tensor, axis))

    pending: list[tuple[onnx.NodeProto, int, np.ndarray, str]] = []
    for node in graph.node:
        op = node.op_type
        if op == "Conv" and int(attributes(node).get("group", 1)) > 1:
            k = kept_of(node.input[0])
            if k is not None:
                group = int(attributes(node)["group"])
                cin = sizes[(node.input[0], 1)]
                if (group * len(k)) % cin:
                    raise PlanError(f"Conv '{node.name}': kept {len(k)} of {cin} channels breaks group {group}")
                set_attribute(node, "group", group * len(k) // cin)
        elif op == "Pad":
            y = node.output[0]
            k = kept_of(y)
            axis = axes.get(y)
            if k is None or axis is None:
                continue
            begin, end = pad_spec(builder, node, axis)
            if (begin, end) == (0, 0):
                continue
            cin = sizes[(node.input[0], axis)]
            pads = builder.const(node.input[1]).astype(np.int64).copy()
            rank = len(builder.shape(node.input[0]))
            pad_axes = _axes_input(builder, node, rank, rank)
            j = pad_axes.index(axis)
            pads[j] = int(np.sum(k < begin))
            pads[j + len(pad_axes)] = int(np.sum(k >= begin + cin))
            pending.append((node, 1, pads, "pads"))
        elif op == "Slice":
            x = node.input[0]
            k = kept_of(x)
            if k is None:
                continue
            axis = axes[x]
            start, stop = slice_spec(builder, node, builder.shape(x), axis)
            if (start, stop) == (0, sizes[(x, axis)]):
                continue
            rank = len(builder.shape(x))
            starts = builder.const(node.input[1]).astype(np.int64).copy()
            ends = builder.const(node.input[2]).astype(np.int64).copy()
            slice_axes = _axes_input(builder, node, rank, len(starts))
            j = slice_axes.index(axis)
            new_start = int(np.sum(k < start))
            starts[j] = new_start
            ends[j] = new_start + int(np.sum((k >= start) & (k < stop)))
            pending.append((node, 1, starts, "starts"))
            pending.append((node, 2, ends, "ends"))
        elif op == "Split":
            x = node.input[0]
            k = kept_of(x)
            if k is None:
                continue
            axis = axes[x]
            rank = len(builder.shape(x))
            if int(attributes(node).get("axis", 0)) % rank != axis:
                continue
            split, offset = [], 0
            for name in node.output:
                n = builder.shape(name)[axis]
                split.append(int(np.sum((k >= offset) & (k < offset + n))))
                offset += n
            for a in ("num_outputs", "split"):
                if a in attributes(node):
                    keep_attrs = [x_ for x_ in node.attribute if x_.name != a]
                    del node.attribute[:]
                    node.attribute.extend(keep_attrs)
            pending.append((node, 1, np.array(split, dtype=np.int64), "split"))
        elif op == "Reshape":
            y = node.output[0]
            k = kept_of(y)
            if k is None:
                continue
            target = builder.const(node.input[1]).astype(np.int64).copy()
            b = axes[y]
            if target[b] > 0:
                target[b] = len(k)
                pending.append((node, 1, target, "shape"))
    for node, position, value, base in pending:
        write_constant_input(graph, index, names, node, position, value, outer, f"{node.name}_{base}")

    # slice constants along their member axes
    values = _constant_values(graph)
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (tensor, axis), k in kept.items():
        if tensor in values:
            by_tensor[tensor].append((axis, k))
    for tensor, cuts in by_tensor.items():
        value = values[tensor]
        for axis, k in cuts:
            value = np.take(value, k, axis=axis)
        _write_constant(graph, tensor, value)

    inferred = infer_shapes(out, where="prune-channels", strict=True)
    out.graph.ClearField("value_info")
    out.graph.value_info.extend(inferred.graph.value_info)
    _check_sizes(out, inferred, kept, axes, values)
    return out


def _check_sizes(out: onnx.ModelProto, inferred: onnx.ModelProto, kept, axes, values) -> None:
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    consts = _constant_values(out.graph)
    for (tensor, axis), k in kept.items():
        if tensor in consts:
            got = consts[tensor].shape[axis]
        elif tensor in shapes:
            got = shapes[tensor][axis]
        else:
            raise PlanError(f"prune-channels: no shape for '{tensor}' after the rewrite")
        if got != len(k):
            raise PlanError(f"prune-channels: '{tensor}' axis {axis} has {got} channels, plan says {len(k)}")


def masked_model(proto: onnx.ModelProto, groups: ChannelGroups, plan: Plan) -> onnx.ModelProto:
    """The unpruned model with the removed channels' consumer weight slices zeroed."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    values = _constant_values(out.graph)
    zeroed: dict[str, np.ndarray] = {}
    for gid, kept in plan.items():
        group = groups.group(gid)
        drop = sorted(set(range(group.channels)) - set(kept))
        for member in group.members:
            if member.role != "in":
                continue
            value = zeroed.get(member.tensor)
            if value is None:
                value = values[member.tensor].copy()
            idx = [i for k in drop for i in member.units[k]]
            slicer = [slice(None)] * value.ndim
            slicer[member.axis] = idx
            value[tuple(slicer)] = 0
            zeroed[member.tensor] = value
    for name, value in zeroed.items():
        _write_constant(out.graph, name, value)
    return out


def magnitude_plan(proto: onnx.ModelProto, groups: Iterable[Group], fraction: float, multiple: int) -> Plan:
    """Keep the channels with the largest L2 norm of their producers' output weights (summed
    over producers; consumers' input slices when a group has no producer), ``fraction`` removed
    from every group of ``groups`` (prunable ones), kept counts rounded up to ``multiple``."""
    values = _constant_values(proto.graph)
    plan: Plan = {}
    for group in groups:
        keep = round_keep(group.channels * (1.0 - fraction), group.channels, multiple)
        if keep >= group.channels:
            continue
        score = np.zeros(group.channels)
        role = "out" if any(m.role == "out" for m in group.members) else "in"
        for m in group.members:
            if m.role != role or m.tensor not in values:
                continue
            w = np.moveaxis(values[m.tensor].astype(np.float64), m.axis, 0)
            norms = (w.reshape(w.shape[0], -1) ** 2).sum(axis=1)
            score += np.array([norms[list(u)].sum() for u in m.units])
        order = np.argsort(-score, kind="stable")
        plan[group.id] = tuple(sorted(int(i) for i in order[:keep]))
    return plan


# --------------------------------------------------------------------------- the pass
@register_pass
class PruneChannels(Pass):
    """Apply a channel plan (option ``plan``: JSON file, JSON text or ``G:I,J-K;...``) or, without
    a plan, remove ``fraction`` of every prunable group's channels by producer weight magnitude
    (kept counts rounded to ``multiple``, default the target's channel multiple). Reference: the
    masked model (see the module docstring)."""

    info = PassInfo("prune-channels", opt_level=3, tolerance=PRUNE_TOLERANCE,
                    description="remove the channels of a pruning plan (reference: the masked model)")
    options = {"plan": "", "fraction": 0.0, "multiple": 0}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._plan: Plan = {}

    def run(self, model, ctx) -> bool:
        groups = channel_groups(model, ctx)
        multiple = self.config["multiple"] or int(getattr(ctx.target, "channel_multiple", 1) or 1)
        if self.config["plan"]:
            try:
                plan = normalize_plan(groups, parse_plan(self.config["plan"]))
            except (PlanError, ValueError, OSError) as exc:
                raise PipelineError(f"pass 'prune-channels': {exc}") from None
            odd = [gid for gid, kept in plan.items() if len(kept) % multiple]
            if odd:
                ctx.log(f"prune-channels: groups {odd} keep counts that are not multiples of {multiple}")
        elif self.config["fraction"] > 0:
            plan = magnitude_plan(model.proto, groups.prunable, float(self.config["fraction"]), multiple)
        else:
            plan = {}
        self._plan = plan
        if not plan:
            return False
        from hqpc.passes.reconstruct import ORIGINALS

        source = model.copy()
        ctx.analyses[(ORIGINALS, source.digest())] = source  # for a following reconstruct pass
        model.proto = apply_plan(model.proto, groups, plan)
        model.annotations["prune_channels"] = {
            "plan": plan_to_json(plan), "source_digest": source.digest(),
            "kept": {str(g): len(k) for g, k in sorted(plan.items())},
            "channels": {str(g): groups.group(g).channels for g in sorted(plan)}}
        return True

    def reference(self, before, after, ctx):
        from hqpc.ir import Model

        groups = channel_groups(before, ctx)
        return Model(proto=masked_model(before.proto, groups, self._plan), annotations={})


def _axes_input(builder, node: onnx.NodeProto, rank: int, default_count: int) -> list[int]:
    """The optional ``axes`` input (index 3) of a Pad or Slice, made non-negative; without it the
    first ``default_count`` axes, as the operator defines."""
    if len(node.input) > 3 and node.input[3]:
        return [int(a) % rank for a in builder.const(node.input[3]).reshape(-1)]
    return list(range(default_count))
