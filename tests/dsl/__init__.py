"""Tests of the hqpc rule language (hqpc.dsl, spec/grammar.lark, spec/rules, spec/README.md)."""
