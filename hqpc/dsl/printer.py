"""AST → canonical text. ``parse(format_file(parse(t)))`` equals ``parse(t)`` (positions aside)."""
from __future__ import annotations

from hqpc.dsl import ast as A

_PREC = {"or": 1, "and": 2, "not": 3, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "??": 5,
         "+": 6, "-": 6, "*": 7, "/": 7, "%": 7, "@": 7, "neg": 8, "**": 9}
_POSTFIX = 10
_ATOM = 11
_COMPARE = {"==", "!=", "<", "<=", ">", ">="}


def _string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _number(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    return text


def _prec(expr) -> int:
    if isinstance(expr, A.Binary):
        return _PREC[expr.op]
    if isinstance(expr, A.Unary):
        return _PREC["not"] if expr.op == "not" else _PREC["neg"]
    if isinstance(expr, A.Subscript):
        return _POSTFIX
    return _ATOM


def _wrap(expr, minimum: int) -> str:
    text = format_expr(expr)
    return f"({text})" if _prec(expr) < minimum else text


def format_expr(expr) -> str:
    if isinstance(expr, A.Num):
        return _number(expr.value)
    if isinstance(expr, A.Str):
        return _string(expr.value)
    if isinstance(expr, A.Bool):
        return "true" if expr.value else "false"
    if isinstance(expr, A.NoneLit):
        return "none"
    if isinstance(expr, A.Name):
        return expr.id
    if isinstance(expr, A.ListExpr):
        return "[" + ", ".join(format_expr(i) for i in expr.items) + "]"
    if isinstance(expr, A.Unary):
        if expr.op == "not":
            return "not " + _wrap(expr.operand, _PREC["not"])
        return expr.op + _wrap(expr.operand, _PREC["neg"])
    if isinstance(expr, A.Binary):
        p = _PREC[expr.op]
        if expr.op in _COMPARE:
            return f"{_wrap(expr.left, p + 1)} {expr.op} {_wrap(expr.right, p + 1)}"
        if expr.op == "**":
            return f"{_wrap(expr.left, _POSTFIX)} ** {_wrap(expr.right, _PREC['neg'])}"
        return f"{_wrap(expr.left, p)} {expr.op} {_wrap(expr.right, p + 1)}"
    if isinstance(expr, A.Subscript):
        return _wrap(expr.value, _POSTFIX) + "[" + ", ".join(_format_index(i) for i in expr.index) + "]"
    if isinstance(expr, A.Call):
        parts = [("*" + a.name) if isinstance(a, A.Splat) else format_expr(a) for a in expr.args]
        parts += [f"{k.name}={format_expr(k.value)}" for k in expr.kwargs]
        text = f"{expr.func}({', '.join(parts)})"
        if expr.attrs:
            text += " {" + ", ".join(_format_op_attr(a) for a in expr.attrs) + "}"
        return text
    raise TypeError(f"not an expression: {expr!r}")


def _format_index(item) -> str:
    if isinstance(item, A.Slice):
        text = (format_expr(item.lo) if item.lo is not None else "") + ":" + (
            format_expr(item.hi) if item.hi is not None else "")
        if item.step is not None:
            text += ":" + format_expr(item.step)
        return text
    return format_expr(item)


def _format_op_attr(attr) -> str:
    if isinstance(attr, A.AttrSpread):
        return ".." + attr.name
    if isinstance(attr, A.AttrDrop):
        return "-" + attr.name
    return f"{attr.name} = {format_expr(attr.value)}"


def _format_pat_attr(attr) -> str:
    if isinstance(attr, A.AttrAll):
        return ".." + attr.name
    if isinstance(attr, A.AttrBind):
        text = f"{attr.attr} = {attr.name}"
        if attr.default is not None:
            text += f" ?? {format_expr(attr.default)}"
        return text
    return f"{attr.attr} {attr.op} {format_expr(attr.value)}"


def _format_pat_arg(arg: A.PatArg) -> str:
    text = ("*" if arg.variadic else "") + arg.name + ("?" if arg.optional else "")
    if arg.kinds:
        text += ": " + " & ".join(arg.kinds)
    return text


def format_pattern(p: A.Pattern) -> str:
    outs = ", ".join(o.name + ("?" if o.optional else "") for o in p.outputs)
    text = f"{outs} = {p.op}({', '.join(_format_pat_arg(a) for a in p.args)})"
    if p.attrs:
        text += " {" + ", ".join(_format_pat_attr(a) for a in p.attrs) + "}"
    for guard in p.guards:
        text += f"\n      where {format_expr(guard)}"
    return text


def format_rule(rule: A.Rule) -> str:
    head = f"rule {rule.name}"
    if rule.options:
        head += " (" + ", ".join(f"{o.key}={format_expr(o.value)}" for o in rule.options) + ")"
    if rule.doc is not None:
        head += " " + _string(rule.doc)
    lines = [head + " {"]
    for item in rule.items:
        if isinstance(item, A.MatchBlock):
            lines.append("  match {")
            for p in item.patterns:
                lines.append("    " + format_pattern(p))
            lines.append("  }")
        elif isinstance(item, A.Where):
            lines.append(f"  where {format_expr(item.cond)}")
        elif isinstance(item, A.Let):
            lines.append(f"  let {item.name} = {format_expr(item.value)}")
        elif isinstance(item, A.Replace):
            if not item.block:
                a = item.assigns[0]
                lines.append(f"  replace {', '.join(a.targets)} with {format_expr(a.value)}")
            else:
                lines.append("  replace {")
                for a in item.assigns:
                    lines.append(f"    {', '.join(a.targets)} = {format_expr(a.value)}")
                lines.append("  }")
    lines.append("}")
    return "\n".join(lines)


def format_file(rule_file: A.RuleFile) -> str:
    return "\n\n".join(format_rule(r) for r in rule_file.rules) + ("\n" if rule_file.rules else "")
