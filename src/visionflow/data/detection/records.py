"""The records every detection reader produces and every later stage consumes.

The internal box convention
---------------------------
A box is ``(x1, y1, x2, y2)``: floats, in absolute pixels of the image as
:func:`visionflow.data.images.load_image` returns it (EXIF orientation applied), in *continuous*
coordinates: pixel column ``i`` covers ``[i, i + 1)``, so a box drawn over columns 10..19 and rows
5..9 is ``(10, 5, 20, 10)``, its width is ``x2 - x1`` and a box covering the whole image is
``(0, 0, width, height)``. This is COCO's convention (its ``[x, y, w, h]`` is ``x1, y1, x2 - x1,
y2 - y1``) and torchvision's ``XYXY``; the readers convert into it and the writers out of it:

* COCO ``[x, y, w, h]`` -> ``(x, y, x + w, y + h)``;
* Pascal VOC's 1-based, inclusive pixel indices ``xmin..xmax`` -> ``(xmin - 1, ymin - 1, xmax,
  ymax)`` (the convention of detectron2 and of the VOC devkit's area ``xmax - xmin + 1``); the
  writer adds the 1 back, so VOC -> internal -> VOC gives the same numbers;
* YOLO's normalised ``cx cy w h`` -> ``((cx - w/2) W, (cy - h/2) H, (cx + w/2) W, (cy + h/2) H)``.

A :class:`DetectionSample` is one image with its boxes; a :class:`DetectionIndex` is the samples,
the sorted class list (stable ids = positions, like
:class:`~visionflow.data.index.DatasetIndex`) and the :class:`Issue` list of what the reader found
wrong but could not put in a record (unknown class ids, annotations whose image is missing,
declared sizes that disagree with the file). Splits are :class:`~visionflow.data.index.Split`
objects, as for classification (see :func:`detection_split`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionflow._io import atomic_write_json, read_json
from visionflow.data.index import SPLIT_NAMES, DatasetIndex, Sample, Split
from visionflow.errors import DataError

__all__ = [
    "ISSUE_KINDS",
    "Box",
    "DetectionIndex",
    "DetectionSample",
    "Issue",
    "box_iou",
    "box_iou_matrix",
    "detection_split",
]

#: ``(x1, y1, x2, y2)`` in absolute pixels (see the module docstring).
Box = tuple[float, float, float, float]

#: What each :attr:`Issue.kind` means.
ISSUE_KINDS = {
    "unknown_class": "a box names a class id the class list does not have (box dropped)",
    "missing_image": "annotations whose image file is missing or unreadable (dropped)",
    "size_mismatch": "the size the annotation declares differs from the image file (file wins)",
    "clipped": "a box reaching outside the image was clipped to it",
    "degenerate": "a box with zero or negative area, or smaller than the minimum (dropped)",
    "outside": "a box entirely outside the image (dropped)",
    "duplicate": "a box repeating another of the same class, IoU above the limit (removed)",
    "unreadable_image": "the image file's pixels cannot be decoded (image dropped)",
    "nested_dataset": "the folder is not a dataset but holds one (or the same one in several "
    "formats); the first was read",
}


@dataclass(frozen=True)
class Issue:
    """One problem found in a dataset, where it is and what was done about it.

    Attributes:
        kind: One of :data:`ISSUE_KINDS`.
        source: Where: ``"instances.json:annotations[3] (id 17)"``, ``"Annotations/a.xml:object
            2"``, ``"labels/a.txt:3"``.
        message: What is wrong, for a person.
        action: What was done (``"dropped"``, ``"clipped"``, ``"kept"``...).
    """

    kind: str
    source: str
    message: str
    action: str

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "source": self.source,
            "message": self.message,
            "action": self.action,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Issue:
        return cls(
            kind=str(obj["kind"]),
            source=str(obj["source"]),
            message=str(obj["message"]),
            action=str(obj["action"]),
        )


@dataclass(frozen=True)
class DetectionSample:
    """One image file and its boxes.

    Two samples are equal when they describe the same file, size, boxes, class names, flags and
    split; ``source`` and ``box_sources`` (where they were read from) do not take part, so the
    COCO, VOC and YOLO versions of the same labels give equal records.

    Attributes:
        path: Absolute path of the image file.
        width: Image width in pixels, from the file's header (EXIF orientation applied).
        height: Image height in pixels, likewise.
        boxes: ``(x1, y1, x2, y2)`` per box, float absolute pixels (the module's convention).
        labels: Class name of each box.
        iscrowd: COCO's crowd flag per box (all ``False`` when the format has none).
        difficult: Pascal VOC's difficult flag per box (all ``False`` when the format has none).
        split: ``"train"``, ``"val"`` or ``"test"`` when the source fixes it, else ``None``.
        source: Where the image's record came from (``"Annotations/a.xml"``).
        box_sources: Where each box came from (``"labels/train/a.txt:3"``).
    """

    path: Path
    width: int
    height: int
    boxes: tuple[Box, ...] = ()
    labels: tuple[str, ...] = ()
    iscrowd: tuple[bool, ...] = ()
    difficult: tuple[bool, ...] = ()
    split: str | None = None
    source: str | None = field(default=None, compare=False)
    box_sources: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        n = len(self.boxes)
        boxes = tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in self.boxes)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", tuple(self.labels))
        for name in ("iscrowd", "difficult"):
            flags = tuple(bool(f) for f in getattr(self, name)) or (False,) * n
            object.__setattr__(self, name, flags)
        sources = tuple(self.box_sources) or tuple(
            f"{self.source or self.path.name}: box {i + 1}" for i in range(n)
        )
        object.__setattr__(self, "box_sources", sources)
        for name in ("labels", "iscrowd", "difficult", "box_sources"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} boxes")
        if self.split is not None and self.split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES} or None, got {self.split!r}")

    def __len__(self) -> int:
        return len(self.boxes)

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        path = self.path
        if root is not None:
            with contextlib.suppress(ValueError):
                path = self.path.relative_to(root)
        return {
            "path": path.as_posix(),
            "width": self.width,
            "height": self.height,
            "split": self.split,
            "source": self.source,
            "boxes": [
                {
                    "xyxy": list(box),
                    "label": label,
                    "iscrowd": crowd,
                    "difficult": difficult,
                    "source": src,
                }
                for box, label, crowd, difficult, src in zip(
                    self.boxes,
                    self.labels,
                    self.iscrowd,
                    self.difficult,
                    self.box_sources,
                    strict=True,
                )
            ],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], root: Path | None = None) -> DetectionSample:
        path = Path(obj["path"])
        if root is not None and not path.is_absolute():
            path = root / path
        boxes = obj.get("boxes", [])
        return cls(
            path=path,
            width=int(obj["width"]),
            height=int(obj["height"]),
            boxes=tuple(tuple(b["xyxy"]) for b in boxes),
            labels=tuple(str(b["label"]) for b in boxes),
            iscrowd=tuple(bool(b.get("iscrowd", False)) for b in boxes),
            difficult=tuple(bool(b.get("difficult", False)) for b in boxes),
            split=obj.get("split"),
            source=obj.get("source"),
            box_sources=tuple(str(b["source"]) for b in boxes if "source" in b),
        )


@dataclass
class DetectionIndex:
    """All images of a detection dataset, their class names (sorted, stable ids = positions)
    and the problems the reader found.

    When ``classes`` is not given it is the sorted set of the box labels.
    """

    root: Path
    samples: list[DetectionSample]
    classes: list[str] = field(default_factory=list)
    format: str = "unknown"
    issues: list[Issue] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.classes:
            self.classes = sorted({label for s in self.samples for label in s.labels})

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def num_boxes(self) -> int:
        return sum(len(s) for s in self.samples)

    def counts(self) -> dict[str, int]:
        """Boxes per class (every class present, possibly 0)."""
        counter = Counter(label for s in self.samples for label in s.labels)
        return {name: counter.get(name, 0) for name in self.classes}

    def subset(self, positions: list[int]) -> DetectionIndex:
        """A new index with the samples at ``positions``; the class list and issues are kept."""
        return DetectionIndex(
            root=self.root,
            samples=[self.samples[i] for i in positions],
            classes=list(self.classes),
            format=self.format,
            issues=list(self.issues),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "format": self.format,
            "classes": list(self.classes),
            "samples": [s.to_json(self.root) for s in self.samples],
            "issues": [i.to_json() for i in self.issues],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DetectionIndex:
        root = Path(obj["root"])
        return cls(
            root=root,
            samples=[DetectionSample.from_json(s, root) for s in obj["samples"]],
            classes=list(obj["classes"]),
            format=obj.get("format", "unknown"),
            issues=[Issue.from_json(i) for i in obj.get("issues", [])],
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DetectionIndex:
        """Read an index written by :meth:`save`.

        Raises:
            DataError: The file is missing or not such an index.
        """
        try:
            return cls.from_json(read_json(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}: not a detection index written by DetectionIndex.save ({exc})"
            ) from None


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes (0 when either has no area)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 and math.isfinite(union) else 0.0


def box_iou_matrix(a: Any, b: Any, crowd: Any = None) -> np.ndarray:
    """Pairwise intersection over union of ``(n, 4)`` and ``(m, 4)`` XYXY boxes, ``(n, m)``.

    Boxes without area give 0. With ``crowd`` (``m`` flags), a crowd box's column is the
    intersection over the area of the ``a`` box instead (COCO's rule: a detection inside a
    crowd region is covered by it whatever the region's size).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0.0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0.0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0.0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, dtype=bool)[None, :], area_a[:, None], union)
    out: np.ndarray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def detection_split(
    index: DetectionIndex,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Split:
    """Split a detection index with :func:`visionflow.data.split.stratified_split`.

    The split the dataset gives is used when every sample has one (COCO's per-split JSONs, VOC's
    ImageSets, YOLO's train/val folders). Otherwise each image is stratified by its most frequent
    class (ties: the first in class order), images without boxes forming their own group, so
    every split gets about the same share of each class and of negatives.

    Raises:
        ConfigError: A fraction is outside ``[0, 1)`` or the two sum to 1 or more.
    """
    from visionflow.data.split import stratified_split

    proxy = []
    for s in index.samples:
        label = None
        if s.labels:
            counts = Counter(s.labels)
            label = min(counts, key=lambda name: (-counts[name], name))
        proxy.append(Sample(path=s.path, label=label, split=s.split, source=s.source))
    return stratified_split(
        DatasetIndex(root=index.root, samples=proxy, classes=list(index.classes)),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
