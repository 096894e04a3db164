"""hqpc: a compiler for edge inference on ONNX models.

Public API: :func:`hqpc.compile` (mirrors the CLI).
"""
__version__ = "0.1.0"

from hqpc.api import compile  # noqa: E402  (re-export; shadows the builtin only inside this package namespace)

__all__ = ["compile", "__version__"]
