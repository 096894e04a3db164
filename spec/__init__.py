"""Data files: DSL grammar, built-in rules, target profiles (installed as hqpc.spec)."""
