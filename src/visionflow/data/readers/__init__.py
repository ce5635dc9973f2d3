"""Dataset readers: a registry from layout name to a function that builds a DatasetIndex.

A reader is a function ``read(path) -> DatasetIndex`` registered with :func:`register_reader`
under a name and with a ``detect`` predicate. :func:`read_dataset` either calls the reader the
user named or, with ``format="auto"``, the first registered reader whose ``detect`` accepts the
path. Registration order is detection order: the CSV reader comes before the folder reader, so a
folder holding a ``labels.csv`` is read through its CSV.

Adding a layout (COCO, VOC, YOLO...) is one module with one decorated function, imported at the
bottom of this file.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visionflow.data.index import DatasetIndex
from visionflow.errors import ConfigError, DataError

__all__ = ["ReaderFn", "available_readers", "read_dataset", "register_reader"]

_log = logging.getLogger(__name__)

ReaderFn = Callable[[Path], DatasetIndex]


@dataclass(frozen=True)
class _Reader:
    name: str
    read: ReaderFn
    detect: Callable[[Path], bool]
    layout: str


_READERS: dict[str, _Reader] = {}


def register_reader(
    name: str, *, detect: Callable[[Path], bool], layout: str | None = None
) -> Callable[[ReaderFn], ReaderFn]:
    """Register a dataset reader under ``name`` (a decorator).

    Args:
        name: The value users pass as ``format``; must be unique.
        detect: Cheap predicate telling whether a path looks like this layout (used by
            ``format="auto"``); it should look at names, not decode images.
        layout: One line describing the expected layout, shown when nothing matches. Defaults to
            the first line of the reader's docstring.

    Raises:
        ValueError: A reader with this name is already registered.
    """
    if not name or name == "auto":
        raise ValueError(f"invalid reader name {name!r}")

    def decorator(fn: ReaderFn) -> ReaderFn:
        if name in _READERS:
            raise ValueError(f"a dataset reader named {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _READERS[name] = _Reader(
            name=name, read=fn, detect=detect, layout=layout or (doc[0] if doc else name)
        )
        return fn

    return decorator


def available_readers() -> list[str]:
    """Names of the registered readers, in detection order."""
    return list(_READERS)


def read_dataset(path: str | os.PathLike[str], *, format: str = "auto") -> DatasetIndex:
    """Read a dataset from disk into a :class:`DatasetIndex`.

    Args:
        path: A dataset folder or annotation file.
        format: A registered reader name (see :func:`available_readers`) or ``"auto"`` to detect
            the layout.

    Raises:
        DataError: The path does not exist, matches no known layout or is malformed.
        ConfigError: ``format`` names no reader.
    """
    root = Path(path).expanduser()
    if format != "auto" and format not in _READERS:
        choices = ["auto", *_READERS]
        close = difflib.get_close_matches(format, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown dataset format {format!r}{hint} (available: {', '.join(choices)})"
        )
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    if format != "auto":
        return _READERS[format].read(root)
    for reader in _READERS.values():
        if _safe_detect(reader, root):
            _log.debug("reading %s with the %s reader", root, reader.name)
            return reader.read(root)
    layouts = "\n".join(f"  - {r.name}: {r.layout}" for r in _READERS.values())
    raise DataError(
        f"{root}: not a dataset layout visionflow recognises. Supported layouts:\n{layouts}"
    )


def _safe_detect(reader: _Reader, path: Path) -> bool:
    """Run a reader's detect; a detector that fails on an odd path just says no."""
    try:
        return bool(reader.detect(path))
    except (OSError, ValueError) as exc:
        _log.debug("detect of reader %s failed on %s: %s", reader.name, path, exc)
        return False


# Import the built-in readers last so that they can register themselves; the import order is
# the detection order (CSV before folder).
from visionflow.data.readers import csv as _csv  # noqa: E402
from visionflow.data.readers import folder as _folder  # noqa: E402

del _csv, _folder
