"""One registry of dataset readers by layout name, shared by classification
(:mod:`visionflow.data.readers`) and detection (:mod:`visionflow.data.detection.readers`).

A reader is a function ``read(path) -> index`` registered under a name with a cheap ``detect``
predicate. :meth:`ReaderRegistry.read` calls the reader the user named or, with
``format="auto"``, the first registered reader whose ``detect`` accepts the path: registration
order is detection order.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from visionflow.errors import ConfigError, DataError

_log = logging.getLogger("visionflow.data.readers")

T = TypeVar("T")


@dataclass(frozen=True)
class _Reader(Generic[T]):
    name: str
    read: Callable[[Path], T]
    detect: Callable[[Path], bool]
    layout: str


class ReaderRegistry(Generic[T]):
    """Readers of one kind of dataset (``kind`` names it in messages: "dataset",
    "detection dataset")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._readers: dict[str, _Reader[T]] = {}

    def register(
        self, name: str, *, detect: Callable[[Path], bool], layout: str | None = None
    ) -> Callable[[Callable[[Path], T]], Callable[[Path], T]]:
        """A decorator registering ``fn`` under ``name``; ``layout`` (default: the first line of
        its docstring) is shown when no reader matches a path.

        Raises:
            ValueError: The name is empty, ``"auto"`` or already registered.
        """
        if not name or name == "auto":
            raise ValueError(f"invalid {self.kind} reader name {name!r}")

        def decorator(fn: Callable[[Path], T]) -> Callable[[Path], T]:
            if name in self._readers:
                raise ValueError(f"a {self.kind} reader named {name!r} is already registered")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._readers[name] = _Reader(
                name=name, read=fn, detect=detect, layout=layout or (doc[0] if doc else name)
            )
            return fn

        return decorator

    def names(self) -> list[str]:
        """The registered names, in detection order."""
        return list(self._readers)

    def detect(self, path: Path) -> str | None:
        """The first reader whose ``detect`` accepts ``path``, or ``None``."""
        for reader in self._readers.values():
            if self._safe_detect(reader, path):
                return reader.name
        return None

    def read(self, path: str | os.PathLike[str], *, format: str = "auto") -> T:
        """Read ``path`` with the reader ``format`` names, or the detected one.

        Raises:
            DataError: The path does not exist, matches no known layout or is malformed.
            ConfigError: ``format`` names no reader.
        """
        root = Path(path).expanduser()
        if format != "auto" and format not in self._readers:
            choices = ["auto", *self._readers]
            close = difflib.get_close_matches(format, choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} format {format!r}{hint} (available: {', '.join(choices)})"
            )
        if not root.exists():
            raise DataError(f"dataset path {root} does not exist")
        name = format if format != "auto" else self.detect(root)
        if name is None:
            layouts = "\n".join(f"  - {r.name}: {r.layout}" for r in self._readers.values())
            raise DataError(
                f"{root}: not a {self.kind} layout visionflow recognises. Supported layouts:\n"
                f"{layouts}"
            )
        _log.debug("reading %s with the %s reader", root, name)
        return self._readers[name].read(root)

    @staticmethod
    def _safe_detect(reader: _Reader[T], path: Path) -> bool:
        """Run a reader's detect; a detector that fails on an odd path just says no."""
        try:
            return bool(reader.detect(path))
        except (OSError, ValueError) as exc:
            _log.debug("detect of reader %s failed on %s: %s", reader.name, path, exc)
            return False
