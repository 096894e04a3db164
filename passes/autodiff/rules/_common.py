"""Helpers shared by several rule families (attributes, window geometry)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper

from ..context import Emitter
from ..errors import unsupported


def attr(node: NodeProto, name: str, default=None):
    """Attribute ``name`` of ``node`` as a Python value (strings decoded)."""
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def input_or_none(node: NodeProto, i: int) -> str | None:
    """``node.input[i]`` or ``None`` when absent / empty."""
    return node.input[i] if len(node.input) > i and node.input[i] else None


def const_input(ctx: Emitter, node: NodeProto, i: int, what: str) -> np.ndarray | None:
    """The constant value of optional input ``i`` (error if present but dynamic)."""
    name = input_or_none(node, i)
    if name is None:
        return None
    v = ctx.value(name)
    if v is None:
        raise unsupported(node, f"{what} (input {i}) must be a constant")
    return v


def static_spatial(ctx: Emitter, node: NodeProto, tensor: str, what: str) -> list[int]:
    """Spatial dims (axes 2..) of ``tensor``; they must be static."""
    shp = ctx.shape(tensor)
    if shp is None or not all(isinstance(d, int) for d in shp[2:]):
        raise unsupported(
            node, f"the {what} needs static spatial dims of {tensor!r} (got {shp}); "
            "pass input_shapes to pin them")
    return list(shp[2:])


def static_dim(ctx: Emitter, node: NodeProto, tensor: str, axis: int, what: str) -> int:
    shp = ctx.shape(tensor)
    if shp is None or not isinstance(shp[axis], int):
        raise unsupported(node, f"the {what} needs a static size of axis {axis} of {tensor!r}")
    return int(shp[axis])


@dataclass
class Window:
    """Resolved geometry of a sliding-window op (Conv / pooling)."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads_begin: list[int]
    pads_end: list[int]
    in_size: list[int]
    out_size: list[int]

    @property
    def nsp(self) -> int:
        return len(self.kernel)

    @property
    def pads(self) -> list[int]:
        return self.pads_begin + self.pads_end


def window(ctx: Emitter, node: NodeProto, x: str, kernel: list[int], ceil_mode: bool = False) -> Window:
    """Resolve kernel/strides/dilations/pads (incl. ``auto_pad``) of ``node``.

    Output sizes follow the ONNX formulas; with ``ceil_mode`` the last window
    must start inside the (left-padded) input.  The statically inferred output
    shape, when known, wins over the recomputation.
    """
    in_size = static_spatial(ctx, node, x, "gradient")
    n = len(kernel)
    strides = list(attr(node, "strides", [1] * n))
    dil = list(attr(node, "dilations", [1] * n))
    auto_pad = attr(node, "auto_pad", "NOTSET") or "NOTSET"
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = [math.ceil(i / s) for i, s in zip(in_size, strides)]
        total = [max(0, (o - 1) * s + e - i) for o, s, e, i in zip(out, strides, eff, in_size)]
        if auto_pad == "SAME_UPPER":
            pb = [t // 2 for t in total]
        else:
            pb = [t - t // 2 for t in total]
        pe = [t - b for t, b in zip(total, pb)]
    elif auto_pad == "VALID":
        pb, pe = [0] * n, [0] * n
    elif auto_pad == "NOTSET":
        pads = list(attr(node, "pads", [0] * (2 * n)))
        pb, pe = pads[:n], pads[n:]
    else:
        raise unsupported(node, f"auto_pad={auto_pad!r}")
    out = []
    for i, b, e, k, s in zip(in_size, pb, pe, eff, strides):
        span = i + b + e - k
        if ceil_mode:
            o = -(-span // s) + 1
            if (o - 1) * s >= i + b:  # last window would start in the right padding
                o -= 1
        else:
            o = span // s + 1
        out.append(o)
    y_shape = ctx.shape(node.output[0])
    if y_shape is not None and all(isinstance(d, int) for d in y_shape[2:]):
        out = list(y_shape[2:])
    return Window(list(kernel), strides, dil, pb, pe, in_size, out)


def spatial_axes(rank: int) -> list[int]:
    return list(range(2, rank))
