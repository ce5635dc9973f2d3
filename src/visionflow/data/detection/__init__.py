"""Object detection data: COCO, Pascal VOC and YOLO readers into one record type, writers and
conversion between them, box checks, and box-aware augmentation.

Boxes are ``(x1, y1, x2, y2)`` floats in absolute, continuous pixel coordinates of the image as
:func:`visionflow.data.images.load_image` returns it (see
:mod:`visionflow.data.detection.records` for the conventions of each format).

Everything imported here needs only numpy, Pillow, PyYAML and Rich; the PyTorch parts (the
dataset class and the transforms) are in :mod:`visionflow.data.detection.transforms`.

Example:
    >>> from visionflow.data.detection import check_detection, read_detection
    >>> index = read_detection("data/voc")  # doctest: +SKIP
    >>> report, clean = check_detection(index)  # doctest: +SKIP
"""

from __future__ import annotations

from visionflow.data.detection.checks import SIZE_BUCKETS, DetectionReport, check_detection
from visionflow.data.detection.convert import ConvertResult, convert
from visionflow.data.detection.readers import (
    available_detection_readers,
    detect_detection_format,
    read_detection,
    register_detection_reader,
)
from visionflow.data.detection.records import (
    ISSUE_KINDS,
    Box,
    DetectionIndex,
    DetectionSample,
    Issue,
    box_iou,
    box_iou_matrix,
    detection_split,
)
from visionflow.data.detection.writers import (
    IMAGE_MODES,
    WriteResult,
    available_detection_writers,
    register_detection_writer,
    write_detection,
)

__all__ = [
    "IMAGE_MODES",
    "ISSUE_KINDS",
    "SIZE_BUCKETS",
    "Box",
    "ConvertResult",
    "DetectionIndex",
    "DetectionReport",
    "DetectionSample",
    "Issue",
    "WriteResult",
    "available_detection_readers",
    "available_detection_writers",
    "box_iou",
    "box_iou_matrix",
    "check_detection",
    "convert",
    "detect_detection_format",
    "detection_split",
    "read_detection",
    "register_detection_reader",
    "register_detection_writer",
    "write_detection",
]
