"""hqpc: a compiler for edge inference on ONNX models."""
__version__ = "0.1.0"
