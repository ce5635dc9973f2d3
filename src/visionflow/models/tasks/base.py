"""The contract between a task and the one training loop.

The engine (:mod:`visionflow.train.engine`) moves batches, steps the optimiser, schedules,
checkpoints and stops; everything that depends on what a label *is* lives in a :class:`Task`:
building the head, the loss, turning raw outputs into predictions, and the metrics.
A second task (object detection) registers itself here without touching the engine.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from visionflow.errors import ConfigError

__all__ = ["Task", "get_task", "register_task"]

_TASKS: dict[str, type[Task]] = {}


class Task(abc.ABC):
    """One kind of problem (classification, detection...).

    Contract:
        * :meth:`build_head` returns a module mapping backbone features to raw outputs.
        * :meth:`loss` maps ``(outputs, targets)`` to a scalar; ``targets`` are what the
          DataLoader yields (class ids, or soft labels after MixUp/CutMix).
        * :meth:`metrics` maps stacked outputs and targets of a whole split to a JSON-able dict
          that has at least :attr:`monitor` (higher is better) and ``"loss"``.
    """

    name: str = ""
    #: The metric early stopping and model selection maximise.
    monitor: str = "accuracy"

    @abc.abstractmethod
    def build_head(self, in_features: int) -> nn.Module: ...

    @abc.abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]: ...

    def batch_size(self, targets: Any) -> int:
        return len(targets)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a :class:`Task` under ``name`` (duplicates are an error)."""

    def wrap(cls: type[Task]) -> type[Task]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return wrap


def get_task(name: str) -> type[Task]:
    if name not in _TASKS:
        hint = difflib.get_close_matches(name, list(_TASKS), n=1)
        suffix = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"unknown task {name!r} (known: {sorted(_TASKS)}){suffix}")
    return _TASKS[name]


def available_tasks() -> Sequence[str]:
    return sorted(_TASKS)
