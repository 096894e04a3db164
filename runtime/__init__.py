"""hqpc runtime helpers: ONNX Runtime sessions, comparison, data (installed as hqpc.runtime)."""
