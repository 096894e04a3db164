"""Static checks of rules, without a model: ONNX schemas, names, arity, kinds of values.

Checked: the op exists in the default ONNX domain (with a suggestion for misspellings),
attributes exist, the number of inputs fits the schema (optional ``x?`` and variadic ``*xs``
only where the schema has them), every name is bound before use and bound once, numeric
expressions only read constant tensors (``: const``), builtins exist and get the arguments they
take, the match is connected, and the replacement replaces an output of a matched node.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hqpc.dsl import ast as A
from hqpc.dsl.builtins import BUILTINS, CONSTANTS
from hqpc.dsl.errors import Diagnostic, RuleCheckError, make_diagnostic
from hqpc.dsl.schema import OpInfo, all_ops, op_info, suggest, suggest_op
from hqpc.ir import WORKING_OPSET

KINDS = ("const", "scalar", "input")
RULE_OPTIONS = ("opt", "targets", "atol", "rtol", "max_rewrites")


@dataclass
class Symbol:
    kind: str  # 'tensor' | 'list' | 'value' | 'bag' | 'local'
    pos: A.Pos | None = None
    const: bool = False
    optional: bool = False
    produced: bool = False  # output of a matched node
    stmt: int | None = None
    op: str | None = None


@dataclass
class RuleInfo:
    """What the compiler needs besides the AST."""

    rule: A.Rule
    symbols: dict[str, Symbol]
    order: list[tuple[int, str, str | None]]  # (pattern index, 'anchor'|'producer'|'consumer', via name)
    guard_names: dict[tuple[int, int], set[str]] = field(default_factory=dict)
    opt_level: int = 1
    targets: tuple[str, ...] | None = None
    atol: float | None = None
    rtol: float | None = None
    max_rewrites: int | None = None
    replaced: tuple[str, ...] = ()


def _known_targets() -> list[str]:
    try:
        from hqpc.target import known_targets

        return known_targets()
    except Exception:
        return []


class _RuleChecker:
    def __init__(self, rule: A.Rule, path: str, text: str, opset: int):
        self.rule = rule
        self.path = path
        self.text = text
        self.opset = opset
        self.diags: list[Diagnostic] = []
        self.symbols: dict[str, Symbol] = {}
        self.in_replace = False

    # ---------------------------------------------------------------- reporting
    def error(self, pos, message: str) -> None:
        self.diags.append(make_diagnostic(self.path, self.text, pos or self.rule.pos, message))

    def warn(self, pos, message: str) -> None:
        self.diags.append(make_diagnostic(self.path, self.text, pos or self.rule.pos, message, "warning"))

    # ---------------------------------------------------------------- driver
    def run(self) -> RuleInfo | None:
        rule = self.rule
        info = RuleInfo(rule, self.symbols, [])
        self._options(info)
        matches = [i for i in rule.items if isinstance(i, A.MatchBlock)]
        replaces = [i for i in rule.items if isinstance(i, A.Replace)]
        if not matches:
            self.error(rule.pos, f"rule '{rule.name}' has no 'match {{ ... }}' block")
            return None
        if len(matches) > 1:
            self.error(matches[1].pos, "a rule has one 'match' block; put every pattern node in it")
        if rule.items[0] is not matches[0]:
            self.error(rule.items[0].pos, "'match { ... }' must come first in a rule")
        if not replaces:
            self.error(rule.pos, f"rule '{rule.name}' has no 'replace' (write: replace OUT with NEW)")
        elif len(replaces) > 1:
            self.error(replaces[1].pos, "a rule has one 'replace'; use 'replace { a = ... b = ... }' for several")
        elif rule.items[-1] is not replaces[0]:
            self.error(rule.items[-1].pos, "'replace' must be the last item of a rule")
        match = matches[0]
        if not match.patterns:
            self.error(match.pos, "the 'match' block is empty")
            return None
        self._patterns(match.patterns)
        info.order = self._order(match.patterns)
        for pi, p in enumerate(match.patterns):
            for gi, guard in enumerate(p.guards):
                self._expr(guard, "value")
                info.guard_names[(pi, gi)] = {n.id for n in A.names_in(guard) if n.id in self.symbols}
        for item in rule.items:
            if isinstance(item, A.Where):
                self._expr(item.cond, "value")
            elif isinstance(item, A.Let):
                if item.name in self.symbols:
                    self.error(item.pos, f"'let {item.name}' rebinds a name already bound in this rule")
                self._expr(item.value, "value")
                self.symbols[item.name] = Symbol("value", item.pos)
            elif isinstance(item, A.Replace) and item is (replaces[0] if replaces else None):
                info.replaced = self._replace(item)
        return info

    # ---------------------------------------------------------------- options
    def _options(self, info: RuleInfo) -> None:
        seen = set()
        for opt in self.rule.options:
            if opt.key in seen:
                self.error(opt.pos, f"rule option '{opt.key}' given twice")
            seen.add(opt.key)
            if opt.key not in RULE_OPTIONS:
                close = suggest(opt.key, RULE_OPTIONS)
                hint = f"; did you mean '{close}'?" if close else ""
                self.error(opt.pos, f"unknown rule option '{opt.key}'{hint} (options: {', '.join(RULE_OPTIONS)})")
                continue
            value = opt.value
            if opt.key in ("opt", "max_rewrites"):
                if not (isinstance(value, A.Num) and isinstance(value.value, int)):
                    self.error(opt.pos, f"rule option '{opt.key}' must be an integer")
                elif opt.key == "opt" and not 0 <= value.value <= 3:
                    self.error(opt.pos, "rule option 'opt' must be 0, 1, 2 or 3")
                elif opt.key == "opt":
                    info.opt_level = value.value
                else:
                    info.max_rewrites = value.value
            elif opt.key in ("atol", "rtol"):
                if not isinstance(value, A.Num) or value.value < 0:
                    self.error(opt.pos, f"rule option '{opt.key}' must be a non-negative number")
                else:
                    setattr(info, opt.key, float(value.value))
            elif opt.key == "targets":
                items = value.items if isinstance(value, A.ListExpr) else (value,)
                names = []
                for item in items:
                    if isinstance(item, (A.Name, A.Str)):
                        names.append(item.id if isinstance(item, A.Name) else item.value)
                    else:
                        self.error(opt.pos, "rule option 'targets' is a list of target names, e.g. [cpu, orin]")
                        names = None
                        break
                if names is not None:
                    known = _known_targets()
                    for name in names:
                        if known and name not in known:
                            close = suggest(name, known)
                            hint = f"; did you mean '{close}'?" if close else ""
                            self.error(opt.pos, f"unknown target '{name}'{hint} (targets: {', '.join(known)})")
                    info.targets = tuple(names)

    # ---------------------------------------------------------------- patterns
    def _op(self, op: str, pos, where: str) -> OpInfo | None:
        info = op_info(op, self.opset)
        if info is not None:
            return info
        close = suggest_op(op)
        hint = f"; did you mean '{close}'?" if close else ""
        self.error(pos, f"unknown ONNX op '{op}'{hint}")
        return None

    def _bind(self, name: str, symbol: Symbol) -> None:
        if name == "_":
            return
        self.symbols[name] = symbol

    def _patterns(self, patterns) -> None:
        produced: dict[str, int] = {}
        for pi, p in enumerate(patterns):
            for out in p.outputs:
                if out.name == "_":
                    continue
                if out.name in produced:
                    self.error(out.pos, f"'{out.name}' is produced by two pattern nodes")
                produced[out.name] = pi
        for pi, p in enumerate(patterns):
            schema = self._op(p.op, p.op_pos or p.pos, "match")
            outs = set()
            for oi, out in enumerate(p.outputs):
                if schema is not None:
                    formal = schema.formal_output(oi)
                    if formal is None:
                        self.error(out.pos, f"{p.op} has {schema.max_outputs} output(s); "
                                            f"the pattern names {len(p.outputs)}")
                    elif out.optional and formal.option == "single":
                        self.error(out.pos, f"output '{formal.name}' of {p.op} is always present; remove '?'")
                if out.name != "_":
                    outs.add(out.name)
                    self._bind(out.name, Symbol("tensor", out.pos, optional=out.optional, produced=True, stmt=pi))
            self._pattern_args(p, schema, outs, produced, pi)
            self._pattern_attrs(p, schema)

    def _pattern_args(self, p: A.Pattern, schema: OpInfo | None, outs: set, produced: dict, pi: int) -> None:
        for ai, arg in enumerate(p.args):
            if arg.variadic and ai != len(p.args) - 1:
                self.error(arg.pos, f"'*{arg.name}' must be the last input of the pattern node")
            for kind in arg.kinds:
                if kind not in KINDS:
                    close = suggest(kind, KINDS)
                    hint = f"; did you mean '{close}'?" if close else ""
                    self.error(arg.pos, f"unknown input constraint '{kind}'{hint} (constraints: {', '.join(KINDS)})")
            if arg.name in outs:
                self.error(arg.pos, f"'{arg.name}' is both an input and an output of the same {p.op} node")
            if schema is not None:
                formal = schema.formal_input(ai)
                if formal is None:
                    self.error(arg.pos, f"{p.op} takes at most {schema.max_inputs} input(s) "
                                        f"({schema.input_names()}), the pattern gives {len(p.args)}")
                elif arg.optional and formal.option == "single":
                    self.error(arg.pos, f"input '{formal.name}' of {p.op} is required; remove '?' from '{arg.name}'")
                elif arg.variadic and formal.option != "variadic":
                    self.error(arg.pos, f"'*{arg.name}' needs a variadic input, but input '{formal.name}' "
                                        f"of {p.op} is not variadic")
            if arg.name == "_":
                continue
            const = any(k in ("const", "scalar") for k in arg.kinds)
            existing = self.symbols.get(arg.name)
            if existing is not None:
                if existing.kind not in ("tensor", "list") or (existing.kind == "list") != arg.variadic:
                    self.error(arg.pos, f"'{arg.name}' is already bound to something else")
                existing.const = existing.const or const
                continue
            if arg.name in produced and arg.variadic:
                self.error(arg.pos, f"'*{arg.name}' cannot name the output of a pattern node")
            self._bind(arg.name, Symbol("list" if arg.variadic else "tensor", arg.pos, const=const,
                                        optional=arg.optional, produced=arg.name in produced,
                                        stmt=produced.get(arg.name, pi)))
        if schema is not None and len(p.args) < schema.min_inputs and not (p.args and p.args[-1].variadic):
            required = [f.name for f in schema.inputs if f.option != "optional"]
            self.error(p.pos, f"{p.op} needs at least {schema.min_inputs} input(s) ({', '.join(required)}), "
                              f"the pattern gives {len(p.args)}")

    def _attr_name(self, attr: str, schema: OpInfo | None, op: str, pos) -> bool:
        if schema is None or attr in schema.attributes:
            return True
        known = sorted(schema.attributes)
        close = suggest(attr, known)
        hint = f"; did you mean '{close}'?" if close else ""
        listing = f" (attributes: {', '.join(known)})" if known else " (it has no attributes)"
        self.error(pos, f"{op} has no attribute '{attr}'{hint}{listing}")
        return False

    def _pattern_attrs(self, p: A.Pattern, schema: OpInfo | None) -> None:
        seen_attrs = set()
        for attr in p.attrs:
            if isinstance(attr, A.AttrAll):
                if attr.name in self.symbols:
                    self.error(attr.pos, f"'{attr.name}' is already bound")
                self._bind(attr.name, Symbol("bag", attr.pos, op=p.op))
                continue
            if attr.attr in seen_attrs:
                self.warn(attr.pos, f"attribute '{attr.attr}' appears twice in the pattern")
            seen_attrs.add(attr.attr)
            self._attr_name(attr.attr, schema, p.op, attr.pos)
            if isinstance(attr, A.AttrBind):
                if attr.default is not None:
                    self._expr(attr.default, "value", allow=set())
                if attr.name in self.symbols:
                    self.error(attr.pos, f"'{attr.name}' is already bound")
                self._bind(attr.name, Symbol("value", attr.pos))
            else:
                self._expr(attr.value, "value")

    def _order(self, patterns) -> list[tuple[int, str, str | None]]:
        """Match order: the last pattern node is the anchor; then follow shared tensor names."""
        n = len(patterns)
        order = [(n - 1, "anchor", None)]
        done = {n - 1}
        bound = set(self._names_of(patterns[n - 1]))
        while len(done) < n:
            step = None
            for pi in reversed(range(n)):
                if pi in done:
                    continue
                outs = [o.name for o in patterns[pi].outputs if o.name != "_"]
                link = next((name for name in outs if name in bound), None)
                if link is not None:
                    step = (pi, "producer", link)
                    break
            if step is None:
                for pi in reversed(range(n)):
                    if pi in done:
                        continue
                    link = next((a.name for a in patterns[pi].args
                                 if a.name != "_" and not a.variadic and a.name in bound), None)
                    if link is not None:
                        step = (pi, "consumer", link)
                        break
            if step is None:
                pi = next(i for i in reversed(range(n)) if i not in done)
                self.error(patterns[pi].pos, f"pattern node '{patterns[pi].op}' is not connected to the rest of "
                                             "the match (patterns must share tensor names)")
                return order
            order.append(step)
            done.add(step[0])
            bound |= set(self._names_of(patterns[step[0]]))
        return order

    @staticmethod
    def _names_of(p: A.Pattern):
        for o in p.outputs:
            if o.name != "_":
                yield o.name
        for a in p.args:
            if a.name != "_" and not a.variadic:
                yield a.name

    # ---------------------------------------------------------------- replacement
    def _replace(self, item: A.Replace) -> tuple[str, ...]:
        self.in_replace = True
        replaced: list[str] = []
        for assign in item.assigns:
            value = assign.value
            if len(assign.targets) > 1 and not (isinstance(value, A.Call) and self._is_op(value.func)):
                self.error(assign.pos, "several targets need an ONNX op with as many outputs")
            if isinstance(value, A.Call) and self._is_op(value.func):
                schema = self._op_call(value)
                if schema is not None and schema.max_outputs is not None and len(assign.targets) > schema.max_outputs:
                    self.error(assign.pos, f"{value.func} has {schema.max_outputs} output(s), "
                                           f"{len(assign.targets)} targets given")
            elif isinstance(value, A.Name) and self._tensorish(value.id):
                self._expr(value, "tensor")
            else:
                self._expr(value, "tensor")
            for target in assign.targets:
                sym = self.symbols.get(target)
                if target == "_":
                    continue
                if sym is None:
                    self.symbols[target] = Symbol("local", assign.pos)
                elif sym.kind == "tensor" and sym.produced:
                    if target in replaced:
                        self.error(assign.pos, f"'{target}' is replaced twice")
                    replaced.append(target)
                elif sym.kind == "tensor":
                    self.error(assign.pos, f"'{target}' is an input of the match; only outputs of matched "
                                           "nodes can be replaced")
                elif sym.kind == "local":
                    self.error(assign.pos, f"'{target}' is assigned twice in the replacement")
                else:
                    self.error(assign.pos, f"'{target}' is bound to a value, not a tensor of the match")
        if not replaced and self.diags_ok():
            outs = [n for n, s in self.symbols.items() if s.kind == "tensor" and s.produced]
            self.error(item.pos, "the replacement replaces no output of the match; assign to one of: "
                       + ", ".join(outs))
        self.in_replace = False
        return tuple(replaced)

    def diags_ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diags)

    def _tensorish(self, name: str) -> bool:
        sym = self.symbols.get(name)
        return sym is not None and sym.kind in ("tensor", "local")

    @staticmethod
    def _is_op(func: str) -> bool:
        return func not in BUILTINS and func[:1].isupper()

    def _op_call(self, call: A.Call) -> OpInfo | None:
        schema = self._op(call.func, call.pos, "replace")
        if call.kwargs:
            self.error(call.kwargs[0].pos, f"ONNX ops take attributes in braces, not keyword arguments: "
                                           f"write {call.func}(...) {{{call.kwargs[0].name} = ...}}")
        splat = any(isinstance(a, A.Splat) for a in call.args)
        if schema is not None:
            n = len(call.args)
            if schema.max_inputs is not None and n > schema.max_inputs and not splat:
                self.error(call.pos, f"{call.func} takes at most {schema.max_inputs} input(s) "
                                     f"({schema.input_names()}), got {n}")
            if n < schema.min_inputs and not splat:
                self.error(call.pos, f"{call.func} needs at least {schema.min_inputs} input(s) "
                                     f"({schema.input_names()}), got {n}")
        for arg in call.args:
            if isinstance(arg, A.Splat):
                sym = self.symbols.get(arg.name)
                if sym is None or sym.kind != "list":
                    self.error(arg.pos, f"'*{arg.name}' needs a variadic binding ('*{arg.name}' in the match)")
            else:
                self._expr(arg, "tensor")
        for attr in call.attrs:
            if isinstance(attr, A.AttrSpread):
                sym = self.symbols.get(attr.name)
                if sym is None or sym.kind != "bag":
                    self._unbound(attr.name, attr.pos, hint=f" ('..{attr.name}' copies attributes bound with "
                                                            f"'{{..{attr.name}}}' in the match)")
                elif schema is not None and sym.op != call.func:
                    self.warn(attr.pos, f"'..{attr.name}' copies attributes of a {sym.op} node into {call.func}")
            else:
                self._attr_name(attr.name, schema, call.func, attr.pos)
                if isinstance(attr, A.AttrSet):
                    self._expr(attr.value, "value")
        return schema

    # ---------------------------------------------------------------- expressions
    def _unbound(self, name: str, pos, hint: str = "") -> None:
        candidates = [n for n in self.symbols] + list(CONSTANTS)
        close = suggest(name, candidates)
        extra = f"; did you mean '{close}'?" if close else ""
        self.error(pos, f"name '{name}' is not bound{extra}{hint}")

    def _expr(self, e, ctx: str, allow=None) -> None:
        """ctx: 'value' (constant expression), 'tensor' (replacement input), 'ref' (graph builtin)."""
        if isinstance(e, (A.Num, A.Str, A.Bool, A.NoneLit)):
            return
        if isinstance(e, A.Name):
            self._name(e, ctx, allow)
            return
        if isinstance(e, A.ListExpr):
            for item in e.items:
                self._expr(item, "value", allow)
            return
        if isinstance(e, A.Unary):
            self._expr(e.operand, "value", allow)
            return
        if isinstance(e, A.Binary):
            self._expr(e.left, "value", allow)
            self._expr(e.right, "value", allow)
            return
        if isinstance(e, A.Subscript):
            self._expr(e.value, "value", allow)
            for item in e.index:
                if isinstance(item, A.Slice):
                    for part in (item.lo, item.hi, item.step):
                        if part is not None:
                            self._expr(part, "value", allow)
                else:
                    self._expr(item, "value", allow)
            return
        if isinstance(e, A.Call):
            self._call(e, ctx, allow)
            return
        self.error(getattr(e, "pos", None), f"unexpected {type(e).__name__}")

    def _name(self, e: A.Name, ctx: str, allow) -> None:
        name = e.id
        if name == "_":
            self.error(e.pos, "'_' matches anything and binds nothing; it cannot be read")
            return
        sym = self.symbols.get(name)
        if allow is not None and sym is not None:
            sym = None  # attribute defaults: literals and constants only
        if sym is None:
            if name in CONSTANTS:
                return
            if name in BUILTINS:
                self.error(e.pos, f"'{name}' is a builtin function; call it: {BUILTINS[name].describe()}")
                return
            self._unbound(name, e.pos)
            return
        if sym.kind == "bag":
            self.error(e.pos, f"'{name}' is an attribute set; use it as '{{..{name}}}' in a replacement node")
        elif ctx == "value" and sym.kind == "tensor" and not sym.const:
            hint = (" — for arithmetic on graph tensors use ONNX ops, e.g. Add(x, 1)" if self.in_replace else "")
            self.error(e.pos, f"'{name}' is not declared constant: numeric expressions read constant tensors "
                              f"only (write '{name}: const' in the match; shape({name}), rank({name}) and "
                              f"dtype({name}) work on any tensor){hint}")
        elif ctx == "value" and sym.kind == "list" and not sym.const:
            self.error(e.pos, f"'*{name}' is not declared constant (write '*{name}: const')")
        elif ctx == "value" and sym.kind == "local":
            self.error(e.pos, f"'{name}' is a tensor computed by the replacement, not a constant")

    def _call(self, e: A.Call, ctx: str, allow) -> None:
        builtin = BUILTINS.get(e.func)
        if builtin is None:
            if self._is_op(e.func):
                if ctx == "tensor":
                    self._op_call(e)
                    return
                schema = op_info(e.func, self.opset)
                if schema is None:
                    close = suggest_op(e.func)
                    hint = f"; did you mean '{close}'?" if close else ""
                    self.error(e.pos, f"unknown ONNX op '{e.func}'{hint}")
                else:
                    self.error(e.pos, f"ONNX op '{e.func}' cannot be evaluated here; ops appear in 'match' "
                                      "patterns and in 'replace'")
                return
            close = suggest(e.func, BUILTINS)
            op_close = suggest(e.func, all_ops(), cutoff=0.8) if e.func[:1].islower() else None
            if op_close and op_close.lower() == e.func.lower():
                hint = f"; ONNX ops are capitalized: did you mean '{op_close}'?"
            elif close:
                hint = f"; did you mean '{close}'?"
            else:
                hint = ""
            self.error(e.pos, f"unknown builtin '{e.func}'{hint} (see the builtin table in spec/README.md)")
            return
        if builtin.category == "macro" and not (ctx == "tensor" and self.in_replace):
            self.error(e.pos, f"{e.func}() creates nodes; use it only as an input in 'replace'")
        if e.attrs:
            self.error(e.pos, f"attribute braces only follow ONNX ops, not the builtin '{e.func}'")
        params = builtin.params
        given = set()
        for i, arg in enumerate(e.args):
            if isinstance(arg, A.Splat):
                self.error(arg.pos, "'*name' only splats a variadic binding into an ONNX op's inputs")
                continue
            if i >= len(params):
                if not builtin.variadic:
                    self.error(getattr(arg, "pos", None) or e.pos,
                               f"{e.func}() takes at most {len(params)} argument(s): {builtin.describe()}")
                    break
                self._expr(arg, "value", allow)
                continue
            given.add(params[i].name)
            self._arg(params[i], arg, allow)
        by_name = {p.name: p for p in params}
        for kw in e.kwargs:
            if kw.name not in by_name:
                close = suggest(kw.name, by_name)
                hint = f"; did you mean '{close}'?" if close else ""
                self.error(kw.pos, f"{e.func}() has no argument '{kw.name}'{hint}: {builtin.describe()}")
                continue
            if kw.name in given:
                self.error(kw.pos, f"{e.func}() got argument '{kw.name}' twice")
            given.add(kw.name)
            self._arg(by_name[kw.name], kw.value, allow)
        missing = [p.name for p in params if p.required and p.name not in given]
        if missing:
            self.error(e.pos, f"{e.func}() needs argument '{missing[0]}': {builtin.describe()}")

    def _arg(self, param, arg, allow) -> None:
        if param.kind == "ref":
            if isinstance(arg, A.Name):
                sym = self.symbols.get(arg.id)
                if sym is not None and sym.kind in ("tensor",):
                    return
                if sym is not None and sym.kind == "list":
                    self.error(arg.pos, f"'{arg.id}' is a list of tensors; graph builtins take one tensor")
                    return
                if sym is not None and sym.kind == "local":
                    self.error(arg.pos, f"'{arg.id}' does not exist in the graph yet; graph builtins read "
                                        "tensors of the match")
                    return
            self._expr(arg, "value", allow)
        elif param.kind == "tensor":
            self._expr(arg, "tensor", allow)
        else:
            self._expr(arg, "value", allow)


# --------------------------------------------------------------------------- entry points
def check_rule(rule: A.Rule, path: str = "<string>", text: str = "",
               opset: int = WORKING_OPSET) -> tuple[RuleInfo | None, list[Diagnostic]]:
    checker = _RuleChecker(rule, path, text, opset)
    try:
        info = checker.run()
    except RecursionError:
        checker.error(rule.pos, "expression nested too deeply")
        info = None
    errors = [d for d in checker.diags if d.severity == "error"]
    return (None if errors else info), checker.diags


def check_file(rule_file: A.RuleFile, opset: int = WORKING_OPSET) -> tuple[list[RuleInfo], list[Diagnostic]]:
    """Check every rule; returns the infos of valid rules and all diagnostics (sorted by position)."""
    infos, diags = [], []
    seen: dict[str, A.Rule] = {}
    for rule in rule_file.rules:
        if rule.name in seen:
            diags.append(make_diagnostic(rule_file.path, rule_file.text, rule.pos,
                                         f"rule '{rule.name}' is defined twice (first at line {seen[rule.name].pos.line})"))
            continue
        seen[rule.name] = rule
        info, rule_diags = check_rule(rule, rule_file.path, rule_file.text, opset)
        diags.extend(rule_diags)
        if info is not None:
            infos.append(info)
    diags.sort(key=lambda d: (d.line, d.column))
    return infos, diags


def load_rules(text: str, path: str = "<string>", opset: int = WORKING_OPSET) -> tuple[A.RuleFile, list[RuleInfo]]:
    """Parse and check; raise RuleSyntaxError / RuleCheckError (all diagnostics) on any error."""
    from hqpc.dsl.parser import parse

    rule_file = parse(text, path)
    infos, diags = check_file(rule_file, opset)
    errors = [d for d in diags if d.severity == "error"]
    if errors:
        raise RuleCheckError(errors)
    return rule_file, infos
