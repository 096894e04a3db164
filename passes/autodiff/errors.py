"""Errors raised by the autodiff graph builder."""
from __future__ import annotations

from onnx import NodeProto


class GradientError(ValueError):
    """The gradient graph cannot be built (unsupported op, bad ``wrt``, ...).

    Raised while the gradient graph is being planned, i.e. before anything is
    executed, so callers can rely on getting it without having run the model.
    """


def node_label(node: NodeProto) -> str:
    """A human-readable name for ``node`` (falls back to its first output)."""
    if node.name:
        return node.name
    out = node.output[0] if len(node.output) else "?"
    return f"<unnamed {node.op_type} -> {out}>"


def no_rule(node: NodeProto) -> GradientError:
    """The standard error for a node whose op has no VJP rule."""
    return GradientError(
        f"no gradient rule for node '{node_label(node)}' (op {node.op_type})"
    )


def unsupported(node: NodeProto, why: str) -> GradientError:
    """A rule exists for the op but not for this node's configuration."""
    return GradientError(
        f"cannot differentiate node '{node_label(node)}' (op {node.op_type}): {why}"
    )
