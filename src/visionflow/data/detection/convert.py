"""Converting a detection dataset between COCO, Pascal VOC and YOLO: read, then write.

The records go through unchanged: what the reader could not use (unknown class ids, annotations
without an image) is left out and listed in :attr:`ConvertResult.issues`; boxes reaching outside
the image or duplicated are written as they are (run the checks,
:func:`~visionflow.data.detection.checks.check_detection`, and write its cleaned index to fix
them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from visionflow.data.detection.readers import read_detection
from visionflow.data.detection.records import Issue
from visionflow.data.detection.writers import (
    WriteResult,
    validate_write_options,
    write_detection,
)

__all__ = ["ConvertResult", "convert"]


@dataclass
class ConvertResult:
    """What :func:`convert` read and wrote.

    Attributes:
        source_format: The reader used (detected or given).
        written: What the writer wrote, with its notes.
        issues: What the reader left out, each with its source.
    """

    source_format: str
    written: WriteResult
    issues: list[Issue] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.source_format,
            **self.written.to_json(),
            "issues": [i.to_json() for i in self.issues],
        }


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    from_format: str = "auto",
    images: str = "link",
    precision: int = 6,
) -> ConvertResult:
    """Convert the detection dataset ``src`` into a new folder ``dst`` in format ``to``.

    Args:
        src: A COCO, VOC or YOLO dataset (folder or annotation file).
        dst: A folder that does not exist yet (or is empty), outside the source dataset.
        to: ``"coco"``, ``"voc"`` or ``"yolo"``.
        from_format: The source's format, or ``"auto"`` to detect it.
        images: ``"link"`` (hard links, copies where the file system refuses) or ``"copy"``.
        precision: Decimals of YOLO's normalised numbers.

    Raises:
        DataError: The source is malformed, or ``dst`` overlaps it or already holds files.
        ConfigError: Unknown format or image mode.

    Example:
        >>> convert("data/voc", "data/voc_as_yolo", to="yolo")  # doctest: +SKIP
    """
    validate_write_options(format=to, images=images, precision=precision)
    index = read_detection(src, format=from_format)
    written = write_detection(index, dst, format=to, images=images, precision=precision)
    return ConvertResult(source_format=index.format, written=written, issues=list(index.issues))
