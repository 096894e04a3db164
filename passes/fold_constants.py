"""fold-constants: evaluate constant sub-expressions at compile time."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from hqpc.graphutil import (GraphIndex, attributes, constant_node_value, drop_initializers, remove_nodes,
                            set_initializer, to_tensor)
from hqpc.passmanager import Pass, PassInfo
from hqpc.passes._rewrite import ShapeTable, constant, elem_dtype, has_subgraph, is_op, outer_reads
from hqpc.registry import register_pass

# Never evaluated at compile time: random ops (a fresh value per run), quantization nodes (the
# explicit Q/DQ format must survive for TensorRT and friends), ops whose output is no tensor.
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                              "Multinomial", "Bernoulli"})
KEEP = NONDETERMINISTIC | frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SplitToSequence",
    "ConcatFromSequence", "SequenceAt", "SequenceLength", "Optional", "OptionalGetElement",
    "OptionalHasElement",
})
_MAX_ROUNDS = 16


@register_pass
class FoldConstants(Pass):
    """Replace constant computations by initializers.

    * ``Constant`` nodes become initializers of the same name.
    * A default-domain node whose inputs are all constants (initializers or Constant outputs;
      never graph inputs, which callers may override) and that is deterministic (no random
      ops, no subgraph attributes, no Q/DQ, no sequence/optional ops; Dropout only in inference
      mode) is evaluated once — with ONNX Runtime, falling back to onnx.reference — and its
      outputs become initializers of the same names.
    * ``Shape``/``Size`` of a tensor whose shape is static (shape inference) become int64
      initializers; for ``Shape`` only the ``start:end`` part it selects must be static.

    Iterated to a fixed point. Skipped: results with more than ``max-elements`` elements
    (avoids bloating the model), outputs that are graph outputs (outputs stay node-produced),
    results whose dtype differs from the inferred one. The evaluation is the runtime's own, so
    values are unchanged.
    """

    info = PassInfo("fold-constants", opt_level=1,
                    description="evaluate constant subgraphs and static Shape/Size into initializers")
    options = {"max-elements": 1 << 22}

    def run(self, model, ctx) -> bool:
        graph = model.proto.graph
        cap = int(self.config["max-elements"])
        created: set[str] = set()
        changed = False
        for _ in range(_MAX_ROUNDS):
            round_changed = self._round(model, graph, cap, created)
            changed |= round_changed
            if not round_changed:
                break
        if created:
            used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
            used |= outer_reads(graph)
            drop_initializers(graph, lambda t: t.name not in used and t.name in created)
        return changed

    def _round(self, model, graph, cap, created) -> bool:
        index = GraphIndex.build(graph)
        shapes = None
        if any(is_op(n, "Shape", "Size") for n in graph.node):
            shapes = ShapeTable(model.proto)
        known: dict[str, np.ndarray] = {}

        def value(name: str) -> np.ndarray | None:
            if name in known:
                return known[name]
            return constant(index, name)

        opsets = list(model.proto.opset_import)
        doomed = []
        for node in list(graph.node):
            outputs = [name for name in node.output if name]
            if not outputs or any(name in index.outputs for name in outputs):
                continue
            results = None
            if is_op(node, "Constant"):
                result = constant_node_value(node) if len(node.attribute) == 1 else None
                results = None if result is None else [result]
            elif is_op(node, "Shape", "Size"):
                results = _static_shape_value(node, shapes)
                if results is None:
                    results = self._evaluate_if_constant(node, value, opsets, model.proto.ir_version, cap)
            else:
                results = self._evaluate_if_constant(node, value, opsets, model.proto.ir_version, cap)
            if results is None or len(results) != len(node.output):
                continue
            if not is_op(node, "Constant") and any(r is not None and r.size > cap for r in results):
                continue  # (a Constant node already holds its value: converting it adds nothing)
            for name, result in zip(node.output, results):
                if name and result is not None:
                    known[name] = result
                    set_initializer(graph, name, result)
                    created.add(name)
            doomed.append(node)
        if doomed:
            remove_nodes(graph, doomed)
        return bool(doomed)

    def _evaluate_if_constant(self, node, value, opsets, ir_version, cap):
        if node.domain not in ("", "ai.onnx") or node.op_type in KEEP or has_subgraph(node):
            return None
        if node.op_type == "Constant":
            return None
        inputs = {}
        for name in node.input:
            if not name:
                continue
            array = value(name)
            if array is None:
                return None
            inputs[name] = array
        if not inputs:
            return None  # only random ops and Constant have no inputs
        if node.op_type == "Dropout":
            mode = inputs.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(False)
            if mode.size != 1 or bool(mode.reshape(())):
                return None
        return evaluate_node(node, inputs, opsets, ir_version, cap)


def _static_shape_value(node, shapes: ShapeTable | None) -> list[np.ndarray] | None:
    """Shape (the selected ``start:end`` part) or Size of a statically shaped input, else None."""
    if shapes is None or len(node.input) != 1 or len(node.output) != 1:
        return None
    shape = shapes.shape(node.input[0])
    if shape is None:
        return None
    if node.op_type == "Size":
        if not all(isinstance(d, int) for d in shape):
            return None
        return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
    attrs = attributes(node)
    rank = len(shape)
    start = int(attrs.get("start", 0))
    end = int(attrs.get("end", rank))
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    part = shape[start:end]
    if not all(isinstance(d, int) for d in part):
        return None
    return [np.array(part, dtype=np.int64)]


def evaluate_node(node: onnx.NodeProto, inputs: dict[str, np.ndarray], opsets, ir_version: int,
                  cap: int) -> list[np.ndarray] | None:
    """Outputs of ``node`` on constant ``inputs`` (ONNX Runtime, else onnx.reference), or None
    when it cannot be evaluated, an output would exceed ``cap`` elements, or a result's dtype or
    shape disagrees with ONNX shape inference. Absent optional outputs are returned as None."""
    initializers = [to_tensor(a, name) for name, a in inputs.items()]
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
    graph = helper.make_graph([node], "fold", [], outputs, initializers)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(max(ir_version, 8), 10)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception:
        return None
    expected = {}
    for value in inferred.graph.output:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            return None  # a sequence, optional or map: not an initializer
        dims = None
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            dims = tuple(int(d.dim_value) for d in tensor.shape.dim)
            if int(np.prod(dims, dtype=np.int64)) > cap:
                return None
        expected[value.name] = (elem_dtype(tensor.elem_type), dims)
    results = _run_ort(model) or _run_reference(model)
    if results is None or len(results) != len(outputs):
        return None
    full: list[np.ndarray | None] = []
    produced = iter(results)
    for name in node.output:
        if not name:
            full.append(None)
            continue
        result = next(produced)
        if not isinstance(result, np.ndarray):
            return None
        want_dtype, want_dims = expected.get(name, (None, None))
        if want_dtype is not None and result.dtype != want_dtype:
            return None
        if want_dims is not None and tuple(result.shape) != want_dims:
            return None
        full.append(result)
    return full


def _run_ort(model: onnx.ModelProto) -> list[np.ndarray] | None:
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [np.asarray(r) if isinstance(r, np.ndarray) else r for r in session.run(None, {})]
    except Exception:
        return None


def _run_reference(model: onnx.ModelProto) -> list[np.ndarray] | None:
    try:
        from onnx.reference import ReferenceEvaluator

        return [np.asarray(r) if isinstance(r, (np.ndarray, np.generic)) else r
                for r in ReferenceEvaluator(model).run(None, {})]
    except Exception:
        return None
