"""The fixed builtin table of the rule language (numpy at rewrite time; never Python eval).

Each builtin declares its parameters and what each parameter receives:

* ``value``  — a constant value (numpy array, number, string, list, dtype, none);
* ``ref``    — a *tensor reference*: a graph tensor named in the pattern (constant or not),
               for metadata such as shape, rank, dtype, use count, producer and annotations;
               an arbitrary constant expression is accepted too (its value's metadata);
* ``tensor`` — (macros only) a tensor of the replacement: a bound tensor, a new node, or a
               constant expression that becomes an initializer.

``graph`` builtins read the graph or the annotations (guards); ``macro`` builtins create nodes
and are only allowed in ``replace``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from hqpc.dsl.errors import EvalError

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: str = "value"  # 'value' | 'ref' | 'tensor'
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Builtin:
    name: str
    params: tuple[Param, ...]
    fn: Callable | None
    category: str  # 'value' | 'graph' | 'macro'
    doc: str
    variadic: bool = False  # extra positional values are passed through (minimum/maximum)
    signature: str = field(default="", compare=False)

    def describe(self) -> str:
        parts = []
        for p in self.params:
            if p.required:
                parts.append(p.name)
            else:
                parts.append(f"{p.name}={_show_default(p.default)}")
        if self.variadic:
            parts.append("...")
        return f"{self.name}({', '.join(parts)})"


def _show_default(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------- tensor references
class TensorRef:
    """A graph tensor as seen by graph builtins. ``name`` is None for an absent optional input."""

    def __init__(self, name: str | None, view):
        self.name = name
        self.view = view

    @property
    def present(self) -> bool:
        return self.name is not None and self.name != ""

    def value(self) -> np.ndarray | None:
        return self.view.constant(self.name) if self.present else None

    def shape(self) -> list | None:
        return self.view.shape(self.name) if self.present else None

    def dtype(self) -> np.dtype | None:
        return self.view.dtype(self.name) if self.present else None

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r})"


class ValueRef:
    """A constant value passed where a tensor reference is expected."""

    def __init__(self, value):
        self.array = None if value is None else np.asarray(value)
        self.name = None

    @property
    def present(self) -> bool:
        return self.array is not None

    def value(self):
        return self.array

    def shape(self):
        return None if self.array is None else [int(d) for d in self.array.shape]

    def dtype(self):
        return None if self.array is None else self.array.dtype


def _need_value(ref, what: str) -> np.ndarray:
    value = ref.value()
    if value is None:
        who = f"'{ref.name}'" if getattr(ref, "name", None) else "the argument"
        raise EvalError(f"{what}: {who} is not a constant")
    return value


def _need_shape(ref, what: str) -> list:
    shape = ref.shape()
    if shape is None:
        who = f"'{ref.name}'" if getattr(ref, "name", None) else "the argument"
        raise EvalError(f"{what}: the shape of {who} is unknown")
    return shape


# --------------------------------------------------------------------------- value builtins
def _arr(x, what="argument"):
    if x is None:
        raise EvalError(f"{what} is none (an absent optional input? use '??' to give a default)")
    if isinstance(x, str):
        raise EvalError(f"{what} is a string, expected a number or tensor")
    return np.asarray(x)


def _axis(axis):
    if axis is None:
        return None
    a = np.asarray(axis)
    if a.ndim == 0:
        return int(a)
    return tuple(int(v) for v in a.reshape(-1))


def _unary(fn):
    return lambda x: fn(_arr(x))


def _reduce(fn):
    def run(x, axis=None, keepdims=False):
        return fn(_arr(x), axis=_axis(axis), keepdims=bool(keepdims))
    return run


def _absmax(x, per_axis=None):
    a = np.abs(_arr(x))
    if per_axis is None:
        return a.max() if a.size else np.zeros((), a.dtype)
    axis = int(per_axis) % max(a.ndim, 1)
    others = tuple(i for i in range(a.ndim) if i != axis)
    return a.max(axis=others) if others else a


def _bcast(x, like=None, axis=0, group=1):
    """Reshape a vector to broadcast along ``axis`` of a tensor of ``like``'s rank.

    With ``group=g`` > 1, ``x`` holds ``g * shape(like)[axis]`` values and ``like``'s axis 0 is
    split into ``g`` equal blocks: block ``i`` of axis 0 takes the ``i``-th slice of ``x`` along
    ``axis`` (the grouped ConvTranspose weight layout ``[C_in, C_out / group, k...]``)."""
    v = _arr(x, "bcast: x")
    if like is None:
        raise EvalError("bcast: 'like' is required (a tensor whose rank to broadcast to)")
    dims = None
    if isinstance(like, ValueRef) and like.array is not None and like.array.ndim == 0 \
            and np.issubdtype(like.array.dtype, np.integer):
        rank = int(like.array)  # a rank given as a number
    elif isinstance(like, (TensorRef, ValueRef)):
        dims = _need_shape(like, "bcast")
        rank = len(dims)
    else:
        rank = int(np.asarray(like))
    axis = int(axis)
    if axis < 0:
        axis += rank
    if not 0 <= axis < rank:
        raise EvalError(f"bcast: axis {axis} out of range for rank {rank}")
    flat = v.reshape(-1)
    group = int(group)
    if group == 1:
        shape = [1] * rank
        shape[axis] = flat.size
        return flat.reshape(shape)
    if dims is None or axis == 0 or not all(isinstance(dims[i], int) for i in (0, axis)) \
            or group < 1 or dims[0] % group or flat.size != group * dims[axis]:
        raise EvalError(f"bcast: group={group} needs a tensor 'like' with static axes 0 and {axis}, axis 0 "
                        f"divisible by the group and x of group * shape(like)[{axis}] values "
                        f"(got {flat.size} values, like {dims})")
    blocks = np.repeat(flat.reshape(group, dims[axis]), dims[0] // group, axis=0)  # [dims[0], dims[axis]]
    shape = [1] * rank
    shape[0], shape[axis] = dims[0], dims[axis]
    return blocks.reshape(shape)


def _reshape(x, shape):
    try:
        return np.reshape(_arr(x), [int(s) for s in np.asarray(shape).reshape(-1)])
    except ValueError as exc:
        raise EvalError(f"reshape: {exc}") from None


def _transpose(x, perm=None):
    a = _arr(x)
    return np.transpose(a, None if perm is None else [int(p) for p in np.asarray(perm).reshape(-1)])


def _concat(items, axis=0):
    if not isinstance(items, (list, tuple)) or not items:
        raise EvalError("concat: expects a non-empty list of constants")
    try:
        return np.concatenate([np.atleast_1d(_arr(i)) for i in items], axis=int(axis))
    except ValueError as exc:
        raise EvalError(f"concat: {exc}") from None


def _stack(items, axis=0):
    if not isinstance(items, (list, tuple)) or not items:
        raise EvalError("stack: expects a non-empty list of constants")
    try:
        return np.stack([_arr(i) for i in items], axis=int(axis))
    except ValueError as exc:
        raise EvalError(f"stack: {exc}") from None


def _cast(x, dtype):
    if not isinstance(dtype, np.dtype):
        raise EvalError("cast: the second argument must be a dtype such as float32 or int8")
    a = _arr(x)
    if np.issubdtype(dtype, np.integer) and np.issubdtype(a.dtype, np.floating):
        info = np.iinfo(dtype)
        a = np.clip(np.round(a), info.min, info.max)
    return a.astype(dtype)


def _full(shape, value, dtype=np.dtype(np.float32)):
    return np.full([int(s) for s in np.asarray(shape).reshape(-1)], value, dtype=dtype)


def _zeros(shape, dtype=np.dtype(np.float32)):
    return _full(shape, 0, dtype)


def _ones(shape, dtype=np.dtype(np.float32)):
    return _full(shape, 1, dtype)


def _select(cond, a, b):
    c = np.asarray(cond)
    if c.ndim == 0:
        return a if bool(c) else b
    return np.where(c, _arr(a), _arr(b))


def _len(x):
    if isinstance(x, (list, tuple, str)):
        return len(x)
    a = _arr(x)
    if a.ndim == 0:
        raise EvalError("len: a scalar has no length")
    return a.shape[0]


def _item(x):
    a = _arr(x)
    if a.size != 1:
        raise EvalError(f"item: expected a single value, got shape {list(a.shape)}")
    return a.reshape(-1)[0].item()


def _minimum(a, b, *more):
    out = np.minimum(_arr(a), _arr(b))
    for m in more:
        out = np.minimum(out, _arr(m))
    return out


def _maximum(a, b, *more):
    out = np.maximum(_arr(a), _arr(b))
    for m in more:
        out = np.maximum(out, _arr(m))
    return out


def _quant_scale(x, bits=8, per_axis=None):
    """Symmetric scale absmax / (2^(bits-1) - 1); zero ranges get scale 1."""
    bits = int(bits)
    if not 2 <= bits <= 16:
        raise EvalError(f"quant_scale: bits must be in 2..16, got {bits}")
    m = np.asarray(_absmax(x, per_axis), dtype=np.float64)
    scale = m / (2 ** (bits - 1) - 1)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def _squeeze(x, axis=None):
    try:
        return np.squeeze(_arr(x), axis=_axis(axis))
    except ValueError as exc:
        raise EvalError(f"squeeze: {exc}") from None


def _expand_dims(x, axis):
    return np.expand_dims(_arr(x), _axis(axis))


def _broadcast_to(x, shape):
    try:
        return np.broadcast_to(_arr(x), [int(s) for s in np.asarray(shape).reshape(-1)]).copy()
    except ValueError as exc:
        raise EvalError(f"broadcast_to: {exc}") from None


def _take(x, indices, axis=0):
    try:
        return np.take(_arr(x), np.asarray(indices, dtype=np.int64), axis=int(axis))
    except IndexError as exc:
        raise EvalError(f"take: {exc}") from None


# --------------------------------------------------------------------------- graph builtins
def _shape(t):
    shape = t.shape()
    return None if shape is None else list(shape)


def _rank(t):
    shape = t.shape()
    return None if shape is None else len(shape)


def _dtype(t):
    return t.dtype()


def _size(t):
    shape = t.shape()
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape)) if shape else 1


def _view(t):
    return getattr(t, "view", None)


def _has(t):
    return t.present


def _is_const(t):
    return t.value() is not None


def _uses(t):
    view = _view(t)
    if view is None or not t.present:
        return 0
    return view.uses(t.name)


def _single_use(t):
    return _uses(t) == 1


def _producer(t):
    view = _view(t)
    if view is None or not t.present:
        return ""
    node = view.index.producer.get(t.name)
    return node.op_type if node is not None else ""


def _is_output(t):
    view = _view(t)
    return bool(view is not None and t.present and t.name in view.index.outputs)


def _is_input(t):
    view = _view(t)
    return bool(view is not None and t.present and t.name in view.index.inputs)


def _broadcast_vector(s, like, axis, what):
    """(is_per_channel, vector) for constant ``s`` against tensor ``like`` along ``axis``."""
    value = _need_value(s, what)
    shape = _need_shape(like, what)
    rank = len(shape)
    axis = int(axis) + (rank if int(axis) < 0 else 0)
    if not 0 <= axis < rank:
        raise EvalError(f"{what}: axis {axis} out of range for rank {rank}")
    channels = shape[axis] if isinstance(shape[axis], int) else None
    if value.ndim > rank:
        return False, None
    full = [1] * (rank - value.ndim) + list(value.shape)
    if any(d != 1 for i, d in enumerate(full) if i != axis):
        return False, None
    c = full[axis]
    if channels is not None and c not in (1, channels):
        return False, None
    if c == 1:
        if channels is None:
            return True, None
        return True, np.full([channels], value.reshape(-1)[0], dtype=value.dtype)
    return True, value.reshape(-1).copy()


def _per_channel(s, like, axis=1):
    ok, _ = _broadcast_vector(s, like, axis, "per_channel")
    return ok


def _channel_vector(s, like, axis=1):
    ok, vector = _broadcast_vector(s, like, axis, "channel_vector")
    if not ok:
        raise EvalError("channel_vector: the constant does not broadcast along a single channel axis")
    if vector is None:
        raise EvalError("channel_vector: the channel count is unknown")
    return vector


def _annotation(namespace, t, default=None):
    if not isinstance(namespace, str):
        raise EvalError("annotation: the namespace must be a string such as \"precision\"")
    if isinstance(t, str):
        names = [t]
        view = None
    else:
        view = _view(t)
        names = [t.name] if t.present else []
        if view is not None and t.present:
            node = view.index.producer.get(t.name)
            if node is not None:
                names.append(node.name)
    if view is None or not names:
        return default
    table = view.annotations.get(namespace)
    if not isinstance(table, dict):
        return default
    for name in names:
        if name in table:
            value = table[name]
            return np.asarray(value) if isinstance(value, list) and all(
                isinstance(v, (int, float)) for v in value) else value
    return default


def _precision(t):
    return _annotation("precision", t)


def _sensitivity(t):
    return _annotation("sensitivity", t)


def _bits(t):
    precision = _annotation("precision", t)
    if precision is None:
        return None
    if isinstance(precision, (int, float)):
        return int(precision)
    found = re.search(r"(\d+)", str(precision))
    return int(found.group(1)) if found else None


# --------------------------------------------------------------------------- the table
def _b(name, params, fn, category="value", doc="", variadic=False):
    return Builtin(name, tuple(params), fn, category, doc, variadic)


V = lambda name, default=REQUIRED: Param(name, "value", default)  # noqa: E731
R = lambda name, default=REQUIRED: Param(name, "ref", default)  # noqa: E731
T = lambda name, default=REQUIRED: Param(name, "tensor", default)  # noqa: E731

_LIST = [
    # arithmetic
    _b("sqrt", [V("x")], _unary(np.sqrt), doc="square root, elementwise"),
    _b("abs", [V("x")], _unary(np.abs), doc="absolute value"),
    _b("exp", [V("x")], _unary(np.exp), doc="e**x"),
    _b("log", [V("x")], _unary(np.log), doc="natural logarithm"),
    _b("sign", [V("x")], _unary(np.sign), doc="-1, 0 or 1"),
    _b("floor", [V("x")], _unary(np.floor), doc="round down"),
    _b("ceil", [V("x")], _unary(np.ceil), doc="round up"),
    _b("round", [V("x")], _unary(np.round), doc="round half to even (numpy, like ONNX Round)"),
    _b("reciprocal", [V("x")], _unary(lambda a: 1 / a), doc="1 / x"),
    _b("minimum", [V("a"), V("b")], _minimum, doc="elementwise minimum of two or more values", variadic=True),
    _b("maximum", [V("a"), V("b")], _maximum, doc="elementwise maximum of two or more values", variadic=True),
    _b("clip", [V("x"), V("lo"), V("hi")], lambda x, lo, hi: np.clip(_arr(x), lo, hi), doc="clamp to [lo, hi]"),
    _b("select", [V("cond"), V("a"), V("b")], _select,
       doc="a if cond else b; a single-value cond evaluates only the chosen branch; arrays: elementwise"),
    # reductions and predicates
    _b("min", [V("x"), V("axis", None), V("keepdims", False)], _reduce(np.min), doc="minimum (over axis)"),
    _b("max", [V("x"), V("axis", None), V("keepdims", False)], _reduce(np.max), doc="maximum (over axis)"),
    _b("sum", [V("x"), V("axis", None), V("keepdims", False)], _reduce(np.sum), doc="sum (over axis)"),
    _b("mean", [V("x"), V("axis", None), V("keepdims", False)], _reduce(np.mean), doc="mean (over axis)"),
    _b("prod", [V("x"), V("axis", None), V("keepdims", False)], _reduce(np.prod), doc="product (over axis)"),
    _b("absmax", [V("x"), V("per_axis", None)], _absmax,
       doc="max |x|; with per_axis=k one value per index of axis k (other axes reduced)"),
    _b("all", [V("x")], lambda x: bool(np.all(_arr(x))), doc="every element true"),
    _b("any", [V("x")], lambda x: bool(np.any(_arr(x))), doc="some element true"),
    _b("isinf", [V("x")], _unary(np.isinf), doc="elementwise +-inf test"),
    _b("isnan", [V("x")], _unary(np.isnan), doc="elementwise NaN test"),
    _b("isfinite", [V("x")], _unary(np.isfinite), doc="elementwise finite test"),
    _b("allclose", [V("a"), V("b"), V("rtol", 1e-5), V("atol", 1e-8)],
       lambda a, b, rtol=1e-5, atol=1e-8: bool(np.allclose(_arr(a), _arr(b), rtol=float(rtol), atol=float(atol))),
       doc="numpy.allclose"),
    # shapes
    _b("reshape", [V("x"), V("shape")], _reshape, doc="reshape (one -1 allowed)"),
    _b("bcast", [V("x"), R("like"), V("axis", 0), V("group", 1)], _bcast,
       doc="reshape vector x to broadcast along `axis` of a tensor with like's rank (like: tensor or rank); "
           "group=g: like's axis 0 is split into g blocks, block i takes the i-th slice of x"),
    _b("broadcast_to", [V("x"), V("shape")], _broadcast_to, doc="numpy.broadcast_to (copied)"),
    _b("expand_dims", [V("x"), V("axis")], _expand_dims, doc="insert size-1 axes"),
    _b("squeeze", [V("x"), V("axis", None)], _squeeze, doc="remove size-1 axes"),
    _b("flatten", [V("x")], lambda x: _arr(x).reshape(-1), doc="to 1-D"),
    _b("transpose", [V("x"), V("perm", None)], _transpose, doc="permute axes (default: reverse)"),
    _b("concat", [V("items"), V("axis", 0)], _concat, doc="join a list of constants along an axis"),
    _b("stack", [V("items"), V("axis", 0)], _stack, doc="stack a list of constants along a new axis"),
    _b("take", [V("x"), V("indices"), V("axis", 0)], _take, doc="select indices along an axis"),
    _b("len", [V("x")], _len, doc="length of a list or of axis 0"),
    _b("item", [V("x")], _item, doc="the single element of a one-element constant, as a number"),
    # construction and casts
    _b("cast", [V("x"), V("dtype")], _cast, doc="convert to a dtype (float->int rounds and saturates)"),
    _b("full", [V("shape"), V("value"), V("dtype", np.dtype(np.float32))], _full, doc="constant-filled array"),
    _b("zeros", [V("shape"), V("dtype", np.dtype(np.float32))], _zeros, doc="zeros"),
    _b("ones", [V("shape"), V("dtype", np.dtype(np.float32))], _ones, doc="ones"),
    _b("zeros_like", [V("x")], lambda x: np.zeros_like(_arr(x)), doc="zeros of x's shape and dtype"),
    _b("ones_like", [V("x")], lambda x: np.ones_like(_arr(x)), doc="ones of x's shape and dtype"),
    # quantization
    _b("quant_scale", [V("x"), V("bits", 8), V("per_axis", None)], _quant_scale,
       doc="symmetric scale absmax(x)/(2^(bits-1)-1) (per_axis: per-channel), float32"),
    # graph and annotations
    _b("shape", [R("t")], _shape, "graph", "dims of t (ints; symbolic dims are names); none if unknown"),
    _b("rank", [R("t")], _rank, "graph", "number of dims of t; none if unknown"),
    _b("dtype", [R("t")], _dtype, "graph", "element type of t (compare with float32, int8, ...)"),
    _b("size", [R("t")], _size, "graph", "number of elements of t; none if not static"),
    _b("has", [R("t")], _has, "graph", "an optional input/output is present"),
    _b("is_const", [R("t")], _is_const, "graph", "t is an initializer or Constant output"),
    _b("uses", [R("t")], _uses, "graph", "number of readers of t (graph outputs count once)"),
    _b("single_use", [R("t")], _single_use, "graph", "t has exactly one reader"),
    _b("producer", [R("t")], _producer, "graph", "op type producing t (\"\" for inputs and initializers)"),
    _b("is_output", [R("t")], _is_output, "graph", "t is a graph output"),
    _b("is_input", [R("t")], _is_input, "graph", "t is a graph input"),
    _b("per_channel", [R("s"), R("like"), V("axis", 1)], _per_channel, "graph",
       "constant s broadcasts against `like` varying at most along `axis` (scalars too)"),
    _b("channel_vector", [R("s"), R("like"), V("axis", 1)], _channel_vector, "graph",
       "constant s as a 1-D vector of like's `axis` length (for per_channel constants)"),
    _b("annotation", [V("namespace"), R("t"), V("default", None)], _annotation, "graph",
       "model.annotations[namespace][t] (tensor name, then producer node name), else default"),
    _b("precision", [R("t")], _precision, "graph", "annotation(\"precision\", t): e.g. \"int8\""),
    _b("sensitivity", [R("t")], _sensitivity, "graph", "annotation(\"sensitivity\", t)"),
    _b("bits", [R("t")], _bits, "graph", "bit width from the precision annotation (\"int8\" -> 8), or none"),
    # macros (replace only): expanded by the rewriter
    _b("qdq", [T("x"), V("scale"), V("zero_point", 0), V("axis", 1), V("dtype", np.dtype(np.int8))], None,
       "macro", "QuantizeLinear -> DequantizeLinear of x (per-axis when scale is a vector)"),
    _b("quantize", [T("x"), V("scale"), V("zero_point", 0), V("axis", 1), V("dtype", np.dtype(np.int8))], None,
       "macro", "QuantizeLinear of x"),
    _b("dequantize", [T("x"), V("scale"), V("zero_point", 0), V("axis", 1)], None, "macro",
       "DequantizeLinear of x (zero_point cast to x's element type)"),
]

BUILTINS: dict[str, Builtin] = {b.name: b for b in _LIST}

DTYPES = {name: np.dtype(name) for name in (
    "float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")}
DTYPES["bool"] = np.dtype(np.bool_)

CONSTANTS: dict[str, Any] = {"inf": math.inf, "nan": math.nan, "pi": math.pi, **DTYPES}


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name if dtype is not None else "none"
