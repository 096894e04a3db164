"""A progress bar on stderr for passes that stream data (calibration batches, probes).

    from hqpc.runtime.progress import progress

    for x, y in progress(dataset.batches(32), total=n_batches, description="sensitivity", ctx=ctx):
        ...

The bar is drawn with ``rich`` on stderr, and only when it can help a person watching:
it is silent (the iterable is passed through untouched, nothing is written) when
``ctx.config.get("verbosity", 1) == 0`` (``-q``), when stderr is not a terminal (pipes, files,
pytest's capture, CI logs), or when the environment sets ``HQPC_NO_PROGRESS`` (any value).
The bar is transient: it disappears when the loop ends, so the log lines printed by the CLI
stay as they are. Closing or abandoning the loop early (``break``, an exception) removes the
bar too.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress", "enabled"]

T = TypeVar("T")


def enabled(ctx: Any = None, stream: Any = None) -> bool:
    """Whether a bar would be drawn for ``ctx`` on ``stream`` (default: the current stderr)."""
    config = getattr(ctx, "config", None) or {}
    try:
        verbosity = int(config.get("verbosity", 1))
    except (TypeError, ValueError):
        verbosity = 1
    if verbosity <= 0 or os.environ.get("HQPC_NO_PROGRESS") is not None:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


def progress(iterable: Iterable[T], total: int | None = None, description: str = "", ctx: Any = None) -> Iterator[T]:
    """Yield the items of ``iterable``, advancing a bar of ``total`` steps (None: unknown)
    labelled ``description`` on stderr when :func:`enabled` says so; otherwise a plain
    pass-through."""
    if not enabled(ctx):
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(file=sys.stderr, stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
