"""TensorRT backends: the TensorRT-RTX ahead-of-time check, full TensorRT plans, build_plan.sh.

Two paths behind one interface; every TensorRT import is lazy (this module imports with only
numpy and onnx installed).

1. **TensorRT-RTX check** (``pip install hqpc[trt-check]``, import ``tensorrt_rtx``), runs on a
   CPU-only machine. :func:`check_with_tensorrt_rtx` parses the model with TensorRT-RTX's ONNX
   parser into a *strongly typed* network, builds a serialized engine ahead of time for an
   explicit compute capability, captures the builder's log and turns its per-layer dump into a
   :class:`LayerTable`; then it compares, for every Conv/ConvTranspose/Gemm/MatMul, the precision
   hqpc put into the graph (Q/DQ, Cast) with the precision TensorRT chose. Parser errors, build
   errors and precision mismatches become :class:`Problem` s naming the ONNX node and the rule.
   :func:`build_rtx_engine` writes a real TensorRT-RTX engine (``rtx`` target, ``--emit plan``).

2. **TensorRT** (``tensorrt`` 10.x/11.x + ``pycuda`` or ``cuda-python``, on a Jetson or a GPU host).
   :func:`build_tensorrt_plan` builds a strongly typed plan (optionally on a DLA core with GPU
   fallback), :func:`run_plan` executes it, :func:`compare_plan_with_ort` compares its outputs with
   ONNX Runtime's on real inputs, per output, with Polygraphy semantics
   (:mod:`hqpc.runtime.compare`). The layer table then comes from the engine inspector's JSON
   (:func:`parse_inspector_json`).

:func:`write_target_artifacts` is what the compiler calls after writing the ONNX output: it writes
``build_plan.sh`` for ``backend = "tensorrt"`` targets and, for ``--emit plan``, the engine.

What was measured with tensorrt-rtx 1.7.1.116 (ONNX parser 200) on a 2-core CPU-only machine
----------------------------------------------------------------------------------------------
* ``pip install tensorrt-rtx==1.7.1.116``: 15 s with a cold pip cache, 8 s warm (95 MB wheel,
  230 MB installed); imports in well under a second.
* ``Builder`` / ``OnnxParser`` / ``build_serialized_network`` work without a GPU. The network must
  be created with ``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED``; the AOT target is set with
  ``config.num_compute_capabilities = n`` and ``config.set_compute_capability(ComputeCapability.SM86, i)``
  (members: SM75, SM80, SM86, SM89, SM120, SM121; several at once give one multi-arch engine).
  Building MobileNetV2 takes 0.25 s; ResNet-20 with Q/DQ 0.3 s. Plans are byte-identical across
  builds. ``BuilderFlag.DISABLE_TIMING_CACHE`` is set (no timing cache on CPU-only builds).
* ``Runtime.deserialize_cuda_engine`` fails without a GPU (cudaError 35), so the engine inspector
  (``create_engine_inspector``) is unusable here. Instead, with
  ``config.profiling_verbosity = ProfilingVerbosity.DETAILED`` and a logger that keeps VERBOSE
  messages, the builder logs one message starting ``Layers:`` that holds one line per engine
  layer (format in :func:`parse_layer_dump`), with every input/constant/output tensor's data type
  and the fused ONNX nodes (``Metadata: [ONNX Layer: a][ONNX Layer: b]``).
* Convolutions are ``LayerType: correlation`` layers, Gemm/MatMul ``gemm``, INT4 weight-only
  MatMul ``runtime_fusion``; an INT8 convolution shows ``Datatype: Int8`` on its activation input
  and its weight constant. A silent FP32 fallback shows ``Float`` there instead, and the weights
  are dequantized by a separate ``kgen`` layer.
* Rules enforced by the real parser (``ParserError.node_name()`` names the node):
  non-zero zero point ("Non-zero zero point is not supported"), scale <= 0 ("Scale coefficients
  must all be positive"), int32 input of DequantizeLinear, e.g. an int32 bias ("input has type
  Int32 but must have type FP8, FP4, Int4, Int8, or UInt8").
* Accepted by the parser but silently run in FP32 (found only in the layer dump): per-channel
  activation scales, weights dequantized on the wrong axis (e.g. axis 1 for Conv).
* FP8 Q/DQ fails to build for SM86 ("HW-specific datatypes: fp8_e4m3"; needs SM89+). For SM75
  TensorRT-RTX 1.7 compiles no INT8 convolution (FP32 fallback) and no FP32 GEMM, so the
  ``xavier``/``t4`` checks use 8.6 as the stand-in capability (see :func:`check_capability`).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from hqpc.errors import HqpcError

RTX_PACKAGE = "tensorrt-rtx==1.7.1.116"
RTX_INSTALL_HINT = "pip install hqpc[trt-check]"
SKIP_RTX = f"skipped: tensorrt-rtx not installed ({RTX_INSTALL_HINT})"
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RTX_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
STAND_IN_CAPABILITY = "8.6"
_CUDA_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "catchCudaError")

# Rules: id -> what TensorRT requires. Messages: "node '<name>' (<op>) breaks <id> (<rule>): <what happened>".
RULES = {
    "trt-zero-point": "zero points must be 0",
    "trt-positive-scale": "scales must be > 0",
    "trt-float-bias": "biases must be float, not int32 behind DequantizeLinear",
    "trt-per-tensor-activation": "activation scales must be per-tensor",
    "trt-weight-axis": "weights must be quantized per output channel",
    "trt-int8-both-inputs": "INT8 needs Q/DQ on both activation and weights",
    "trt-fp8-capability": "FP8 needs compute capability 8.9 or newer",
    "trt-precision": "quantized layers must run in the precision hqpc assigned",
    "trt-parse": "the TensorRT ONNX parser must accept every node",
    "trt-build": "the network must build for the target's compute capability",
}


class TensorRTUnavailable(HqpcError):
    """A TensorRT flavour needed for the requested action is not installed or has no GPU."""


class TensorRTCheckFailed(Exception):
    """Raised by the ``verify-trt`` pass when the check finds problems (the pass is then
    reported as failed/rolled back; it is a finding about the model, not a compiler crash, so a
    pass manager may skip the crash reproducer when ``is_finding`` is set)."""

    is_finding = True


# =========================================================================== availability
def rtx_missing_reason() -> str | None:
    """None when ``tensorrt_rtx`` imports, else why not."""
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising OSError
        return f"tensorrt-rtx not installed ({RTX_INSTALL_HINT}): {type(exc).__name__}: {exc}"
    return None


def tensorrt_missing_reason() -> str | None:
    """None when full TensorRT (``tensorrt``) imports, else why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        return ("tensorrt (TensorRT 10/11) not installed: its PyPI packages fetch the libraries from "
                f"NVIDIA's index; install it on the Jetson/GPU host ({type(exc).__name__}: {exc})")
    return None


def gpu_missing_reason() -> str | None:
    """None when a CUDA device is usable through pycuda or cuda-python, else why not."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() > 0:
            return None
        return "no CUDA device found (pycuda)"
    except Exception as exc:
        pycuda_error = f"pycuda: {type(exc).__name__}: {exc}"
    try:
        cudart = _cudart()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) == 0 and count > 0:
            return None
        return f"no CUDA device found (cuda-python: {err}); {pycuda_error}"
    except Exception as exc:
        return f"no CUDA GPU driver: {pycuda_error}; cuda-python: {type(exc).__name__}: {exc}"


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


# =========================================================================== layer table
@dataclass(frozen=True)
class TensorDesc:
    name: str
    dims: tuple[int, ...]
    dtype: str  # normalized: Float, Half, BFloat16, Int8, Int4, FP8, FP4, Int32, Int64, UInt8, Bool
    format: str = ""

    def short(self) -> str:
        return f"{self.dtype}{list(self.dims)}"


@dataclass
class LayerInfo:
    """One engine layer: name, type, tensors and the ONNX nodes fused into it."""

    name: str
    layer_type: str
    inputs: list[TensorDesc] = field(default_factory=list)
    constants: list[TensorDesc] = field(default_factory=list)
    outputs: list[TensorDesc] = field(default_factory=list)
    onnx_nodes: list[str] = field(default_factory=list)
    tactic: str = ""
    weights_dtype: str | None = None  # inspector JSON ("Weights": {"Type": ...})

    @property
    def is_compute(self) -> bool:
        """Convolution/GEMM-like layer (not a generated pointwise kernel or reformat)."""
        kind = self.layer_type.lower()
        return kind in ("correlation", "gemm", "runtime_fusion", "convolution", "deconvolution",
                        "matrixmultiply", "fullyconnected", "caskconvolution", "caskgemmconvolution",
                        "cask_convolution", "caskdeconvolution", "gemmconvolution", "cudnnconvolution") \
            or "conv" in kind or "gemm" in kind or "matmul" in kind

    def weight(self, shape: Iterable[int] | None = None) -> TensorDesc | None:
        """The weight tensor: matched by (sorted) shape when the ONNX weight shape is known, else
        the first constant with two or more dims > 1, else the second input (weights dequantized
        by a separate kernel arrive as an input)."""
        if shape is not None:
            want = sorted(int(d) for d in shape)
            for t in list(self.constants) + list(self.inputs[1:]):
                if sorted(t.dims) == want:
                    return t
                if sorted(d for d in t.dims if d != 1) == sorted(d for d in want if d != 1) and len(want) > 1:
                    return t
        for t in self.constants:
            if sum(1 for d in t.dims if d > 1) >= 2:
                return t
        if len(self.inputs) >= 2:
            return self.inputs[1]
        return None

    def precision(self, weight_shape: Iterable[int] | None = None) -> str:
        """Precision of the math: from the activation input and the weight data types."""
        act = self.inputs[0].dtype if self.inputs else None
        w = self.weight(weight_shape)
        wt = self.weights_dtype or (w.dtype if w is not None else None)
        return precision_of(act, wt)

    def row(self) -> dict[str, Any]:
        if self.is_compute:
            w = self.weight()
        else:  # generated kernels: only a real (multi-dim) constant counts as weights
            w = next((t for t in self.constants if sum(1 for d in t.dims if d > 1) >= 2), None)
        return {"layer": self.name, "type": self.layer_type, "onnx_nodes": list(self.onnx_nodes),
                "inputs": [t.dtype for t in self.inputs],
                "weights": self.weights_dtype or (w.dtype if w is not None else None),
                "outputs": [t.dtype for t in self.outputs],
                "precision": self.precision() if self.is_compute else None}


def precision_of(act: str | None, weight: str | None) -> str:
    """``int8`` when activation and weights are Int8, ``int4-weights`` for Int4 weights with
    float activations, ``fp16``/``bf16``/``fp32``/``fp8`` likewise; mixed cases spelled out."""
    names = {"Float": "fp32", "Half": "fp16", "BFloat16": "bf16", "Int8": "int8", "FP8": "fp8",
             "Int4": "int4", "FP4": "fp4", "Int32": "int32", "UInt8": "uint8"}
    a = names.get(act or "", (act or "?").lower())
    if weight is None:
        return a
    w = names.get(weight, weight.lower())
    if a == w:
        return a
    if w in ("int4", "int8", "fp4", "fp8") and a in ("fp32", "fp16", "bf16"):
        return f"{w}-weights"
    return f"{a}/{w}"


@dataclass
class LayerTable:
    layers: list[LayerInfo]

    def for_node(self, node: str) -> list[LayerInfo]:
        return [layer for layer in self.layers if node in layer.onnx_nodes]

    def compute_layer(self, node: str) -> LayerInfo | None:
        """The layer that does ``node``'s math: among layers carrying the node, a compute layer
        named after it, else any compute layer, else the first layer."""
        found = self.for_node(node)
        if not found:
            return None
        prefix = _sanitize(node)
        compute = [layer for layer in found if layer.is_compute]
        named = [layer for layer in compute if _sanitize(layer.name).startswith(prefix)]
        return (named or compute or found)[0]

    def rows(self) -> list[dict[str, Any]]:
        return [layer.row() for layer in self.layers]


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", name)


# --------------------------------------------------------------------------- dump parsing
_DTYPE_WORDS = [  # order matters: longer/more specific first
    ("BFloat16", "BFloat16"), ("BF16", "BFloat16"), ("FP16", "Half"), ("Half", "Half"),
    ("FP32", "Float"), ("Float", "Float"), ("FP8", "FP8"), ("FP4", "FP4"), ("Int64", "Int64"),
    ("INT64", "Int64"), ("Int32", "Int32"), ("INT32", "Int32"), ("UInt8", "UInt8"), ("Int8", "Int8"),
    ("INT8", "Int8"), ("Int4", "Int4"), ("INT4", "Int4"), ("Bool", "Bool"), ("BOOL", "Bool"),
]


def normalize_dtype(text: str) -> str:
    """Map a data-type or format string (``Int8``, ``Half``, ``Channel major FP16 format ...``)
    to one of the names used in :class:`TensorDesc`."""
    text = text.strip()
    for word, name in _DTYPE_WORDS:
        if text == word:
            return name
    for word, name in _DTYPE_WORDS:
        if re.search(rf"(?<![A-Za-z0-9]){word}(?![A-Za-z0-9])", text):
            return name
    return text or "?"


def _balanced(text: str, start: int, open_ch: str = "[", close_ch: str = "]") -> int:
    """Index just past the bracket group that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} in layer dump line: {text[start:start + 80]!r}")


def _tensor_list(text: str) -> list[TensorDesc]:
    """Parse ``[ { Name: a, Dimensions: [..], ..., Datatype: Int8, Format: ... }, {...} ]``."""
    out = []
    i = 0
    while True:
        j = text.find("{", i)
        if j < 0:
            return out
        end = _balanced(text, j, "{", "}")
        body = text[j + 1:end - 1].strip()
        name = re.match(r"Name: (.*?), Dimensions: ", body)
        dims = re.search(r"Dimensions: \[([^\]]*)\]", body)
        dtype = re.search(r"Datatype: ([A-Za-z0-9_]+)", body)
        fmt = re.search(r"Format: (.*)$", body)
        out.append(TensorDesc(
            name=name.group(1) if name else "",
            dims=tuple(int(d) for d in dims.group(1).split(",") if d.strip().lstrip("-").isdigit()) if dims else (),
            dtype=normalize_dtype(dtype.group(1)) if dtype else "?",
            format=fmt.group(1).strip() if fmt else ""))
        i = end


_METADATA = re.compile(r"\[ONNX Layer: (.*?)\](?=\[ONNX Layer: |\s*$)")


def parse_metadata(text: str) -> list[str]:
    """``[ONNX Layer: a]\\x1f[ONNX Layer: b]`` → ``["a", "b"]``. TensorRT-RTX separates the entries
    with the ASCII unit separator (0x1F); names may hold ``;``, ``/``, ``,`` and brackets."""
    out: list[str] = []
    for part in text.strip().split("\x1f"):
        out.extend(_METADATA.findall(part.strip()))
    return out


def parse_layer_line(line: str) -> LayerInfo:
    """Parse one line of the TensorRT-RTX builder's ``Layers:`` dump::

        Name: conv_q_myl0_1, LayerType: correlation, Inputs: [ { Name: t, Dimensions: [1,8,16,16],
        Strides: [...], StrideOrder: [...], Datatype: Int8, Format: (NHWC) Channel major format }],
        Constants: [ {...} ], Outputs: [ {...} ], TacticName: __myelin_CASK_STUB, StreamId: 0,
        Metadata: [ONNX Layer: conv_q][ONNX Layer: dq_x][ONNX Layer: dq_w]
    """
    head = re.match(r"Name: (.*?), LayerType: ([^,]*), ", line)
    if not head:
        raise ValueError(f"not a layer line: {line[:80]!r}")
    layer = LayerInfo(name=head.group(1), layer_type=head.group(2).strip())
    pos = head.end()
    for key, attr in (("Inputs", "inputs"), ("Constants", "constants"), ("Outputs", "outputs")):
        marker = f"{key}: "
        at = line.find(marker, pos)
        if at < 0:
            continue
        start = at + len(marker)
        if start >= len(line) or line[start] != "[":
            continue
        end = _balanced(line, start)
        setattr(layer, attr, _tensor_list(line[start + 1:end - 1]))
        pos = end
    tactic = re.search(r", TacticName: (.*?), StreamId: ", line[pos:])
    if tactic:
        layer.tactic = tactic.group(1)
    meta = line.rfind("Metadata:")
    if meta >= 0:
        layer.onnx_nodes = parse_metadata(line[meta + len("Metadata:"):])
    return layer


def parse_layer_dump(text: str) -> LayerTable:
    """Parse a TensorRT-RTX DETAILED build log (the logger's messages joined by newlines, as
    saved by :func:`check_with_tensorrt_rtx`): every line starting ``Name: ... LayerType:``
    inside the ``Layers:`` message becomes a :class:`LayerInfo`. Lines of other messages are
    ignored, so the whole log can be passed. If the log holds several ``Layers:`` blocks (a
    multi-capability build), the last one is returned."""
    blocks: list[list[LayerInfo]] = []
    current: list[LayerInfo] | None = None
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        stripped = re.sub(r"^\[[^\]]*\]\s*", "", line)  # optional "[Severity.VERBOSE] " prefix
        if stripped.startswith("Layers:"):
            current = []
            blocks.append(current)
            continue
        if current is None:
            continue
        if line.startswith("Name: ") and ", LayerType: " in line:
            current.append(parse_layer_line(line))
        elif line.strip() == "" or line.startswith("I/O Tensors") or line.startswith("["):
            current = None
    return LayerTable(blocks[-1] if blocks else [])


def parse_inspector_json(text: str | dict) -> LayerTable:
    """Parse engine-inspector JSON (``IEngineInspector.get_engine_information(JSON)`` or
    ``trtexec --exportLayerInfo``) of a full TensorRT engine built with DETAILED verbosity:
    ``{"Layers": [{"Name", "LayerType", "Inputs": [{"Name", "Dimensions", "Format/Datatype"}],
    "Outputs": [...], "Weights": {"Type", "Count"}, "Metadata": "[ONNX Layer: ...]", ...}]}``.
    Layers given only as names (non-DETAILED builds) get no tensors."""
    data = json.loads(text) if isinstance(text, str) else text
    layers = []
    for entry in data.get("Layers", []):
        if isinstance(entry, str):
            layers.append(LayerInfo(name=entry, layer_type="?"))
            continue

        def tensors(items):
            out = []
            for t in items or []:
                desc = t.get("Format/Datatype") or t.get("Datatype") or t.get("Format") or ""
                out.append(TensorDesc(name=t.get("Name", ""), dims=tuple(int(d) for d in t.get("Dimensions", [])),
                                      dtype=normalize_dtype(desc), format=desc))
            return out

        weights = entry.get("Weights")
        layers.append(LayerInfo(
            name=entry.get("Name", ""),
            layer_type=entry.get("ParameterType") or entry.get("LayerType", "?"),
            inputs=tensors(entry.get("Inputs")), constants=tensors(entry.get("Constants")),
            outputs=tensors(entry.get("Outputs")),
            onnx_nodes=parse_metadata(entry.get("Metadata", "") or ""),
            tactic=str(entry.get("TacticName", entry.get("TacticValue", ""))),
            weights_dtype=normalize_dtype(weights["Type"]) if isinstance(weights, dict) and weights.get("Type") else None))
    return LayerTable(layers)


# =========================================================================== graph side
@dataclass(frozen=True)
class NodeExpectation:
    node: str
    op: str
    expected: str  # int8, fp8, int8-weights, int4-weights, fp16, bf16, fp32
    weight_shape: tuple[int, ...] | None

    @property
    def quantized(self) -> bool:
        return self.expected in ("int8", "fp8")


_ONNX_TO_PRECISION = {
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8", onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "int4", onnx.TensorProto.FLOAT8E4M3FN: "fp8", onnx.TensorProto.FLOAT8E5M2: "fp8",
    onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16", onnx.TensorProto.FLOAT: "fp32",
}


class _GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=False)
        except Exception:
            pass
        g = model.graph
        self.graph = g
        self.producer = {out: n for n in g.node for out in n.output}
        self.inits = {t.name: t for t in g.initializer}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        for v in list(g.input) + list(g.value_info) + list(g.output):
            tt = v.type.tensor_type
            self.types[v.name] = tt.elem_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            self.shapes[v.name] = tuple(dims) if tt.HasField("shape") and None not in dims else None
        for t in g.initializer:
            self.types[t.name] = t.data_type
            self.shapes[t.name] = tuple(int(d) for d in t.dims)
        for n in g.node:  # Constant nodes
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.types[n.output[0]] = a.t.data_type
                        self.shapes[n.output[0]] = tuple(int(d) for d in a.t.dims)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def dq(self, name: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def act_dq(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear an activation comes from, also through max pools: TensorRT
        propagates DQ forward through them (max of grid values is on the grid), so
        DQ→MaxPool→Conv runs as an INT8 convolution (measured with TensorRT-RTX)."""
        seen = 0
        node = self.producer.get(name)
        while node is not None and node.op_type in COMMUTING_POOLS and node.input and seen < 8:
            node, seen = self.producer.get(node.input[0]), seen + 1
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def dtype(self, name: str) -> int:
        return self.types.get(name, 0)

    def array(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return onnx.numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return onnx.numpy_helper.to_array(a.t)
        return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


COMMUTING_POOLS = ("MaxPool", "GlobalMaxPool")


def expected_precisions(model: onnx.ModelProto) -> list[NodeExpectation]:
    """For every Conv/ConvTranspose/Gemm/MatMul: the precision the graph asks TensorRT for.

    ``int8``/``fp8``: activation *and* weight come from DequantizeLinear of that type;
    ``int4-weights``/``int8-weights``: only the weight is Q/DQ; otherwise the activation's float
    type (``fp16`` after a Cast, ``fp32``)."""
    index = _GraphIndex(model)
    out = []
    for node in index.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        act, weight = node.input[0], node.input[1]
        act_dq, w_dq = index.act_dq(act), index.dq(weight)
        act_q = _ONNX_TO_PRECISION.get(index.dtype(act_dq.input[0])) if act_dq is not None else None
        w_q = _ONNX_TO_PRECISION.get(index.dtype(w_dq.input[0])) if w_dq is not None else None
        w_shape = index.shapes.get(w_dq.input[0]) if w_dq is not None else index.shapes.get(weight)
        if act_q and w_q and act_q == w_q:
            expected = act_q
        elif act_q and w_q:
            expected = f"{act_q}/{w_q}"
        elif w_q and not act_q:
            expected = f"{w_q}-weights"
        else:
            expected = _ONNX_TO_PRECISION.get(index.dtype(act), "fp32")
            if expected in ("int8", "int4"):
                expected = "fp32"
        out.append(NodeExpectation(node.name, node.op_type, expected, w_shape))
    return out


def _weight_axis(node: onnx.NodeProto, weight_rank: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return weight_rank - 1  # MatMul


def diagnose_node(model: onnx.ModelProto, node_name: str, index: _GraphIndex | None = None) -> tuple[str, str]:
    """Why a quantized node may not run in INT8: ``(rule id, explanation)`` from the graph around
    it (per-channel activation scale, weights on the wrong axis, missing Q/DQ, non-zero zero point,
    non-positive scale). Falls back to ``trt-precision`` when nothing in the graph explains it."""
    index = index or _GraphIndex(model)
    node = next((n for n in index.graph.node if n.name == node_name), None)
    if node is None:
        return "trt-precision", "node not found in the graph"
    act_dq, w_dq = index.act_dq(node.input[0]), index.dq(node.input[1]) if len(node.input) > 1 else None
    if act_dq is None or w_dq is None:
        which = "activation input" if act_dq is None else "weight input"
        return "trt-int8-both-inputs", f"its {which} has no DequantizeLinear"
    for dq, role in ((act_dq, "activation"), (w_dq, "weight")):
        scale = index.array(dq.input[1]) if len(dq.input) > 1 else None
        if scale is not None and np.any(scale <= 0):
            return "trt-positive-scale", f"{role} DequantizeLinear '{dq.name}' has a scale <= 0"
        zp = index.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if zp is not None and np.any(zp.astype(np.float64) != 0):
            return "trt-zero-point", f"{role} DequantizeLinear '{dq.name}' has a non-zero zero point"
    act_scale_shape = index.shapes.get(act_dq.input[1]) if len(act_dq.input) > 1 else None
    if act_scale_shape and int(np.prod(act_scale_shape)) > 1:
        return ("trt-per-tensor-activation",
                f"activation DequantizeLinear '{act_dq.name}' has a per-channel scale of shape {list(act_scale_shape)}")
    w_shape = index.shapes.get(w_dq.input[0])
    w_scale_shape = index.shapes.get(w_dq.input[1]) if len(w_dq.input) > 1 else None
    if w_shape and w_scale_shape and int(np.prod(w_scale_shape)) > 1 and _attr(w_dq, "block_size", 0) in (0, None):
        axis = _attr(w_dq, "axis", 1)
        axis = axis + len(w_shape) if axis < 0 else axis
        want = _weight_axis(node, len(w_shape))
        if axis != want:
            return ("trt-weight-axis", f"weight DequantizeLinear '{w_dq.name}' uses axis {axis}; "
                                       f"{node.op_type} needs axis {want} (output channels)")
    return "trt-precision", "nothing in the graph explains it"


# =========================================================================== check result
@dataclass
class Problem:
    node: str
    op: str
    rule: str
    message: str

    def __str__(self) -> str:
        where = f"node '{self.node}'" + (f" ({self.op})" if self.op else "") if self.node else "model"
        return f"{where} breaks {self.rule} ({RULES.get(self.rule, '')}): {self.message}"


@dataclass
class CheckResult:
    """Outcome of one TensorRT(-RTX) parse + build of a model."""

    builder: str
    compute_capability: str
    parsed: bool = False
    built: bool = False
    problems: list[Problem] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)  # per Conv/Gemm/MatMul
    table: LayerTable = field(default_factory=lambda: LayerTable([]))
    log: str = ""
    engine: bytes | None = None
    build_s: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.parsed and self.built and not self.problems

    @property
    def quantized(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes if n["expected"] in ("int8", "fp8")]

    def summary(self) -> dict[str, Any]:
        q = self.quantized
        good = [n for n in q if n["ok"]]
        return {"quantized": len(q), "as_assigned": len(good),
                "int8_pct": round(100.0 * len(good) / len(q), 2) if q else None}

    def annotation(self) -> dict[str, Any]:
        """Deterministic, JSON-serialisable record for ``model.annotations["trt"]`` and the report
        (no timings or byte counts, so the output model stays byte-identical across runs)."""
        return {
            "status": "ok" if self.ok else "failed", "builder": self.builder,
            "compute_capability": self.compute_capability, "note": self.note,
            "parsed": self.parsed, "built": self.built, **self.summary(),
            "problems": [str(p) for p in self.problems],
            "nodes": self.nodes, "layers": self.table.rows(),
        }

    def format_table(self, only_problems: bool = False) -> str:
        rows = [n for n in self.nodes if (not only_problems or not n["ok"])]
        if not rows:
            return ""
        width = min(48, max(len(r["node"]) for r in rows))
        lines = [f"{'node':<{width}}  {'op':<8} {'hqpc':<12} {'engine':<12} layer"]
        for r in rows:
            name = r["node"] if len(r["node"]) <= width else "…" + r["node"][-(width - 1):]
            mark = "" if r["ok"] else "  <-- MISMATCH"
            lines.append(f"{name:<{width}}  {r['op']:<8} {r['expected']:<12} {str(r['engine']):<12} "
                         f"{r['layer']}{mark}")
        return "\n".join(lines)


def compare_precisions(model: onnx.ModelProto, table: LayerTable) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Match every compute node with its engine layer; a quantized node (int8/fp8) must run in
    that precision, a weight-only one must keep its low-precision weights."""
    rows, problems = [], []
    index = _GraphIndex(model)
    for exp in expected_precisions(model):
        layer = table.compute_layer(exp.node)
        engine = layer.precision(exp.weight_shape) if layer is not None else None
        if exp.quantized or exp.expected.endswith("-weights"):
            ok = engine == exp.expected
        else:
            ok = True  # float layers: reported, not enforced
        rows.append({"node": exp.node, "op": exp.op, "expected": exp.expected, "engine": engine,
                     "layer": layer.name if layer is not None else None,
                     "input": layer.inputs[0].dtype if layer is not None and layer.inputs else None,
                     "weight": (lambda w: w.dtype if w is not None else None)(layer.weight(exp.weight_shape))
                     if layer is not None else None,
                     "output": layer.outputs[0].dtype if layer is not None and layer.outputs else None,
                     "ok": ok})
        if not ok:
            if layer is None:
                problems.append(Problem(exp.node, exp.op, "trt-precision",
                                        f"hqpc assigned {exp.expected} but no engine layer carries this node"))
                continue
            rule, why = diagnose_node(model, exp.node, index)
            weight = layer.weight(exp.weight_shape)
            problems.append(Problem(exp.node, exp.op, rule,
                                    f"{why}; hqpc assigned {exp.expected}, TensorRT chose {engine} "
                                    f"(layer '{layer.name}': input {layer.inputs[0].dtype if layer.inputs else '?'}, "
                                    f"weights {weight.dtype if weight is not None else '?'})"))
    return rows, problems


# --------------------------------------------------------------------------- error mapping
_PARSER_RULES = [
    (re.compile(r"zero point", re.I), "trt-zero-point"),
    (re.compile(r"Scale coefficients must all be positive|scale.*positive", re.I), "trt-positive-scale"),
    (re.compile(r"has type Int32 but must have type", re.I), "trt-float-bias"),
    (re.compile(r"HW-specific datatypes: fp8", re.I), "trt-fp8-capability"),
]


def _clean(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip() and not any(n in line for n in _CUDA_NOISE)]
    return " ".join(" ".join(lines).split())


def _short_parser_message(desc: str) -> str:
    """The useful sentence of a parser error: drop the C++ assertion expression, source locations
    and the DLA-only advice."""
    message = _clean(desc)
    assertion = re.search(r"Assertion failed: (?:\(.*?\)|[\w:]+\(.*?\)): (.*)$", message)
    if assertion:
        message = assertion.group(1)
    usage = re.search(r"API Usage Error \((?:[^:()]+: )?(.*?)(?:\.? In \w+ at [^)]*)?\)", message)
    if usage:
        message = usage.group(1)
    message = re.sub(r"\s*Please set kENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA.*$", "", message)
    return message.strip()


def classify_parser_error(desc: str, node: str, op: str, model: onnx.ModelProto | None = None) -> Problem:
    """Turn a TensorRT ONNX-parser error into a :class:`Problem` naming node and rule."""
    message = _short_parser_message(desc)
    rule = next((r for pattern, r in _PARSER_RULES if pattern.search(desc)), "trt-parse")
    if rule == "trt-float-bias" and model is not None:
        outputs = next((list(x.output) for x in model.graph.node if x.name == node), [])
        uses = [(c, "bias" if c.op_type in ("Conv", "ConvTranspose", "Gemm") and list(c.input).index(o) == 2
                 else "input") for c in model.graph.node for o in outputs if o in c.input]
        if uses:
            what = ", ".join(f"int32 {role} of {c.op_type} '{c.name}'" for c, role in uses)
            return Problem(node, op, rule, f"TensorRT parser rejected it ({what}): {message}")
    return Problem(node, op, rule, f"TensorRT parser rejected it: {message}")


def classify_build_error(messages: list[str], model: onnx.ModelProto) -> list[Problem]:
    """Builder errors (no engine): name the node when the message quotes one."""
    text = _clean("\n".join(messages)) or "the builder returned no engine (no error message)"
    names = {n.name: n.op_type for n in model.graph.node}
    if re.search(r"HW-specific datatypes: fp8", text, re.I):
        fp8 = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               and _GraphIndex(model).dtype(n.input[0] if n.op_type == "DequantizeLinear" else n.output[0])
               in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)]
        node = fp8[0] if fp8 else None
        return [Problem(node.name if node else "", node.op_type if node else "", "trt-fp8-capability",
                        f"TensorRT builder failed: {text}")]
    quoted = re.findall(r"operation '([^']+)'|node '([^']+)'|layer '([^']+)'", text)
    node = next((q for group in quoted for q in group if q in names), "")
    return [Problem(node, names.get(node, ""), "trt-build", f"TensorRT builder failed: {text}")]


# =========================================================================== TensorRT-RTX
def check_capability(target) -> tuple[str, str]:
    """Compute capability to check a target at with TensorRT-RTX, and a note when it differs from
    the device's own. The profile's ``check_compute_capability`` says which (8.6 stands in for
    Orin's 8.7, which TensorRT-RTX lacks, and for 7.x devices, for which TensorRT-RTX 1.7 builds
    no INT8 convolution); without it, the device's own capability is used."""
    own = str(target.get("compute_capability", "") or "")
    cc = str(target.get("check_compute_capability", "") or own or STAND_IN_CAPABILITY)
    note = ""
    if own and cc != own:
        note = f"{target.name} is sm_{own.replace('.', '')}; TensorRT-RTX checks at {cc} (nearest it supports)"
    return cc, note


def _capability_enum(trt, cc: str):
    """``"8.6"`` → ``ComputeCapability.SM86``; ``"12.0"`` → ``SM120``."""
    text = str(cc).strip()
    major, _, minor = text.partition(".")
    key = f"SM{major}{minor or '0'}"
    if not (major.isdigit() and (minor or "0").isdigit()) or not hasattr(trt.ComputeCapability, key):
        known = ", ".join(RTX_CAPABILITIES)
        raise HqpcError(f"compute capability {cc} is not one TensorRT-RTX builds for (known: {known})")
    return getattr(trt.ComputeCapability, key)


def _make_logger(trt):
    class _Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            self.messages.append((str(severity).split(".")[-1], msg))

    return _Capture()


def _profile_shapes(network, max_batch: int, dynamic_dim: int = 32):
    """(name, min, opt, max) for inputs with dynamic dims: batch 1..max_batch, others fixed."""
    shapes = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        low = [d if d >= 0 else (1 if k == 0 else dynamic_dim) for k, d in enumerate(dims)]
        high = [d if d >= 0 else (max_batch if k == 0 else dynamic_dim) for k, d in enumerate(dims)]
        shapes.append((tensor.name, low, low, high))
    return shapes


def _add_profile(builder, network, config, max_batch: int) -> None:
    """Add one optimization profile covering the network's dynamic input dims (if any)."""
    shapes = _profile_shapes(network, max_batch)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, low, opt, high in shapes:
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)


def _rtx_build(model: onnx.ModelProto, capabilities: list[str], max_batch: int):
    """Parse and build with TensorRT-RTX; returns (parsed, plan or None, parser errors, logger messages)."""
    import tensorrt_rtx as trt

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parsed = bool(parser.parse(model.SerializeToString()))
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    errors = [(e.desc(), e.node_name(), e.node_operator()) for e in errors]
    if not parsed:
        return False, None, errors, logger.messages
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.set_flag(trt.BuilderFlag.DISABLE_TIMING_CACHE)
    config.num_compute_capabilities = len(capabilities)
    for i, cc in enumerate(capabilities):
        config.set_compute_capability(_capability_enum(trt, cc), i)
    _add_profile(builder, network, config, max_batch)
    plan = builder.build_serialized_network(network, config)
    return True, (bytes(plan) if plan is not None else None), errors, logger.messages


def rtx_version() -> str:
    import tensorrt_rtx as trt

    return f"tensorrt-rtx {trt.__version__}"


def check_with_tensorrt_rtx(model: onnx.ModelProto, compute_capability: str = STAND_IN_CAPABILITY,
                            max_batch: int = 1, note: str = "", log_path: Path | None = None) -> CheckResult:
    """Parse + AOT-build ``model`` with TensorRT-RTX for ``compute_capability`` and compare each
    Conv/Gemm/MatMul's engine precision with the one hqpc assigned. Raises
    :class:`TensorRTUnavailable` when tensorrt_rtx is not importable. ``log_path`` keeps the full
    builder log (the layer dump is in it)."""
    reason = rtx_missing_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    start = time.perf_counter()
    parsed, plan, errors, messages = _rtx_build(model, [compute_capability], max_batch)
    result = CheckResult(builder=rtx_version(), compute_capability=str(compute_capability), parsed=parsed,
                         built=plan is not None, note=note, engine=plan)
    result.log = "\n".join(f"[{sev}] {msg}" for sev, msg in messages)
    result.build_s = time.perf_counter() - start
    if log_path is not None:
        from hqpc.ir import atomic_write_text

        atomic_write_text(Path(log_path), result.log + "\n")
    if not parsed:
        seen = set()
        for desc, node, op in errors:
            problem = classify_parser_error(desc, node, op, model)
            if (problem.node, problem.rule) not in seen:
                seen.add((problem.node, problem.rule))
                result.problems.append(problem)
        if not result.problems:
            result.problems.append(Problem("", "", "trt-parse", "TensorRT parser failed without an error"))
        return result
    if plan is None:
        errs = [msg for sev, msg in messages if sev in ("ERROR", "INTERNAL_ERROR")]
        result.problems.extend(classify_build_error(errs, model))
        return result
    result.table = parse_layer_dump(result.log)
    result.nodes, problems = compare_precisions(model, result.table)
    result.problems.extend(problems)
    return result


def build_rtx_engine(model: onnx.ModelProto, capabilities: list[str], max_batch: int = 1) -> tuple[bytes, CheckResult]:
    """Build a TensorRT-RTX engine for ``capabilities`` (e.g. ``["8.6"]``) on this machine; returns
    the serialized engine and the check of its layers. Raises HqpcError when it cannot be built."""
    reason = rtx_missing_reason()
    if reason:
        raise TensorRTUnavailable(f"building an rtx engine needs TensorRT-RTX: {reason}")
    if len(capabilities) == 1:
        result = check_with_tensorrt_rtx(model, capabilities[0], max_batch=max_batch)
    else:
        parsed, plan, errors, messages = _rtx_build(model, capabilities, max_batch)
        result = CheckResult(builder=rtx_version(), compute_capability=",".join(capabilities),
                             parsed=parsed, built=plan is not None, engine=plan)
        result.log = "\n".join(f"[{sev}] {msg}" for sev, msg in messages)
        if not parsed:
            result.problems = [classify_parser_error(d, n, o, model) for d, n, o in errors]
        elif plan is None:
            result.problems = classify_build_error([m for s, m in messages if s in ("ERROR", "INTERNAL_ERROR")], model)
        else:
            result.table = parse_layer_dump(result.log)
            result.nodes, result.problems = compare_precisions(model, result.table)
    if result.engine is None:
        first = str(result.problems[0]) if result.problems else "no engine"
        raise HqpcError(f"TensorRT-RTX could not build an engine for SM {','.join(capabilities)}: {first}")
    return result.engine, result


# =========================================================================== full TensorRT
def build_tensorrt_plan(model: onnx.ModelProto, dla_core: int | None = None, max_batch: int = 1,
                        workspace_mb: int | None = None) -> tuple[bytes, CheckResult]:
    """Build a serialized TensorRT plan (``tensorrt`` 10.x or 11.x, on the device or a GPU host).

    Strongly typed network (11.x: always; 10.x: flag set, precision comes from Q/DQ and Casts),
    DETAILED profiling verbosity, no timing cache reuse across machines. ``dla_core``: default
    device DLA on that core with GPU fallback. The layer table comes from the engine inspector
    (needs the plan deserialized, i.e. a GPU) or, failing that, from the builder log."""
    reason = tensorrt_missing_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    result = CheckResult(builder=f"tensorrt {trt.__version__}", compute_capability="device")
    start = time.perf_counter()
    result.parsed = bool(parser.parse(model.SerializeToString()))
    if not result.parsed:
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            result.problems.append(classify_parser_error(e.desc(), e.node_name(), e.node_operator(), model))
        raise HqpcError(f"TensorRT cannot parse the model: {result.problems[0] if result.problems else 'unknown error'}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if dla_core is not None:
        if builder.num_DLA_cores <= int(dla_core):
            raise HqpcError(f"--dla-core {dla_core}: this device has {builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    _add_profile(builder, network, config, max_batch)
    plan = builder.build_serialized_network(network, config)
    result.log = "\n".join(f"[{sev}] {msg}" for sev, msg in logger.messages)
    result.build_s = time.perf_counter() - start
    if plan is None:
        problems = classify_build_error([m for s, m in logger.messages if s in ("ERROR", "INTERNAL_ERROR")], model)
        raise HqpcError(f"TensorRT could not build the plan: {problems[0]}")
    result.built = True
    result.engine = bytes(plan)
    result.table = inspect_plan(result.engine) or parse_layer_dump(result.log)
    result.nodes, result.problems = compare_precisions(model, result.table)
    return result.engine, result


def inspect_plan(plan: bytes) -> LayerTable | None:
    """Layer table of a full-TensorRT plan through the engine inspector (None without a GPU)."""
    if tensorrt_missing_reason():
        return None
    import tensorrt as trt

    try:
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            return None
        inspector = engine.create_engine_inspector()
        return parse_inspector_json(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:
        return None


def run_plan(plan: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute a TensorRT plan once on ``feeds`` (host arrays) and return every output by name.

    Uses pycuda when importable, else cuda-python. Needs ``tensorrt`` and a CUDA GPU."""
    reason = tensorrt_missing_reason() or gpu_missing_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise HqpcError("TensorRT could not deserialize the plan (built for another device or TensorRT version?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    host_in = {}
    for name in inputs:
        dtype = trt.nptype(engine.get_tensor_dtype(name))
        host_in[name] = np.ascontiguousarray(feeds[name], dtype=dtype)
        context.set_input_shape(name, tuple(host_in[name].shape))
    host_out = {n: np.empty(tuple(context.get_tensor_shape(n)), dtype=trt.nptype(engine.get_tensor_dtype(n)))
                for n in outputs}
    try:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda

        stream = cuda.Stream()
        device = {n: cuda.mem_alloc(max(a.nbytes, 1)) for n, a in {**host_in, **host_out}.items()}
        for n, a in host_in.items():
            cuda.memcpy_htod_async(device[n], a, stream)
        for n, ptr in device.items():
            context.set_tensor_address(n, int(ptr))
        if not context.execute_async_v3(stream.handle):
            raise HqpcError("TensorRT execution failed")
        for n, a in host_out.items():
            cuda.memcpy_dtoh_async(a, device[n], stream)
        stream.synchronize()
        return host_out
    except ImportError:
        pass
    cudart = _cudart()

    def check(ret):
        err = ret[0] if isinstance(ret, tuple) else ret
        if int(err) != 0:
            raise HqpcError(f"CUDA error {err}")
        return ret[1] if isinstance(ret, tuple) and len(ret) > 1 else None

    stream = check(cudart.cudaStreamCreate())
    device = {n: check(cudart.cudaMalloc(max(a.nbytes, 1))) for n, a in {**host_in, **host_out}.items()}
    try:
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, a in host_in.items():
            check(cudart.cudaMemcpyAsync(device[n], a.ctypes.data, a.nbytes, h2d, stream))
        for n, ptr in device.items():
            context.set_tensor_address(n, int(ptr))
        if not context.execute_async_v3(int(stream)):
            raise HqpcError("TensorRT execution failed")
        for n, a in host_out.items():
            check(cudart.cudaMemcpyAsync(a.ctypes.data, device[n], a.nbytes, d2h, stream))
        check(cudart.cudaStreamSynchronize(stream))
    finally:
        for ptr in device.values():
            cudart.cudaFree(ptr)
        cudart.cudaStreamDestroy(stream)
    return host_out


def compare_plan_with_ort(model: onnx.ModelProto, plan: bytes, batches: Iterable[dict[str, np.ndarray]],
                          tolerance=None) -> dict[str, Any]:
    """Run the plan and ONNX Runtime on the same inputs (calibration/eval images, one dict of
    feeds per batch) and compare every output with Polygraphy semantics: an element fails only
    beyond *both* atol and rtol·|reference|. ``tolerance``: one :class:`Tolerance` for all outputs
    or ``{output name: Tolerance}`` with an optional ``"*"`` default (default atol = rtol = 1e-2).

    Returns ``{"ok", "batches", "outputs": [{"name", "ok", "atol", "rtol", "max_abs", "max_rel",
    "min_atol", "min_rtol", "reason"}]}``, each output's worst batch."""
    from hqpc.runtime import ort as ort_rt
    from hqpc.runtime.compare import Tolerance, compare_arrays

    default = Tolerance(atol=1e-2, rtol=1e-2)
    if isinstance(tolerance, dict):
        per_output, default = tolerance, tolerance.get("*", default)
    else:
        per_output, default = {}, tolerance or default
    worst: dict[str, Any] = {}
    count = 0
    for feeds in batches:
        count += 1
        expected = ort_rt.run(model, feeds)
        got = run_plan(plan, feeds)
        for name, ref in expected.items():
            tol = per_output.get(name, default)
            if name not in got:
                row = {"name": name, "ok": False, "max_abs": float("inf"), "max_rel": float("inf"),
                       "min_atol": float("inf"), "min_rtol": float("inf"), "reason": "missing from the plan's outputs"}
            else:
                row = compare_arrays(name, ref, got[name].astype(ref.dtype).reshape(ref.shape)
                                     if got[name].size == ref.size else got[name], tol).as_dict()
            row.update(atol=tol.atol, rtol=tol.rtol)
            old = worst.get(name)
            if old is None or (old["ok"], -old["max_abs"]) > (row["ok"], -row["max_abs"]):
                worst[name] = row
    if not count:
        raise HqpcError("no inputs to compare the plan on")
    outputs = [worst[name] for name in worst]
    return {"ok": all(o["ok"] for o in outputs), "batches": count, "outputs": outputs}


def verify_plan_on_data(model: onnx.ModelProto, plan: bytes, data_spec, split: str = "eval", batch: int = 8,
                        limit: int = 64, tolerance=None):
    """:func:`compare_plan_with_ort` on the first ``limit`` images of a data spec's ``split``
    (``calib`` or ``eval``), ``batch`` at a time, for a single-input model. The plan must have been
    built with ``max_batch >= batch``."""
    from hqpc.runtime import ort as ort_rt

    inputs = ort_rt.graph_inputs(model)
    if len(inputs) != 1:
        raise HqpcError("verifying a plan on a data spec needs a single-input model")
    name = inputs[0].name
    seen = 0
    batches = []
    for x, _ in data_spec.split(split).batches(batch):
        batches.append({name: x.astype(np.float32)})
        seen += len(x)
        if seen >= limit:
            break
    return compare_plan_with_ort(model, plan, batches, tolerance)


# =========================================================================== build_plan.sh
_CHECK_SCRIPT = r'''import json, re, sys
expected = json.loads(sys.argv[2])
layers = json.load(open(sys.argv[1])).get("Layers", [])
def dtype(desc):
    for word, name in (("Int8", "int8"), ("INT8", "int8"), ("FP16", "fp16"), ("Half", "fp16"), ("FP8", "fp8"),
                       ("Int4", "int4"), ("FP32", "fp32"), ("Float", "fp32")):
        if re.search(r"(?<![A-Za-z0-9])%s(?![A-Za-z0-9])" % word, desc or ""):
            return name
    return "?"
bad = 0
for node, want in sorted(expected.items()):
    found = [l for l in layers if isinstance(l, dict) and "[ONNX Layer: %s]" % node in (l.get("Metadata") or "")]
    compute = [l for l in found if l.get("ParameterType") in ("Convolution", "Deconvolution", "Gemm", "MatrixMultiply", "FullyConnected")
               or re.search("conv|gemm|matmul|correlation|fusion", l.get("LayerType", ""), re.I)] or found
    if not compute:
        print("MISSING  %-48s expected %-6s (no layer carries it)" % (node, want)); bad += 1; continue
    l = compute[0]
    ins = [dtype(t.get("Format/Datatype") or t.get("Datatype")) for t in l.get("Inputs", [])]
    w = dtype((l.get("Weights") or {}).get("Type")) if isinstance(l.get("Weights"), dict) else (ins[1] if len(ins) > 1 else ins[0] if ins else "?")
    act = ins[0] if ins else "?"
    if act == w:
        got = act
    elif w in ("int8", "int4", "fp8") and act in ("fp32", "fp16"):
        got = w + "-weights"
    else:
        got = "%s/%s" % (act, w)
    ok = got == want
    bad += not ok
    print("%-8s %-48s expected %-6s engine %-10s %s" % ("ok" if ok else "MISMATCH", node, want, got, l.get("Name")))
print("%d of %d quantized layers as expected" % (len(expected) - bad, len(expected)))
sys.exit(1 if bad else 0)
'''


def build_plan_script(onnx_name: str, target, expected: dict[str, str], dla_core: int | None = None,
                      max_batch: int = 1, input_shapes: dict[str, list] | None = None,
                      plan_name: str | None = None) -> str:
    """Text of ``build_plan.sh``: run on the device (Jetson) next to ``onnx_name``. It builds the
    plan with ``trtexec`` (strongly typed, DETAILED layer info, DLA flags when asked), exports the
    layer information and checks that every Conv/Gemm hqpc quantized runs in the expected
    precision (``expected``: ONNX node name → ``int8`` ...)."""
    stem = onnx_name[:-5] if onnx_name.endswith(".onnx") else onnx_name
    plan_name = plan_name or f"{stem}.plan"
    layers_name = f"{stem}.layers.json"
    cmd = ["\"$TRTEXEC\"", f"--onnx={shlex.quote(onnx_name)}", f"--saveEngine={shlex.quote(plan_name)}",
           "--stronglyTyped", "--profilingVerbosity=detailed", f"--exportLayerInfo={shlex.quote(layers_name)}",
           "--skipInference"]
    if input_shapes:
        def fmt(shape_map, batch):
            return ",".join(f"{name}:{'x'.join(str(batch if (d is None or isinstance(d, str)) and k == 0 else d) for k, d in enumerate(shape))}"
                            for name, shape in shape_map.items())
        dynamic = {n: s for n, s in input_shapes.items() if any(d is None or isinstance(d, str) for d in s)}
        if dynamic:
            cmd += [f"--minShapes={fmt(dynamic, 1)}", f"--optShapes={fmt(dynamic, max_batch)}",
                    f"--maxShapes={fmt(dynamic, max_batch)}"]
    if dla_core is not None:
        cmd += [f"--useDLACore={int(dla_core)}", "--allowGPUFallback"]
    table = "\n".join(f"#   {node}: {prec}" for node, prec in sorted(expected.items())) or "#   (none)"
    expected_json = json.dumps(dict(sorted(expected.items())), sort_keys=True)
    return f"""#!/usr/bin/env bash
# Generated by hqpc for target '{target.name}' ({target.description}).
# Run this ON THE DEVICE (TensorRT 10.x from JetPack 6, or TensorRT 11.x) in the folder holding
# {onnx_name}. It builds {plan_name} with trtexec and checks the precision TensorRT chose for
# every Conv/Gemm that hqpc quantized.
#   - strongly typed: precision comes from the Q/DQ nodes and Casts in the ONNX (TensorRT 11 has
#     no precision flags; --stronglyTyped is a no-op there). If a TensorRT 10.x build refuses
#     --stronglyTyped together with --useDLACore, drop --stronglyTyped and add --int8 --fp16:
#     explicit Q/DQ still fixes the INT8 layers.
#   - no timing cache is shipped: tactics are timed on this device.
#   - DLA: {"core " + str(dla_core) + " with GPU fallback" if dla_core is not None else "not used (hqpc --dla-core N adds --useDLACore=N --allowGPUFallback)"}.
# Expected precision per quantized layer (ONNX node: precision):
{table}
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ] && ! command -v "$TRTEXEC" >/dev/null 2>&1; then
  echo "trtexec not found; set TRTEXEC=/path/to/trtexec (JetPack: /usr/src/tensorrt/bin/trtexec)" >&2
  exit 2
fi
{" ".join(cmd)}
echo "built {plan_name}; layer information in {layers_name}"
EXPECTED={shlex.quote(expected_json)}
python3 - {shlex.quote(layers_name)} "$EXPECTED" <<'HQPC_CHECK'
{_CHECK_SCRIPT}HQPC_CHECK
"""


def write_build_plan(output_path: Path, model: onnx.ModelProto, target, dla_core: int | None = None,
                     max_batch: int = 1, script_name: str = "build_plan.sh") -> Path:
    """Write ``build_plan.sh`` (executable) next to ``output_path``; returns its path."""
    from hqpc.ir import atomic_write_text
    from hqpc.runtime import ort as ort_rt

    output_path = Path(output_path)
    expected = {e.node: e.expected for e in expected_precisions(model) if e.quantized or e.expected.endswith("-weights")}
    shapes = {i.name: ort_rt.input_shape(i) for i in ort_rt.graph_inputs(model)}
    text = build_plan_script(output_path.name, target, expected, dla_core=dla_core, max_batch=max_batch,
                             input_shapes=shapes)
    path = output_path.with_name(script_name)
    atomic_write_text(path, text)
    os.chmod(path, 0o755)
    return path


# =========================================================================== compiler entry point
def plan_path_for(output_path: Path) -> Path:
    output_path = Path(output_path)
    name = output_path.name
    for suffix in (".onnx", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output_path.with_name(name + ".plan")


def preflight_target_artifacts(target, options) -> None:
    """Usage errors of the backend options, raised as HqpcError *before* compiling (so nothing is
    written): ``--dla-core`` on a target without DLA or out of range, ``--emit plan`` for a
    non-TensorRT target, ``--emit plan`` for ``rtx`` without TensorRT-RTX installed, ``--emit plan``
    for orin/xavier/t4 without TensorRT and a GPU (``build_plan.sh`` is then the way)."""
    emit = getattr(options, "emit", "onnx")
    extra = dict(getattr(options, "extra", {}) or {})
    backend = getattr(target, "backend", "")
    dla_core = extra.get("dla_core")
    if dla_core is not None:
        cores = int(target.get("dla_cores", 0) or 0)
        if backend != "tensorrt" or cores == 0:
            raise HqpcError(f"--dla-core: target '{target.name}' has no DLA")
        if not 0 <= int(dla_core) < cores:
            raise HqpcError(f"--dla-core {dla_core}: target '{target.name}' has DLA cores 0..{cores - 1}")
    if emit == "plan":
        if backend not in ("tensorrt", "tensorrt-rtx"):
            raise HqpcError(f"--emit plan needs a TensorRT target (orin, xavier, t4, rtx); '{target.name}' "
                            f"uses {backend}")
        if backend == "tensorrt-rtx" and rtx_missing_reason():
            raise HqpcError(f"--emit plan for '{target.name}' builds a TensorRT-RTX engine here: "
                            f"{RTX_INSTALL_HINT}")
        missing = backend == "tensorrt" and (tensorrt_missing_reason() or gpu_missing_reason())
        if missing:
            raise HqpcError(f"--emit plan for '{target.name}' needs TensorRT and the device ({missing}); "
                            f"compile with --emit onnx and run the build_plan.sh written beside the output "
                            f"on the {target.name}")


def write_target_artifacts(result, output_path: Path | None, target, options,
                           log: Callable[[str], None] = lambda m: None) -> dict[str, str]:
    """Write the backend files that go with a compiled model; call after the ONNX is written.

    * ``target.backend == "tensorrt"`` (orin, xavier, t4): ``build_plan.sh`` next to
      ``output_path`` (see :func:`build_plan_script`). With ``options.emit == "plan"`` also
      ``<stem>.plan``, built here with ``tensorrt`` when it is importable (and a GPU of the target
      kind is present), else :class:`HqpcError` "building a plan for orin needs TensorRT on the
      device: run build_plan.sh there".
    * ``target.backend == "tensorrt-rtx"`` (rtx) with ``options.emit == "plan"``: ``<stem>.plan``,
      a TensorRT-RTX engine built on this machine for the target's ``compute_capability``
      (``options.extra["compute_capabilities"]``, e.g. ``"8.6,8.9,12.0"``, overrides it).
    * other backends: nothing; ``--emit plan`` is an HqpcError.

    ``result``: :class:`hqpc.compiler.CompileResult`; ``options``: its CompileOptions
    (``emit``; ``data``; ``extra["dla_core"]`` int or None; ``extra["max_batch"]`` int, default 1;
    ``extra["plan_atol"]``/``extra["plan_rtol"]``, default 1e-2). A plan built with ``tensorrt`` and
    a ``--data`` spec is run on the eval images and compared with ONNX Runtime (report
    ``artifacts.plan_vs_onnxruntime``).
    Returns ``{"build_plan": path, "plan": path}`` (only the files written) and records them in
    ``result.report["artifacts"]``.
    """
    emit = getattr(options, "emit", "onnx")
    extra = dict(getattr(options, "extra", {}) or {})
    dla_core = extra.get("dla_core")
    max_batch = int(extra.get("max_batch") or 1)
    backend = getattr(target, "backend", "")
    written: dict[str, str] = {}
    if output_path is None:
        preflight_target_artifacts(target, options)
        if emit == "plan":
            raise HqpcError("--emit plan needs an output path (-o OUT.onnx); the plan is written beside it")
        return written
    output_path = Path(output_path)
    model = result.model.proto
    preflight_target_artifacts(target, options)
    if backend == "tensorrt":
        path = write_build_plan(output_path, model, target, dla_core=dla_core, max_batch=max_batch)
        written["build_plan"] = str(path)
        log(f"wrote {path} (run it on the {target.name} to build and check the plan)")
        if emit == "plan":
            if tensorrt_missing_reason() or gpu_missing_reason():
                raise HqpcError(f"building a plan for {target.name} needs TensorRT on the device: run "
                                f"{path} there")
            plan, check = build_tensorrt_plan(model, dla_core=dla_core, max_batch=max_batch)
            plan_path = plan_path_for(output_path)
            from hqpc.ir import atomic_write_bytes

            atomic_write_bytes(plan_path, plan)
            written["plan"] = str(plan_path)
            log(f"wrote {plan_path} ({len(plan)} bytes, {check.builder})")
            if getattr(options, "data", None):
                from hqpc.runtime.compare import Tolerance
                from hqpc.runtime.data import DataSpec

                tol = Tolerance(atol=float(extra.get("plan_atol", 1e-2)), rtol=float(extra.get("plan_rtol", 1e-2)))
                comparison = verify_plan_on_data(model, plan, DataSpec.load(options.data), batch=max_batch,
                                                 tolerance=tol)
                if isinstance(getattr(result, "report", None), dict):
                    result.report.setdefault("artifacts", {})["plan_vs_onnxruntime"] = comparison
                log(f"plan vs ONNX Runtime on {comparison['batches']} eval batches: "
                    + ("ok" if comparison["ok"] else "MISMATCH " + ", ".join(
                        f"{o['name']} max abs {o['max_abs']:.3g}" for o in comparison["outputs"] if not o["ok"])))
    elif backend == "tensorrt-rtx":
        if emit == "plan":
            caps = extra.get("compute_capabilities") or target.get("compute_capability") or STAND_IN_CAPABILITY
            caps = [c.strip() for c in str(caps).split(",") if c.strip()]
            plan, check = build_rtx_engine(model, caps, max_batch=max_batch)
            plan_path = plan_path_for(output_path)
            from hqpc.ir import atomic_write_bytes

            atomic_write_bytes(plan_path, plan)
            written["plan"] = str(plan_path)
            s = check.summary()
            log(f"wrote {plan_path} ({len(plan)} bytes, {check.builder}, SM {','.join(caps)}"
                + (f", {s['as_assigned']}/{s['quantized']} quantized layers as assigned" if s["quantized"] else "") + ")")
    if written and isinstance(getattr(result, "report", None), dict):
        result.report.setdefault("artifacts", {}).update(written)
    return written


def check_to_text(result: CheckResult) -> str:
    """Human summary: status line, problems, then the per-node table."""
    s = result.summary()
    head = (f"{result.builder} SM {result.compute_capability}: parsed={result.parsed} built={result.built}; "
            f"{s['as_assigned']}/{s['quantized']} quantized Conv/Gemm layers as assigned")
    parts = [head] + [f"  {p}" for p in result.problems]
    table = result.format_table()
    if table:
        parts.append(table)
    return "\n".join(parts)


__all__ = [
    "RULES", "TensorRTUnavailable", "TensorRTCheckFailed", "rtx_missing_reason", "tensorrt_missing_reason",
    "gpu_missing_reason", "TensorDesc", "LayerInfo", "LayerTable", "parse_layer_dump", "parse_layer_line",
    "parse_inspector_json", "expected_precisions", "diagnose_node", "Problem", "CheckResult",
    "compare_precisions", "check_capability", "check_with_tensorrt_rtx", "build_rtx_engine",
    "build_tensorrt_plan", "run_plan", "compare_plan_with_ort", "verify_plan_on_data", "build_plan_script", "write_build_plan",
    "preflight_target_artifacts", "write_target_artifacts", "check_to_text",
]
