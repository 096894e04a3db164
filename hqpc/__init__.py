"""hqpc: a compiler for edge inference on ONNX models.

Public API: :func:`hqpc.compile` (mirrors the CLI) and :func:`hqpc.gradients` (reverse-mode
gradients of an ONNX model's loss, computed by ONNX Runtime on a generated backward graph).
"""
__version__ = "0.1.0"

from hqpc.api import compile  # noqa: E402  (shadows the builtin only inside this namespace)
from hqpc.passes.gradients import gradients  # noqa: E402

__all__ = ["compile", "gradients", "__version__"]
