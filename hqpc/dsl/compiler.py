"""Rules → passes. Each rule becomes a :class:`~hqpc.passmanager.Pass` subclass named after the
rule, with its opt level, targets and tolerance, so the pass manager, the numeric guard and the
golden tests treat rules and Python passes alike.

A rule pass applies its rewrite to a fixed point: find the first match (anchors in graph
order), rewrite, re-index, repeat, until nothing matches. A rule that keeps matching its own
output (no fixed point within ``max_rewrites``, default ``10 * nodes + 100``) raises, and the
pass manager rolls the pass back and reports it.
"""
from __future__ import annotations

import re
from pathlib import Path

from hqpc.dsl import ast as A
from hqpc.dsl.checker import RuleInfo, load_rules
from hqpc.dsl.errors import EvalError
from hqpc.dsl.evaluator import GraphView
from hqpc.dsl.matcher import Matcher
from hqpc.dsl.rewrite import Builder, RewriteError, apply
from hqpc.dsl.trace import Tracer
from hqpc.graphutil import NameGenerator
from hqpc.ir import WORKING_OPSET, Model, infer_shapes
from hqpc.passmanager import Pass, PassContext, PassInfo
from hqpc.runtime.compare import EXACT, Tolerance


class NoFixedPoint(RuntimeError):
    """A rule kept rewriting its own result."""


class RuleEngine:
    """Applies one checked rule to a model until it no longer matches."""

    def __init__(self, info: RuleInfo, path: str = "<rules>"):
        self.info = info
        self.rule = info.rule
        self.path = path
        self.matcher = Matcher(info)

    def run(self, model: Model, max_rewrites: int | None = None) -> Tracer:
        rule = self.rule
        tracer = Tracer(rule.name, self.path, self.matcher.anchor_op, len(rule.match.patterns))
        limit = max_rewrites or self.info.max_rewrites or 10 * len(model.proto.graph.node) + 100
        opset = model.opset or WORKING_OPSET
        self.matcher.opset = opset
        while True:
            view = GraphView(model.proto, model.annotations)
            anchors = [n for n in view.graph.node if n.op_type == self.matcher.anchor_op and n.domain in ("", "ai.onnx")]
            tracer.candidates = max(tracer.candidates, len(anchors))
            fired = False
            for anchor in anchors:
                for state in self.matcher.find(view, anchor, tracer):
                    try:
                        namer = NameGenerator(view.graph)
                        rewrite = Builder(rule, self.info.replaced, view, state, namer, opset).build()
                        apply(view.graph, rewrite, view)
                    except (EvalError, RewriteError) as exc:
                        tracer.reject(rule, anchor, _advanced(state), f"replacement failed: {exc}",
                                      rule.replace.pos, rule.match.patterns)
                        continue
                    tracer.fired(anchor.name)
                    fired = True
                    break
                if fired:
                    break
            if not fired:
                return tracer
            if tracer.rewrites >= limit:
                raise NoFixedPoint(f"rule '{rule.name}' did not reach a fixed point after {tracer.rewrites} "
                                   "rewrites (does the replacement match the pattern again?)")


def _advanced(state):
    state = state.fork()
    state.progress += 50
    return state


class RulePass(Pass):
    """Base of every compiled rule. ``rule_info`` and ``source`` are set per rule."""

    rule_info: RuleInfo
    source: str = ""
    rule_text: str = ""
    options = {}

    def __init__(self, **options):
        super().__init__(**options)
        self.last_trace: Tracer | None = None

    def run(self, model: Model, ctx: PassContext) -> bool:
        path = self.source.rsplit(":", 1)[0] if self.source else "<rules>"
        engine = RuleEngine(self.rule_info, path)
        tracer = engine.run(model)
        self.last_trace = tracer
        if _verbose(ctx):
            for line in tracer.lines():
                ctx.log(line)
        if tracer.rewrites:
            refreshed = infer_shapes(model.proto, where=f"after rule '{self.info.name}'")
            if refreshed is not model.proto:
                model.proto = refreshed
        return tracer.rewrites > 0


def _verbose(ctx: PassContext) -> bool:
    """Rule traces go to ``ctx.log`` with -v (``ctx.config["verbosity"] >= 2``) or when
    ``ctx.config["trace_rules"]`` is set."""
    config = ctx.config or {}
    return bool(config.get("trace_rules")) or int(config.get("verbosity", 0) or 0) >= 2


def _class_name(rule_name: str) -> str:
    return "Rule_" + re.sub(r"\W", "_", rule_name)


def compile_rule(info: RuleInfo, path: str = "<rules>", module: str = "hqpc.dsl.user", text: str = "") -> type[Pass]:
    rule = info.rule
    tolerance = None
    if info.atol is not None or info.rtol is not None:
        tolerance = Tolerance(atol=info.atol if info.atol is not None else EXACT.atol,
                              rtol=info.rtol if info.rtol is not None else EXACT.rtol)
    pass_info = PassInfo(name=rule.name, opt_level=info.opt_level, tolerance=tolerance, targets=info.targets,
                         description=rule.doc or f"rule from {Path(path).name}")
    line = rule.pos.line if rule.pos else 0
    attrs = {"info": pass_info, "rule_info": info, "source": f"{path}:{line}", "rule_text": text,
             "__module__": module, "__doc__": rule.doc or f"Rule '{rule.name}' ({path}:{line})."}
    return type(_class_name(rule.name), (RulePass,), attrs)


def compile_text(text: str, path: str = "<string>", module: str = "hqpc.dsl.user") -> list[type[Pass]]:
    """Parse, check and compile every rule of ``text`` (raises RuleError on any error)."""
    rule_file, infos = load_rules(text, path)
    from hqpc.dsl.printer import format_rule

    return [compile_rule(info, path, module, format_rule(info.rule)) for info in infos]


def compile_file(path: str | Path, module: str = "hqpc.dsl.user") -> list[type[Pass]]:
    from hqpc.dsl.parser import parse_file

    rule_file = parse_file(path)
    return compile_text(rule_file.text, str(path), module)
