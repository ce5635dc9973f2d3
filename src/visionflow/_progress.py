"""The transient Rich progress bar every stage shows while a person waits (data checks,
feature passes, data quality, active selection); the training loop has its own, richer one
(:class:`visionflow.train.callbacks.RichProgress`)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def transient_bar(
    console: Console, *, label: str = "[bold]{task.description}", remaining: bool = True
) -> Progress:
    """A bar that disappears when done: label, bar, done/total, then the time remaining
    (``remaining``) or elapsed (for stages whose steps vary too much for an estimate)."""
    clock: ProgressColumn = TimeRemainingColumn() if remaining else TimeElapsedColumn()
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        clock,
        console=console,
        transient=True,
    )
