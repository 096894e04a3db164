"""The IR: an ONNX ModelProto plus an annotation side table.

Invariants of a loaded :class:`Model`:

* the default-domain opset is at least :data:`WORKING_OPSET` (older models are upgraded with
  onnx's version converter) and the IR version is one ONNX Runtime accepts;
* every node has a unique, non-empty name;
* initializers are not also listed as graph inputs;
* value_info holds the result of (non-strict) shape inference.

Passes edit ``model.proto`` directly or through an onnx-graphsurgeon view
(:meth:`Model.graph` / :meth:`Model.set_graph`). Annotations (sensitivity scores, bitwidths,
ranges, ...) are JSON-serialisable values in ``model.annotations[namespace]``; they are written
into ``metadata_props`` as ``hqpc.<namespace>`` when the model is saved.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from hqpc.errors import ModelLoadError

WORKING_OPSET = 17
MIN_IR_VERSION = 8
MAX_IR_VERSION = 10  # onnxruntime 1.18+ reads up to 10; newer ir versions add nothing we use
ANNOTATION_PREFIX = "hqpc."
INLINE_INITIALIZER_LIMIT = 16  # text form prints values of initializers up to this many elements


@dataclass
class Model:
    """A model under compilation: ``proto`` is the single source of truth for the graph."""

    proto: onnx.ModelProto
    annotations: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def load(cls, model: str | os.PathLike | onnx.ModelProto, opset: int = WORKING_OPSET) -> "Model":
        """Load from a path or a ModelProto, validate, upgrade the opset and infer shapes."""
        source = None
        if isinstance(model, onnx.ModelProto):
            proto = copy.deepcopy(model)
        else:
            source = Path(model)
            proto = _read_model_file(source)
        proto = normalize(proto, opset, where=str(source) if source else "<model>")
        annotations = _annotations_from_metadata(proto)
        return cls(proto=proto, annotations=annotations, source=source)

    def copy(self) -> "Model":
        return Model(proto=copy.deepcopy(self.proto), annotations=copy.deepcopy(self.annotations),
                     source=self.source)

    # ----------------------------------------------------------------- graphsurgeon view
    def graph(self):
        """Return an onnx-graphsurgeon Graph of this model (a fresh view; edit, then set_graph)."""
        import onnx_graphsurgeon as gs

        return gs.import_onnx(self.proto)

    def set_graph(self, graph) -> None:
        """Replace the graph by an edited onnx-graphsurgeon Graph, keeping model-level fields."""
        import onnx_graphsurgeon as gs

        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        exported = gs.export_onnx(graph, do_type_check=False)
        self.replace_graph_proto(exported.graph)

    def replace_graph_proto(self, graph_proto: onnx.GraphProto) -> None:
        self.proto.graph.CopyFrom(graph_proto)

    # ----------------------------------------------------------------- queries
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.proto.graph.initializer}

    def initializer_array(self, name: str) -> np.ndarray:
        for t in self.proto.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        raise KeyError(name)

    @property
    def opset(self) -> int:
        return default_opset(self.proto)

    def node_count(self) -> int:
        return len(self.proto.graph.node)

    def param_count(self) -> int:
        return int(sum(int(np.prod(t.dims)) for t in self.proto.graph.initializer))

    def serialized(self) -> bytes:
        """Deterministic serialization of the model including annotations."""
        return self.to_proto().SerializeToString(deterministic=True)

    def digest(self) -> str:
        """Content hash (graph and annotations); analyses are cached under it."""
        return hashlib.sha256(self.serialized()).hexdigest()

    # ----------------------------------------------------------------- output
    def to_proto(self) -> onnx.ModelProto:
        """The ModelProto with annotations stored in ``metadata_props`` (``hqpc.*`` keys)."""
        out = copy.deepcopy(self.proto)
        keep = [p for p in out.metadata_props if not p.key.startswith(ANNOTATION_PREFIX)]
        del out.metadata_props[:]
        out.metadata_props.extend(keep)
        for namespace in sorted(self.annotations):
            entry = out.metadata_props.add()
            entry.key = ANNOTATION_PREFIX + namespace
            entry.value = json.dumps(self.annotations[namespace], sort_keys=True, separators=(",", ":"))
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same folder, then rename over ``path``."""
        atomic_write_bytes(Path(path), self.serialized())

    def text(self) -> str:
        """Canonical text form (ONNX textual syntax); see :func:`model_text`."""
        return model_text(self.to_proto())


# --------------------------------------------------------------------------- helpers
def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def _read_model_file(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-derived errors
        raise ModelLoadError(f"{path}: not an ONNX model (protobuf parse failed: {_one_line(exc)})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes; truncated or not ONNX)")
    bad = _invalid_utf8_field(proto)
    if bad:
        raise ModelLoadError(f"{path}: not a valid ONNX model: string field {bad} is not valid UTF-8")
    external = [(what, t) for what, t in _all_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        _check_external_locations(external, path)  # before anything reads external data
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot load external data ({_one_line(exc)})") from None
    return proto


def normalize(proto: onnx.ModelProto, opset: int, where: str) -> onnx.ModelProto:
    """Check, drop initializer inputs, upgrade opset, fix IR version, name nodes, infer shapes."""
    check_graph_structure(proto.graph, where)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{where}: invalid ONNX model: {_one_line(exc)}") from None
    _check_domains(proto, where)
    _check_weights(proto.graph, where)
    _check_interface(proto.graph, where)
    _drop_initializer_inputs(proto)
    # IR < 4 requires initializers to be graph inputs (the version converter enforces it)
    proto.ir_version = min(max(proto.ir_version, MIN_IR_VERSION), MAX_IR_VERSION)
    current = default_opset(proto)
    if current == 0:
        raise ModelLoadError(f"{where}: model imports no default-domain opset")
    if current < opset:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as exc:
            raise ModelLoadError(f"{where}: cannot upgrade opset {current} to {opset}: {_one_line(exc)}") from None
    proto.ir_version = min(max(proto.ir_version, MIN_IR_VERSION), MAX_IR_VERSION)
    make_node_names_unique(proto.graph)
    return infer_shapes(proto, where=where)


# --------------------------------------------------------------------------- input checks
# Domains whose ops ONNX Runtime implements; a node of any other domain (not a model-local
# function) cannot be run by the numeric guard, so the model is refused.
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc",
                 "com.ms.internal.nhwc")
# Ops whose constant inputs are weights: an Inf there makes every result meaningless.
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
                         "LayerNormalization", "LSTM", "GRU", "RNN"})
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node '{node.name or f'#{index}'}' ({node.op_type})"


def _all_tensors(graph: onnx.GraphProto, prefix: str = ""):
    """(description, TensorProto) of every initializer and tensor attribute, subgraphs included."""
    for t in graph.initializer:
        yield f"{prefix}initializer '{t.name}'", t
    for node in graph.node:
        for attr in node.attribute:
            where = f"{prefix}attribute '{attr.name}' of node '{node.name}'"
            if attr.HasField("t"):
                yield where, attr.t
            yield from ((where, t) for t in attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(sub, prefix=f"{prefix}subgraph of node '{node.name}': ")


def _check_external_locations(tensors, path: Path) -> None:
    """Every external-data location must resolve (symlinks followed) inside the model's folder."""
    folder = os.path.realpath(path.parent)
    for what, tensor in tensors:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = os.path.realpath(os.path.join(folder, location))
        if not location or os.path.isabs(location) or os.path.commonpath([folder, target]) != folder \
                or target == folder:
            raise ModelLoadError(f"{path}: {what}: external data location {location!r} is not a file inside the "
                                 f"model's folder {folder}; refusing to read it")


def _invalid_utf8_field(message, path: str = "model") -> str | None:
    """Path of the first string field holding invalid UTF-8 (protobuf parses it; using it fails)."""
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        for index, item in enumerate(value if repeated else [value]):
            where = f"{path}.{field.name}" + (f"[{index}]" if repeated else "")
            if field.type == field.TYPE_STRING:
                if isinstance(item, bytes):
                    return where
            else:
                found = _invalid_utf8_field(item, where)
                if found:
                    return found
    return None


def check_graph_structure(graph: onnx.GraphProto, where: str) -> None:
    """Duplicate tensor names, inputs nobody produces and cycles, as errors naming the nodes and
    tensors; an acyclic graph whose nodes are merely out of order is sorted topologically."""
    producer: dict[str, str] = {}
    producer_node: dict[str, int] = {}

    def define(name: str, what: str) -> None:
        if name in producer:
            twice = (f"{what} is defined twice" if producer[name] == what
                     else f"produced by {producer[name]} and by {what}")
            raise ModelLoadError(f"{where}: invalid ONNX model: duplicate tensor name '{name}': {twice}")
        producer[name] = what

    for t in graph.initializer:
        define(t.name, f"initializer '{t.name}'")
    initializers = set(producer)
    for value in graph.input:
        if value.name not in initializers:
            define(value.name, f"graph input '{value.name}'")
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                define(name, _node_label(node, index))
                producer_node[name] = index
    in_order = True
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in producer:
                raise ModelLoadError(f"{where}: invalid ONNX model: {_node_label(node, index)} reads tensor '{name}', "
                                     "which no node, graph input or initializer produces")
            if name in producer_node and producer_node[name] >= index:
                in_order = False
    if in_order:
        return
    nodes = list(graph.node)
    preds = [{producer_node[n] for n in node.input if n in producer_node} for node in nodes]
    succs: list[list[int]] = [[] for _ in nodes]
    for index, p in enumerate(preds):
        for q in p:
            succs[q].append(index)
    import heapq

    pending = [len(p) for p in preds]
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in succs[i]:
            pending[j] -= 1
            if pending[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(nodes):
        left = {i for i, count in enumerate(pending) if count > 0}
        path, seen, i = [], {}, min(left)
        while i not in seen:  # walk predecessors inside the unsorted rest until a node repeats
            seen[i] = len(path)
            path.append(i)
            i = min(q for q in preds[i] if q in left)
        cycle = path[seen[i]:][::-1]
        names = " -> ".join(_node_label(nodes[k], k) for k in cycle + cycle[:1])
        raise ModelLoadError(f"{where}: invalid ONNX model: graph has a cycle: {names}")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _check_domains(proto: onnx.ModelProto, where: str) -> None:
    local = {f.domain for f in proto.functions}
    for index, node in enumerate(proto.graph.node):
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise ModelLoadError(f"{where}: {_node_label(node, index)} uses unknown op domain '{node.domain}' "
                                 f"(ONNX Runtime runs {', '.join(d for d in KNOWN_DOMAINS if d)})")


def _check_interface(graph: onnx.GraphProto, where: str) -> None:
    """Graph inputs and outputs must be tensors of a known element type (the guard feeds and
    compares tensors only)."""
    initializers = {t.name for t in graph.initializer}
    for kind, values in (("input", [v for v in graph.input if v.name not in initializers]), ("output", graph.output)):
        for value in values:
            which = value.type.WhichOneof("value")
            if which != "tensor_type" or not value.type.tensor_type.elem_type:
                what = "a tensor of unknown element type" if which == "tensor_type" else (which or "untyped")
                raise ModelLoadError(f"{where}: graph {kind} '{value.name}' is not a tensor "
                                     f"({what.replace('_type', '')}); hqpc compiles models whose inputs and outputs "
                                     "are tensors")


def _check_weights(graph: onnx.GraphProto, where: str) -> None:
    """NaN in any float constant, or Inf in the weights of Conv/Gemm/MatMul/normalization, is an error
    naming the tensor (Inf elsewhere is legal: masks, clip bounds)."""
    weight_inputs = {name for node in graph.node if node.op_type in _WEIGHT_OPS for name in node.input}
    variances = {node.input[4]: next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
                 for node in graph.node if node.op_type == "BatchNormalization" and len(node.input) > 4}
    for what, tensor in _all_tensors(graph):
        if tensor.data_type not in _FLOAT_TYPES or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except Exception as exc:
            raise ModelLoadError(f"{where}: {what}: unreadable tensor data ({_one_line(exc)})") from None
        nan = int(np.count_nonzero(np.isnan(values)))
        if nan:
            raise ModelLoadError(f"{where}: {what} holds {nan} NaN value(s) of {values.size}; "
                                 "a model with NaN weights cannot be compiled meaningfully")
        if what.startswith("initializer") and tensor.name in weight_inputs and not np.isfinite(values).all():
            raise ModelLoadError(f"{where}: {what} holds Inf values in the weights of a Conv/Gemm/MatMul/"
                                 "normalization node; the model cannot be compiled meaningfully")
        if (what.startswith("initializer") and tensor.name in variances
                and np.any(values + variances[tensor.name] < 0)):
            raise ModelLoadError(f"{where}: {what} is the variance of a BatchNormalization node and holds values "
                                 f"below -epsilon ({float(values.min()):g}); the node would compute NaN")


def infer_shapes(proto: onnx.ModelProto, where: str = "<model>", strict: bool = False) -> onnx.ModelProto:
    """Run ONNX shape inference, replacing stale value_info. Raises ModelLoadError when strict."""
    stripped = copy.deepcopy(proto)
    del stripped.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(stripped, check_type=strict, strict_mode=strict, data_prop=True)
    except Exception as exc:
        if strict:
            raise ModelLoadError(f"{where}: shape inference failed: {_one_line(exc)}") from None
        return proto


def _drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    names = {t.name for t in proto.graph.initializer}
    if not any(i.name in names for i in proto.graph.input):
        return
    keep = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)


def make_node_names_unique(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: keep the first use of a name, suffix later ones."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in seen:
            name = f"{base}_{suffix}"
            suffix += 1
        node.name = name
        seen.add(name)


def _annotations_from_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in proto.metadata_props:
        if entry.key.startswith(ANNOTATION_PREFIX):
            try:
                out[entry.key[len(ANNOTATION_PREFIX):]] = json.loads(entry.value)
            except json.JSONDecodeError:
                continue
    return out


def tensor_digest(tensor: onnx.TensorProto) -> str:
    """Short content hash of an initializer's values (8 hex digits)."""
    return hashlib.sha256(numpy_helper.to_array(tensor).tobytes()).hexdigest()[:8]


def model_text(proto: onnx.ModelProto, inline_limit: int = INLINE_INITIALIZER_LIMIT) -> str:
    """Stable ONNX textual form; initializers larger than ``inline_limit`` elements are shown as
    a declaration (type and shape) plus a trailing ``# name: sha256:XXXXXXXX`` comment line, and
    annotations follow as ``# hqpc.<namespace>: <json>`` lines (sorted keys).

    The result parses back with ``onnx.parser`` (large initializers then come back as
    value_info declarations, which the golden-test harness seeds deterministically).
    """
    shown = copy.deepcopy(proto)
    annotation_lines = [f"# {p.key}: {p.value}" for p in sorted(proto.metadata_props, key=lambda p: p.key)
                        if p.key.startswith(ANNOTATION_PREFIX)]
    del shown.metadata_props[:]
    hashed: list[tuple[str, str]] = []
    small = []
    for tensor in shown.graph.initializer:
        if int(np.prod(tensor.dims)) > inline_limit:
            shape = [int(d) for d in tensor.dims]
            shown.graph.value_info.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, shape))
            hashed.append((tensor.name, tensor_digest(tensor)))
        else:
            small.append(tensor)
    del shown.graph.initializer[:]
    shown.graph.initializer.extend(small)
    inferred = {v.name for v in proto.graph.value_info}
    keep_vi = [v for v in shown.graph.value_info if v.name not in inferred]
    del shown.graph.value_info[:]
    shown.graph.value_info.extend(keep_vi)
    text = onnx.printer.to_text(shown)
    if hashed:
        text += "\n" + "\n".join(f"# {name}: sha256:{digest}" for name, digest in hashed)
    if annotation_lines:
        text += "\n" + "\n".join(annotation_lines)
    return text.rstrip() + "\n"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
