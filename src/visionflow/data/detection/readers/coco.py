"""COCO object detection: an "instances" JSON with ``images``, ``annotations`` and
``categories``; each annotation's ``bbox`` is ``[x, y, width, height]`` in pixels.

Accepted layouts (the dataset root in brackets):

* a JSON file: ``[root]/annotations/instances_train2017.json`` (root = the folder above
  ``annotations/``) or any ``[root]/file.json``;
* a folder: ``[root]/annotations/*.json`` (``instances_*.json`` when there are any, since
  ``captions_*`` and ``person_keypoints_*`` are other tasks), one JSON per split, or Roboflow's
  ``[root]/<split>/_annotations.coco.json``.

The split comes from the JSON's name (``instances_val2017`` -> val, ``<split>/_annotations...``
-> that split). An image's ``file_name`` is looked up, in order, under ``root/<part>``,
``root/images/<part>``, ``root/images``, the JSON's folder and ``root`` (``<part>`` being the
name after ``instances_``, e.g. ``train2017``); a name that leads out of the root is refused.
Category ids are per file and mapped to names, so several JSONs may number them differently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from visionflow.data.detection._files import (
    check_links,
    finite_number,
    lexical_under,
    read_annotation_bytes,
)
from visionflow.data.detection.readers import register_detection_reader
from visionflow.data.detection.readers._common import (
    RawBox,
    RawImage,
    build_index,
    rel,
    split_of_name,
)
from visionflow.data.detection.records import DetectionIndex, Issue
from visionflow.errors import DataError

__all__ = ["ROBOFLOW_COCO_NAME", "read_coco"]

#: The file name Roboflow gives its COCO exports, one per split folder.
ROBOFLOW_COCO_NAME = "_annotations.coco.json"

_LAYOUT = (
    "a COCO instances JSON (images, annotations with bbox [x, y, w, h], categories), or a "
    "folder with annotations/instances_<split>.json or <split>/_annotations.coco.json"
)
_SNIFF_BYTES = 64 * 1024


def _json_files(directory: Path) -> list[Path]:
    ann = directory / "annotations"
    if ann.is_dir():
        files = sorted(p for p in ann.glob("*.json") if p.is_file())
        instances = [p for p in files if p.name.lower().startswith("instances")]
        if instances or files:
            return instances or files
    roboflow = sorted(
        p / ROBOFLOW_COCO_NAME
        for p in directory.iterdir()
        if p.is_dir() and (p / ROBOFLOW_COCO_NAME).is_file()
    )
    if roboflow:
        return roboflow
    for name in (ROBOFLOW_COCO_NAME, "instances.json", "annotations.json"):
        if (directory / name).is_file():
            return [directory / name]
    return []


def _looks_like_coco(file: Path) -> bool:
    with open(file, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    return b'"images"' in head or b'"annotations"' in head or b'"categories"' in head


def _detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".json" and _looks_like_coco(path)
    return path.is_dir() and bool(_json_files(path))


@register_detection_reader("coco", detect=_detect, layout=_LAYOUT)
def read_coco(path: Path) -> DetectionIndex:
    """COCO: instances JSON(s) with images, annotations (bbox x, y, w, h) and categories."""
    if path.is_file():
        files = [path]
        parent = path.parent
        root = parent.parent if parent.name.lower() == "annotations" else parent
    elif path.is_dir():
        files = _json_files(path)
        root = path
        if not files:
            raise DataError(f"{path}: no COCO annotation file found; expected {_LAYOUT}")
    else:
        raise DataError(f"{path} is neither a file nor a folder; expected {_LAYOUT}")
    root = root.resolve()
    files = [f.resolve() for f in files]
    images: list[RawImage] = []
    issues: list[Issue] = []
    classes: set[str] = set()
    for file in files:
        file_images, file_classes = _read_file(file, root, issues)
        images.extend(file_images)
        classes.update(file_classes)
    return build_index(root, images, classes=sorted(classes), format="coco", issues=issues)


def _split_and_part(file: Path) -> tuple[str | None, str]:
    """The split a JSON's name means, and the name part that may be its image folder."""
    if file.name == ROBOFLOW_COCO_NAME:
        return split_of_name(file.parent.name), file.parent.name
    stem = file.stem
    part = stem[len("instances_") :] if stem.lower().startswith("instances_") else stem
    return split_of_name(part), part


def _image_bases(file: Path, root: Path, part: str) -> list[Path]:
    candidates = [root / part, root / "images" / part, root / "images", file.parent, root]
    out: list[Path] = []
    for c in candidates:
        if c not in out and c.is_relative_to(root):
            out.append(c)
    return out


def _load(file: Path, name: str) -> dict[str, Any]:
    data = read_annotation_bytes(file)
    try:
        obj = json.loads(data)
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{name}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise DataError(f"{name}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{name}: expected a JSON object with images, annotations and categories, found "
            f"{type(obj).__name__}"
        )
    for key in ("images", "categories"):
        if key not in obj:
            raise DataError(f"{name}: no {key!r} list; is this a COCO instances file?")
    for key in ("images", "annotations", "categories"):
        if not isinstance(obj.get(key, []), list):
            raise DataError(f"{name}: {key!r} must be a list, found {type(obj[key]).__name__}")
    return obj


def _id(value: Any, where: str, what: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(f"{where}: {what} is {value!r}; expected an integer")
    return value


def _read_file(file: Path, root: Path, issues: list[Issue]) -> tuple[list[RawImage], set[str]]:
    name = rel(file, root)
    obj = _load(file, name)
    split, part = _split_and_part(file)
    bases = _image_bases(file, root, part)

    categories: dict[int | str, str] = {}
    for i, cat in enumerate(obj["categories"]):
        where = f"{name}:categories[{i}]"
        if not isinstance(cat, dict):
            raise DataError(f"{where}: expected an object with id and name")
        cid = _id(cat.get("id"), where, "id")
        cname = cat.get("name")
        if not isinstance(cname, str) or not cname.strip():
            raise DataError(f"{where}: name is {cname!r}; every category needs a non-empty name")
        cname = cname.strip()
        if cid in categories and categories[cid] != cname:
            raise DataError(
                f"{where}: id {cid!r} is used for both {categories[cid]!r} and {cname!r}"
            )
        categories[cid] = cname

    by_id: dict[int | str, RawImage] = {}
    for i, entry in enumerate(obj["images"]):
        where = f"{name}:images[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object with id and file_name")
        iid = _id(entry.get("id"), where, "id")
        if iid in by_id:
            raise DataError(f"{where}: image id {iid!r} appears twice in {name}")
        file_name = entry.get("file_name")
        if not isinstance(file_name, str):
            raise DataError(f"{where}: file_name is {file_name!r}; expected the image's path")
        by_id[iid] = RawImage(
            path=_locate(file_name, bases, root, f"{where} (id {iid})"),
            source=f"{name}:image {iid}",
            split=split,
            declared_size=_declared_size(entry, where),
        )

    for i, ann in enumerate(obj.get("annotations", [])):
        if not isinstance(ann, dict):
            raise DataError(f"{name}:annotations[{i}]: expected an object")
        where = (
            f"{name}:annotation {ann['id']}"
            if isinstance(ann.get("id"), int | str) and not isinstance(ann.get("id"), bool)
            else f"{name}:annotations[{i}]"
        )
        image_id = _id(ann.get("image_id"), where, "image_id")
        category_id = _id(ann.get("category_id"), where, "category_id")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DataError(f"{where}: bbox is {bbox!r}; expected [x, y, width, height]")
        x, y, w, h = (finite_number(v, where, f"bbox[{k}]") for k, v in enumerate(bbox))
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            raise DataError(f"{where}: iscrowd is {crowd!r}; expected 0 or 1")
        image = by_id.get(image_id)
        if image is None:
            issues.append(
                Issue(
                    "missing_image",
                    where,
                    f"image_id {image_id!r} is not in the images list of {name}",
                    "dropped",
                )
            )
            continue
        label = categories.get(category_id)
        if label is None:
            known = ", ".join(str(k) for k in sorted(categories, key=str)) or "none"
            issues.append(
                Issue(
                    "unknown_class",
                    where,
                    f"category_id {category_id!r} is not in the categories of {name} "
                    f"(ids: {known})",
                    "dropped",
                )
            )
            continue
        image.boxes.append(RawBox((x, y, x + w, y + h), label, where, iscrowd=bool(crowd)))
    return list(by_id.values()), set(categories.values())


def _declared_size(entry: dict[str, Any], where: str) -> tuple[int, int] | None:
    if entry.get("width") is None and entry.get("height") is None:
        return None
    w = finite_number(entry.get("width"), where, "width")
    h = finite_number(entry.get("height"), where, "height")
    if w != int(w) or h != int(h) or w <= 0 or h <= 0:
        raise DataError(f"{where}: width and height must be positive integers, got {w}x{h}")
    return int(w), int(h)


def _locate(file_name: str, bases: list[Path], root: Path, where: str) -> Path:
    """The first base under which ``file_name`` exists, else where it would be in the first
    base it does not escape from (names are checked on their own; only the chosen path's links
    are resolved, the costly part)."""
    valid: list[Path] = []
    first_error: DataError | None = None
    for base in bases:
        try:
            candidate = lexical_under(base, file_name, root, where)
        except DataError as exc:
            first_error = first_error or exc
            continue
        if os.path.lexists(candidate):
            # a link inside the root that leads out of it is refused, not looked past
            return check_links(candidate, file_name, root, where)
        valid.append(candidate)
    if valid:
        return check_links(valid[0], file_name, root, where)
    raise first_error or DataError(f"{where}: no folder to look for {file_name!r} in")
