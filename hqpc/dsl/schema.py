"""ONNX operator schemas as the rule checker and rewriter need them (default domain only)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx
from onnx import defs, helper

from hqpc.ir import WORKING_OPSET

VARIADIC = defs.OpSchema.FormalParameterOption.Variadic
OPTIONAL = defs.OpSchema.FormalParameterOption.Optional
SINGLE = defs.OpSchema.FormalParameterOption.Single


@dataclass(frozen=True)
class Formal:
    name: str
    option: str  # 'single' | 'optional' | 'variadic'
    type_str: str
    min_arity: int = 1


@dataclass(frozen=True)
class OpInfo:
    op: str
    inputs: tuple[Formal, ...]
    outputs: tuple[Formal, ...]
    attributes: dict  # name -> (AttrType, default python value or None, required)
    since: int

    @property
    def min_inputs(self) -> int:
        last = 0
        for i, f in enumerate(self.inputs):
            if f.option == "single":
                last = i + 1
            elif f.option == "variadic":
                last = i + f.min_arity
        return last

    @property
    def max_inputs(self) -> int | None:
        if self.inputs and self.inputs[-1].option == "variadic":
            return None
        return len(self.inputs)

    @property
    def max_outputs(self) -> int | None:
        if self.outputs and self.outputs[-1].option == "variadic":
            return None
        return len(self.outputs)

    def formal_input(self, index: int) -> Formal | None:
        if index < len(self.inputs):
            return self.inputs[index]
        if self.inputs and self.inputs[-1].option == "variadic":
            return self.inputs[-1]
        return None

    def formal_output(self, index: int) -> Formal | None:
        if index < len(self.outputs):
            return self.outputs[index]
        if self.outputs and self.outputs[-1].option == "variadic":
            return self.outputs[-1]
        return None

    def input_names(self) -> str:
        return ", ".join(f.name + ("?" if f.option == "optional" else "...") if f.option != "single" else f.name
                         for f in self.inputs)


def _option(opt) -> str:
    if opt == VARIADIC:
        return "variadic"
    if opt == OPTIONAL:
        return "optional"
    return "single"


@lru_cache(maxsize=None)
def op_info(op: str, opset: int = WORKING_OPSET) -> OpInfo | None:
    """Schema of default-domain op ``op`` at ``opset``, or None if there is none."""
    try:
        schema = defs.get_schema(op, opset, "")
    except Exception:
        return None
    if schema.deprecated:
        return None
    attributes = {}
    for name, attr in schema.attributes.items():
        default = None
        if attr.default_value is not None and attr.default_value.type != 0:
            default = helper.get_attribute_value(attr.default_value)
            if isinstance(default, bytes):
                default = default.decode("utf-8")
            elif isinstance(default, onnx.TensorProto):
                default = onnx.numpy_helper.to_array(default)
        attributes[name] = (attr.type, default, bool(attr.required))
    inputs = tuple(Formal(f.name, _option(f.option), f.type_str, getattr(f, "min_arity", 1)) for f in schema.inputs)
    outputs = tuple(Formal(f.name, _option(f.option), f.type_str, getattr(f, "min_arity", 1)) for f in schema.outputs)
    return OpInfo(op, inputs, outputs, attributes, schema.since_version)


@lru_cache(maxsize=1)
def all_ops() -> tuple[str, ...]:
    names = {s.name for s in defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx")}
    return tuple(sorted(n for n in names if op_info(n) is not None))


def suggest(name: str, candidates, cutoff: float = 0.6) -> str | None:
    """The closest candidate: exact case-insensitive match first, then difflib."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    if name.lower() in lowered and lowered[name.lower()] != name:
        return lowered[name.lower()]
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=cutoff)
    if found:
        return found[0]
    found = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=cutoff)
    if found:
        return lowered[found[0]]
    # a shared prefix of 3+ characters: 'padding' -> 'pads', 'opt_level' -> 'opt'
    prefixed = [c for c in candidates if len(c) >= 3 and len(name) >= 3 and name.lower()[:3] == c.lower()[:3]]
    return prefixed[0] if len(prefixed) == 1 else None


def suggest_op(name: str) -> str | None:
    ops = all_ops()
    hit = suggest(name, ops)
    if hit:
        return hit
    # abbreviations: 'BatchNorm' -> 'BatchNormalization'
    prefixed = [op for op in ops if op.lower().startswith(name.lower()) and len(name) >= 3]
    return prefixed[0] if len(prefixed) == 1 else None


_TENSOR_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16, "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32, "tensor(uint32)": np.uint32, "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def concrete_dtype(type_str: str):
    """numpy dtype for a concrete formal type string like 'tensor(int64)', else None."""
    found = _TENSOR_TYPES.get(type_str)
    return np.dtype(found) if found is not None else None


def attribute_value(attr_type, value):
    """Convert a rule value to what ``helper.make_attribute`` needs for the schema's type."""
    A = onnx.AttributeProto
    arr = np.asarray(value) if not isinstance(value, (str, bytes)) else None
    if attr_type == A.FLOAT:
        return float(np.asarray(value).reshape(-1)[0]) if arr is not None and arr.size == 1 else float(value)
    if attr_type == A.INT:
        return int(np.asarray(value).reshape(-1)[0]) if arr is not None and arr.size == 1 else int(value)
    if attr_type == A.STRING:
        return str(value)
    if attr_type == A.INTS:
        return [int(v) for v in np.asarray(value).reshape(-1)]
    if attr_type == A.FLOATS:
        return [float(v) for v in np.asarray(value).reshape(-1)]
    if attr_type == A.STRINGS:
        return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if attr_type == A.TENSOR:
        return onnx.numpy_helper.from_array(np.asarray(value))
    return value
