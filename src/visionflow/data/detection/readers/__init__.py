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

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from visionflow.data._registry import ReaderRegistry
from visionflow.data.detection.records import DetectionIndex, Issue
from visionflow.errors import DataError

__all__ = [
    "DetectionReaderFn",
    "available_detection_readers",
    "detect_detection_format",
    "find_detection_dataset",
    "read_detection",
    "register_detection_reader",
]

DetectionReaderFn = Callable[[Path], DetectionIndex]

_REGISTRY: ReaderRegistry[DetectionIndex] = ReaderRegistry("detection dataset")


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
    return _REGISTRY.register(name, detect=detect, layout=layout)


def available_detection_readers() -> list[str]:
    """Names of the registered detection readers, in detection order."""
    return _REGISTRY.names()


def detect_detection_format(path: str | os.PathLike[str]) -> str | None:
    """Name of the first reader whose ``detect`` accepts ``path``, or ``None``."""
    return _REGISTRY.detect(Path(path).expanduser())


def find_detection_dataset(path: str | os.PathLike[str]) -> str | None:
    """What :func:`read_detection` would read at ``path``: the layout's name, ``"<name> in
    <folder>/"`` for a folder that holds datasets (the first), or ``None``."""
    root = Path(path).expanduser()
    found = _REGISTRY.detect(root)
    if found is not None:
        return found
    inside = _datasets_inside(root)
    return f"{inside[0][1]} in {inside[0][0].name}/" if inside else None


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
    try:
        return _REGISTRY.read(path, format=format)
    except DataError as exc:
        # only a folder of no known layout is looked into; a dataset that failed to read
        # (malformed, a path escaping it...) keeps its own error
        nested = format == "auto" and root.is_dir() and _REGISTRY.detect(root) is None
        inside = _datasets_inside(root) if nested else []
        if not inside:
            raise
        found = ", ".join(f"{sub.name}/ ({name})" for sub, name in inside)
        indexes = [_REGISTRY.read(sub, format=name) for sub, name in inside]
        if any(_signature(i) != _signature(indexes[0]) for i in indexes[1:]):
            raise DataError(
                f"{path} is not a dataset itself but holds {len(inside)} that differ: {found}; "
                f"point at one of them (e.g. {inside[0][0]})"
            ) from exc
        first = indexes[0]
        note = Issue(
            kind="nested_dataset",
            source=str(path),
            message=f"{path} is not a dataset itself; it holds {found}"
            + (" with the same images and boxes" if len(inside) > 1 else ""),
            action=f"read {inside[0][0].name}/",
        )
        return replace(first, issues=[note, *first.issues])


def _signature(index: DetectionIndex) -> list[tuple[Any, ...]]:
    """What two readings of the same labels share: file names, sizes, boxes to 0.01 px (YOLO
    stores normalised numbers), classes and splits, in a stable order."""
    out = []
    for s in index.samples:
        boxes = (tuple(round(v, 2) for v in b) for b in s.boxes)
        objects = tuple(sorted(zip(s.labels, boxes, strict=True)))
        out.append((s.path.name, s.width, s.height, s.split, objects))
    return sorted(out)


def _datasets_inside(path: Path) -> list[tuple[Path, str]]:
    """Sub-folders of ``path`` that are datasets of a known layout (a folder holding the same
    labels in several formats is a common way to ship them)."""
    if not path.is_dir():
        return []
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        name = _REGISTRY.detect(sub)
        if name is not None:
            found.append((sub, name))
    return found


# Import the built-in readers last so that they can register themselves; the import order is
# the detection order.
from visionflow.data.detection.readers import coco as _coco  # noqa: E402
from visionflow.data.detection.readers import voc as _voc  # noqa: E402
from visionflow.data.detection.readers import yolo as _yolo  # noqa: E402

del _coco, _voc, _yolo
