"""hqpc compiler passes (installed as hqpc.passes)."""
