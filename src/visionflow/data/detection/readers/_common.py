"""What every detection reader does after parsing its files: read the image sizes from their
headers, drop (and report) annotations whose image cannot be read, report declared sizes that
disagree with the file, convert YOLO's normalised boxes to pixels, and sort the records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from visionflow.data.detection._files import image_sizes
from visionflow.data.detection.records import Box, DetectionIndex, DetectionSample, Issue
from visionflow.data.images import DEFAULT_MAX_PIXELS

__all__ = ["RawBox", "RawImage", "build_index", "rel", "split_of_name"]

#: Folder or file-name parts that mean a split, and the split each means.
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def split_of_name(name: str) -> str | None:
    """The split a folder or file-name part means (``"val2017"`` -> ``"val"``), else ``None``."""
    word = name.strip().lower().rstrip("0123456789").rstrip("_-")
    return _SPLIT_WORDS.get(word)


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or the whole path when it is not under it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


@dataclass
class RawBox:
    """A box as parsed: xyxy pixels, or YOLO's normalised ``cx, cy, w, h``."""

    coords: tuple[float, float, float, float]
    label: str
    source: str
    iscrowd: bool = False
    difficult: bool = False


@dataclass
class RawImage:
    """One image's annotations as parsed, before its file has been looked at."""

    path: Path
    source: str
    split: str | None = None
    declared_size: tuple[int, int] | None = None
    normalised: bool = False
    boxes: list[RawBox] = field(default_factory=list)


def build_index(
    root: Path,
    images: list[RawImage],
    *,
    classes: list[str],
    format: str,
    issues: list[Issue],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DetectionIndex:
    """Records for every image whose header can be read; the rest become issues.

    Samples are sorted by path relative to ``root`` (then by source), so the same labels read
    from any format come out in the same order.
    """
    sizes = image_sizes((im.path for im in images), max_pixels=max_pixels)
    samples: list[DetectionSample] = []
    for im in images:
        size = sizes[im.path]
        if isinstance(size, str):
            n = len(im.boxes)
            issues.append(
                Issue(
                    "missing_image",
                    im.source,
                    f"image {rel(im.path, root)}: {size}; its {n} box(es) cannot be used",
                    "dropped",
                )
            )
            continue
        width, height = size
        if im.declared_size is not None and im.declared_size != size:
            dw, dh = im.declared_size
            issues.append(
                Issue(
                    "size_mismatch",
                    im.source,
                    f"the annotation declares {dw}x{dh} but {rel(im.path, root)} is "
                    f"{width}x{height} pixels",
                    "kept; the file's size is used",
                )
            )
        boxes: list[Box] = []
        for box in im.boxes:
            if im.normalised:
                cx, cy, w, h = box.coords
                boxes.append(
                    (
                        (cx - w / 2) * width,
                        (cy - h / 2) * height,
                        (cx + w / 2) * width,
                        (cy + h / 2) * height,
                    )
                )
            else:
                boxes.append(box.coords)
        samples.append(
            DetectionSample(
                path=im.path,
                width=width,
                height=height,
                boxes=tuple(boxes),
                labels=tuple(b.label for b in im.boxes),
                iscrowd=tuple(b.iscrowd for b in im.boxes),
                difficult=tuple(b.difficult for b in im.boxes),
                split=im.split,
                source=im.source,
                box_sources=tuple(b.source for b in im.boxes),
            )
        )
    samples.sort(key=lambda s: (rel(s.path, root), s.source or ""))
    return DetectionIndex(
        root=root, samples=samples, classes=sorted(classes), format=format, issues=issues
    )
