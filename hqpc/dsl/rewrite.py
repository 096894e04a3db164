"""Build and apply the replacement of one match.

Building evaluates the replacement (new nodes, new initializers, Q/DQ macros) without touching
the graph; applying first validates (the producers of replaced tensors must die, graph outputs
keep their names) and only then edits the graph. Every new node carries the provenance tag
``hqpc.rule = <rule name>`` in its ``metadata_props``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hqpc.dsl import ast as A
from hqpc.dsl.builtins import BUILTINS
from hqpc.dsl.errors import EvalError
from hqpc.dsl.evaluator import Evaluator, GraphView
from hqpc.dsl.matcher import MatchState
from hqpc.dsl.schema import attribute_value, concrete_dtype, op_info
from hqpc.graphutil import NameGenerator, drop_initializers, rename_input_uses

PROVENANCE_KEY = "hqpc.rule"


class RewriteError(Exception):
    """The replacement cannot be applied to this match (reported in the trace, not fatal)."""


@dataclass
class Rewrite:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # old graph tensor -> new source tensor
    matched: list[onnx.NodeProto] = field(default_factory=list)


def is_op_call(expr) -> bool:
    return isinstance(expr, A.Call) and expr.func not in BUILTINS and expr.func[:1].isupper()


def _as_array(value, what: str) -> np.ndarray:
    if value is None:
        raise EvalError(f"{what} is none")
    if isinstance(value, (str, np.dtype)):
        raise EvalError(f"{what} is {value!r}, not a tensor value")
    arr = np.asarray(value)
    if arr.dtype == object:
        raise EvalError(f"{what} is not numeric")
    return arr


def _default_dtype(value, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.float64:
        return arr.astype(np.float32)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        return arr
    raise EvalError(f"cannot store a value of dtype {arr.dtype} as an initializer")


class Builder:
    def __init__(self, rule: A.Rule, replaced_names: tuple[str, ...], view: GraphView, state: MatchState,
                 namer: NameGenerator, opset: int):
        self.rule = rule
        self.replaced_names = set(replaced_names)
        self.view = view
        self.state = state
        self.namer = namer
        self.opset = opset
        self.evaluator = Evaluator(view, state.scope)
        self.locals: dict[str, str] = {}
        self.dtypes: dict[str, np.dtype] = {}  # dtypes of tensors this rewrite creates, when known
        self.out = Rewrite(matched=list(state.nodes.values()))
        first = state.nodes.get(0)
        self.prefix = first.name if first is not None and first.name else rule.name

    # ---------------------------------------------------------------- entry
    def build(self) -> Rewrite:
        for assign in self.rule.replace.assigns:
            value = assign.value
            if is_op_call(value):
                outputs = self._node(value, len(assign.targets), hint=assign.targets[0])
                for target, tensor in zip(assign.targets, outputs):
                    self._assign(target, tensor)
            else:
                self._assign(assign.targets[0], self._tensor(value, hint=assign.targets[0]))
        return self.out

    def _assign(self, target: str, tensor: str) -> None:
        if target == "_":
            return
        if target in self.replaced_names:
            old = self.state.scope.tensors.get(target)
            if not old:
                raise RewriteError(f"'{target}' is absent in this match; nothing to replace")
            if not tensor:
                raise RewriteError(f"'{target}' would be replaced by an absent tensor")
            self.out.replaced[old] = tensor
        else:
            self.locals[target] = tensor

    # ---------------------------------------------------------------- tensors
    def _tensor(self, expr, hint: str = "value", dtype=None) -> str:
        """Tensor name for a replacement input ('' when absent)."""
        if isinstance(expr, A.Name):
            name = expr.id
            scope = self.state.scope
            if name in self.locals:
                return self.locals[name]
            if name in scope.tensors and name not in scope.values:
                bound = scope.tensors[name]
                if isinstance(bound, list):
                    raise EvalError(f"'{name}' is a list of tensors; splat it with '*{name}'")
                return bound or ""
        if isinstance(expr, A.NoneLit):
            return ""
        if is_op_call(expr):
            return self._node(expr, 1, hint=expr.func)[0]
        if isinstance(expr, A.Call) and expr.func in BUILTINS and BUILTINS[expr.func].category == "macro":
            return self._macro(expr)
        value = self.evaluator.eval(expr)
        if value is None:
            return ""
        base = expr.id if isinstance(expr, A.Name) else hint
        return self._init(value, base, dtype)

    def _init(self, value, base: str, dtype=None) -> str:
        existing = self.view.constant_name(value)
        if existing is not None and (dtype is None or np.asarray(value).dtype == dtype):
            return existing  # the value of a bound constant, unchanged: reuse the tensor
        arr = _as_array(value, f"the value for '{base}'")
        if dtype is not None:
            arr = arr.astype(dtype)
        else:
            arr = _default_dtype(value, arr)
        name = self.namer(f"{self.prefix}.{base}")
        self.out.inits.append(numpy_helper.from_array(np.array(arr, order="C", copy=True), name))
        self.dtypes[name] = arr.dtype
        return name

    def _dtype_of(self, tensor: str):
        if not tensor:
            return None
        if tensor in self.dtypes:
            return self.dtypes[tensor]
        return self.view.dtype(tensor)

    # ---------------------------------------------------------------- nodes
    def _node(self, call: A.Call, n_outputs: int, hint: str) -> list[str]:
        schema = op_info(call.func, self.opset) or op_info(call.func)
        if schema is None:
            raise EvalError(f"unknown ONNX op '{call.func}'")
        # inputs: tensors first (their dtypes decide the dtype of constant inputs of the same type)
        slots: list[tuple[str, object]] = []
        for arg in call.args:
            if isinstance(arg, A.Splat):
                bound = self.state.scope.tensors.get(arg.name)
                if not isinstance(bound, list):
                    raise EvalError(f"'*{arg.name}' is not a variadic binding")
                slots += [("tensor", t) for t in bound]
            elif self._is_tensor_expr(arg):
                slots.append(("tensor", self._tensor(arg, hint=call.func)))
            else:
                slots.append(("value", arg))
        known: dict[str, np.dtype] = {}
        for i, (kind, item) in enumerate(slots):
            formal = schema.formal_input(i)
            if kind == "tensor" and formal is not None:
                dt = self._dtype_of(item)
                if dt is not None:
                    known.setdefault(formal.type_str, dt)
        inputs: list[str] = []
        for i, (kind, item) in enumerate(slots):
            if kind == "tensor":
                inputs.append(item)
                continue
            formal = schema.formal_input(i)
            dtype = None
            if formal is not None:
                dtype = concrete_dtype(formal.type_str) or known.get(formal.type_str)
            base = item.id if isinstance(item, A.Name) else f"{call.func}.{formal.name if formal else i}"
            value = self.evaluator.eval(item)
            if value is None:
                inputs.append("")
                continue
            name = self._init(value, base, dtype)
            if formal is not None and self._dtype_of(name) is not None:
                known.setdefault(formal.type_str, self._dtype_of(name))
            inputs.append(name)
        while inputs and inputs[-1] == "":
            inputs.pop()
        required_outputs = 0
        for i, f in enumerate(schema.outputs):
            if f.option == "single":
                required_outputs = i + 1
        count = max(n_outputs, required_outputs, 1)
        outputs = [self.namer(f"{self.prefix}.{hint}" if i == 0 else f"{self.prefix}.{hint}_{i}")
                   for i in range(count)]
        node = helper.make_node(call.func, inputs, outputs, name=self.namer(f"{self.prefix}/{call.func}"))
        self._attrs(node, call, schema)
        tag = node.metadata_props.add()
        tag.key = PROVENANCE_KEY
        tag.value = self.rule.name
        self.out.nodes.append(node)
        return outputs

    def _is_tensor_expr(self, expr) -> bool:
        if isinstance(expr, A.NoneLit) or is_op_call(expr):
            return True
        if isinstance(expr, A.Call) and expr.func in BUILTINS and BUILTINS[expr.func].category == "macro":
            return True
        if isinstance(expr, A.Name):
            scope = self.state.scope
            return expr.id in self.locals or (expr.id in scope.tensors and expr.id not in scope.values)
        return False

    def _attrs(self, node: onnx.NodeProto, call: A.Call, schema) -> None:
        attrs: dict[str, onnx.AttributeProto] = {}
        for item in call.attrs:
            if isinstance(item, A.AttrSpread):
                source = self.state.scope.bags.get(item.name)
                if source is None:
                    raise EvalError(f"'..{item.name}' is not bound")
                for attr in source.attribute:
                    attrs[attr.name] = attr
            elif isinstance(item, A.AttrDrop):
                attrs.pop(item.name, None)
            else:
                value = self.evaluator.eval(item.value)
                if value is None:
                    attrs.pop(item.name, None)
                    continue
                attr_type = schema.attributes.get(item.name, (None,))[0] if schema else None
                try:
                    converted = attribute_value(attr_type, value) if attr_type is not None else value
                    if isinstance(converted, np.ndarray):
                        converted = converted.tolist()
                    elif isinstance(converted, np.generic):
                        converted = converted.item()
                    attrs[item.name] = helper.make_attribute(item.name, converted)
                except (TypeError, ValueError) as exc:
                    raise EvalError(f"attribute {item.name} of {call.func}: {exc}") from None
        node.attribute.extend(attrs.values())

    # ---------------------------------------------------------------- Q/DQ macros
    def _macro(self, call: A.Call) -> str:
        """qdq / quantize / dequantize; tensors are named after the input: x_scale,
        x_zero_point, x_quantized, x_dequantized (made unique)."""
        builtin = BUILTINS[call.func]
        args, _ = self.evaluator.bind_args(builtin, call, tensor_arg=lambda e: self._tensor(e, hint="x"))
        x = args[0]
        if not x:
            raise EvalError(f"{call.func}(): the input tensor is absent")
        base = x
        if call.func == "dequantize":
            _, scale, zero_point, axis = args
            zp_dtype = self._dtype_of(x) or np.dtype(np.int8)
            scale_name, n = self._scale(scale, base)
            zp_name = self._zero_point(zero_point, zp_dtype, n, base)
            return self._qdq_node("DequantizeLinear", x, scale_name, zp_name, axis, n, np.dtype(np.float32), base)
        _, scale, zero_point, axis, dtype = args
        if not isinstance(dtype, np.dtype) or dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
            raise EvalError(f"{call.func}(): dtype must be int8 or uint8, got {dtype!r}")
        scale_name, n = self._scale(scale, base)
        zp_name = self._zero_point(zero_point, dtype, n, base)
        q = self._qdq_node("QuantizeLinear", x, scale_name, zp_name, axis, n, dtype, base)
        if call.func == "quantize":
            return q
        return self._qdq_node("DequantizeLinear", q, scale_name, zp_name, axis, n, np.dtype(np.float32), base)

    def _named_init(self, arr: np.ndarray, name: str) -> str:
        name = self.namer(name)
        self.out.inits.append(numpy_helper.from_array(np.array(arr, order="C", copy=True), name))
        self.dtypes[name] = arr.dtype
        return name

    def _scale(self, scale, base: str) -> tuple[str, int]:
        arr = _as_array(scale, "the Q/DQ scale").astype(np.float32)
        if arr.size == 1:
            arr = arr.reshape(())
        elif arr.ndim != 1:
            raise EvalError(f"the Q/DQ scale must be a scalar or a vector, got shape {list(arr.shape)}")
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise EvalError("the Q/DQ scale must be finite and positive")
        return self._named_init(arr, f"{base}_scale"), int(arr.size)

    def _zero_point(self, zero_point, dtype, n: int, base: str) -> str:
        arr = _as_array(zero_point, "the Q/DQ zero point")
        if arr.size == 1:
            arr = np.full([n], arr.reshape(-1)[0]) if n > 1 else arr.reshape(())
        elif arr.size != n:
            raise EvalError(f"the zero point has {arr.size} values, the scale {n}")
        info = np.iinfo(dtype)
        arr = np.clip(np.round(arr), info.min, info.max).astype(dtype)
        return self._named_init(arr, f"{base}_zero_point")

    def _qdq_node(self, op: str, x: str, scale: str, zp: str, axis, n: int, out_dtype, base: str) -> str:
        suffix = "quantized" if op == "QuantizeLinear" else "dequantized"
        out = self.namer(f"{base}_{suffix}")
        node = helper.make_node(op, [x, scale, zp], [out], name=self.namer(f"{base}_{op}"))
        if n > 1:
            node.attribute.append(helper.make_attribute("axis", int(axis)))
        tag = node.metadata_props.add()
        tag.key = PROVENANCE_KEY
        tag.value = self.rule.name
        self.out.nodes.append(node)
        self.dtypes[out] = np.dtype(out_dtype)
        return out


# --------------------------------------------------------------------------- apply
def apply(graph: onnx.GraphProto, rewrite: Rewrite, view: GraphView) -> None:
    """Validate, then edit ``graph`` in place. Raises RewriteError before any edit if invalid."""
    index = view.index
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    new_outputs = {name for node in rewrite.nodes for name in node.output}
    new_inits = {t.name for t in rewrite.inits}
    doomed = []
    for old in rewrite.replaced:
        producer = index.producer.get(old)
        if producer is None:
            raise RewriteError(f"'{old}' has no producer to replace")
        if all(producer is not d for d in doomed):
            doomed.append(producer)
    doomed_ids = {id(n) for n in doomed}
    new_reads = {name for node in rewrite.nodes for name in node.input}
    forwards = {old: src for old, src in rewrite.replaced.items() if src not in new_outputs and src not in new_inits}
    for node in doomed:
        for out in node.output:
            if not out or out in rewrite.replaced:
                continue
            outside = [c for c in index.consumers.get(out, ()) if id(c) not in doomed_ids]
            if outside or out in outputs or out in new_reads or out in forwards.values() \
                    or out in view.subgraph_reads:
                raise RewriteError(f"{node.op_type} '{node.name}' must be removed but its output '{out}' is still "
                                   "used; replace it too or guard the rule (e.g. where uses(...) == 0)")
    for old, src in rewrite.replaced.items():
        if old in forwards and old in view.subgraph_reads:
            raise RewriteError(f"'{old}' is read inside a subgraph; it cannot be forwarded to '{src}'")
        if src in rewrite.replaced:
            raise RewriteError(f"'{old}' would be replaced by '{src}', which is replaced itself")
        if old in forwards and old in outputs and (src in inputs or src in outputs):
            raise RewriteError(f"graph output '{old}' cannot be forwarded to '{src}' "
                               f"(a graph {'input' if src in inputs else 'output'}); the output name must stay")
        producer = index.producer.get(src)
        if old in forwards and producer is not None and id(producer) in doomed_ids:
            raise RewriteError(f"'{old}' would be forwarded to '{src}', which is removed by the same rewrite")
    if len(set(rewrite.replaced.values())) != len(rewrite.replaced):
        raise RewriteError("two outputs would be replaced by the same tensor")

    # ---- edit (on a Python list of the node objects; written back once at the end)
    nodes = list(graph.node)
    positions = {id(n): i for i, n in enumerate(nodes)}
    insert_at = max(positions[id(n)] for n in doomed)
    renames = {src: old for old, src in rewrite.replaced.items() if src in new_outputs or src in new_inits}
    for node in rewrite.nodes:
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for tensor in rewrite.inits:
        if tensor.name in renames:
            tensor.name = renames[tensor.name]
    final = ([n for n in nodes[:insert_at + 1] if id(n) not in doomed_ids] + list(rewrite.nodes)
             + [n for n in nodes[insert_at + 1:] if id(n) not in doomed_ids])
    del graph.node[:]
    graph.initializer.extend(rewrite.inits)
    for old, src in forwards.items():
        rename_input_uses(graph, old, src, nodes=final)
    removed = list(doomed)
    final = _remove_dead(final, graph, rewrite.matched, removed)
    _reuse_names(final, rewrite, removed)
    final = _ensure_topological(final, graph)
    graph.node.extend(final)


def _reuse_names(nodes: list, rewrite: Rewrite, removed: list) -> None:
    """A new node takes the name of a removed node of the same op type (the producer of the
    tensor it replaces first), so reports keyed by node name stay readable."""
    taken = {n.name for n in nodes}
    free = [n for n in removed if n.name and n.name not in taken]
    for node in rewrite.nodes:
        replaced_producers = [n for n in free if set(n.output) & set(node.output)]
        pick = next((n for n in replaced_producers if n.op_type == node.op_type), None)
        if pick is None:
            pick = next((n for n in free if n.op_type == node.op_type), None)
        if pick is not None:
            node.name = pick.name
            free.remove(pick)


def _readers(nodes: list, graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            if name:
                counts[name] = counts.get(name, 0) + 1
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for inner in sub.node:
                    for name in inner.input:
                        counts[name] = counts.get(name, 0) + 1
    for out in graph.output:
        counts[out.name] = counts.get(out.name, 0) + 1
    return counts


def _remove_dead(nodes: list, graph: onnx.GraphProto, matched: list, removed: list) -> list:
    """Drop matched nodes left without readers, Constant nodes that only fed removed nodes, and
    initializers that only removed nodes read."""
    removed_ids = {id(n) for n in removed}
    candidates = [n for n in matched if id(n) not in removed_ids]
    readers = _readers(nodes, graph)
    producers = {name: n for n in nodes for name in n.output}
    changed = True
    while changed:
        changed = False
        for node in list(candidates):
            if all(readers.get(o, 0) == 0 for o in node.output if o):
                candidates.remove(node)
                removed.append(node)
                removed_ids.add(id(node))
                for name in node.input:
                    if not name:
                        continue
                    readers[name] = readers.get(name, 0) - 1
                    producer = producers.get(name)
                    if producer is not None and producer.op_type == "Constant" and id(producer) not in removed_ids \
                            and all(producer is not c for c in candidates):
                        candidates.append(producer)
                changed = True
    nodes = [n for n in nodes if id(n) not in removed_ids]
    doomed_inputs = {name for n in removed for name in n.input if name}
    readers = _readers(nodes, graph)
    drop_initializers(graph, lambda t: t.name in doomed_inputs and readers.get(t.name, 0) == 0)
    return nodes


def _ensure_topological(nodes: list, graph: onnx.GraphProto) -> list:
    """Stable topological order (only reorders when the current order is invalid)."""
    produced_by = {name: idx for idx, n in enumerate(nodes) for name in n.output if name}
    seen: set[str] = set()
    valid = True
    for node in nodes:
        if any(name in produced_by and name not in seen for name in node.input):
            valid = False
            break
        seen.update(node.output)
    if valid:
        return nodes
    deps = [{produced_by[name] for name in n.input if name in produced_by} for n in nodes]
    done: set[int] = set()
    order: list[int] = []
    remaining = list(range(len(nodes)))
    while remaining:
        pick = next((i for i in remaining if deps[i] <= done), None)
        if pick is None:  # a cycle: keep the order (the verifier reports it)
            return nodes
        remaining.remove(pick)
        done.add(pick)
        order.append(pick)
    return [nodes[i] for i in order]
