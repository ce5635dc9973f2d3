"""Dataset readers: a registry from layout name to a function that builds a DatasetIndex.

A reader is a function ``read(path) -> DatasetIndex`` registered with :func:`register_reader`
under a name and with a ``detect`` predicate. :func:`read_dataset` either calls the reader the
user named or, with ``format="auto"``, the first registered reader whose ``detect`` accepts the
path. Registration order is detection order: the CSV reader comes before the folder reader, so a
folder holding a ``labels.csv`` is read through its CSV.

Adding a layout is one module with one decorated function, imported at the
bottom of this file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from visionflow.data._registry import ReaderRegistry
from visionflow.data.index import DatasetIndex

__all__ = ["ReaderFn", "available_readers", "read_dataset", "register_reader"]

ReaderFn = Callable[[Path], DatasetIndex]

_REGISTRY: ReaderRegistry[DatasetIndex] = ReaderRegistry("dataset")


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
    return _REGISTRY.register(name, detect=detect, layout=layout)


def available_readers() -> list[str]:
    """Names of the registered readers, in detection order."""
    return _REGISTRY.names()


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
    return _REGISTRY.read(path, format=format)


# Import the built-in readers last so that they can register themselves; the import order is
# the detection order (CSV before folder).
from visionflow.data.readers import csv as _csv  # noqa: E402
from visionflow.data.readers import folder as _folder  # noqa: E402

del _csv, _folder
