"""Fixed batch dimensions: compile batch-polymorphic models with a free batch, emit them fixed.

Many exported models pin the leading dimension of their inputs and outputs to 1. The data-driven
passes (calibration, gradients, the pruning search, the numeric guard on calibration images) run
batches of many samples, which ONNX Runtime refuses on such a model.

:func:`relax_fixed_batch` gives the passes a copy whose inputs and outputs carry a symbolic batch
``N`` instead of the fixed value ``B``, but only when that is provably the same function, checked
numerically: for two different seeded inputs ``x₁, x₂`` of batch ``B``,

    relaxed(concat(x₁, x₂)) == concat(original(x₁), original(x₂))     (atol 1e-5, rtol 1e-4)

and strict shape inference accepts the relaxed graph. The common flatten-before-classifier
``Reshape(x, [B, K])`` (and any constant Reshape target whose leading entry is ``B`` while its
data's leading dim is the batch ``B``) gets ``0`` there instead, ONNX's "copy this dim from the
input", which is the same shape for batch ``B`` and follows any other batch. A graph that still
mixes samples (a reduction over the batch axis, a Reshape that folds the batch into another
axis) fails the check and is compiled as it is, with the reason logged. :func:`restore_fixed_batch` puts ``B`` back on the emitted model's interface, so
the output has the input model's signature.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from hqpc.ir import Model, infer_shapes
from hqpc.runtime import ort as ort_rt
from hqpc.runtime.compare import EXACT, compare_outputs

BATCH_PARAM = "N"


@dataclass
class FixedBatch:
    """The fixed leading dims the input model declared: value name -> B, per input and output."""

    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    reshapes: list[str] = field(default_factory=list)  # Reshape nodes whose target got a leading 0


def fixed_batch_dims(proto: onnx.ModelProto) -> FixedBatch:
    """Inputs and outputs whose leading dimension is a fixed positive value."""
    def fixed(values) -> dict[str, int]:
        out = {}
        for v in values:
            dims = ort_rt.input_shape(v)
            if len(dims) >= 2 and isinstance(dims[0], int) and dims[0] > 0:
                out[v.name] = dims[0]
        return out
    return FixedBatch(fixed(ort_rt.graph_inputs(proto)), fixed(proto.graph.output))


def _with_leading_dims(proto: onnx.ModelProto, dims: dict[str, int | str]) -> onnx.ModelProto:
    """A copy whose named inputs/outputs get the given leading dim; value_info re-inferred."""
    out = copy.deepcopy(proto)
    for value in list(out.graph.input) + list(out.graph.output):
        if value.name in dims:
            dim = value.type.tensor_type.shape.dim[0]
            new = dims[value.name]
            if isinstance(new, str):
                dim.Clear()
                dim.dim_param = new
            else:
                dim.Clear()
                dim.dim_value = new
    del out.graph.value_info[:]
    return out


def relax_fixed_batch(model: Model, log=lambda message: None) -> tuple[Model, FixedBatch | None]:
    """``(model with a free batch, what to restore)`` when the input model pins a batch of ``B``
    on every input and output and the free-batch graph is the same function on stacked samples;
    else ``(model, None)`` unchanged."""
    fixed = fixed_batch_dims(model.proto)
    inputs = ort_rt.graph_inputs(model.proto)
    if not fixed.inputs or len(fixed.inputs) != len(inputs):
        return model, None
    if len(fixed.outputs) != len(model.proto.graph.output):
        log(f"batch: inputs fix the batch to {sorted(set(fixed.inputs.values()))} but not every output does; "
            "compiling with the fixed batch")
        return model, None
    relaxed = _with_leading_dims(model.proto, {**{n: BATCH_PARAM for n in fixed.inputs},
                                               **{n: BATCH_PARAM for n in fixed.outputs}})
    batch = next(iter(fixed.inputs.values()))
    fixed.reshapes = _batch_following_reshapes(relaxed, _leading_dims(model.proto), batch)
    rewritten = len(fixed.reshapes)
    reason = _polymorphism_failure(model.proto, relaxed, fixed)
    if reason:
        log(f"batch: the graph is not batch-polymorphic ({reason}); data-driven passes run with batch "
            f"{next(iter(fixed.inputs.values()))}")
        return model, None
    result = model.copy()
    result.replace_graph_proto(relaxed.graph)
    log(f"batch: fixed batch {batch} relaxed to '{BATCH_PARAM}' for compilation (checked on stacked samples"
        + (f"; {rewritten} Reshape target(s) copy the batch dim" if rewritten else "")
        + "); the output keeps the fixed batch")
    return result, fixed


def _leading_dims(proto: onnx.ModelProto) -> dict[str, int | str | None]:
    """Leading dim of every tensor shape inference knows in ``proto`` (inputs, outputs, value_info)."""
    inferred = infer_shapes(copy.deepcopy(proto))
    values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    return {v.name: (ort_rt.input_shape(v) or [None])[0] for v in values}


def _batch_following_reshapes(proto: onnx.ModelProto, leading: dict[str, int | str | None], batch: int) -> list[str]:
    """Set the leading entry of constant Reshape targets ``[B, ...]`` whose data has leading dim
    ``B`` to 0 (copy from the input; ``allowzero`` must be 0), in place; returns those nodes."""
    inits = {t.name: t for t in proto.graph.initializer}
    uses = Counter(name for node in proto.graph.node for name in node.input)
    changed: list[str] = []
    for node in proto.graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target = inits.get(node.input[1])
        if target is None or leading.get(node.input[0]) != batch:
            continue
        shape = numpy_helper.to_array(target)
        if shape.ndim != 1 or len(shape) < 1 or int(shape[0]) != batch:
            continue
        _set_leading_entry(proto, node, inits, uses, shape, 0)
        changed.append(node.name)
    return changed


def _set_leading_entry(proto: onnx.ModelProto, node: onnx.NodeProto, inits: dict, uses: Counter,
                       shape: np.ndarray, value: int) -> None:
    """Give ``node``'s constant Reshape target ``shape`` the leading entry ``value`` (a private
    copy of the initializer when other nodes read it too)."""
    shape = shape.copy()
    shape[0] = value
    name = node.input[1] if uses.get(node.input[1], 0) == 1 else f"{node.input[1]}__batch_{node.name}"
    tensor = numpy_helper.from_array(shape.astype(np.int64), name)
    if name == node.input[1]:
        inits[name].CopyFrom(tensor)
    else:
        proto.graph.initializer.append(tensor)
        node.input[1] = name


def _polymorphism_failure(original: onnx.ModelProto, relaxed: onnx.ModelProto, fixed: FixedBatch) -> str | None:
    """None when relaxed(concat(x₁, x₂)) equals concat(original(x₁), original(x₂)); else why not."""
    try:
        relaxed = infer_shapes(relaxed, strict=True)
        first = ort_rt.random_feeds(original, seed=1)
        second = ort_rt.random_feeds(original, seed=2)
        stacked = {k: np.concatenate([first[k], second[k]]) for k in first}
        expected_a, expected_b = ort_rt.run(original, first), ort_rt.run(original, second)
        got = ort_rt.run(relaxed, stacked, quiet=True)
    except Exception as exc:  # any failure means: do not relax
        return " ".join(str(exc).split())[:200]
    expected = {k: np.concatenate([expected_a[k], expected_b[k]]) for k in expected_a}
    if any(got[k].shape != expected[k].shape for k in expected):
        return "output shapes differ on stacked samples"
    comparison = compare_outputs(expected, got, EXACT)
    return None if comparison.ok else f"stacked samples give other outputs: {comparison.summary()}"


def restore_fixed_batch(model: Model, fixed: FixedBatch | None) -> Model:
    """The model with the input model's fixed leading dims back on its interface (in place)."""
    if fixed is None:
        return model
    dims = {**fixed.inputs, **fixed.outputs}
    restored = _with_leading_dims(model.proto, dims)
    batch = next(iter(fixed.inputs.values()))
    inits = {t.name: t for t in restored.graph.initializer}
    uses = Counter(name for node in restored.graph.node for name in node.input)
    for node in restored.graph.node:  # the Reshape targets relax_fixed_batch rewrote get B back
        if node.name in fixed.reshapes and node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]])
            if shape.ndim == 1 and len(shape) and int(shape[0]) == 0:
                _set_leading_entry(restored, node, inits, uses, shape, batch)
    restored = infer_shapes(restored)
    model.replace_graph_proto(restored.graph)
    return model
