"""Reverse-mode automatic differentiation of ONNX models as a graph transformation.

* :mod:`.builder`   — graph walk, gradient accumulation, pruning, outputs
* :mod:`.losses`    — cross-entropy / Fisher / scalar loss heads
* :mod:`.rules`     — VJP rules by op family (registry ``RULES``)
* :mod:`.context`   — the emitter shared by builder and rules
* :mod:`.precision` — float32 <-> float64 model conversion
* :mod:`.testing`   — float64 reference execution + finite-difference helpers

The public entry points live in :mod:`hqpc.passes.gradients`.
"""
from .builder import BackwardResult, build_backward, grad_output_name
from .errors import GradientError
from .losses import LOSSES
from .precision import convert_float_type
from .rules import RULES

__all__ = [
    "BackwardResult",
    "GradientError",
    "LOSSES",
    "RULES",
    "build_backward",
    "convert_float_type",
    "grad_output_name",
]
