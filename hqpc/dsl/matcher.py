"""Pattern matching of a checked rule on an ``onnx.GraphProto`` (via hqpc.graphutil.GraphIndex).

The last pattern node is the *anchor*: every node of its op type is a candidate. The other
pattern nodes are reached through shared tensor names (producer lookups are deterministic,
consumer lookups branch), in the order the checker computed. Binary commutative ops (Add, Mul,
Max, Min, Sum, And, Or, Xor, Equal) also match with their two inputs swapped. Node guards run
as soon as the names they read are bound; rule-level ``where``/``let`` run after the whole
pattern matched. Every rejected candidate is reported to a :class:`~hqpc.dsl.trace.Tracer`
with how far it got, so the trace can show the closest partial match.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import onnx

from hqpc.dsl import ast as A
from hqpc.dsl.checker import RuleInfo
from hqpc.dsl.errors import EvalError
from hqpc.dsl.evaluator import Evaluator, GraphView, Scope, binary, explain_false, short, truth
from hqpc.dsl.printer import format_expr
from hqpc.dsl.schema import op_info
from hqpc.graphutil import attributes
from hqpc.ir import WORKING_OPSET

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal", "Mean"}
MAX_ALTERNATIVES = 256


@dataclass
class MatchState:
    scope: Scope
    nodes: dict[int, onnx.NodeProto] = field(default_factory=dict)
    used: frozenset = frozenset()
    progress: int = 0

    def fork(self) -> "MatchState":
        return MatchState(self.scope.copy(), dict(self.nodes), self.used, self.progress)


class _Reject(Exception):
    def __init__(self, reason: str, pos=None):
        super().__init__(reason)
        self.reason = reason
        self.pos = pos


class Matcher:
    def __init__(self, info: RuleInfo, opset: int | None = None):
        self.info = info
        self.rule = info.rule
        self.patterns = self.rule.match.patterns
        self.order = info.order
        self.anchor_op = self.patterns[-1].op
        self.opset = opset
        # guards scheduled after the order step that binds the last name they read
        bound: set[str] = set()
        self.guards_at: dict[int, list[tuple[int, A.Expr]]] = {}
        pending = [((pi, gi), g) for pi, p in enumerate(self.patterns) for gi, g in enumerate(p.guards)]
        for k, (pi, _, _) in enumerate(self.order):
            bound |= self._binds(self.patterns[pi])
            ready = [(key, g) for key, g in pending if info.guard_names.get(key, set()) <= bound]
            self.guards_at[k] = [(key[0], g) for key, g in ready]
            pending = [(key, g) for key, g in pending if (key, g) not in ready]
        if pending:  # names never bound (checker reports); run them at the end
            self.guards_at.setdefault(len(self.order) - 1, []).extend((key[0], g) for key, g in pending)

    @staticmethod
    def _binds(p: A.Pattern) -> set[str]:
        names = {o.name for o in p.outputs} | {a.name for a in p.args}
        for attr in p.attrs:
            if isinstance(attr, A.AttrBind):
                names.add(attr.name)
            elif isinstance(attr, A.AttrAll):
                names.add(attr.name)
        return names

    # ---------------------------------------------------------------- public
    def find(self, view: GraphView, anchor: onnx.NodeProto, tracer=None) -> Iterator[MatchState]:
        """Every complete match (pattern, guards, wheres and lets) anchored at ``anchor``."""
        self.view = view
        self.tracer = tracer
        self.anchor = anchor
        self._budget = MAX_ALTERNATIVES
        start = MatchState(Scope())
        for state in self._search(0, start):
            final = self._checks(state)
            if final is not None:
                yield final

    # ---------------------------------------------------------------- search
    def _fail(self, state: MatchState, reason: str, pos=None) -> None:
        if self.tracer is not None:
            self.tracer.reject(self.rule, self.anchor, state, reason, pos, self.patterns)

    def _search(self, k: int, state: MatchState) -> Iterator[MatchState]:
        if k == len(self.order):
            yield state
            return
        self._budget -= 1
        if self._budget < 0:
            return
        pi, how, via = self.order[k]
        p = self.patterns[pi]
        if how == "anchor":
            candidates = [self.anchor]
        elif how == "producer":
            tensor = state.scope.tensors.get(via)
            if not tensor or isinstance(tensor, list):
                self._fail(state, f"'{via}' is absent, so no {p.op} node produces it", p.pos)
                return
            node = self.view.index.producer.get(tensor)
            if node is None:
                what = "a graph input" if tensor in self.view.index.inputs else (
                    "an initializer" if tensor in self.view.index.initializers else "not produced by any node")
                self._fail(state, f"'{via}' ({tensor}) is {what}, not the output of a {p.op} node", p.pos)
                return
            if node.op_type != p.op or node.domain not in ("", "ai.onnx"):
                self._fail(state, f"'{via}' ({tensor}) is produced by {node.op_type} '{node.name}', not {p.op}",
                           p.pos)
                return
            candidates = [node]
        else:
            tensor = state.scope.tensors.get(via)
            if not tensor or isinstance(tensor, list):
                self._fail(state, f"'{via}' is absent, so no {p.op} node reads it", p.pos)
                return
            candidates = [n for n in self.view.index.consumers.get(tensor, ())
                          if n.op_type == p.op and n.domain in ("", "ai.onnx")]
            if not candidates:
                readers = sorted({n.op_type for n in self.view.index.consumers.get(tensor, ())})
                self._fail(state, f"no {p.op} node reads '{via}' ({tensor}); its readers: "
                                  f"{', '.join(readers) or 'none'}", p.pos)
                return
        for node in candidates:
            if id(node) in state.used:
                self._fail(state, f"{node.op_type} '{node.name}' is already matched by another pattern node", p.pos)
                continue
            for matched in self._node(pi, p, node, state):
                after = self._guards(k, matched)
                if after is not None:
                    yield from self._search(k + 1, after)

    def _node(self, pi: int, p: A.Pattern, node: onnx.NodeProto, state: MatchState) -> Iterator[MatchState]:
        if node.op_type != p.op or node.domain not in ("", "ai.onnx"):
            self._fail(state, f"{node.op_type} '{node.name}' is not a {p.op}", p.pos)
            return
        base = state.fork()
        try:
            self._outputs(p, node, base)
        except _Reject as r:
            self._fail(state, r.reason, r.pos or p.pos)
            return
        orders = [None]
        if p.op in COMMUTATIVE and len(p.args) == 2 and not any(a.variadic for a in p.args):
            orders = [(0, 1), (1, 0)]
        node_attrs = attributes(node)
        for perm in orders:
            trial = base.fork()
            try:
                self._inputs(p, node, trial, perm)
                self._attributes(p, node, node_attrs, trial)
            except _Reject as r:
                self._fail(trial, r.reason, r.pos or p.pos)
                continue
            except EvalError as exc:
                self._fail(trial, f"{p.op} '{node.name}': {exc}", p.pos)
                continue
            trial.nodes[pi] = node
            trial.used = trial.used | {id(node)}
            trial.progress += 10
            yield trial

    def _bind(self, state: MatchState, name: str, value, pos, what: str) -> None:
        if name == "_":
            return
        if name in state.scope.tensors:
            if state.scope.tensors[name] != value:
                raise _Reject(f"'{name}' is {_tname(state.scope.tensors[name])} but {what} is {_tname(value)}", pos)
            return
        state.scope.tensors[name] = value

    def _outputs(self, p: A.Pattern, node: onnx.NodeProto, state: MatchState) -> None:
        for oi, out in enumerate(p.outputs):
            tensor = node.output[oi] if oi < len(node.output) and node.output[oi] else None
            if tensor is None and not out.optional:
                raise _Reject(f"{node.op_type} '{node.name}' has no output {oi}", out.pos)
            self._bind(state, out.name, tensor, out.pos, f"output {oi} of {node.op_type} '{node.name}'")

    def _inputs(self, p: A.Pattern, node: onnx.NodeProto, state: MatchState, perm) -> None:
        inputs = list(node.input)
        count = len(p.args)
        for ai, arg in enumerate(p.args):
            if arg.variadic:
                rest = [t for t in inputs[ai:] if t]
                for t in rest:
                    self._kinds(arg, t, node)
                if arg.name != "_":
                    state.scope.tensors[arg.name] = rest
                return
            index = perm[ai] if perm else ai
            tensor = inputs[index] if index < len(inputs) and inputs[index] else None
            if tensor is None:
                if not arg.optional:
                    raise _Reject(f"{node.op_type} '{node.name}' has no input {index} ('{arg.name}')", arg.pos)
            else:
                self._kinds(arg, tensor, node)
            self._bind(state, arg.name, tensor, arg.pos, f"input {index} of {node.op_type} '{node.name}'")
        extra = [i for i in range(count, len(inputs)) if inputs[i]]
        if extra:
            schema = op_info(node.op_type, self.opset or WORKING_OPSET) or op_info(node.op_type)
            formal = schema.formal_input(extra[0]) if schema else None
            label = f"input '{formal.name}'" if formal else f"input {extra[0]}"
            raise _Reject(f"{node.op_type} '{node.name}' has {label}, which the pattern does not list "
                          f"(add an optional input like 'b?' to accept it)", p.pos)

    def _kinds(self, arg: A.PatArg, tensor: str, node: onnx.NodeProto) -> None:
        for kind in arg.kinds:
            if kind in ("const", "scalar"):
                value = self.view.constant(tensor)
                if value is None:
                    producer = self.view.index.producer.get(tensor)
                    src = f"produced by {producer.op_type} '{producer.name}'" if producer is not None else (
                        "a graph input" if tensor in self.view.index.inputs else "not constant")
                    raise _Reject(f"'{arg.name}' ({tensor}) of {node.op_type} '{node.name}' is not constant "
                                  f"({src})", arg.pos)
                if kind == "scalar" and value.size != 1:
                    raise _Reject(f"'{arg.name}' ({tensor}) is not a scalar (shape {list(value.shape)})", arg.pos)
            elif kind == "input" and tensor not in self.view.index.inputs:
                raise _Reject(f"'{arg.name}' ({tensor}) is not a graph input", arg.pos)

    def _attributes(self, p: A.Pattern, node: onnx.NodeProto, node_attrs: dict, state: MatchState) -> None:
        schema = op_info(node.op_type, self.opset or WORKING_OPSET) or op_info(node.op_type)
        for attr in p.attrs:
            if isinstance(attr, A.AttrAll):
                state.scope.bags[attr.name] = node
                continue
            if attr.attr in node_attrs:
                value = node_attrs[attr.attr]
            elif isinstance(attr, A.AttrBind) and attr.default is not None:
                value = Evaluator(self.view, Scope()).eval(attr.default)
            elif schema is not None and attr.attr in schema.attributes and schema.attributes[attr.attr][1] is not None:
                value = schema.attributes[attr.attr][1]
            else:
                raise _Reject(f"{node.op_type} '{node.name}' has no attribute '{attr.attr}' and it has no default",
                              attr.pos)
            if isinstance(attr, A.AttrBind):
                state.scope.values[attr.name] = value
            else:
                expected = Evaluator(self.view, state.scope).eval(attr.value)
                if not truth(binary(attr.op, value, expected)):
                    raise _Reject(f"{node.op_type} '{node.name}': attribute {attr.attr} is {short(value)}, "
                                  f"the pattern needs {attr.attr} {attr.op} {format_expr(attr.value)}", attr.pos)
                state.progress += 1

    def _guards(self, k: int, state: MatchState) -> MatchState | None:
        for pi, guard in self.guards_at.get(k, ()):
            evaluator = Evaluator(self.view, state.scope)
            try:
                ok = evaluator.condition(guard)
            except EvalError as exc:
                self._fail(state, f"guard 'where {format_expr(guard)}' could not be evaluated: {exc}", guard.pos)
                return None
            if not ok:
                self._fail(state, f"guard failed: where {explain_false(evaluator, guard)}", guard.pos)
                return None
            state.progress += 1
        return state

    def _checks(self, state: MatchState) -> MatchState | None:
        """Rule-level where/let, in order (lets extend the scope)."""
        state = state.fork()
        state.progress += 5
        for item in self.rule.items:
            if isinstance(item, A.Where):
                evaluator = Evaluator(self.view, state.scope)
                try:
                    ok = evaluator.condition(item.cond)
                except EvalError as exc:
                    self._fail(state, f"'where {format_expr(item.cond)}' could not be evaluated: {exc}", item.pos)
                    return None
                if not ok:
                    self._fail(state, f"guard failed: where {explain_false(evaluator, item.cond)}", item.pos)
                    return None
                state.progress += 1
            elif isinstance(item, A.Let):
                try:
                    state.scope.values[item.name] = Evaluator(self.view, state.scope).eval(item.value)
                except EvalError as exc:
                    self._fail(state, f"'let {item.name}' failed: {exc}", item.pos)
                    return None
                state.progress += 1
        return state


def _tname(value) -> str:
    if value is None:
        return "absent"
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return f"'{value}'"
