"""Health checks of a detection dataset: what is wrong with its boxes before training on them.

:func:`check_detection` takes the index a reader built (with the reader's own findings: unknown
class ids, annotations whose image is missing, declared sizes that disagree with the file) and
returns a :class:`DetectionReport` plus a cleaned
:class:`~visionflow.data.detection.records.DetectionIndex`:

* images whose pixels cannot be decoded are dropped (with ``decode=True``, the default: every
  image is decoded once, so a truncated file is caught here rather than mid-epoch);
* boxes with zero or negative width or height are dropped (``degenerate``);
* boxes reaching outside the image are clipped to it (``clipped``), or dropped when nothing is
  left (``outside``); boxes narrower or lower than ``min_box_size`` pixels after that are dropped
  (``degenerate``);
* a box of the same class as an earlier box of the image, identical or with IoU above
  ``duplicate_iou``, is removed (``duplicate``), naming the box it repeats;
* images without boxes are kept as negatives and counted; those that only lost their boxes to
  the checks are counted apart, since they may not be true negatives.

Every dropped, clipped or removed box is an :class:`~visionflow.data.detection.records.Issue`
naming its source (``"labels/train/a.txt:3"``). The report also counts boxes and images per
class and box sizes in COCO's buckets (area below 32², below 96², above).
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visionflow._cpu import cpu_count
from visionflow._io import atomic_write_json
from visionflow.data.checks import _render_list, _run
from visionflow.data.detection.records import (
    ISSUE_KINDS,
    Box,
    DetectionIndex,
    DetectionSample,
    Issue,
    box_iou,
)
from visionflow.data.images import DEFAULT_MAX_PIXELS
from visionflow.errors import ConfigError, DataError

__all__ = ["SIZE_BUCKETS", "DetectionReport", "check_detection", "size_bucket"]

#: COCO's object-size buckets: upper bounds of the box area in pixels (``large`` is the rest).
SIZE_BUCKETS = {"small": 32**2, "medium": 96**2}

#: Titles of the issue lists in :meth:`DetectionReport.render`, in display order.
_TITLES = {
    "missing_image": "Annotations whose image is missing or unreadable (dropped)",
    "unreadable_image": "Images that cannot be decoded (dropped)",
    "unknown_class": "Unknown class ids (boxes dropped)",
    "outside": "Boxes entirely outside the image (dropped)",
    "degenerate": "Degenerate boxes (dropped)",
    "clipped": "Boxes clipped to the image (kept)",
    "duplicate": "Duplicate boxes (removed)",
    "size_mismatch": "Declared sizes that differ from the file (the file's size is used)",
}


def size_bucket(box: Box) -> str:
    """``"small"``, ``"medium"`` or ``"large"`` by the box's area, as COCO's evaluation."""
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    for name, limit in SIZE_BUCKETS.items():
        if area < limit:
            return name
    return "large"


@dataclass
class DetectionReport:
    """The outcome of :func:`check_detection`.

    Attributes:
        root: The dataset root.
        format: The reader that produced the index.
        num_images: Images in the input index (annotations whose image was missing never made
            it into the index: they are issues).
        num_usable: Images in the cleaned index.
        num_boxes: Boxes in the input index.
        num_kept_boxes: Boxes in the cleaned index.
        num_negatives: Usable images without boxes (kept: they teach the background).
        num_emptied: Of those, images that had boxes before the checks dropped them all.
        classes: The class list.
        counts: Boxes per class after the checks (every class present, possibly 0).
        images_per_class: Usable images holding at least one box of each class.
        box_sizes: Per class, boxes per COCO size bucket (``small``/``medium``/``large``);
            ``"(all)"`` sums the classes.
        image_sizes: ``{"width": {"min", "median", "max"}, "height": {...}}`` of usable images.
        issues: The reader's issues, then the checks', each naming its source.
        warnings: Human-readable summary lines.
    """

    root: str
    format: str
    num_images: int
    num_usable: int
    num_boxes: int
    num_kept_boxes: int
    num_negatives: int
    num_emptied: int
    classes: list[str]
    counts: dict[str, int]
    images_per_class: dict[str, int]
    box_sizes: dict[str, dict[str, int]]
    image_sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def issue_counts(self) -> dict[str, int]:
        """Issues per kind (only kinds that occur)."""
        counter = Counter(i.kind for i in self.issues)
        return {kind: counter[kind] for kind in ISSUE_KINDS if counter[kind]}

    def of_kind(self, kind: str) -> list[Issue]:
        """The issues of one kind, in report order."""
        return [i for i in self.issues if i.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "format": self.format,
            "num_images": self.num_images,
            "num_usable": self.num_usable,
            "num_boxes": self.num_boxes,
            "num_kept_boxes": self.num_kept_boxes,
            "num_negatives": self.num_negatives,
            "num_emptied": self.num_emptied,
            "classes": list(self.classes),
            "counts": dict(self.counts),
            "images_per_class": dict(self.images_per_class),
            "box_sizes": {k: dict(v) for k, v in self.box_sizes.items()},
            "image_sizes": {k: dict(v) for k, v in self.image_sizes.items()},
            "issue_counts": self.issue_counts(),
            "issues": [i.to_json() for i in self.issues],
            "warnings": list(self.warnings),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically."""
        return atomic_write_json(path, self.to_json())

    def render(self, console: Console) -> None:
        """A table of boxes per class and size bucket, then each kind of issue."""
        table = Table(
            title=(
                f"{self.root} ({self.format}): {self.num_usable} of {self.num_images} images, "
                f"{self.num_kept_boxes} of {self.num_boxes} boxes usable"
            ),
            title_justify="left",
        )
        for name, justify in (
            ("class", "left"),
            ("boxes", "right"),
            ("images", "right"),
            ("small", "right"),
            ("medium", "right"),
            ("large", "right"),
        ):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for name in [*self.classes, "(all)"]:
            sizes = self.box_sizes.get(name, {})
            boxes = self.num_kept_boxes if name == "(all)" else self.counts.get(name, 0)
            images = (
                self.num_usable - self.num_negatives
                if name == "(all)"
                else self.images_per_class.get(name, 0)
            )
            style = "red" if boxes == 0 else ("bold" if name == "(all)" else None)
            table.add_row(
                name,
                str(boxes),
                str(images),
                *(str(sizes.get(b, 0)) for b in ("small", "medium", "large")),
                style=style,
            )
        negatives = f"{self.num_negatives} (of which {self.num_emptied} emptied by the checks)"
        table.caption = f"images without boxes (negatives, kept): {negatives}"
        console.print(table)
        for kind, title in _TITLES.items():
            _render_list(
                console,
                title,
                [f"{i.source}: {i.message}" for i in self.of_kind(kind)],
                style="yellow" if kind in ("clipped", "size_mismatch") else "red",
            )
        _render_list(console, "Warnings", list(self.warnings), style="yellow")

    def raise_for_problems(self) -> None:
        """Raise if nothing is left to train a detector on.

        Raises:
            DataError: No usable image, or no usable box.
        """
        if self.num_usable == 0:
            raise DataError(
                f"{self.root}: no usable images ({self.num_images} read; see the data report)"
            )
        if self.num_kept_boxes == 0:
            raise DataError(
                f"{self.root}: no usable boxes ({self.num_boxes} read, "
                f"{len(self.issues)} issue(s); see the data report); a detector needs boxes"
            )


def check_detection(
    index: DetectionIndex,
    *,
    min_box_size: float = 1.0,
    duplicate_iou: float = 0.95,
    decode: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[DetectionReport, DetectionIndex]:
    """Check every box (and, with ``decode``, every image); report and return a cleaned index.

    Args:
        index: The dataset as read by a detection reader.
        min_box_size: Boxes narrower or lower than this (pixels, after clipping) are dropped;
            1 is torchvision's ``SanitizeBoundingBoxes`` default.
        duplicate_iou: Same-class boxes of one image overlapping more than this are duplicates.
        decode: Decode every image completely (catches truncated files; costs a full pass).
        max_pixels: Largest ``width * height`` decoded.
        workers: Decoding threads (default ``min(8, cpu count)``).
        progress: Show a progress bar on stderr.

    Returns:
        The report and the cleaned index (same root, format, classes and reader issues; the
        samples in their order, minus undecodable images, with their boxes cleaned).

    Raises:
        ConfigError: ``min_box_size`` is negative, ``duplicate_iou`` outside (0, 1] or
            ``workers`` below 1.
    """
    if min_box_size < 0:
        raise ConfigError(f"min_box_size must be 0 or more, got {min_box_size}")
    if not 0 < duplicate_iou <= 1:
        raise ConfigError(f"duplicate_iou must be in (0, 1], got {duplicate_iou}")
    workers = min(8, cpu_count()) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    root = Path(index.root)
    issues: list[Issue] = list(index.issues)
    unreadable: dict[Path, str] = {}
    if decode:
        paths = sorted({s.path for s in index.samples}, key=lambda p: p.as_posix())
        for path, result in zip(paths, _run(paths, max_pixels, workers, progress), strict=True):
            if result.reason is not None:
                unreadable[path] = result.reason

    kept: list[DetectionSample] = []
    emptied = 0
    for sample in index.samples:
        if sample.path in unreadable:
            issues.append(
                Issue(
                    "unreadable_image",
                    sample.source or _rel(sample.path, root),
                    f"image {_rel(sample.path, root)}: {unreadable[sample.path]}; its "
                    f"{len(sample)} box(es) cannot be used",
                    "dropped",
                )
            )
            continue
        cleaned = _clean_boxes(sample, min_box_size, duplicate_iou, issues)
        if len(sample) and not len(cleaned):
            emptied += 1
        kept.append(cleaned)

    clean = DetectionIndex(
        root=index.root,
        samples=kept,
        classes=list(index.classes),
        format=index.format,
        issues=list(index.issues),
    )
    report = _report(index, clean, issues, emptied)
    return report, clean


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _fmt(box: Box) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def _clean_boxes(
    sample: DetectionSample, min_box_size: float, duplicate_iou: float, issues: list[Issue]
) -> DetectionSample:
    width, height = sample.width, sample.height
    keep: list[int] = []
    boxes: list[Box] = []
    for i, box in enumerate(sample.boxes):
        source, label = sample.box_sources[i], sample.labels[i]
        x1, y1, x2, y2 = box
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            issues.append(
                Issue(
                    "degenerate",
                    source,
                    f"{label!r} box {_fmt(box)} has no area (width {x2 - x1:g}, height "
                    f"{y2 - y1:g})",
                    "dropped",
                )
            )
            continue
        clipped = (
            min(max(x1, 0.0), width),
            min(max(y1, 0.0), height),
            min(max(x2, 0.0), width),
            min(max(y2, 0.0), height),
        )
        if clipped != box:
            if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
                issues.append(
                    Issue(
                        "outside",
                        source,
                        f"{label!r} box {_fmt(box)} lies outside the {width}x{height} image",
                        "dropped",
                    )
                )
                continue
            issues.append(
                Issue(
                    "clipped",
                    source,
                    f"{label!r} box {_fmt(box)} reaches outside the {width}x{height} image; "
                    f"clipped to {_fmt(clipped)}",
                    "clipped",
                )
            )
            box = clipped
        w, h = box[2] - box[0], box[3] - box[1]
        if w < min_box_size or h < min_box_size:
            issues.append(
                Issue(
                    "degenerate",
                    source,
                    f"{label!r} box {_fmt(box)} is {w:g}x{h:g} px, below the minimum of "
                    f"{min_box_size:g} px",
                    "dropped",
                )
            )
            continue
        duplicate_of = None
        for j, earlier in zip(keep, boxes, strict=True):
            if sample.labels[j] != label:
                continue
            iou = box_iou(earlier, box)
            if earlier == box or iou > duplicate_iou:
                duplicate_of = (j, iou)
                break
        if duplicate_of is not None:
            j, iou = duplicate_of
            issues.append(
                Issue(
                    "duplicate",
                    source,
                    f"{label!r} box {_fmt(box)} repeats {sample.box_sources[j]} (IoU {iou:.3f})",
                    "removed",
                )
            )
            continue
        keep.append(i)
        boxes.append(box)
    if len(keep) == len(sample) and boxes == list(sample.boxes):
        return sample
    return replace(
        sample,
        boxes=tuple(boxes),
        labels=tuple(sample.labels[i] for i in keep),
        iscrowd=tuple(sample.iscrowd[i] for i in keep),
        difficult=tuple(sample.difficult[i] for i in keep),
        box_sources=tuple(sample.box_sources[i] for i in keep),
    )


def _report(
    index: DetectionIndex, clean: DetectionIndex, issues: list[Issue], emptied: int
) -> DetectionReport:
    counts = clean.counts()
    images_per_class = {
        name: sum(1 for s in clean.samples if name in s.labels) for name in clean.classes
    }
    box_sizes: dict[str, dict[str, int]] = {
        name: {"small": 0, "medium": 0, "large": 0} for name in [*clean.classes, "(all)"]
    }
    for s in clean.samples:
        for box, label in zip(s.boxes, s.labels, strict=True):
            bucket = size_bucket(box)
            box_sizes[label][bucket] += 1
            box_sizes["(all)"][bucket] += 1
    image_sizes: dict[str, dict[str, float]] = {}
    if clean.samples:
        for name, values in (
            ("width", [s.width for s in clean.samples]),
            ("height", [s.height for s in clean.samples]),
        ):
            image_sizes[name] = {
                "min": min(values),
                "median": float(statistics.median(values)),
                "max": max(values),
            }
    report = DetectionReport(
        root=str(index.root),
        format=index.format,
        num_images=len(index.samples),
        num_usable=len(clean.samples),
        num_boxes=index.num_boxes,
        num_kept_boxes=clean.num_boxes,
        num_negatives=sum(1 for s in clean.samples if not len(s)),
        num_emptied=emptied,
        classes=list(clean.classes),
        counts=counts,
        images_per_class=images_per_class,
        box_sizes=box_sizes,
        image_sizes=image_sizes,
        issues=issues,
    )
    report.warnings = _warnings(report)
    return report


def _warnings(report: DetectionReport) -> list[str]:
    out = []
    for kind, n in report.issue_counts().items():
        out.append(f"{n} x {kind}: {ISSUE_KINDS[kind]}")
    for name in report.classes:
        if report.counts.get(name, 0) == 0:
            out.append(f"class {name!r} has no usable boxes")
    if report.num_emptied:
        out.append(
            f"{report.num_emptied} image(s) lost all their boxes to the checks and now count as "
            "negatives; fix their boxes, or remove the images if they are not true negatives"
        )
    return out
