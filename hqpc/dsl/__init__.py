"""The hqpc rule language: match -> check -> replace graph rewrites compiled into passes.

Pipeline: :mod:`parser` (``spec/grammar.lark``, lark LALR) -> :mod:`ast` (frozen dataclasses
with positions) -> :mod:`checker` (ONNX schemas, names, arity, kinds) -> :mod:`compiler`
(a :class:`~hqpc.passmanager.Pass` per rule, applied to a fixed point by :mod:`matcher` and
:mod:`rewrite`, constants evaluated by :mod:`evaluator` with the fixed table in
:mod:`builtins`) ; :mod:`printer` (AST -> text), :mod:`trace` (why a rule did not fire),
:mod:`cli` (``hqpc rules ...``, ``load_pass_file``). The language reference is
``spec/README.md``.
"""
