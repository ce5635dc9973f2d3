"""Detection dataset readers: a registry from layout name to a function building a
:class:`~visionflow.data.detection.records.DetectionIndex`.

The same design as :mod:`visionflow.data.readers` for classification: a reader is a function
``read(path) -> DetectionIndex`` registered with :func:`register_detection_reader` under a name
and with a cheap ``detect`` predicate; :func:`read_detection` calls the reader the user named or,
with ``format="auto"``, the first whose ``detect`` accepts the path. Registration order is
detection order: COCO (a JSON file or an ``annotations/`` folder), Pascal VOC (an
``Annotations/`` folder), YOLO (a ``data.yaml`` or ``images/`` + ``labels/``).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visionflow.data.detection.records import DetectionIndex
from visionflow.errors import ConfigError, DataError

__all__ = [
    "DetectionReaderFn",
    "available_detection_readers",
    "detect_detection_format",
    "read_detection",
    "register_detection_reader",
]

_log = logging.getLogger(__name__)

DetectionReaderFn = Callable[[Path], DetectionIndex]


@dataclass(frozen=True)
class _Reader:
    name: str
    read: DetectionReaderFn
    detect: Callable[[Path], bool]
    layout: str


_READERS: dict[str, _Reader] = {}


def register_detection_reader(
    name: str, *, detect: Callable[[Path], bool], layout: str | None = None
) -> Callable[[DetectionReaderFn], DetectionReaderFn]:
    """Register a detection reader under ``name`` (a decorator).

    Args:
        name: The value users pass as ``format``; must be unique.
        detect: Cheap predicate telling whether a path looks like this layout; it looks at
            names (and at most the start of a small file), never decodes images.
        layout: One line describing the layout, shown when nothing matches (default: the first
            line of the reader's docstring).

    Raises:
        ValueError: The name is empty, ``"auto"`` or already registered.
    """
    if not name or name == "auto":
        raise ValueError(f"invalid detection reader name {name!r}")

    def decorator(fn: DetectionReaderFn) -> DetectionReaderFn:
        if name in _READERS:
            raise ValueError(f"a detection reader named {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _READERS[name] = _Reader(
            name=name, read=fn, detect=detect, layout=layout or (doc[0] if doc else name)
        )
        return fn

    return decorator


def available_detection_readers() -> list[str]:
    """Names of the registered detection readers, in detection order."""
    return list(_READERS)


def detect_detection_format(path: str | os.PathLike[str]) -> str | None:
    """Name of the first reader whose ``detect`` accepts ``path``, or ``None``."""
    root = Path(path).expanduser()
    for reader in _READERS.values():
        if _safe_detect(reader, root):
            return reader.name
    return None


def read_detection(path: str | os.PathLike[str], *, format: str = "auto") -> DetectionIndex:
    """Read a detection dataset (COCO, Pascal VOC or YOLO) into a
    :class:`~visionflow.data.detection.records.DetectionIndex`.

    Args:
        path: A dataset folder, or its annotation file (a COCO JSON, a YOLO ``data.yaml``).
        format: A registered reader name (see :func:`available_detection_readers`) or
            ``"auto"`` to detect the layout.

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
            f"unknown detection format {format!r}{hint} (available: {', '.join(choices)})"
        )
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    if format != "auto":
        return _READERS[format].read(root)
    name = detect_detection_format(root)
    if name is not None:
        _log.debug("reading %s with the %s detection reader", root, name)
        return _READERS[name].read(root)
    layouts = "\n".join(f"  - {r.name}: {r.layout}" for r in _READERS.values())
    raise DataError(
        f"{root}: not a detection dataset layout visionflow recognises. Supported layouts:\n"
        f"{layouts}"
    )


def _safe_detect(reader: _Reader, path: Path) -> bool:
    """Run a reader's detect; a detector that fails on an odd path just says no."""
    try:
        return bool(reader.detect(path))
    except (OSError, ValueError) as exc:
        _log.debug("detect of reader %s failed on %s: %s", reader.name, path, exc)
        return False


# Import the built-in readers last so that they can register themselves; the import order is
# the detection order.
from visionflow.data.detection.readers import coco as _coco  # noqa: E402
from visionflow.data.detection.readers import voc as _voc  # noqa: E402
from visionflow.data.detection.readers import yolo as _yolo  # noqa: E402

del _coco, _voc, _yolo
