"""Callbacks: how the training loop talks to the outside (progress bars, logs, search pruning)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from visionflow.train.engine import Engine

__all__ = ["Callback", "RichProgress", "StopTraining"]


class StopTraining(Exception):
    """Raised by a callback to end training early (e.g. a search pruner); the best is kept."""


class Callback:
    """Hooks called by :class:`~visionflow.train.engine.Engine`; override what you need."""

    def on_fit_start(self, engine: Engine) -> None: ...

    def on_epoch_start(self, engine: Engine, epoch: int, steps: int) -> None: ...

    def on_batch_end(self, engine: Engine, step: int, loss: float) -> None: ...

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None: ...

    def on_fit_end(self, engine: Engine) -> None: ...


class RichProgress(Callback):
    """A progress bar per epoch with ETA and live loss/accuracy; silent when not a terminal."""

    def __init__(self, console: Console | None = None, *, enabled: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last = ""

    def on_fit_start(self, engine: Engine) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()

    def on_epoch_start(self, engine: Engine, epoch: int, steps: int) -> None:
        if self._progress is None:
            return
        desc = f"{engine.phase} epoch {epoch + 1}/{engine.planned_epochs}"
        self._task = self._progress.add_task(desc, total=steps, metrics=self._last)

    def on_batch_end(self, engine: Engine, step: int, loss: float) -> None:
        if self._progress is None or self._task is None:
            return
        self._progress.update(self._task, advance=1, metrics=f"loss {loss:.3f} {self._last}")

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        parts = [f"train loss {record['train_loss']:.3f}"]
        if record.get("val_accuracy") is not None:
            parts.append(f"val acc {record['val_accuracy']:.3f}")
        if record.get("val_loss") is not None:
            parts.append(f"val loss {record['val_loss']:.3f}")
        self._last = " | ".join(parts)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, metrics=self._last)

    def on_fit_end(self, engine: Engine) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
