"""channel-groups: which channels of which tensors and initializers must be cut together.

Model
-----
Every channel dimension the analysis understands is a node ``(name, axis)`` of a networkx
graph: activations (``role="act"``) and initializer axes (``"out"``: a Conv/Gemm/MatMul weight's
output axis and its bias; ``"in"``: a *terminal consumer*'s input-channel axis — a Conv with
group 1, Gemm or MatMul that sums over the channels; ``"param"``: per-channel parameters of
channel-wise ops — BatchNormalization, depthwise weights, per-channel constants of Mul/Add...).
Edges couple dimensions; an edge carries an index map (identity for most ops; offsets for
Concat / Split / Slice / Pad on the channel axis; blocks for grouped convolutions and for
Flatten/Reshape into Gemm features, where channel ``c`` becomes features ``[c·P, (c+1)·P)``).

Channel-level union-find inside each connected component of that graph gives *units*: the
smallest sets of (dimension, index) pairs that must be removed together. Units that touch the
same set of dimensions form a **group**; a group's channels are its units, ordered by their
index in the group's first member. Plans (``{group id: [kept unit indices]}``) refer to these.

Rules (per op; anything else is "not understood"):

* Conv/Gemm/MatMul outputs start a new channel space; their inputs end one (terminal consumer).
* BatchNormalization/InstanceNormalization, unary activations, Clip, HardSigmoid/HardSwish,
  pooling (Max/Average/Global/Lp), Dropout/Identity, Cast: channel-wise, output = input.
* Add/Sub/Mul/Div/Max/Min/Sum/Mean/Pow/PRelu: joins — every operand whose channel axis has the
  output's size is coupled (residuals; SE ``x·s`` with ``s`` of shape [N, C, 1, 1]); broadcast
  operands (size 1) are not; per-channel constants are ``param`` members.
* Conv with ``group > 1`` keeps whole groups: input block g, output block g and the weight's
  output rows of block g are one unit (depthwise: one channel). ConvTranspose only with group 1.
* Concat on the channel axis: input k maps to ``offset_k + i``; Split / Slice (step 1) on the
  channel axis: output j is input ``start + j``; Pad (constant mode, non-negative) on the channel
  axis: output ``begin + i`` is input i, and the padded channels are units of their own.
* Reshape keeping the channel axis (only the other dims change) or flattening the channel axis
  and everything after it into the last dim; Flatten at the channel axis; Squeeze/Unsqueeze/
  Transpose move the axis; Reduce* over non-channel axes.

Anything not understood — an unknown op, a reduction over channels, a Shape of a member, a
dynamic weight, an unknown channel count — marks the dimensions it touches *bad*: their groups
are unprunable and the reason is recorded. Groups touching model inputs or outputs are
unprunable. Structural problems (sizes that do not match across an edge) make every group of the
whole component unprunable, so a wrong cut cannot happen.

The result (:class:`ChannelGroups`) is a pure data structure (frozen dataclasses), cached per
model digest via ``ctx.analysis("channel-groups", ...)``; the pass stores its JSON form in
``model.annotations["channel_groups"]``::

    {"groups": [{"id": 0, "channels": 16, "members": ["conv1.W:0", "y1:1", ...],
                 "producers": ["conv1"], "consumers": ["conv2"], "prunable": true, "reason": ""}]}

Member strings: ``name:axis`` (all of the axis, one index per channel), ``name:axis[a:b,...]``
(these index ranges, in channel order), with ``*P`` when each channel is P consecutive indices.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
import scipy.sparse
import scipy.sparse.csgraph

from hqpc.graphutil import GraphIndex, attributes
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes._rewrite import ShapeTable, constant
from hqpc.registry import register_pass

ANNOTATION = "channel_groups"
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "ThresholdedRelu",
    "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Shrink"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
JOIN_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                        "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"})
ROLE_ORDER = {"act": 0, "out": 1, "param": 2, "in": 3}


# --------------------------------------------------------------------------- result types
@dataclass(frozen=True)
class Member:
    """One dimension of a group: ``units[k]`` are the indices of channel k on ``tensor``'s ``axis``."""

    tensor: str
    axis: int
    size: int
    role: str                       # act | out | param | in
    units: tuple[tuple[int, ...], ...]
    node: str = ""                  # producer (act) or the node using the initializer (params)

    def describe(self) -> str:
        flat = [i for unit in self.units for i in unit]
        if not flat:
            return f"{self.tensor}:{self.axis}[]"
        width = len(self.units[0]) if self.units else 1
        suffix = f"*{width}" if width > 1 and all(len(u) == width for u in self.units) else ""
        if flat == list(range(self.size)):
            return f"{self.tensor}:{self.axis}{suffix}"
        runs, start, prev = [], flat[0], flat[0]
        for i in flat[1:]:
            if i != prev + 1:
                runs.append(f"{start}:{prev + 1}")
                start = i
            prev = i
        runs.append(f"{start}:{prev + 1}")
        return f"{self.tensor}:{self.axis}[{','.join(runs)}]{suffix}"


@dataclass(frozen=True)
class Group:
    id: int
    channels: int
    members: tuple[Member, ...]
    producers: tuple[str, ...]      # Conv/Gemm/MatMul nodes whose output channels are the units
    consumers: tuple[str, ...]      # terminal consumers whose input channels are the units
    prunable: bool
    reason: str = ""

    def member(self, tensor: str, axis: int | None = None) -> Member | None:
        for m in self.members:
            if m.tensor == tensor and (axis is None or m.axis == axis):
                return m
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "channels": self.channels, "members": [m.describe() for m in self.members],
                "producers": list(self.producers), "consumers": list(self.consumers),
                "prunable": self.prunable, "reason": self.reason}


@dataclass(frozen=True)
class ChannelGroups:
    groups: tuple[Group, ...]
    axes: dict[str, int] = field(default_factory=dict, compare=False)   # tracked channel axis per tensor

    def group(self, gid: int) -> Group:
        return self.groups[gid]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def to_json(self) -> dict[str, Any]:
        return {"groups": [g.as_dict() for g in self.groups]}

    def dim_units(self) -> dict[tuple[str, int], list[tuple[int, int, tuple[int, ...]]]]:
        """(tensor, axis) -> [(group id, unit index, indices)] over all groups."""
        out: dict[tuple[str, int], list] = defaultdict(list)
        for g in self.groups:
            for m in g.members:
                for k, unit in enumerate(m.units):
                    out[(m.tensor, m.axis)].append((g.id, k, unit))
        return out


# --------------------------------------------------------------------------- analysis
class _Builder:
    """Walks the graph in order, records dimensions, coupling edges and bad marks."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.graph = proto.graph
        self.index = GraphIndex.build(self.graph)
        self.shapes = ShapeTable(proto)
        self.g = nx.MultiGraph()  # parallel edges: e.g. Concat(x, x)
        self.axis: dict[str, int] = {}
        self.position: dict[str, int] = {}
        self.broken: list[tuple[tuple[str, int], str]] = []   # dims whose component is structurally unsafe
        self.plain_reads: dict[str, list[str]] = defaultdict(list)  # constants read other than as a member
        self._touched: set[str] = set()
        self._params: set[str] = set()

    # ----------------------------------------------------------------- helpers
    def const(self, name: str) -> np.ndarray | None:
        return constant(self.index, name) if name else None

    def shape(self, name: str) -> list | None:
        if name in self.index.initializers:
            return [int(d) for d in self.index.initializers[name].dims]
        value = self.const(name)
        if value is not None:
            return list(value.shape)
        return self.shapes.shape(name)

    def dim(self, tensor: str, axis: int, role: str, node: onnx.NodeProto | None, pos: int) -> tuple[str, int]:
        key = (tensor, axis)
        if key not in self.g:
            shape = self.shape(tensor)
            size = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
            self.g.add_node(key, size=size if isinstance(size, int) else None, roles=set(), bad=[],
                            node="", pos=pos)
            if not isinstance(size, int):
                self.broken.append((key, f"unknown channel count of '{tensor}' axis {axis}"))
        data = self.g.nodes[key]
        data["roles"].add(role)
        data["pos"] = min(data["pos"], pos)
        if node is not None and not data["node"]:
            data["node"] = node.name
        return key

    def act(self, tensor: str, pos: int) -> tuple[str, int] | None:
        """The tracked channel dim of an activation, None when it has none."""
        if tensor not in self.axis:
            return None
        self._touched.add(tensor)
        return self.dim(tensor, self.axis[tensor], "act", self.index.producer.get(tensor), pos)

    def new_act(self, tensor: str, axis: int, node: onnx.NodeProto, pos: int) -> tuple[str, int]:
        self.axis[tensor] = axis
        return self.dim(tensor, axis, "act", node, pos)

    def bad(self, key: tuple[str, int], reason: str) -> None:
        if reason not in self.g.nodes[key]["bad"]:
            self.g.nodes[key]["bad"].append(reason)

    def size(self, key) -> int | None:
        return self.g.nodes[key]["size"]

    def couple(self, a, b, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Identity coupling (``pairs`` None) or explicit index pairs (ia[k] ~ ib[k])."""
        if pairs is None:
            sa, sb = self.size(a), self.size(b)
            if sa is None or sb is None or sa != sb:
                self.broken.append((a, f"channel counts differ: {a[0]}:{a[1]} ({sa}) vs {b[0]}:{b[1]} ({sb})"))
            self.g.add_edge(a, b, pairs=None)
            return
        ia, ib = (np.asarray(p, dtype=np.int64) for p in pairs)
        sa, sb = self.size(a), self.size(b)
        if sa is None or sb is None or (ia.size and (ia.max() >= sa or ib.max() >= sb or ia.min() < 0 or ib.min() < 0)):
            self.broken.append((a, f"index map out of range between {a[0]}:{a[1]} and {b[0]}:{b[1]}"))
            self.g.add_edge(a, b, pairs=None)
            return
        self.g.add_edge(a, b, pairs=(ia, ib, a))

    def unknown(self, node: onnx.NodeProto, pos: int, why: str = "") -> None:
        reason = why or f"{node.op_type} '{node.name}' not understood"
        for name in node.input:
            key = self.act(name, pos) if name else None
            if key is not None:
                self.bad(key, reason)
        for name in node.output:
            if not name:
                continue
            shape = self.shape(name)
            if shape is not None and len(shape) >= 2:
                self.bad(self.new_act(name, 1, node, pos), reason)

    # ----------------------------------------------------------------- walk
    def run(self) -> None:
        for pos, value in enumerate(self.graph.input):
            shape = self.shape(value.name)
            if shape is not None and len(shape) >= 2 and value.name not in self.index.initializers:
                key = self.new_act(value.name, 1, None, -1)
                self.bad(key, f"touches model input '{value.name}'")
        for pos, node in enumerate(self.graph.node):
            self._touched, self._params = set(), set()
            try:
                self.visit(node, pos)
            except _Unknown as exc:
                self._params = set()
                self.unknown(node, pos, str(exc))
            except Exception as exc:  # never a crash: whatever cannot be analysed is not cut
                self._params = set()
                self.unknown(node, pos, f"{node.op_type} '{node.name}' could not be analysed "
                                        f"({type(exc).__name__})")
            else:
                # safety net: a tracked input the rule did not handle cannot be cut
                for name in node.input:
                    if name and name in self.axis and name not in self._touched:
                        self.bad(self.act(name, pos), f"{node.op_type} '{node.name}' reads '{name}' in a way "
                                                      "not understood")
            for name in node.input:
                if name and name not in self._params and self.const(name) is not None:
                    self.plain_reads[name].append(f"{node.op_type} '{node.name}'")
        for out in self.graph.output:
            key = self.act(out.name, len(self.graph.node))
            if key is not None:
                self.bad(key, f"touches model output '{out.name}'")
            if out.name in self.index.initializers:
                self.plain_reads[out.name].append("the model outputs")
        # a constant that is a member somewhere must not be read any other way (it would be cut
        # under that reader too); names read inside subgraphs are never cut
        from hqpc.passes._rewrite import outer_reads

        for name in outer_reads(self.graph):
            self.plain_reads[name].append("a subgraph")
        for key in list(self.g.nodes):
            readers = self.plain_reads.get(key[0])
            if readers:
                self.bad(key, f"'{key[0]}' is also read by {readers[0]}")

    def visit(self, node: onnx.NodeProto, pos: int) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise _Unknown(f"{op} '{node.name}' (domain {node.domain}) not understood")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise _Unknown(f"{op} '{node.name}' has subgraphs")
        data_inputs = [n for n in node.input if n]
        if data_inputs and all(self.const(n) is not None for n in data_inputs):
            return  # constant computation: no channels
        if op in UNARY_OPS or op in POOL_OPS:
            return self.passthrough(node, pos, pool=op in POOL_OPS)
        if op == "Clip":
            for name in node.input[1:]:
                if name and (self.const(name) is None or self.const(name).size != 1):
                    raise _Unknown(f"Clip '{node.name}' with non-scalar bounds")
            return self.passthrough(node, pos)
        if op in JOIN_OPS:
            return self.join(node, pos)
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            raise _Unknown("")
        handler(node, pos)

    def require_act(self, name: str, pos: int) -> tuple[str, int]:
        key = self.act(name, pos)
        if key is None:
            raise _Unknown(f"input '{name}' has no tracked channel axis")
        return key

    def check_extra_outputs(self, node: onnx.NodeProto) -> None:
        for name in node.output[1:]:
            if name and (self.index.consumers.get(name) or name in self.index.outputs):
                raise _Unknown(f"{node.op_type} '{node.name}' uses its extra output '{name}'")

    def passthrough(self, node: onnx.NodeProto, pos: int, pool: bool = False) -> None:
        self.check_extra_outputs(node)
        src = self.require_act(node.input[0], pos)
        if pool and src[1] != 1:
            raise _Unknown(f"{node.op_type} '{node.name}' pools with channels on axis {src[1]}")
        self.couple(src, self.new_act(node.output[0], src[1], node, pos))

    def param(self, name: str, axis: int, role: str, node: onnx.NodeProto, pos: int) -> tuple[str, int]:
        if self.const(name) is None:
            raise _Unknown(f"{node.op_type} '{node.name}': '{name}' is not a constant")
        self._params.add(name)
        return self.dim(name, axis, role, node, pos)

    # ----------------------------------------------------------------- joins
    def join(self, node: onnx.NodeProto, pos: int) -> None:
        out = node.output[0]
        out_shape = self.shape(out)
        if out_shape is None:
            raise _Unknown(f"{node.op_type} '{node.name}': unknown output rank")
        rank = len(out_shape)
        tracked, consts = [], []
        for name in node.input:
            if not name:
                continue
            if self.const(name) is not None:
                consts.append(name)
                continue
            key = self.act(name, pos)
            in_shape = self.shape(name)
            if key is None or in_shape is None:
                raise _Unknown(f"{node.op_type} '{node.name}': operand '{name}' has no tracked channel axis")
            tracked.append((key, key[1] + rank - len(in_shape)))
        if not tracked:
            return
        aligned = {a for key, a in tracked if self.size(key) != 1}
        if len(aligned) > 1:
            raise _Unknown(f"{node.op_type} '{node.name}': operands carry channels on different axes")
        axis = aligned.pop() if aligned else tracked[0][1]
        size = out_shape[axis] if axis < rank else None
        out_key = self.new_act(out, axis, node, pos)
        for key, a in tracked:
            if self.size(key) == 1 and size != 1:
                continue  # broadcast along the channel axis: not coupled
            if a != axis:
                raise _Unknown(f"{node.op_type} '{node.name}': operands carry channels on different axes")
            self.couple(key, out_key)
        for name in consts:
            value = self.const(name)
            caxis = axis - (rank - value.ndim)
            if caxis < 0 or value.shape[caxis] == 1:
                continue
            self.couple(self.param(name, caxis, "param", node, pos), out_key)

    # ----------------------------------------------------------------- mac ops
    def op_Conv(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        if x[1] != 1:
            raise _Unknown(f"Conv '{node.name}': channels not on axis 1")
        w = self.const(node.input[1])
        if w is None:
            raise _Unknown(f"Conv '{node.name}': weight is not a constant")
        group = int(attributes(node).get("group", 1))
        cin, cout = self.size(x), int(w.shape[0])
        y = self.new_act(node.output[0], 1, node, pos)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if group == 1:
            self.couple(x, self.param(node.input[1], 1, "in", node, pos))
            self.couple(y, self.param(node.input[1], 0, "out", node, pos))
            if bias:
                self.couple(y, self.param(bias, 0, "out", node, pos))
            return
        if cin is None or cin % group or cout % group or w.shape[1] * group != cin:
            raise _Unknown(f"Conv '{node.name}': inconsistent group {group}")
        cin_g, cout_g = cin // group, cout // group
        xs, ys = [], []
        for g in range(group):
            ins = np.arange(g * cin_g, (g + 1) * cin_g)
            outs = np.arange(g * cout_g, (g + 1) * cout_g)
            xs.extend([ins, np.full(cout_g, ins[0])])
            ys.extend([np.full(cin_g, outs[0]), outs])
        self.couple(x, y, (np.concatenate(xs), np.concatenate(ys)))
        self.couple(y, self.param(node.input[1], 0, "param", node, pos))
        if bias:
            self.couple(y, self.param(bias, 0, "param", node, pos))

    def op_ConvTranspose(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        if x[1] != 1 or int(attributes(node).get("group", 1)) != 1 or self.const(node.input[1]) is None:
            raise _Unknown(f"ConvTranspose '{node.name}' (only group 1 with constant weights)")
        y = self.new_act(node.output[0], 1, node, pos)
        self.couple(x, self.param(node.input[1], 0, "in", node, pos))
        self.couple(y, self.param(node.input[1], 1, "out", node, pos))
        if len(node.input) > 2 and node.input[2]:
            self.couple(y, self.param(node.input[2], 0, "out", node, pos))

    def op_Gemm(self, node: onnx.NodeProto, pos: int) -> None:
        attrs = attributes(node)
        a = self.require_act(node.input[0], pos)
        b = self.const(node.input[1])
        if attrs.get("transA", 0) or a[1] != 1 or b is None or b.ndim != 2:
            raise _Unknown(f"Gemm '{node.name}' (needs transA=0, features on axis 1, constant B)")
        trans_b = int(attrs.get("transB", 0))
        y = self.new_act(node.output[0], 1, node, pos)
        self.couple(a, self.param(node.input[1], 1 if trans_b else 0, "in", node, pos))
        self.couple(y, self.param(node.input[1], 0 if trans_b else 1, "out", node, pos))
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2])
            if c is None:
                raise _Unknown(f"Gemm '{node.name}': C is not a constant")
            n = int(b.shape[0] if trans_b else b.shape[1])
            if c.ndim >= 1 and c.shape[-1] == n and n != 1:
                if c.ndim == 2 and c.shape[0] != 1:
                    raise _Unknown(f"Gemm '{node.name}': C of shape {list(c.shape)}")
                self.couple(y, self.param(node.input[2], c.ndim - 1, "out", node, pos))

    def op_MatMul(self, node: onnx.NodeProto, pos: int) -> None:
        a = self.require_act(node.input[0], pos)
        b = self.const(node.input[1])
        a_shape = self.shape(node.input[0])
        if b is None or b.ndim != 2 or a_shape is None or a[1] != len(a_shape) - 1:
            raise _Unknown(f"MatMul '{node.name}' (needs features on the last axis and a constant 2-D B)")
        y = self.new_act(node.output[0], len(a_shape) - 1, node, pos)
        self.couple(a, self.param(node.input[1], 0, "in", node, pos))
        self.couple(y, self.param(node.input[1], 1, "out", node, pos))

    # ----------------------------------------------------------------- normalization
    def op_BatchNormalization(self, node: onnx.NodeProto, pos: int) -> None:
        self.check_extra_outputs(node)
        if attributes(node).get("training_mode", 0):
            raise _Unknown(f"BatchNormalization '{node.name}' in training mode")
        self._per_channel_norm(node, pos, node.input[1:5])

    def op_InstanceNormalization(self, node: onnx.NodeProto, pos: int) -> None:
        self._per_channel_norm(node, pos, node.input[1:3])

    def _per_channel_norm(self, node, pos, params) -> None:
        x = self.require_act(node.input[0], pos)
        if x[1] != 1:
            raise _Unknown(f"{node.op_type} '{node.name}': channels not on axis 1")
        y = self.new_act(node.output[0], 1, node, pos)
        self.couple(x, y)
        for name in params:
            if name:
                self.couple(y, self.param(name, 0, "param", node, pos))

    # ----------------------------------------------------------------- layout
    def op_Concat(self, node: onnx.NodeProto, pos: int) -> None:
        out_shape = self.shape(node.output[0])
        if out_shape is None:
            raise _Unknown(f"Concat '{node.name}': unknown rank")
        rank = len(out_shape)
        axis = int(attributes(node)["axis"]) % rank
        keys = []
        for name in node.input:
            if self.const(name) is not None:
                keys.append(None)
                continue
            keys.append(self.require_act(name, pos))
        chan = {k[1] for k in keys if k is not None}
        if len(chan) != 1:
            raise _Unknown(f"Concat '{node.name}': inputs carry channels on different axes")
        caxis = chan.pop()
        y = self.new_act(node.output[0], caxis, node, pos)
        if axis != caxis:
            for name, key in zip(node.input, keys):
                self.couple(key if key is not None else self.param(name, caxis, "param", node, pos), y)
            return
        offset = 0
        for name, key in zip(node.input, keys):
            if key is None:
                key = self.param(name, caxis, "param", node, pos)
            n = self.size(key)
            if n is None:
                raise _Unknown(f"Concat '{node.name}': unknown size of '{name}'")
            self.couple(key, y, (np.arange(n), offset + np.arange(n)))
            offset += n

    def op_Split(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        shape = self.shape(node.input[0])
        axis = int(attributes(node).get("axis", 0)) % len(shape)
        if axis != x[1]:
            for name in node.output:
                if name:
                    self.couple(x, self.new_act(name, x[1], node, pos))
            return
        offset = 0
        for name in node.output:
            size = self.shape(name)[axis] if self.shape(name) else None
            if not isinstance(size, int):
                raise _Unknown(f"Split '{node.name}': unknown output size")
            if name:
                y = self.new_act(name, axis, node, pos)
                self.couple(x, y, (offset + np.arange(size), np.arange(size)))
            offset += size

    def op_Slice(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        shape = self.shape(node.input[0])
        spec = slice_spec(self, node, shape, x[1])
        if spec is None:
            raise _Unknown(f"Slice '{node.name}': non-constant or stepped slice on the channel axis")
        start, stop = spec
        y = self.new_act(node.output[0], x[1], node, pos)
        if start == 0 and stop == self.size(x):
            self.couple(x, y)
        else:
            self.couple(x, y, (np.arange(start, stop), np.arange(stop - start)))

    def op_Pad(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        spec = pad_spec(self, node, x[1])
        if spec is None:
            raise _Unknown(f"Pad '{node.name}': non-constant, negative or non-constant-mode pad on the channel axis")
        begin, _ = spec
        y = self.new_act(node.output[0], x[1], node, pos)
        n = self.size(x)
        if n is None:
            raise _Unknown(f"Pad '{node.name}': unknown channel count")
        if spec == (0, 0):
            self.couple(x, y)
        else:
            self.couple(x, y, (np.arange(n), begin + np.arange(n)))

    def op_Reshape(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        if self.const(node.input[1]) is None:
            raise _Unknown(f"Reshape '{node.name}': shape is not a constant")
        rule = reshape_rule(self.shape(node.input[0]), self.shape(node.output[0]), x[1],
                            self.const(node.input[1]), int(attributes(node).get("allowzero", 0)))
        if rule is None:
            raise _Unknown(f"Reshape '{node.name}' moves or splits the channel axis")
        out_axis, block = rule
        y = self.new_act(node.output[0], out_axis, node, pos)
        self._block_couple(x, y, block)

    def op_Flatten(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        shape = self.shape(node.input[0])
        axis = int(attributes(node).get("axis", 1)) % max(1, len(shape))
        if axis != x[1] or any(not isinstance(d, int) for d in shape[axis:]):
            raise _Unknown(f"Flatten '{node.name}' at axis {axis} with channels on axis {x[1]}")
        block = int(np.prod(shape[axis + 1:])) if len(shape) > axis + 1 else 1
        y = self.new_act(node.output[0], 1, node, pos)
        self._block_couple(x, y, block)

    def _block_couple(self, x, y, block: int) -> None:
        n = self.size(x)
        if block == 1:
            self.couple(x, y)
            return
        if n is None:
            raise _Unknown("unknown channel count")
        ins = np.repeat(np.arange(n), block)
        self.couple(x, y, (ins, np.arange(n * block)))

    def op_Squeeze(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        axes = self._axes(node, len(self.shape(node.input[0])))
        if axes is None:
            shape = self.shape(node.input[0])
            axes = [i for i, d in enumerate(shape) if d == 1]
        if x[1] in axes:
            raise _Unknown(f"Squeeze '{node.name}' removes the channel axis")
        self.couple(x, self.new_act(node.output[0], x[1] - sum(a < x[1] for a in axes), node, pos))

    def op_Unsqueeze(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        out_rank = len(self.shape(node.output[0]) or [])
        axes = self._axes(node, out_rank)
        if axes is None:
            raise _Unknown(f"Unsqueeze '{node.name}': axes not constant")
        axis = x[1]
        for a in sorted(axes):
            if a <= axis:
                axis += 1
        self.couple(x, self.new_act(node.output[0], axis, node, pos))

    def op_Transpose(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        rank = len(self.shape(node.input[0]))
        perm = list(attributes(node).get("perm", list(reversed(range(rank)))))
        self.couple(x, self.new_act(node.output[0], perm.index(x[1]), node, pos))

    def _axes(self, node: onnx.NodeProto, rank: int) -> list[int] | None:
        attrs = attributes(node)
        if "axes" in attrs:
            return [int(a) % rank for a in attrs["axes"]]
        if len(node.input) > 1 and node.input[1]:
            value = self.const(node.input[1])
            return None if value is None else [int(a) % rank for a in value.reshape(-1)]
        return None

    def _reduce(self, node: onnx.NodeProto, pos: int) -> None:
        x = self.require_act(node.input[0], pos)
        rank = len(self.shape(node.input[0]))
        attrs = attributes(node)
        axes = self._axes(node, rank)
        if axes is None:
            if attrs.get("noop_with_empty_axes", 0):
                axes = []
            else:
                raise _Unknown(f"{node.op_type} '{node.name}' reduces over all axes")
        if x[1] in axes:
            raise _Unknown(f"{node.op_type} '{node.name}' reduces over the channel axis")
        keep = int(attrs.get("keepdims", 1))
        axis = x[1] if keep else x[1] - sum(a < x[1] for a in axes)
        self.couple(x, self.new_act(node.output[0], axis, node, pos))

    def __getattr__(self, name: str):
        if name.startswith("op_") and name[3:] in REDUCE_OPS:
            return self._reduce
        raise AttributeError(name)


class _Unknown(Exception):
    pass


# --------------------------------------------------------------------------- op specs (shared with the rewrite)
def _int_list(value) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def slice_spec(b, node: onnx.NodeProto, shape, axis: int) -> tuple[int, int] | None:
    """(start, stop) of a Slice on channel ``axis`` (the full range when the axis is not sliced),
    or None when the slice is not constant, stepped or reversed on that axis."""
    if shape is None or not isinstance(shape[axis], int):
        return None
    size = shape[axis]
    def inp(i: int) -> str:
        return node.input[i] if i < len(node.input) and node.input[i] else ""

    starts, ends = b.const(inp(1)), b.const(inp(2))
    if starts is None or ends is None:
        return None
    values = {i: b.const(inp(i)) for i in (3, 4) if inp(i)}
    if any(v is None for v in values.values()):
        return None
    values = [None, starts, ends, values.get(3), values.get(4)]
    axes = _int_list(values[3]) if values[3] is not None else list(range(len(_int_list(starts))))
    steps = _int_list(values[4]) if values[4] is not None else [1] * len(axes)
    axes = [a % len(shape) for a in axes]
    if axis not in axes:
        return 0, size
    k = axes.index(axis)
    if steps[k] != 1:
        return None
    start, stop = _int_list(starts)[k], _int_list(ends)[k]
    start = start + size if start < 0 else start
    stop = stop + size if stop < 0 else stop
    start, stop = min(max(start, 0), size), min(max(stop, 0), size)
    if stop <= start:
        return None
    return start, stop


def pad_spec(b, node: onnx.NodeProto, axis: int) -> tuple[int, int] | None:
    """(begin, end) padding of a Pad on channel ``axis``, None when unsupported there."""
    attrs = attributes(node)
    if len(node.input) > 1 and node.input[1]:
        pads = b.const(node.input[1])
        if pads is None:
            return None
        pads = _int_list(pads)
    else:
        pads = _int_list(attrs.get("pads", []))
    shape = b.shape(node.input[0])
    if shape is None:
        return None
    rank = len(shape)
    if len(node.input) > 3 and node.input[3]:
        axes_value = b.const(node.input[3])
        if axes_value is None:
            return None
        axes = [a % rank for a in _int_list(axes_value)]
    else:
        axes = list(range(rank))
    if len(pads) != 2 * len(axes):
        return None
    if axis not in axes:
        return 0, 0
    k = axes.index(axis)
    begin, end = pads[k], pads[k + len(axes)]
    if (begin, end) == (0, 0):
        return 0, 0
    mode = attrs.get("mode", "constant")
    if mode != "constant" or begin < 0 or end < 0:
        return None
    return begin, end


def reshape_rule(in_shape, out_shape, axis: int, target: np.ndarray, allowzero: int) -> tuple[int, int] | None:
    """How a Reshape maps channel ``axis``: (output axis, block) with block 1 when the channel
    axis survives unchanged, block P when channel c becomes output indices [c·P, (c+1)·P) of the
    last output axis (flattening the channel axis and everything after it). None otherwise."""
    if in_shape is None or out_shape is None or axis == 0:
        return None
    if not all(isinstance(d, int) for d in in_shape[1:]) or not all(isinstance(d, int) for d in out_shape[1:]):
        return None
    if in_shape[0] != out_shape[0]:
        return None
    target = _int_list(target)
    if len(target) != len(out_shape):
        return None
    channels = in_shape[axis]
    inner = int(np.prod(in_shape[axis + 1:])) if axis + 1 < len(in_shape) else 1
    outer = int(np.prod(in_shape[1:axis])) if axis > 1 else 1

    def zero_ok(b: int) -> bool:
        # a 0 entry copies the input dim at the same position: only safe off the channel axis
        # (or at it, when the channel axis stays there)
        for i, v in enumerate(target):
            if v == 0 and not allowzero and i < len(in_shape) and i == axis and i != b:
                return False
            if v == 0 and not allowzero and i == b and i != axis:
                return False
        return True

    for b in range(1, len(out_shape)):
        before = int(np.prod(out_shape[1:b])) if b > 1 else 1
        after = int(np.prod(out_shape[b + 1:])) if b + 1 < len(out_shape) else 1
        if out_shape[b] == channels and before == outer and after == inner and zero_ok(b):
            return b, 1
    b = len(out_shape) - 1
    before = int(np.prod(out_shape[1:b])) if b > 1 else 1
    if b >= 1 and out_shape[b] == channels * inner and before == outer and zero_ok(b):
        return b, inner
    return None


# --------------------------------------------------------------------------- components -> groups
def analyze(proto: onnx.ModelProto) -> ChannelGroups:
    """Channel groups of ``proto`` (see the module docstring)."""
    builder = _Builder(proto)
    builder.run()
    g = builder.g
    broken_components: dict[int, list[str]] = {}
    component_of: dict[tuple[str, int], int] = {}
    components = sorted((sorted(c, key=lambda k: (g.nodes[k]["pos"], k)) for c in nx.connected_components(g)),
                        key=lambda c: (g.nodes[c[0]]["pos"], c[0]))
    for cid, comp in enumerate(components):
        for key in comp:
            component_of[key] = cid
    for key, reason in builder.broken:
        broken_components.setdefault(component_of[key], [])
        if reason not in broken_components[component_of[key]]:
            broken_components[component_of[key]].append(reason)

    raw_groups = []
    for cid, comp in enumerate(components):
        raw_groups.extend(_component_groups(g, comp, broken_components.get(cid)))
    raw_groups.sort(key=lambda r: r["sort"])
    groups = []
    for gid, raw in enumerate(raw_groups):
        groups.append(Group(id=gid, channels=raw["channels"], members=raw["members"], producers=raw["producers"],
                            consumers=raw["consumers"], prunable=raw["prunable"], reason=raw["reason"]))
    return ChannelGroups(groups=tuple(groups), axes=dict(builder.axis))


def _component_groups(g: nx.MultiGraph, comp: list, broken: list[str] | None) -> list[dict]:
    if broken:
        # structurally unsafe: one unprunable group per dimension, no channel map needed
        out = []
        for key in comp:
            data = g.nodes[key]
            size = data["size"] or 0
            member = Member(key[0], key[1], size, _role(data), tuple((i,) for i in range(size)), data["node"])
            out.append(_raw_group(g, [member], size, [key], "; ".join(broken[:3])))
        return out
    offsets, total = {}, 0
    for key in comp:
        offsets[key] = total
        total += g.nodes[key]["size"]
    rows, cols = [], []
    for a, b, data in g.subgraph(comp).edges(data=True):
        pairs = data["pairs"]
        if pairs is None:
            n = g.nodes[a]["size"]
            rows.append(offsets[a] + np.arange(n))
            cols.append(offsets[b] + np.arange(n))
        else:
            ia, ib, first = pairs
            src, dst = (a, b) if first == a else (b, a)
            rows.append(offsets[src] + ia)
            cols.append(offsets[dst] + ib)
    if rows:
        r, c = np.concatenate(rows), np.concatenate(cols)
    else:
        r = c = np.zeros(0, dtype=np.int64)
    matrix = scipy.sparse.coo_matrix((np.ones(len(r)), (r, c)), shape=(total, total))
    _, labels = scipy.sparse.csgraph.connected_components(matrix, directed=False)
    # unit -> {dim: [indices]}
    units: dict[int, dict[tuple, list[int]]] = defaultdict(lambda: defaultdict(list))
    for key in comp:
        start = offsets[key]
        for i, label in enumerate(labels[start:start + g.nodes[key]["size"]]):
            units[int(label)][key].append(i)
    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for label, dims in units.items():
        by_signature[tuple(k for k in comp if k in dims)].append(label)
    out = []
    for signature, labels_ in by_signature.items():
        first = signature[0]
        labels_.sort(key=lambda lab: min(units[lab][first]))
        members = []
        for key in signature:
            data = g.nodes[key]
            members.append(Member(key[0], key[1], data["size"], _role(data),
                                  tuple(tuple(units[lab][key]) for lab in labels_), data["node"]))
        reasons = []
        for key in signature:
            for reason in g.nodes[key]["bad"]:
                if reason not in reasons:
                    reasons.append(reason)
        out.append(_raw_group(g, members, len(labels_), list(signature), "; ".join(reasons[:3])))
    return out


def _role(data: dict) -> str:
    roles = data["roles"]
    for role in ("in", "out", "param", "act"):
        if role in roles:
            return role
    return "act"


def _raw_group(g: nx.MultiGraph, members: list[Member], channels: int, keys: list, reason: str) -> dict:
    order = sorted(range(len(members)), key=lambda i: (g.nodes[keys[i]]["pos"], ROLE_ORDER[members[i].role],
                                                       members[i].tensor, members[i].axis))
    members = [members[i] for i in order]
    producers, consumers = [], []
    for m in members:
        if m.role == "in" and m.node not in consumers:
            consumers.append(m.node)
        if m.role == "out" and m.node not in producers:
            producers.append(m.node)
    if not reason and channels < 1:
        reason = "no channels"
    pos = min(g.nodes[k]["pos"] for k in keys)
    return {"channels": channels, "members": tuple(members), "producers": tuple(producers),
            "consumers": tuple(consumers), "prunable": not reason, "reason": reason,
            "sort": (pos, members[0].describe())}


def channel_groups(model, ctx=None) -> ChannelGroups:
    """Cached analysis of ``model`` (an hqpc Model): ``ctx.analysis("channel-groups", ...)``."""
    if ctx is None:
        return analyze(model.proto)
    return ctx.analysis("channel-groups", model, lambda: analyze(model.proto))


# --------------------------------------------------------------------------- the pass
@register_pass
class ChannelGroupsPass(Pass):
    """Analysis only: stores the channel groups in ``model.annotations["channel_groups"]``
    (see the module docstring for the rules and the JSON form)."""

    info = PassInfo("channel-groups", opt_level=3, analysis=True,
                    description="find the channels that structural pruning must cut together (analysis)")
    options = {"prunable_only": False}

    def run(self, model, ctx) -> bool:
        result = channel_groups(model, ctx)
        data = result.to_json()
        if self.config["prunable_only"]:
            data["groups"] = [g for g in data["groups"] if g["prunable"]]
        model.annotations[ANNOTATION] = data
        prunable = sum(1 for g in result.groups if g.prunable)
        ctx.log(f"channel-groups: {len(result.groups)} groups, {prunable} prunable")
        return False
