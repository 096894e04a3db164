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
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot load external data ({_one_line(exc)})") from None
    return proto


def normalize(proto: onnx.ModelProto, opset: int, where: str) -> onnx.ModelProto:
    """Check, drop initializer inputs, upgrade opset, fix IR version, name nodes, infer shapes."""
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{where}: invalid ONNX model: {_one_line(exc)}") from None
    _drop_initializer_inputs(proto)
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
