"""User-facing error types.

Every error a user can cause (bad model file, bad pipeline text, unknown target, bad data
spec) derives from :class:`HqpcError`. The CLI turns these into one line on stderr and exit
code 2; anything else escaping a pass is a compiler bug, handled by the pass manager (the
pass is rolled back and reported).
"""


class HqpcError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 2."""

    exit_code = 2


class ModelLoadError(HqpcError):
    """The model file is missing, unreadable, not ONNX, or not a valid graph."""


class PipelineError(HqpcError):
    """A textual pipeline, pass name or pass option is wrong."""


class TargetError(HqpcError):
    """Unknown target name or malformed target profile."""


class OutputError(HqpcError):
    """The requested output location is unusable (e.g. it is the input model)."""
