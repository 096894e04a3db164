"""Vector-Jacobian-product rules, one module per op family.

Each rule is registered in :data:`RULES` (``op_type -> Rule``) with
:func:`register`.  A rule is called as ``fn(ctx, node, dys, needs)`` where

* ``ctx`` is the :class:`~hqpc.passes.autodiff.context.Emitter`,
* ``node`` the forward ``NodeProto``,
* ``dys[i]`` the name of the gradient of the loss w.r.t. ``node.output[i]``
  (``None`` when no gradient flows into that output), and
* ``needs[i]`` tells whether the gradient w.r.t. ``node.input[i]`` is wanted.

It returns a list aligned with ``node.input`` holding gradient tensor names
(or ``None``), each shaped exactly like the corresponding input.  ``inputs``
given to :func:`register` lists the differentiable input slots; the builder
refuses (with :class:`GradientError`) to differentiate through any other slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["RULES", "Rule", "register"]


@dataclass(frozen=True)
class Rule:
    fn: Callable
    inputs: tuple[int, ...] | None  # differentiable input slots (None = all)

    def differentiable(self, slot: int) -> bool:
        return self.inputs is None or slot in self.inputs


RULES: dict[str, Rule] = {}


def register(*op_types: str, inputs: tuple[int, ...] | None = None):
    """Decorator registering ``fn`` as the VJP rule of ``op_types``."""

    def deco(fn):
        for op in op_types:
            RULES[op] = Rule(fn, inputs)
        return fn

    return deco


# Importing the family modules fills the registry.
from . import activations, conv, elementwise, linear, norm, pooling, reduce, shape  # noqa: E402,F401
