"""``hqpc rules ...`` and ``--pass-file`` support.

* :func:`main_rules` implements ``hqpc rules list | check FILE... | show NAME | explain MODEL``.
* :func:`load_pass_file` parses, checks, compiles and registers the rules of a user file
  (``hqpc MODEL --pass-file my.hqp --pipeline my-rule,...``).

Exit codes of ``hqpc rules``: 0 success, 1 ``check`` found errors, 2 usage or input errors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hqpc.dsl.checker import check_file
from hqpc.dsl.compiler import RuleEngine, RulePass, compile_text
from hqpc.dsl.errors import Diagnostic, RuleError, make_diagnostic
from hqpc.dsl.parser import parse_file
from hqpc.dsl.printer import format_rule
from hqpc.errors import HqpcError
from hqpc.passmanager import Pass

USER_MODULE = "hqpc.dsl.user"


def load_pass_file(path) -> list[type[Pass]]:
    """Parse, check, compile and register every rule in ``path``; return the pass classes.

    Raises :class:`~hqpc.dsl.errors.RuleError` (an HqpcError: ``str()`` is one line
    ``file:line:col: message``; ``.render()`` adds the source line and a caret) when the file is
    missing, does not parse, fails the checks, or a rule's name is taken by another pass.
    Loading the same unchanged file twice is harmless (the registered classes are returned).
    """
    from hqpc.registry import passes, register_pass

    path = Path(path)
    rule_file = parse_file(path)
    classes = compile_text(rule_file.text, str(path), module=USER_MODULE)
    existing = passes()
    result = []
    for cls in classes:
        name = cls.info.name
        other = existing.get(name)
        if other is not None:
            if issubclass(other, RulePass) and other.source == cls.source and other.rule_text == cls.rule_text:
                result.append(other)
                continue
            origin = other.source if issubclass(other, RulePass) and other.source else other.__module__
            rule = cls.rule_info.rule
            raise RuleError(make_diagnostic(str(path), rule_file.text, rule.pos,
                                            f"rule '{name}' clashes with the existing pass '{name}' "
                                            f"(from {origin}); rename the rule"))
    for cls in classes:
        if cls.info.name not in existing:
            register_pass(cls)
            result.append(cls)
    return result


# --------------------------------------------------------------------------- hqpc rules
class _RulesParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (``hqpc: error: ...``, exit 2), like ``hqpc``'s own;
    its subcommand parsers are of this class too."""

    def error(self, message: str):
        raise HqpcError(f"{self.prog}: {message} (see hqpc rules --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _RulesParser(prog="hqpc rules", description="Inspect and check rewrite rules.")
    sub = ap.add_subparsers(dest="command", metavar="{list,check,show,explain}")
    p_list = sub.add_parser("list", help="all passes and rules with their source")
    p_list.add_argument("--pass-file", action="append", default=[], metavar="FILE", help="also load these rules")
    p_list.add_argument("--rules-only", action="store_true", help="only rule-language passes")
    p_check = sub.add_parser("check", help="parse and type-check rule files (no model needed)")
    p_check.add_argument("files", nargs="+", metavar="FILE")
    p_show = sub.add_parser("show", help="print a rule's source text")
    p_show.add_argument("name")
    p_show.add_argument("--pass-file", action="append", default=[], metavar="FILE")
    p_explain = sub.add_parser("explain", help="run rules on a model and say why each fired or not")
    p_explain.add_argument("model")
    p_explain.add_argument("names", nargs="*", metavar="RULE", help="rules to try (default: every rule)")
    p_explain.add_argument("--pass-file", action="append", default=[], metavar="FILE")
    return ap


def main_rules(argv: list[str]) -> int:
    """Entry point of ``hqpc rules ...``; returns the exit code."""
    ap = _parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if exc.code in (0, None) else 2
    except HqpcError as exc:
        print(f"hqpc: error: {exc}", file=sys.stderr)
        return 2
    if args.command is None:
        print("hqpc: error: hqpc rules needs a command: list, check, show or explain (see hqpc rules --help)",
              file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            return _check(args.files)
        for path in getattr(args, "pass_file", []):
            load_pass_file(path)
        if args.command == "list":
            return _list(args.rules_only)
        if args.command == "show":
            return _show(args.name)
        if args.command == "explain":
            return _explain(args.model, args.names)
    except RuleError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except HqpcError as exc:
        print(f"hqpc: error: {exc}", file=sys.stderr)
        return 2
    return 2


def _rule_classes() -> dict[str, type[Pass]]:
    from hqpc.registry import passes

    return {name: cls for name, cls in passes().items() if isinstance(cls, type) and issubclass(cls, RulePass)}


def _list(rules_only: bool) -> int:
    from hqpc.registry import passes, source_of

    rows = []
    for name, cls in sorted(passes().items()):
        is_rule = issubclass(cls, RulePass)
        if rules_only and not is_rule:
            continue
        info = cls.info
        source = cls.source if is_rule else source_of(name)
        targets = ",".join(info.targets) if info.targets else "all"
        description = (info.description or (cls.__doc__ or "").strip().splitlines()[0:1] or [""])
        description = description if isinstance(description, str) else (description[0] if description else "")
        rows.append((name, "rule" if is_rule else "pass", f"O{info.opt_level}", targets, source, description))
    header = ("NAME", "KIND", "OPT", "TARGETS", "SOURCE", "DESCRIPTION")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    out = sys.stdout
    for row in [header] + rows:
        out.write("  ".join(row[i].ljust(widths[i]) for i in range(5)) + "  " + row[5] + "\n")
    return 0


def _check(files: list[str]) -> int:
    failed = False
    for name in files:
        try:
            rule_file = parse_file(name)
        except RuleError as exc:
            print(exc.render(), file=sys.stderr)
            failed = True
            continue
        infos, diags = check_file(rule_file)
        for d in diags:
            print(d.render(), file=sys.stderr)
        errors = [d for d in diags if d.severity == "error"]
        if errors:
            failed = True
            print(f"{name}: {len(errors)} error(s)", file=sys.stderr)
        else:
            names = ", ".join(i.rule.name for i in infos)
            print(f"{name}: ok ({len(infos)} rule{'s' if len(infos) != 1 else ''}{': ' + names if names else ''})")
    return 1 if failed else 0


def _show(name: str) -> int:
    rules = _rule_classes()
    if name not in rules:
        from hqpc.dsl.schema import suggest

        close = suggest(name, rules)
        hint = f"; did you mean '{close}'?" if close else ""
        print(f"hqpc: error: no rule named '{name}'{hint}", file=sys.stderr)
        return 2
    cls = rules[name]
    print(f"# {cls.source}")
    print(format_rule(cls.rule_info.rule))
    return 0


def _explain(model_path: str, names: list[str]) -> int:
    from hqpc.ir import Model

    rules = _rule_classes()
    unknown = [n for n in names if n not in rules]
    if unknown:
        print(f"hqpc: error: no rule named '{unknown[0]}' (see `hqpc rules list --rules-only`)", file=sys.stderr)
        return 2
    model = Model.load(model_path)
    for name in names or sorted(rules):
        cls = rules[name]
        trial = model.copy()
        path = cls.source.rsplit(":", 1)[0]
        try:
            tracer = RuleEngine(cls.rule_info, path).run(trial)
        except Exception as exc:  # a rule that never reaches a fixed point
            print(f"rule {name}: error: {exc}")
            continue
        print(tracer.text())
    return 0


__all__ = ["main_rules", "load_pass_file", "Diagnostic"]
