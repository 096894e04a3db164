"""Evaluation of rule expressions at rewrite time: numpy values, builtins from a fixed table.

No Python ``eval`` is ever applied to rule text: expressions are interpreted node by node.
Any failure raises :class:`~hqpc.dsl.errors.EvalError`, which rejects the match (and shows in
the why-didn't-it-fire trace); it never crashes the compiler.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from hqpc.dsl import ast as A
from hqpc.dsl.builtins import BUILTINS, CONSTANTS, REQUIRED, TensorRef, ValueRef, dtype_name
from hqpc.dsl.errors import EvalError
from hqpc.dsl.printer import format_expr
from hqpc.graphutil import GraphIndex


class GraphView:
    """A snapshot of a model for matching: index, constants, types (inferred on demand)."""

    def __init__(self, proto: onnx.ModelProto, annotations: dict | None = None):
        self.proto = proto
        self.graph = proto.graph
        self.index = GraphIndex.build(proto.graph)
        self.annotations = annotations or {}
        self._consts: dict[str, np.ndarray | None] = {}
        self._const_names: dict[int, tuple[np.ndarray, str]] = {}
        self._types: dict[str, tuple[int, list | None]] | None = None
        self._inferred = False
        self._subgraph_reads: set[str] | None = None

    @property
    def subgraph_reads(self) -> set[str]:
        """Names read inside If/Loop/Scan bodies (invisible to the GraphIndex consumer map)."""
        if self._subgraph_reads is None:
            names: set[str] = set()
            stack = [self.graph]
            while stack:
                graph = stack.pop()
                for node in graph.node:
                    if graph is not self.graph:
                        names.update(n for n in node.input if n)
                    for attr in node.attribute:
                        if attr.type == onnx.AttributeProto.GRAPH:
                            stack.append(attr.g)
                        elif attr.type == onnx.AttributeProto.GRAPHS:
                            stack.extend(attr.graphs)
            self._subgraph_reads = names
        return self._subgraph_reads

    def uses(self, name: str) -> int:
        return self.index.use_count(name) + (1 if name in self.subgraph_reads else 0)

    def constant(self, name: str | None) -> np.ndarray | None:
        if not name:
            return None
        if name not in self._consts:
            value = self.index.constant(name)
            self._consts[name] = value
            if value is not None and name in self.index.initializers:
                self._const_names[id(value)] = (value, name)
        return self._consts[name]

    def constant_name(self, value) -> str | None:
        """The initializer whose (cached) value object ``value`` is, if any."""
        found = self._const_names.get(id(value))
        return found[1] if found is not None and found[0] is value else None

    def _table(self) -> dict:
        if self._types is None:
            table = {}
            for value in list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output):
                _add_value_info(table, value)
            for init in self.graph.initializer:
                table[init.name] = (init.data_type, [int(d) for d in init.dims])
            self._types = table
        return self._types

    def _lookup(self, name: str):
        table = self._table()
        found = table.get(name)
        if (found is None or found[1] is None) and not self._inferred:
            self._inferred = True
            try:
                stripped = copy.deepcopy(self.proto)
                del stripped.graph.value_info[:]
                inferred = onnx.shape_inference.infer_shapes(stripped, data_prop=True)
                for value in inferred.graph.value_info:
                    if value.name not in table or table[value.name][1] is None:
                        _add_value_info(table, value)
            except Exception:
                pass
            found = table.get(name)
        if found is None:
            const = self.constant(name)
            if const is not None:
                return (onnx.helper.np_dtype_to_tensor_dtype(const.dtype), list(const.shape))
        return found

    def shape(self, name: str) -> list | None:
        found = self._lookup(name)
        return None if found is None or found[1] is None else list(found[1])

    def dtype(self, name: str) -> np.dtype | None:
        found = self._lookup(name)
        if found is None or not found[0]:
            return None
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(found[0]))
        except Exception:
            return None


def _add_value_info(table: dict, value: onnx.ValueInfoProto) -> None:
    tt = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        return
    shape = None
    if tt.HasField("shape"):
        shape = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    table[value.name] = (tt.elem_type, shape)


@dataclass
class Scope:
    """Names visible to an expression: pattern tensors, attribute values, lets, attribute bags."""

    tensors: dict[str, Any] = field(default_factory=dict)  # name -> graph tensor | None | [names]
    values: dict[str, Any] = field(default_factory=dict)
    bags: dict[str, onnx.NodeProto] = field(default_factory=dict)

    def copy(self) -> "Scope":
        return Scope(dict(self.tensors), dict(self.values), dict(self.bags))


def truth(value) -> bool:
    """A condition holds when it is not none/false/empty and every element is true."""
    if value is None:
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(truth(v) for v in value)
    if isinstance(value, np.dtype):
        return True
    arr = np.asarray(value)
    return arr.size > 0 and bool(np.all(arr))


def _arr(value, what: str):
    if value is None:
        raise EvalError(f"{what} is none (an absent optional input? give a default with '??')")
    if isinstance(value, (str, np.dtype)):
        raise EvalError(f"{what} is {value!r}, not a number")
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise EvalError(f"{what}: {exc}") from None
    if arr.dtype == object:
        raise EvalError(f"{what}: not a numeric value")
    return arr


def _operand(value, what: str):
    """Python numbers stay Python numbers, so numpy treats them as weak scalars
    (``float32_array * 0.5`` stays float32); everything else becomes an array."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return _arr(value, what)


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (str, np.dtype, bool)) and not isinstance(value, np.ndarray)


def _equal(a, b) -> Any:
    if _is_plain(a) or _is_plain(b):
        if isinstance(a, (bool, np.bool_)) and not _is_plain(b):
            return bool(np.all(np.asarray(b) == a))
        if isinstance(b, (bool, np.bool_)) and not _is_plain(a):
            return bool(np.all(np.asarray(a) == b))
        return a == b
    try:
        left, right = np.asarray(a), np.asarray(b)
        if left.dtype == object or right.dtype == object:
            return list(np.ravel(left)) == list(np.ravel(right)) and left.shape == right.shape
        if left.shape != right.shape:
            np.broadcast_shapes(left.shape, right.shape)
        return np.equal(left, right)
    except ValueError:
        return False


_ARITH = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.true_divide, "%": np.mod,
          "**": np.power, "@": np.matmul}
_ORDER = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


def binary(op: str, left, right):
    """Apply a non-short-circuit binary operator (also used for attribute comparisons)."""
    if op == "==":
        return _equal(left, right)
    if op == "!=":
        eq = _equal(left, right)
        return (not eq) if isinstance(eq, bool) else np.logical_not(eq)
    if op in _ORDER:
        a, b = _operand(left, f"left side of '{op}'"), _operand(right, f"right side of '{op}'")
        try:
            return _ORDER[op](a, b)
        except ValueError as exc:
            raise EvalError(f"'{op}': {exc}") from None
    if op in _ARITH:
        if op == "+" and isinstance(left, list) and isinstance(right, list):
            return left + right
        a, b = _operand(left, f"left operand of '{op}'"), _operand(right, f"right operand of '{op}'")
        try:
            with np.errstate(all="ignore"):
                if op == "**" and np.issubdtype(np.asarray(a).dtype, np.integer) and \
                        np.issubdtype(np.asarray(b).dtype, np.integer) and np.any(np.asarray(b) < 0):
                    return np.float_power(a, b)
                return _ARITH[op](a, b)
        except (ValueError, TypeError) as exc:
            raise EvalError(f"'{op}': {exc}") from None
    raise EvalError(f"unknown operator '{op}'")


class Evaluator:
    """Evaluates expressions against a :class:`Scope` and a :class:`GraphView`."""

    def __init__(self, view: GraphView | None, scope: Scope):
        self.view = view
        self.scope = scope

    # ---------------------------------------------------------------- entry points
    def eval(self, expr):
        method = getattr(self, "_" + type(expr).__name__, None)
        if method is None:
            raise EvalError(f"cannot evaluate {type(expr).__name__}")
        return method(expr)

    def condition(self, expr) -> bool:
        return truth(self.eval(expr))

    def ref(self, expr):
        """A tensor reference for graph builtins."""
        if isinstance(expr, A.Name) and expr.id in self.scope.tensors:
            bound = self.scope.tensors[expr.id]
            if isinstance(bound, list):
                raise EvalError(f"'{expr.id}' is a list of tensors; pass one tensor")
            return TensorRef(bound, self.view)
        return ValueRef(self.eval(expr))

    # ---------------------------------------------------------------- nodes
    def _Num(self, e):
        return e.value

    def _Str(self, e):
        return e.value

    def _Bool(self, e):
        return e.value

    def _NoneLit(self, e):
        return None

    def _Name(self, e):
        name = e.id
        if name in self.scope.values:
            return self.scope.values[name]
        if name in self.scope.tensors:
            bound = self.scope.tensors[name]
            if bound is None:
                return None
            if isinstance(bound, list):
                return [self._const(name, t) for t in bound]
            return self._const(name, bound)
        if name in self.scope.bags:
            raise EvalError(f"'{name}' is an attribute set; use it as '{{..{name}}}' in a replacement node")
        if name in CONSTANTS:
            return CONSTANTS[name]
        raise EvalError(f"unbound name '{name}'")

    def _const(self, name: str, tensor: str):
        value = self.view.constant(tensor) if self.view is not None else None
        if value is None:
            raise EvalError(f"'{name}' ({tensor}) is not a constant tensor")
        return value

    def _ListExpr(self, e):
        return [self.eval(i) for i in e.items]

    def _Unary(self, e):
        if e.op == "not":
            return not self.condition(e.operand)
        value = _operand(self.eval(e.operand), f"operand of unary '{e.op}'")
        return -value if e.op == "-" else value

    def _Binary(self, e):
        if e.op == "and":
            return self.condition(e.left) and self.condition(e.right)
        if e.op == "or":
            return self.condition(e.left) or self.condition(e.right)
        if e.op == "??":
            left = self.eval(e.left)
            return self.eval(e.right) if left is None else left
        return binary(e.op, self.eval(e.left), self.eval(e.right))

    def _Subscript(self, e):
        value = self.eval(e.value)
        if value is None:
            raise EvalError(f"cannot index none ({format_expr(e.value)} is none)")
        index = tuple(self._index(i) for i in e.index)
        try:
            if isinstance(value, (list, tuple)):
                if len(index) != 1:
                    raise EvalError("a list takes one index")
                out = value[index[0]]
                return list(out) if isinstance(out, tuple) else out
            arr = _arr(value, "indexed value")
            out = arr[index if len(index) > 1 else index[0]]
            return out
        except (IndexError, TypeError) as exc:
            raise EvalError(f"index {format_expr(e)}: {exc}") from None

    def _index(self, item):
        if isinstance(item, A.Slice):
            parts = [None if p is None else self._int(p) for p in (item.lo, item.hi, item.step)]
            return slice(*parts)
        return self._int(item)

    def _int(self, expr) -> int:
        value = self.eval(expr)
        try:
            arr = np.asarray(value)
            if arr.size != 1 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
                raise ValueError
            return int(arr.reshape(-1)[0])
        except (ValueError, TypeError):
            raise EvalError(f"index must be an integer, got {value!r}") from None

    def _Call(self, e):
        builtin = BUILTINS.get(e.func)
        if builtin is None:
            raise EvalError(f"'{e.func}' is not a builtin function")
        if builtin.category == "macro":
            raise EvalError(f"{e.func}() creates nodes; use it only in a replacement")
        if e.func == "select" and len(e.args) == 3 and not e.kwargs:
            cond = self.eval(e.args[0])
            if cond is None or isinstance(cond, (bool, np.bool_)) or np.asarray(cond).size == 1:
                return self.eval(e.args[1] if truth(cond) else e.args[2])  # lazy: only the chosen branch
        args, kwargs = self.bind_args(builtin, e)
        try:
            with np.errstate(all="ignore"):
                return builtin.fn(*args, **kwargs)
        except EvalError:
            raise
        except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError, AttributeError) as exc:
            raise EvalError(f"{e.func}(): {' '.join(str(exc).split())[:200]}") from None

    def bind_args(self, builtin, call: A.Call, tensor_arg=None):
        """Positional and keyword arguments for ``builtin`` (evaluated per parameter kind)."""
        params = builtin.params
        values: dict[str, Any] = {}
        extra = []
        for i, arg in enumerate(call.args):
            if isinstance(arg, A.Splat):
                raise EvalError("'*name' is only allowed in ONNX op arguments")
            if i < len(params):
                values[params[i].name] = self._param(params[i], arg, tensor_arg)
            elif builtin.variadic:
                extra.append(self.eval(arg))
            else:
                raise EvalError(f"{builtin.name}() takes at most {len(params)} arguments")
        by_name = {p.name: p for p in params}
        for kw in call.kwargs:
            if kw.name not in by_name:
                raise EvalError(f"{builtin.name}() has no argument '{kw.name}'")
            values[kw.name] = self._param(by_name[kw.name], kw.value, tensor_arg)
        args = []
        for p in params:
            if p.name in values:
                args.append(values[p.name])
            elif p.default is REQUIRED:
                raise EvalError(f"{builtin.name}() needs argument '{p.name}'")
            else:
                args.append(p.default)
        return args + extra, {}

    def _param(self, param, expr, tensor_arg):
        if param.kind == "ref":
            return self.ref(expr)
        if param.kind == "tensor":
            if tensor_arg is None:
                raise EvalError("tensor argument outside a replacement")
            return tensor_arg(expr)
        return self.eval(expr)


# --------------------------------------------------------------------------- explanations
def short(value) -> str:
    """Compact text of a value for traces."""
    if value is None:
        return "none"
    if isinstance(value, np.dtype):
        return dtype_name(value)
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(short(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") + "]"
    arr = np.asarray(value)
    if arr.ndim == 0:
        return f"{arr.item():.6g}" if np.issubdtype(arr.dtype, np.floating) else str(arr.item())
    if arr.size <= 6:
        return np.array2string(arr.reshape(-1) if arr.ndim > 1 else arr, precision=4, separator=", ") + (
            f" (shape {list(arr.shape)})" if arr.ndim > 1 else "")
    return f"<{dtype_name(arr.dtype)} array of shape {list(arr.shape)}>"


def explain_false(evaluator: Evaluator, expr) -> str:
    """Why ``expr`` is false: the failing conjunct with the values of its parts."""
    try:
        if isinstance(expr, A.Binary) and expr.op == "and":
            if not evaluator.condition(expr.left):
                return explain_false(evaluator, expr.left)
            return explain_false(evaluator, expr.right)
        if isinstance(expr, A.Binary) and expr.op in ("==", "!=", "<", "<=", ">", ">="):
            parts = []
            for side in (expr.left, expr.right):
                if not isinstance(side, (A.Num, A.Str, A.Bool, A.NoneLit)):
                    parts.append(f"{format_expr(side)} is {short(evaluator.eval(side))}")
            return f"{format_expr(expr)}" + (f" ({'; '.join(parts)})" if parts else "")
        if isinstance(expr, A.Call) and expr.func in ("single_use",) and expr.args:
            ref = evaluator.ref(expr.args[0])
            uses = BUILTINS["uses"].fn(ref)
            return f"{format_expr(expr)} ('{ref.name}' has {uses} uses)"
        if isinstance(expr, A.Unary) and expr.op == "not":
            return f"{format_expr(expr)} ({format_expr(expr.operand)} is true)"
    except EvalError as exc:
        return f"{format_expr(expr)} ({exc})"
    return format_expr(expr) + _name_values(evaluator, expr)


def _name_values(evaluator: Evaluator, expr) -> str:
    """' (a is 1; b is 2)' for the names an expression reads (constants only, up to four)."""
    parts, seen = [], set()
    for name in A.names_in(expr):
        if name.id in seen or len(parts) >= 4:
            continue
        seen.add(name.id)
        scope = evaluator.scope
        if name.id not in scope.values and name.id not in scope.tensors:
            continue
        try:
            value = evaluator.eval(name)
        except EvalError:
            bound = scope.tensors.get(name.id)
            if isinstance(bound, str):
                parts.append(f"{name.id} is tensor '{bound}'")
            continue
        parts.append(f"{name.id} is {short(value)}")
    return f" ({'; '.join(parts)})" if parts else ""
