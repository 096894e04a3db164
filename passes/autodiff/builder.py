"""Reverse-mode autodiff as an ONNX -> ONNX graph transformation.

:func:`build_backward` takes a forward model, the names of the tensors to
differentiate with respect to (initializers, graph inputs or intermediate
activations) and a loss kind, and returns a model that computes, in standard
ONNX ops only, the forward pass, the scalar loss and the requested gradients.

Algorithm
---------
1. Normalise the model: copy it, upgrade opsets below 16 to 17 (the MaxPool
   rule needs ``ScatterElements(reduction='add')``), optionally switch its
   float type, pin input shapes, run ONNX shape inference.
2. Plan: ``D`` = float tensors that depend on a ``wrt`` tensor (forward sweep);
   ``R`` = tensors the loss depends on (backward sweep from the first output).
   Only nodes with an output in ``D & R`` and an input in ``D & R`` are
   differentiated, so VJPs of unrelated sub-graphs (e.g. the first conv's input
   gradient when only weights are requested) are never emitted.  Every such
   node must have a rule and gradients may only flow through differentiable
   input slots; otherwise :class:`GradientError` is raised here, before any
   node is emitted or anything runs.
3. Emit the loss head (seed gradient of the first output), then walk the
   planned nodes in reverse topological order, summing the contributions of
   all consumers of each tensor (``Sum``) and calling the op's VJP rule.
4. Expose ``grad::<name>`` outputs (zeros if the loss does not depend on the
   tensor) plus the loss and, for Fisher losses, the labels used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .context import Emitter, TensorInfo, info_from_value_info
from .errors import GradientError, no_rule, node_label
from .losses import build_loss
from .precision import convert_float_type, model_float_type
from .rules import RULES

MIN_OPSET = 16
UPGRADE_OPSET = 17
MAX_IR_VERSION = 10
_CONST_LIMIT = 1 << 16
OPTIONS = {"conv_input_grad": ("auto", "conv_transpose")}  # initializers up to this many elements are readable by rules


@dataclass
class BackwardResult:
    model: onnx.ModelProto
    grad_outputs: dict[str, str]
    loss_output: str
    logits_output: str
    labels_input: str | None
    uniform_input: str | None
    labels_output: str | None
    float_type: int
    extra_outputs: list[str] = field(default_factory=list)


def grad_output_name(name: str) -> str:
    return f"grad::{name}"


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise GradientError("model has no default-domain opset import")


def _min_ir_for_opset(opset: int) -> int:
    for _, ir, op, *_ in helper.VERSION_TABLE:
        if op >= opset:
            return ir
    return MAX_IR_VERSION


def prepare_model(model: onnx.ModelProto, dtype=None,
                  input_shapes: dict[str, Sequence] | None = None) -> onnx.ModelProto:
    """Copy + opset upgrade + float type + pinned input shapes + shape inference."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = _default_opset(m)
    if opset < MIN_OPSET:
        try:
            m = onnx.version_converter.convert_version(m, UPGRADE_OPSET)
        except Exception as e:
            raise GradientError(f"could not upgrade the model from opset {opset} to "
                                f"{UPGRADE_OPSET}: {e}") from e
        opset = UPGRADE_OPSET
    if dtype is not None:
        want = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        if model_float_type(m) != want:
            m = convert_float_type(m, dtype)
    for vi in m.graph.input:
        if input_shapes and vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            new = list(input_shapes[vi.name])
            if len(dims) and len(dims) != len(new):
                raise GradientError(f"input_shapes[{vi.name!r}] has rank {len(new)}, model says {len(dims)}")
            del vi.type.tensor_type.shape.dim[:]
            for d in new:
                dim = vi.type.tensor_type.shape.dim.add()
                if isinstance(d, (int, np.integer)) and d >= 0:
                    dim.dim_value = int(d)
                elif isinstance(d, str):
                    dim.dim_param = d
    del m.graph.value_info[:]
    for vi in m.graph.output:  # re-derive output shapes from the (possibly re-pinned) inputs
        vi.type.tensor_type.ClearField("shape")
    m.ir_version = min(max(m.ir_version, _min_ir_for_opset(opset)), MAX_IR_VERSION)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:  # pragma: no cover - inference failures are rare
        raise GradientError(f"ONNX shape inference failed: {e}") from e
    return m


def _collect_infos(m: onnx.ModelProto) -> tuple[dict[str, TensorInfo], dict[str, np.ndarray]]:
    g = m.graph
    infos: dict[str, TensorInfo] = {}
    consts: dict[str, np.ndarray] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        infos[vi.name] = info_from_value_info(vi)
    for t in g.initializer:
        infos[t.name] = TensorInfo(t.data_type, tuple(int(d) for d in t.dims))
        if int(np.prod(t.dims)) <= _CONST_LIMIT:
            consts[t.name] = numpy_helper.to_array(t)
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            a = node.attribute[0]
            v = helper.get_attribute_value(a)
            if a.name == "value":
                v = numpy_helper.to_array(v)
            elif a.name in ("value_float", "value_floats"):
                v = np.asarray(v, dtype=np.float32)
            elif a.name in ("value_int", "value_ints"):
                v = np.asarray(v, dtype=np.int64)
            else:
                continue
            consts[node.output[0]] = v
            infos.setdefault(node.output[0], TensorInfo(helper.np_dtype_to_tensor_dtype(v.dtype), v.shape))
    return infos, consts


def build_backward(
    model: onnx.ModelProto,
    wrt: Sequence[str],
    loss: str = "cross_entropy",
    labels_input: str = "hqpc_labels",
    uniform_input: str = "hqpc_uniform",
    dtype=None,
    input_shapes: dict[str, Sequence] | None = None,
    extra_outputs: Sequence[str] = (),
    options: dict | None = None,
) -> BackwardResult:
    """Build the forward+backward model.  See the module docstring."""
    options = dict(options or {})
    for k, v in options.items():
        if k not in OPTIONS or v not in OPTIONS[k]:
            raise GradientError(f"unknown option {k}={v!r}; known: {OPTIONS}")
    m = prepare_model(model, dtype, input_shapes)
    g = m.graph
    opset = _default_opset(m)
    infos, consts = _collect_infos(m)
    ftype = model_float_type(m)
    if not len(g.output):
        raise GradientError("model has no outputs")
    logits = g.output[0].name

    wrt = list(dict.fromkeys(wrt))
    produced = {o for n in g.node for o in n.output if o}
    known = produced | {t.name for t in g.initializer} | {i.name for i in g.input}
    for w in wrt:
        if w not in known:
            raise GradientError(f"wrt tensor {w!r} is not an initializer, input or node output of the model")
        if not infos.get(w, TensorInfo()).is_float:
            raise GradientError(f"wrt tensor {w!r} is not a float tensor")
    for name in (labels_input, uniform_input):
        if name in known:
            raise GradientError(f"the loss input name {name!r} is already used by the model")
    for name in extra_outputs:
        if name not in known:
            raise GradientError(f"extra output {name!r} is not a tensor of the model")

    def is_float(name: str) -> bool:
        info = infos.get(name)
        return info is not None and info.is_float

    # ---- plan: D (depends on wrt) and R (loss depends on it)
    dep = set(wrt)
    for node in g.node:
        if any(i in dep for i in node.input if i):
            for o in node.output:
                if o and is_float(o):
                    dep.add(o)
    reach = {logits}
    for node in reversed(g.node):
        if any(o in reach for o in node.output if o):
            reach.update(i for i in node.input if i)
    live = dep & reach
    active = [n for n in g.node
              if any(o in live for o in n.output if o) and any(i in live for i in n.input if i)]
    missing = [n for n in active if n.domain not in ("", "ai.onnx") or n.op_type not in RULES]
    if missing:
        err = no_rule(missing[0])
        if len(missing) > 1:
            others = sorted({n.op_type for n in missing[1:]})
            err = GradientError(f"{err} (and {len(missing) - 1} more nodes without rules: {', '.join(others)})")
        raise err
    for n in active:
        rule = RULES[n.op_type]
        for slot, i in enumerate(n.input):
            if i and i in live and not rule.differentiable(slot):
                raise GradientError(
                    f"cannot differentiate node '{node_label(n)}' (op {n.op_type}) with respect to "
                    f"its input {slot} ({i!r}): that input is not differentiable")

    # ---- emit
    used = known | {n.name for n in g.node if n.name} | {o.name for o in g.output}
    ctx = Emitter(infos, consts, used, opset, ftype, options)
    head = build_loss(ctx, logits, loss, labels_input, uniform_input)

    contribs: dict[str, list[str]] = {}

    def grad_of(name: str) -> str | None:
        lst = contribs.get(name)
        if not lst:
            return None
        if len(lst) > 1:
            s = ctx.op("Sum", lst, hint="grad_acc")
            ctx.set_info(s, name)
            contribs[name] = [s]
        return contribs[name][0]

    if logits in live or logits in dep:
        contribs[logits] = [head.seed]
    for node in reversed(active):
        dys = [grad_of(o) if o in live else None for o in node.output]
        if all(d is None for d in dys):
            continue
        needs = [bool(i) and i in live for i in node.input]
        rule = RULES[node.op_type]
        try:
            grads = rule.fn(ctx, node, dys, needs)
        except GradientError:
            raise
        except Exception as e:
            raise GradientError(
                f"gradient rule failed for node '{node_label(node)}' (op {node.op_type}): {e}") from e
        for i, (inp, gr) in enumerate(zip(node.input, grads)):
            if gr is not None and needs[i]:
                if gr not in infos:
                    ctx.set_info(gr, inp)
                contribs.setdefault(inp, []).append(gr)

    # ---- outputs
    outputs = [g.output[0]]
    grad_outputs: dict[str, str] = {}
    for w in wrt:
        src = grad_of(w)
        if src is None:
            src = ctx.zeros_like(w)
        out = grad_output_name(w)
        if out in used:
            out = ctx.fresh("grad")
        ctx.op("Identity", [src], [out])
        grad_outputs[w] = out
        info = infos.get(w, TensorInfo(ftype, None))
        outputs.append(helper.make_tensor_value_info(out, info.elem_type, _vi_shape(info.shape)))
    loss_out = "hqpc::loss"
    ctx.op("Identity", [head.loss], [loss_out])
    outputs.append(helper.make_tensor_value_info(loss_out, ftype, []))
    labels_out = None
    if head.labels is not None and head.labels != head.labels_input:
        labels_out = "hqpc::labels"
        ctx.op("Identity", [head.labels], [labels_out])
        lshape = infos.get(logits, TensorInfo()).shape
        outputs.append(helper.make_tensor_value_info(
            labels_out, TensorProto.INT64, [lshape[0] if lshape else None]))
    for name in extra_outputs:
        info = infos.get(name, TensorInfo(ftype, None))
        outputs.append(helper.make_tensor_value_info(name, info.elem_type, _vi_shape(info.shape)))

    g.node.extend(ctx.nodes)
    g.initializer.extend(ctx.initializers)
    g.input.extend(head.new_inputs)
    del g.output[:]
    g.output.extend(outputs)
    del g.value_info[:]  # stale after editing forward nodes; ORT re-infers
    return BackwardResult(
        model=m, grad_outputs=grad_outputs, loss_output=loss_out, logits_output=logits,
        labels_input=head.labels_input, uniform_input=head.uniform_input,
        labels_output=labels_out, float_type=ftype, extra_outputs=list(extra_outputs),
    )


def _vi_shape(shape):
    if shape is None:
        return None
    return list(shape)
