"""Abstract syntax of the hqpc rule language (frozen dataclasses carrying source positions).

Positions never take part in equality, so ``parse(print(parse(text))) == parse(text)`` holds
for every valid text (the grammar round-trip property the tests check).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Pos:
    """1-based line and column of the first character, and the end (exclusive column)."""

    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


def _pos():
    return field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Node:
    pos: Pos | None = _pos()


# --------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Num(Node):
    value: int | float


@dataclass(frozen=True)
class Str(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class NoneLit(Node):
    pass


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class Unary(Node):
    op: str  # '-', '+', 'not'
    operand: "Expr"


@dataclass(frozen=True)
class Binary(Node):
    op: str  # + - * / % ** @ ?? and or == != < <= > >=
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class Slice(Node):
    lo: "Expr | None"
    hi: "Expr | None"
    step: "Expr | None"


@dataclass(frozen=True)
class Subscript(Node):
    value: "Expr"
    index: tuple["Expr | Slice", ...]


@dataclass(frozen=True)
class Keyword(Node):
    name: str
    value: "Expr"


@dataclass(frozen=True)
class Splat(Node):
    name: str


@dataclass(frozen=True)
class AttrSpread(Node):
    """``..attrs`` in a replacement: copy every attribute bound by ``{..attrs}`` in the match."""

    name: str


@dataclass(frozen=True)
class AttrSet(Node):
    name: str
    value: "Expr"


@dataclass(frozen=True)
class AttrDrop(Node):
    """``-name`` in a replacement attribute block: leave attribute ``name`` out."""

    name: str


@dataclass(frozen=True)
class Call(Node):
    """``f(args)`` (a builtin) or ``Op(args) {attrs}`` (an ONNX node, in replacements)."""

    func: str
    args: tuple["Expr | Splat", ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    attrs: tuple["AttrSpread | AttrSet | AttrDrop", ...] = ()


Expr = Union[Num, Str, Bool, NoneLit, Name, ListExpr, Unary, Binary, Subscript, Call]


# --------------------------------------------------------------------------- patterns
@dataclass(frozen=True)
class OutName(Node):
    name: str  # '_' ignores the output
    optional: bool = False


@dataclass(frozen=True)
class PatArg(Node):
    name: str  # '_' matches anything without binding
    optional: bool = False
    variadic: bool = False
    kinds: tuple[str, ...] = ()  # 'const', 'scalar', 'input'


@dataclass(frozen=True)
class AttrAll(Node):
    """``{..attrs}``: bind every attribute of the node (to copy into the replacement)."""

    name: str


@dataclass(frozen=True)
class AttrBind(Node):
    """``{epsilon = eps ?? 1e-5}``: bind the attribute's value (default: ``??`` then schema)."""

    attr: str
    name: str
    default: Expr | None = None


@dataclass(frozen=True)
class AttrCmp(Node):
    """``{group == 1}``: the attribute (or its schema default) must compare true."""

    attr: str
    op: str
    value: Expr


@dataclass(frozen=True)
class Pattern(Node):
    outputs: tuple[OutName, ...]
    op: str
    args: tuple[PatArg, ...] = ()
    attrs: tuple["AttrAll | AttrBind | AttrCmp", ...] = ()
    guards: tuple[Expr, ...] = ()
    op_pos: Pos | None = field(default=None, compare=False, repr=False, kw_only=True)


# --------------------------------------------------------------------------- rule items
@dataclass(frozen=True)
class MatchBlock(Node):
    patterns: tuple[Pattern, ...]


@dataclass(frozen=True)
class Where(Node):
    cond: Expr


@dataclass(frozen=True)
class Let(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class Assign(Node):
    targets: tuple[str, ...]
    value: Expr


@dataclass(frozen=True)
class Replace(Node):
    """``replace out with E`` (``block=False``, one assign) or ``replace { a = E ... }``."""

    assigns: tuple[Assign, ...]
    block: bool = False


Item = Union[MatchBlock, Where, Let, Replace]


@dataclass(frozen=True)
class RuleOption(Node):
    key: str
    value: Expr


@dataclass(frozen=True)
class Rule(Node):
    name: str
    options: tuple[RuleOption, ...] = ()
    doc: str | None = None
    items: tuple[Item, ...] = ()

    # ---- convenience views (the checker guarantees one match block and one final replace)
    @property
    def match(self) -> MatchBlock | None:
        return next((i for i in self.items if isinstance(i, MatchBlock)), None)

    @property
    def replace(self) -> Replace | None:
        return next((i for i in self.items if isinstance(i, Replace)), None)

    @property
    def checks(self) -> tuple["Where | Let", ...]:
        return tuple(i for i in self.items if isinstance(i, (Where, Let)))

    def option(self, key: str, default=None):
        for opt in self.options:
            if opt.key == key:
                return opt.value
        return default


@dataclass(frozen=True)
class RuleFile(Node):
    rules: tuple[Rule, ...]
    path: str = field(default="<string>", compare=False)
    text: str = field(default="", compare=False, repr=False)


def walk(node):
    """Yield ``node`` and every AST node below it (depth first, source order)."""
    if node is None:
        return
    if isinstance(node, tuple):
        for item in node:
            yield from walk(item)
        return
    if not isinstance(node, Node):
        return
    yield node
    for name in node.__dataclass_fields__:
        if name == "pos":
            continue
        value = getattr(node, name)
        if isinstance(value, (Node, tuple)):
            yield from walk(value)


def names_in(expr) -> list[Name]:
    """Every :class:`Name` read by an expression (including splats as Names)."""
    out = []
    for node in walk(expr):
        if isinstance(node, Name):
            out.append(node)
        elif isinstance(node, Splat):
            out.append(Name(node.name, pos=node.pos))
    return out
