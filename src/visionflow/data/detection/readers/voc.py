"""Pascal VOC: one XML file per image in ``Annotations/``, the images in ``JPEGImages/``.

Each ``<object>`` has a ``<name>``, an optional ``<difficult>`` flag and a ``<bndbox>`` whose
``xmin``, ``ymin``, ``xmax``, ``ymax`` are 1-based, inclusive pixel indices (the VOC devkit
computes a box's width as ``xmax - xmin + 1``): they become ``(xmin - 1, ymin - 1, xmax, ymax)``
in visionflow's continuous 0-based convention, and the VOC writer adds the 1 back, so numbers
survive VOC -> visionflow -> VOC unchanged. ``<filename>`` is looked up in ``JPEGImages/``, then
``images/``, then the root (LabelImg writes its XML next to the images); without one, the image
is the XML's stem with any image extension. ``ImageSets/Main/{train,val,test}.txt`` (or only
``trainval.txt``, meaning train) give the split when present; per-class lists
(``cat_train.txt``) are ignored. The XML is parsed without any DTD (see
:func:`~visionflow.data.detection._files.parse_xml`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from visionflow.data.detection._files import (
    XmlDocument,
    parse_number,
    parse_xml,
    read_annotation_bytes,
)
from visionflow.data.detection._files import resolve_under as _resolve_under
from visionflow.data.detection.readers import register_detection_reader
from visionflow.data.detection.readers._common import RawBox, RawImage, build_index, rel
from visionflow.data.detection.records import DetectionIndex, Issue
from visionflow.data.images import IMAGE_EXTENSIONS
from visionflow.errors import DataError

__all__ = ["read_voc"]

_LAYOUT = (
    "Pascal VOC: Annotations/*.xml (one per image, 1-based inclusive pixel boxes) with the "
    "images in JPEGImages/ and optional ImageSets/Main/{train,val,test}.txt"
)
_SPLIT_FILES = ("train", "val", "test")


def _xml_files(directory: Path) -> list[Path]:
    ann = directory / "Annotations"
    if not ann.is_dir():
        return []
    return sorted(
        p
        for p in ann.iterdir()
        if p.suffix.lower() == ".xml" and not p.name.startswith(".") and p.is_file()
    )


def _detect(path: Path) -> bool:
    return path.is_dir() and bool(_xml_files(path))


@register_detection_reader("voc", detect=_detect, layout=_LAYOUT)
def read_voc(path: Path) -> DetectionIndex:
    """Pascal VOC: Annotations/*.xml with images in JPEGImages/, optional ImageSets/Main."""
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; expected {_LAYOUT}")
    root = path.resolve()
    files = _xml_files(root)
    if not files:
        raise DataError(f"{root}: no Annotations/*.xml files; expected {_LAYOUT}")
    splits = _read_splits(root)
    images: list[RawImage] = []
    classes: set[str] = set()
    for file in files:
        image = _read_xml(file, root, splits.get(file.stem))
        classes.update(b.label for b in image.boxes)
        images.append(image)
    issues: list[Issue] = []
    return build_index(root, images, classes=sorted(classes), format="voc", issues=issues)


def _read_splits(root: Path) -> dict[str, str]:
    """Image id -> split from ``ImageSets/Main``; an id listed in two splits is an error."""
    main = root / "ImageSets" / "Main"
    lists = {
        name: main / f"{name}.txt" for name in _SPLIT_FILES if (main / f"{name}.txt").is_file()
    }
    if not lists and (main / "trainval.txt").is_file():
        lists = {"train": main / "trainval.txt"}
    out: dict[str, str] = {}
    where: dict[str, str] = {}
    for split, file in lists.items():
        name = rel(file, root)
        try:
            text = read_annotation_bytes(file).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
        for line in text.splitlines():
            tokens = line.split()
            if not tokens:
                continue
            image_id = tokens[0]
            if image_id in out and out[image_id] != split:
                raise DataError(
                    f"{name} and {where[image_id]} both list {image_id!r}; an image belongs to "
                    "one split: remove it from one of them"
                )
            out[image_id] = split
            where[image_id] = name
    return out


def _text(element: ET.Element, tag: str) -> str | None:
    """The stripped text of the child ``tag``, or ``None`` when it is absent or empty."""
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text.strip()


def _required(element: ET.Element, tag: str, where: str) -> str:
    text = _text(element, tag)
    if text is None:
        raise DataError(f"{where}: <{tag}> is missing or empty")
    return text


def _at(doc: XmlDocument, element: ET.Element) -> str:
    line = doc.line(element)
    return f" (line {line})" if line else ""


def _read_xml(file: Path, root: Path, split: str | None) -> RawImage:
    name = rel(file, root)
    doc = parse_xml(file)
    tree = doc.root
    if tree.tag != "annotation":
        raise DataError(
            f"{name}: the root element is <{tree.tag}>; a Pascal VOC file starts with <annotation>"
        )
    image_path = _image_path(tree, file, root, name)
    declared = None
    size = tree.find("size")
    if size is not None and size.find("width") is not None:
        where = f"{name}:<size>{_at(doc, size)}"
        w = parse_number(_required(size, "width", where), where, "width")
        h = parse_number(_required(size, "height", where), where, "height")
        if w != int(w) or h != int(h) or w < 0 or h < 0:
            raise DataError(f"{where}: width and height must be whole numbers, got {w}x{h}")
        # VOC tools write 0x0 when they did not know the size: that declares nothing
        declared = (int(w), int(h)) if w > 0 and h > 0 else None
    image = RawImage(path=image_path, source=name, split=split, declared_size=declared)
    for k, obj in enumerate(tree.findall("object"), start=1):
        where = f"{name}:object {k}"
        detail = f"{where}{_at(doc, obj)}"
        label = _required(obj, "name", detail)
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{detail}: <bndbox> is missing")
        xmin, ymin, xmax, ymax = (
            parse_number(_required(bndbox, tag, detail), detail, tag)
            for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        difficult = _flag(_text(obj, "difficult"), detail)
        image.boxes.append(
            RawBox((xmin - 1, ymin - 1, xmax, ymax), label, where, difficult=difficult)
        )
    return image


def _flag(text: str | None, where: str) -> bool:
    if text is None:
        return False
    value = text.lower()
    if value in ("0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise DataError(f"{where}: <difficult> is {text!r}; expected 0 or 1")


def _image_path(tree: ET.Element, file: Path, root: Path, name: str) -> Path:
    bases = [root / "JPEGImages", root / "images", root]
    filename = _text(tree, "filename")
    if filename is None:
        for base in bases:
            for candidate in sorted(base.glob(f"{file.stem}.*")) if base.is_dir() else []:
                if candidate.suffix.lower() in IMAGE_EXTENSIONS and candidate.is_file():
                    return _resolve_under(base, candidate.name, root, f"{name}: <filename>")
        return bases[0] / f"{file.stem}.jpg"
    where = f"{name}: <filename>"
    first = _resolve_under(bases[0], filename, root, where)
    if first.is_file():
        return first
    for base in bases[1:]:
        candidate = _resolve_under(base, filename, root, where)
        if candidate.is_file():
            return candidate
    return first
