"""Parser: ``spec/grammar.lark`` (lark, LALR) → :mod:`hqpc.dsl.ast`, with friendly errors.

Errors are :class:`~hqpc.dsl.errors.RuleSyntaxError` carrying ``file:line:col``, what was
expected, and the offending line with a caret. Common mistakes get their own message:
unbalanced brackets, a missing ``with`` after ``replace OUT``, ``=`` used for comparison,
patterns outside ``match { }``, single-quoted strings, ``&&``/``||``/``!``, a missing comma.
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError
from lark.lexer import PatternStr

from hqpc.dsl import ast as A
from hqpc.dsl.errors import Diagnostic, RuleSyntaxError, source_line

KEYWORDS = ("rule", "match", "where", "let", "replace", "with", "and", "or", "not", "true", "false", "none")


def grammar_text() -> str:
    return resources.files("hqpc.spec").joinpath("grammar.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=True, start="start")


def parse(text: str, path: str = "<string>") -> A.RuleFile:
    """Parse rule-language text. Raises RuleSyntaxError (one diagnostic) on any error."""
    if not isinstance(text, str):
        raise TypeError("rule text must be str")
    _check_brackets(text, path)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        raise RuleSyntaxError(_friendly(exc, text, path)) from None
    try:
        rules = _ToAst(text, path).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, RuleSyntaxError):
            raise exc.orig_exc from None
        raise
    return A.RuleFile(tuple(rules), path=path, text=text, pos=A.Pos(1, 1))


def parse_file(path: str | Path) -> A.RuleFile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleSyntaxError(Diagnostic(str(path), 0, 0, "no such rule file")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleSyntaxError(Diagnostic(str(path), 0, 0, f"cannot read rule file ({exc})")) from None
    return parse(text, str(path))


def parse_expr(text: str) -> A.Expr:
    """Parse a single expression (used by tests and the README checker)."""
    rule_file = parse(f"rule _expr {{ let _e = {text} }}")
    return rule_file.rules[0].items[0].value


# --------------------------------------------------------------------------- tree → AST
def _pos(meta) -> A.Pos | None:
    if getattr(meta, "empty", True):
        return None
    return A.Pos(meta.line, meta.column, meta.end_line, meta.end_column)


def _tpos(token) -> A.Pos:
    return A.Pos(token.line, token.column, token.end_line, token.end_column)


def _unescape(raw: str) -> str:
    body = raw[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def _number(text: str) -> int | float:
    if re.fullmatch(r"\d+", text):
        return int(text)
    return float(text)


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, text: str, path: str):
        super().__init__()
        self.text = text
        self.path = path

    # ---- file and rule
    def start(self, meta, children):
        return [c for c in children if c is not None]

    def rule(self, meta, children):
        name, options, doc, *items = children
        return A.Rule(str(name), tuple(options or ()), _unescape(doc) if doc is not None else None,
                      tuple(items), pos=_tpos(name))

    def rule_options(self, meta, children):
        return [c for c in children if c is not None]

    def rule_option(self, meta, children):
        key, value = children
        return A.RuleOption(str(key), value, pos=_tpos(key))

    def where_item(self, meta, children):
        return A.Where(children[0], pos=_pos(meta))

    def let_item(self, meta, children):
        name, value = children
        return A.Let(str(name), value, pos=_tpos(name))

    def replace_with(self, meta, children):
        targets, value = children
        return A.Replace((A.Assign(tuple(str(t) for t in targets), value, pos=_tpos(targets[0])),),
                         block=False, pos=_pos(meta))

    def replace_block(self, meta, children):
        return A.Replace(tuple(children), block=True, pos=_pos(meta))

    def target_list(self, meta, children):
        return list(children)

    def assign(self, meta, children):
        targets, value = children
        return A.Assign(tuple(str(t) for t in targets), value, pos=_tpos(targets[0]))

    # ---- patterns
    def match_block(self, meta, children):
        return A.MatchBlock(tuple(children), pos=_pos(meta))

    def pattern(self, meta, children):
        outputs, op, args, attrs, *guards = children
        return A.Pattern(tuple(outputs), str(op), tuple(args or ()), tuple(attrs or ()), tuple(guards),
                         pos=outputs[0].pos, op_pos=_tpos(op))

    def node_guard(self, meta, children):
        return children[0]

    def out_list(self, meta, children):
        return list(children)

    def out_name(self, meta, children):
        name, opt = children
        return A.OutName(str(name), opt is not None, pos=_tpos(name))

    def pat_args(self, meta, children):
        return [c for c in children if c is not None]

    def pat_arg(self, meta, children):
        name, opt, kinds = children
        return A.PatArg(str(name), opt is not None, False, tuple(kinds or ()), pos=_tpos(name))

    def pat_variadic(self, meta, children):
        name, kinds = children
        return A.PatArg(str(name), False, True, tuple(kinds or ()), pos=_pos(meta))

    def kinds(self, meta, children):
        return [str(c) for c in children]

    def pat_attrs(self, meta, children):
        return [c for c in children if c is not None]

    def attr_all(self, meta, children):
        return A.AttrAll(str(children[0]), pos=_pos(meta))

    def attr_bind(self, meta, children):
        attr, name, default = children
        return A.AttrBind(str(attr), str(name), default, pos=_tpos(attr))

    def attr_cmp(self, meta, children):
        attr, op, value = children
        return A.AttrCmp(str(attr), str(op), value, pos=_tpos(attr))

    # ---- expressions
    def _bin(op):
        def build(self, meta, children):
            left, right = children[0], children[-1]
            return A.Binary(op, left, right, pos=_pos(meta))
        return build

    or_op = _bin("or")
    and_op = _bin("and")
    coalesce_op = _bin("??")
    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    mod = _bin("%")
    matmul = _bin("@")
    pow = _bin("**")
    del _bin

    def compare(self, meta, children):
        left, op, right = children
        return A.Binary(str(op), left, right, pos=_pos(meta))

    def not_op(self, meta, children):
        return A.Unary("not", children[0], pos=_pos(meta))

    def neg(self, meta, children):
        return A.Unary("-", children[0], pos=_pos(meta))

    def pos(self, meta, children):
        return A.Unary("+", children[0], pos=_pos(meta))

    def subscript(self, meta, children):
        value, index = children
        return A.Subscript(value, tuple(index), pos=_pos(meta))

    def subscripts(self, meta, children):
        return list(children)

    def slice(self, meta, children):
        lo, hi, step = children
        return A.Slice(lo, hi, step, pos=_pos(meta))

    def number(self, meta, children):
        return A.Num(_number(str(children[0])), pos=_tpos(children[0]))

    def string(self, meta, children):
        return A.Str(_unescape(str(children[0])), pos=_tpos(children[0]))

    def true(self, meta, children):
        return A.Bool(True, pos=_pos(meta))

    def false(self, meta, children):
        return A.Bool(False, pos=_pos(meta))

    def none(self, meta, children):
        return A.NoneLit(pos=_pos(meta))

    def name(self, meta, children):
        return A.Name(str(children[0]), pos=_tpos(children[0]))

    def list(self, meta, children):
        return A.ListExpr(tuple(c for c in children if c is not None), pos=_pos(meta))

    def call(self, meta, children):
        func, args, attrs = children
        positional, keywords = [], []
        for arg in args or ():
            if isinstance(arg, A.Keyword):
                keywords.append(arg)
            else:
                if keywords:
                    raise RuleSyntaxError(_diag(self.path, self.text, arg.pos,
                                                "positional argument after a keyword argument"))
                positional.append(arg)
        return A.Call(str(func), tuple(positional), tuple(keywords), tuple(attrs or ()), pos=_tpos(func))

    def call_args(self, meta, children):
        return [c for c in children if c is not None]

    def kwarg(self, meta, children):
        name, value = children
        return A.Keyword(str(name), value, pos=_tpos(name))

    def splat(self, meta, children):
        return A.Splat(str(children[0]), pos=_pos(meta))

    def op_attrs(self, meta, children):
        return [c for c in children if c is not None]

    def attr_spread(self, meta, children):
        return A.AttrSpread(str(children[0]), pos=_pos(meta))

    def attr_set(self, meta, children):
        name, value = children
        return A.AttrSet(str(name), value, pos=_tpos(name))

    def attr_drop(self, meta, children):
        return A.AttrDrop(str(children[0]), pos=_pos(meta))


# --------------------------------------------------------------------------- friendly errors
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


def _diag(path: str, text: str, pos, message: str) -> Diagnostic:
    line = getattr(pos, "line", 0) or 0
    column = getattr(pos, "column", 0) or 0
    return Diagnostic(path, line, column, message, source_line(text, line))


def _check_brackets(text: str, path: str) -> None:
    """Unbalanced brackets and unterminated strings, reported where the problem starts."""
    stack: list[tuple[str, int, int]] = []
    suspects: list[tuple[int, int]] = []  # '{' closed by a '}' indented less than the opening line
    lines = text.splitlines()
    indent = lambda number: len(lines[number - 1]) - len(lines[number - 1].lstrip()) if number <= len(lines) else 0  # noqa: E731
    line, col, i, n = 1, 1, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch == '"':
            start = (line, col)
            i += 1
            col += 1
            while i < n and text[i] not in '"\n':
                step = 2 if text[i] == "\\" and i + 1 < n and text[i + 1] != "\n" else 1
                i += step
                col += step
            if i >= n or text[i] == "\n":
                raise RuleSyntaxError(_diag(path, text, A.Pos(*start), "unterminated string (missing closing '\"')"))
        elif ch in _OPEN:
            stack.append((ch, line, col))
        elif ch in _CLOSE:
            if not stack:
                raise RuleSyntaxError(_diag(path, text, A.Pos(line, col),
                                            f"unbalanced '{ch}': no '{_CLOSE[ch]}' is open here"))
            opener, oline, ocol = stack.pop()
            if opener == "{" and ch == "}" and oline != line and indent(line) < indent(oline):
                suspects.append((oline, ocol))
            if _OPEN[opener] != ch:
                raise RuleSyntaxError(_diag(
                    path, text, A.Pos(line, col),
                    f"unbalanced brackets: expected '{_OPEN[opener]}' to close '{opener}' from line {oline} "
                    f"column {ocol}, found '{ch}'"))
        if ch == "\n":
            line, col = line + 1, 1
        else:
            col += 1
        i += 1
    if stack:
        opener, oline, ocol = stack[-1]
        if opener == "{" and suspects:
            oline, ocol = suspects[0]
        raise RuleSyntaxError(_diag(path, text, A.Pos(oline, ocol),
                                    f"unbalanced brackets: '{opener}' is never closed (missing '{_OPEN[opener]}')"))


_EXPR_START = {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "MINUS", "PLUS", "NOT", "TRUE", "FALSE", "NONE"}
_DESCRIBE = {"NAME": "a name", "NUMBER": "a number", "STRING": "a string", "RULE_NAME": "a rule name",
             "CMP": "a comparison", "OPT": "'?'", "$END": "end of file"}


def _describe_terminal(name: str) -> str:
    if name in _DESCRIBE:
        return _DESCRIBE[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except (KeyError, AttributeError):
        return name
    if isinstance(pattern, PatternStr):
        return f"'{pattern.value}'"
    return name.lower()


def _describe_expected(expected) -> str:
    names = set(expected)
    parts = []
    if {"NAME", "NUMBER", "LPAR"} <= names:
        names -= _EXPR_START
        parts.append("an expression")
    parts += sorted({_describe_terminal(n) for n in names})
    if not parts:
        return "nothing"
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def _found(token) -> str:
    if token is None or token.type == "$END":
        return "end of file"
    return f"'{token}'"


def _before(text: str, line: int, column: int) -> str:
    """Source text before a position, comments stripped."""
    lines = text.splitlines()
    prefix = "\n".join(lines[:line - 1] + [lines[line - 1][:column - 1] if line - 1 < len(lines) else ""])
    return re.sub(r"#[^\n]*", "", prefix)


def _friendly(exc: UnexpectedInput, text: str, path: str) -> Diagnostic:
    line, column = getattr(exc, "line", 0) or 0, getattr(exc, "column", 0) or 0
    if isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        hint = {
            "'": "strings use double quotes (\"...\")",
            ";": "no ';' needed: statements are separated by whitespace or newlines",
            "!": "use 'not' for negation and '!=' for inequality",
            "|": "use 'or' to combine conditions",
            "$": "'$' is not part of the rule language",
        }.get(ch)
        if ch == "&":
            hint = "use 'and' to combine conditions ('&' only joins input constraints like 'w: const & scalar')"
        message = f"unexpected character '{ch}'" + (f": {hint}" if hint else "")
        if ch == "=" and text[exc.pos_in_stream:exc.pos_in_stream + 2] != "==":
            message = "unexpected '=': to compare use '=='"
        return _diag(path, text, A.Pos(line, column), message)

    token = getattr(exc, "token", None)
    expected = set(getattr(exc, "expected", None) or getattr(exc, "accepts", None) or ())
    if isinstance(exc, UnexpectedEOF) or (token is not None and token.type == "$END"):
        last = max(len(text.splitlines()), 1)
        return _diag(path, text, A.Pos(last, len(source_line(text, last)) + 1),
                     f"unexpected end of file; expected {_describe_expected(expected)}")
    found = _found(token)
    before = _before(text, line, column)
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_\-]*|\S", before)
    message = None
    replace_m = re.search(r"\breplace\s+([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_]\w*)*)\s*$", before)
    if "WITH" in expected and replace_m:
        targets = " ".join(replace_m.group(1).split())
        message = (f"expected 'with' after 'replace {targets}' "
                   f"(write: replace {targets} with NEW), found {found}")
    elif token.type == "AMPERSAND" and "AMPERSAND" not in expected:
        message = "use 'and' to combine conditions ('&' only joins input constraints like 'w: const & scalar')"
    elif token.type == "EQUAL" and ("CMP" in expected or "AND" in expected or "OR" in expected):
        message = "'=' binds a name; to compare use '=='"
    elif token.type == "LBRACE" and words[-1:] == ["with"]:
        message = "'replace OUT with' takes one expression; for several nodes write 'replace { OUT = ... }'"
    elif token.type == "COLON" and expected & {"EQUAL", "CMP"}:
        message = ("attributes are bound with '=' (epsilon = eps) or compared with '==' "
                   f"(group == 1), found ':'")
    elif expected >= {"MATCH", "WHERE", "LET", "REPLACE"}:
        if token.type in ("NAME", "RULE_NAME"):
            nxt = text[exc.pos_in_stream + len(str(token)):].lstrip()[:2]
            if nxt.startswith("=") and not nxt.startswith("=="):
                message = (f"unexpected {found}: pattern statements go inside 'match {{ ... }}' and "
                           f"constants are bound with 'let {token} = ...'")
        if message is None:
            message = f"expected 'match', 'where', 'let', 'replace' or '}}' in a rule, found {found}"
    elif expected == {"RULE"}:
        message = f"expected 'rule NAME {{ ... }}' at the top level, found {found}"
    elif "RULE_NAME" in expected:
        message = f"expected a rule name (letters, digits, '_' and '-') after 'rule', found {found}"
    elif token.type == "LPAR" and "EQUAL" in expected and words and words[-1] not in ("=",):
        message = f"a pattern names its output(s): write 'y = {words[-1]}(...)'"
    elif expected & {"COMMA"} and expected & {"RPAR", "RSQB", "RBRACE"} and \
            token.type in _EXPR_START | {"STAR", "RULE_NAME"}:
        message = f"expected {_describe_expected(expected)}, found {found} (missing ','?)"
    if message is None:
        message = f"expected {_describe_expected(expected)}, found {found}"
    return _diag(path, text, A.Pos(line, column), message)
