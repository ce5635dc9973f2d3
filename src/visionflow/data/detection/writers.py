"""Writers of the three detection formats, and the placement of images in each layout.

:func:`write_detection` writes a :class:`~visionflow.data.detection.records.DetectionIndex` as a
new dataset folder in COCO, Pascal VOC or YOLO layout, the one each reader reads back:

* ``coco``: ``annotations/instances_<split>.json`` (``instances.json`` for images without a
  split) and ``images/<split>/``; category ids are 1.. in class-list order; ``iscrowd`` kept;
* ``voc``: ``Annotations/<stem>.xml``, ``JPEGImages/``, and ``ImageSets/Main/{train,val,test,
  trainval}.txt`` when the samples have splits; ``difficult`` kept; boxes as 1-based inclusive
  indices ``(x1 + 1, y1 + 1, x2, y2)``, written as integers when within 0.001 px of one
  (:data:`VOC_SNAP`), else as the exact float;
* ``yolo``: ``data.yaml`` (``names``, and ``train``/``val``/``test`` when there are splits),
  ``images/<split>/`` and ``labels/<split>/<stem>.txt`` with normalised ``cx cy w h`` printed
  with ``precision`` decimals (an empty label file marks a negative). YOLO has no split-less
  slot beside split folders, so when only some samples have a split the others go to train.

What a format cannot hold is listed in :attr:`WriteResult.notes` (crowd or difficult flags,
classes without boxes in VOC). Images keep their file name; a name already used in the target
folder gets ``_1``, ``_2``... before the suffix. They are hard-linked (no extra disk space; a
symlink would point out of the new dataset, which the readers refuse) or copied with
``images="copy"``; a link that the file system refuses falls back to a copy.

The output is built in a hidden temporary folder beside ``dst`` and renamed into place at the
end, so an interrupted conversion leaves no half-written dataset (the files inside it are plain
writes: the rename of the whole folder is the atomic step). The destination must not exist
(or be an empty folder) and must not overlap the source dataset.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visionflow.data.detection.records import DetectionIndex, DetectionSample
from visionflow.data.index import SPLIT_NAMES
from visionflow.errors import ConfigError, DataError

__all__ = [
    "IMAGE_MODES",
    "WriteResult",
    "available_detection_writers",
    "register_detection_writer",
    "validate_write_options",
    "write_detection",
]

#: How images get into the new dataset.
IMAGE_MODES = ("link", "copy")


@dataclass
class WriteResult:
    """What :func:`write_detection` wrote.

    Attributes:
        format: The format written.
        dst: The new dataset folder.
        num_images: Images written.
        num_boxes: Boxes written.
        linked: Images hard-linked.
        copied: Images copied (by request, or because a link was refused).
        notes: What the format could not hold, or where samples went, for a person.
    """

    format: str
    dst: Path
    num_images: int = 0
    num_boxes: int = 0
    linked: int = 0
    copied: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "dst": str(self.dst),
            "num_images": self.num_images,
            "num_boxes": self.num_boxes,
            "linked": self.linked,
            "copied": self.copied,
            "notes": list(self.notes),
        }


class _Placer:
    """Puts image files into target folders under unique stems, by link or copy."""

    def __init__(self, mode: str, result: WriteResult) -> None:
        self.mode = mode
        self.result = result
        self._taken: dict[Path, set[str]] = {}

    def place(self, source: Path, folder: Path) -> Path:
        taken = self._taken.setdefault(folder, set())
        stem, suffix = source.stem, source.suffix
        candidate, k = stem, 0
        while candidate.lower() in taken:  # lower: case-insensitive file systems
            k += 1
            candidate = f"{stem}_{k}"
        taken.add(candidate.lower())
        target = folder / f"{candidate}{suffix}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            if self.mode == "link":
                try:
                    os.link(source, target)
                    self.result.linked += 1
                    return target
                except OSError:  # another device, or links not supported: copy instead
                    pass
            shutil.copyfile(source, target)
            self.result.copied += 1
        except OSError as exc:
            raise DataError(
                f"{source}: cannot {self.mode} the image into {folder} ({exc.strerror or exc})"
            ) from None
        return target


WriterFn = Callable[[DetectionIndex, Path, _Placer, WriteResult, int], None]

_WRITERS: dict[str, WriterFn] = {}


def register_detection_writer(name: str) -> Callable[[WriterFn], WriterFn]:
    """Register a writer ``fn(index, folder, placer, result, precision)`` under ``name``.

    Raises:
        ValueError: The name is empty or already registered.
    """
    if not name:
        raise ValueError("a detection writer needs a name")

    def decorator(fn: WriterFn) -> WriterFn:
        if name in _WRITERS:
            raise ValueError(f"a detection writer named {name!r} is already registered")
        _WRITERS[name] = fn
        return fn

    return decorator


def available_detection_writers() -> list[str]:
    """Names of the registered detection writers."""
    return list(_WRITERS)


def write_detection(
    index: DetectionIndex,
    dst: str | os.PathLike[str],
    *,
    format: str,
    images: str = "link",
    precision: int = 6,
) -> WriteResult:
    """Write ``index`` as a new dataset folder ``dst`` in ``format``.

    Args:
        index: The records to write (usually from
            :func:`~visionflow.data.detection.readers.read_detection`).
        dst: The new dataset folder: must not exist, or be empty.
        format: ``"coco"``, ``"voc"`` or ``"yolo"`` (see :func:`available_detection_writers`).
        images: ``"link"`` (hard links, copy where refused) or ``"copy"``.
        precision: Decimals of YOLO's normalised numbers (6 keeps boxes of a 10,000-pixel image
            within 0.01 px).

    Raises:
        ConfigError: Unknown format or image mode, or a precision outside 1..17.
        DataError: ``dst`` overlaps the source dataset or an image, already holds files, or a
            box names a class outside ``index.classes``.
    """
    validate_write_options(format=format, images=images, precision=precision)
    target = Path(dst).expanduser()
    _refuse_overlap(index, target)
    known = set(index.classes)
    for s in index.samples:
        unknown = sorted(set(s.labels) - known)
        if unknown:
            raise DataError(
                f"{s.source or s.path}: class(es) {unknown} are not in the class list "
                f"{index.classes}"
            )
    resolved = target.resolve()
    resolved.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{resolved.name}.", suffix=".tmp", dir=resolved.parent))
    result = _result(format, target, index)
    try:
        _WRITERS[format](index, tmp, _Placer(images, result), result, precision)
        if resolved.is_dir():
            resolved.rmdir()  # empty, checked above; fails (and stops us) if it was filled since
        os.rename(tmp, resolved)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def validate_write_options(*, format: str, images: str, precision: int) -> None:
    """Check :func:`write_detection`'s options (before any time is spent reading a dataset).

    Raises:
        ConfigError: Unknown format or image mode, or a precision outside 1..17.
    """
    if format not in _WRITERS:
        close = difflib.get_close_matches(format, list(_WRITERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown detection format {format!r} to write{hint}; choose one of "
            f"{', '.join(_WRITERS)}"
        )
    if images not in IMAGE_MODES:
        raise ConfigError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    if not 1 <= precision <= 17:
        raise ConfigError(f"precision must be between 1 and 17 decimals, got {precision}")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _result(format: str, dst: Path, index: DetectionIndex) -> WriteResult:
    return WriteResult(
        format=format, dst=dst, num_images=len(index.samples), num_boxes=index.num_boxes
    )


def _refuse_overlap(index: DetectionIndex, dst: Path) -> None:
    target = dst.resolve()
    root = Path(index.root).resolve()
    if target == root or target.is_relative_to(root) or root.is_relative_to(target):
        raise DataError(
            f"{dst}: the output folder overlaps the source dataset {root}; choose a folder "
            "outside it (visionflow never writes into or over a dataset it reads)"
        )
    for s in index.samples:
        if s.path.resolve().is_relative_to(target):
            raise DataError(
                f"{dst}: the output folder holds the source image {s.path}; choose another folder"
            )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(
            f"{dst} already exists and is not an empty folder; give a new folder so nothing is "
            "overwritten"
        )


def _splits(
    index: DetectionIndex, result: WriteResult, *, mixed_to_train: bool
) -> list[str | None]:
    """Each sample's split; with ``mixed_to_train``, unsplit samples beside split ones -> train."""
    splits = [s.split for s in index.samples]
    if mixed_to_train and any(splits) and not all(splits):
        n = sum(1 for s in splits if s is None)
        result.notes.append(
            f"{n} image(s) without a split were written to train (the other images have splits)"
        )
        return [s or "train" for s in splits]
    return splits


def _note_flags(
    index: DetectionIndex, result: WriteResult, *, crowd: bool, difficult: bool
) -> None:
    n_crowd = sum(sum(s.iscrowd) for s in index.samples)
    n_difficult = sum(sum(s.difficult) for s in index.samples)
    if not crowd and n_crowd:
        result.notes.append(
            f"{n_crowd} crowd box(es) written as ordinary boxes: {result.format} has no "
            "iscrowd flag"
        )
    if not difficult and n_difficult:
        result.notes.append(
            f"{n_difficult} difficult box(es) written as ordinary boxes: {result.format} has no "
            "difficult flag"
        )


# ---------------------------------------------------------------------------- COCO
@register_detection_writer("coco")
def _write_coco(
    index: DetectionIndex, out: Path, placer: _Placer, result: WriteResult, precision: int
) -> None:
    del precision  # COCO keeps floats as they are
    _note_flags(index, result, crowd=True, difficult=False)
    category = {name: i + 1 for i, name in enumerate(index.classes)}
    categories = [
        {"id": cid, "name": name, "supercategory": "none"} for name, cid in category.items()
    ]
    groups: dict[str | None, list[DetectionSample]] = {}
    for sample, split in zip(
        index.samples, _splits(index, result, mixed_to_train=False), strict=True
    ):
        groups.setdefault(split, []).append(sample)
    for split in sorted(groups, key=lambda s: (s is None, SPLIT_NAMES.index(s) if s else 0)):
        folder = out / "images" / split if split else out / "images"
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for image_id, sample in enumerate(groups[split], start=1):
            target = placer.place(sample.path, folder)
            images.append(
                {
                    "id": image_id,
                    "file_name": target.name,
                    "width": sample.width,
                    "height": sample.height,
                }
            )
            for (x1, y1, x2, y2), label, crowd in zip(
                sample.boxes, sample.labels, sample.iscrowd, strict=True
            ):
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category[label],
                        "bbox": [_plain(x1), _plain(y1), _plain(w), _plain(h)],
                        "area": _plain(w * h),
                        "iscrowd": int(crowd),
                        "segmentation": [],
                    }
                )
        name = f"instances_{split}.json" if split else "instances.json"
        obj = {
            "info": {"description": "written by visionflow"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        text = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        _write(out / "annotations" / name, text.encode("utf-8"))


def _plain(value: float) -> int | float:
    """Whole numbers as JSON integers (``12`` rather than ``12.0``), others unchanged."""
    return int(value) if value.is_integer() else value


# ---------------------------------------------------------------------------- VOC
@register_detection_writer("voc")
def _write_voc(
    index: DetectionIndex, out: Path, placer: _Placer, result: WriteResult, precision: int
) -> None:
    del precision  # numbers are written exactly
    _note_flags(index, result, crowd=False, difficult=True)
    used = Counter(label for s in index.samples for label in s.labels)
    unused = [name for name in index.classes if not used[name]]
    if unused:
        result.notes.append(
            f"class(es) without boxes are not kept (VOC has no class list): {', '.join(unused)}"
        )
    by_split: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for sample in index.samples:
        target = placer.place(sample.path, out / "JPEGImages")
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = "JPEGImages"
        ET.SubElement(root, "filename").text = target.name
        size = ET.SubElement(root, "size")
        ET.SubElement(size, "width").text = str(sample.width)
        ET.SubElement(size, "height").text = str(sample.height)
        ET.SubElement(size, "depth").text = "3"
        ET.SubElement(root, "segmented").text = "0"
        for (x1, y1, x2, y2), label, difficult in zip(
            sample.boxes, sample.labels, sample.difficult, strict=True
        ):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = label
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = str(int(difficult))
            box = ET.SubElement(obj, "bndbox")
            for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(box, tag).text = _number_text(value)
        ET.indent(root)
        _write(out / "Annotations" / f"{target.stem}.xml", ET.tostring(root, encoding="utf-8"))
        if sample.split:
            by_split[sample.split].append(target.stem)
    if any(by_split.values()):
        main = out / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        lists = dict(by_split)
        lists["trainval"] = by_split["train"] + by_split["val"]
        for name, stems in lists.items():
            if stems:
                _write(main / f"{name}.txt", "".join(f"{s}\n" for s in stems).encode())


#: VOC coordinates this close to a whole number are written as that integer: VOC's indices are
#: whole pixels, many VOC tools parse them with ``int()``, and YOLO's 6-decimal rounding leaves
#: noise like 9.999984 that is not a real sub-pixel position.
VOC_SNAP = 1e-3


def _number_text(value: float) -> str:
    """An integer when (nearly, see :data:`VOC_SNAP`) whole, else the shortest exact text."""
    nearest = round(value)
    return str(int(nearest)) if abs(value - nearest) < VOC_SNAP else repr(float(value))


# ---------------------------------------------------------------------------- YOLO
@register_detection_writer("yolo")
def _write_yolo(
    index: DetectionIndex, out: Path, placer: _Placer, result: WriteResult, precision: int
) -> None:
    _note_flags(index, result, crowd=False, difficult=False)
    ids = index.class_to_idx
    splits = _splits(index, result, mixed_to_train=True)
    for sample, split in zip(index.samples, splits, strict=True):
        folder = out / "images" / split if split else out / "images"
        target = placer.place(sample.path, folder)
        labels = (out / "labels" / split) if split else out / "labels"
        lines = []
        for (x1, y1, x2, y2), label in zip(sample.boxes, sample.labels, strict=True):
            values = (
                (x1 + x2) / 2 / sample.width,
                (y1 + y2) / 2 / sample.height,
                (x2 - x1) / sample.width,
                (y2 - y1) / sample.height,
            )
            numbers = " ".join(f"{v:.{precision}f}" for v in values)
            lines.append(f"{ids[label]} {numbers}\n")
        labels.mkdir(parents=True, exist_ok=True)
        _write(labels / f"{target.stem}.txt", "".join(lines).encode())
    config: dict[str, Any] = {"path": "."}
    for name in SPLIT_NAMES:
        if name in splits:
            config[name] = f"images/{name}"
    if not any(splits):
        del config["path"]
    config["nc"] = len(index.classes)
    config["names"] = list(index.classes)
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    _write(out / "data.yaml", text.encode("utf-8"))
