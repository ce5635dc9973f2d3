"""YOLO (Darknet / Ultralytics): one text file per image, a line ``class cx cy w h`` per box,
the four numbers normalised by the image's width and height.

Layouts:

* a ``data.yaml`` (or ``dataset.yaml``; the file itself or its folder may be given) with
  ``names`` (a list, or a mapping ``{id: name}``) and ``train`` / ``val`` / ``test``: each a folder
  of images, a ``.txt`` list of image paths, or a list of those, relative to ``path`` when that
  names the yaml's folder or a folder inside it (otherwise ``path`` records where the author kept
  the data and is ignored) and to the yaml's folder otherwise. Roboflow's ``train: ../train/images``
  is read as ``train/images`` under the yaml's folder;
* without a yaml: ``images/`` and ``labels/`` (optionally with ``train``/``val``/``test``
  sub-folders, or ``<split>/images`` + ``<split>/labels``), names in ``classes.txt`` or
  ``obj.names`` (in the root or in ``labels/``), one per line, id = line number from 0.

An image's label file is its path with the last ``images`` folder replaced by ``labels`` and the
suffix by ``.txt`` (beside the image when there is no ``images`` folder). An image without one,
or with an empty one, is a negative. Polygon lines (``class x1 y1 x2 y2 ...``, Ultralytics
segmentation) count as their bounding box. Label files without an image are reported.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from visionflow.data.detection._files import (
    parse_number,
    read_annotation_bytes,
    resolve_under,
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
from visionflow.data.images import IMAGE_EXTENSIONS
from visionflow.data.readers.folder import _files_under
from visionflow.errors import DataError

__all__ = ["CLASS_NAME_FILES", "YAML_NAMES", "label_path", "read_yolo"]

_log = logging.getLogger(__name__)

#: Dataset description files looked for in a YOLO folder, in order.
YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")
#: Class-name files (one name per line) used when there is no yaml.
CLASS_NAME_FILES = ("classes.txt", "obj.names", "classes.names")

_LAYOUT = (
    "YOLO: images/ + labels/ (a '<stem>.txt' per image, lines 'class cx cy w h' normalised), "
    "names in data.yaml or classes.txt/obj.names, splits from data.yaml or images/{train,val,test}"
)
_MAX_YAML_BYTES = 4 * 2**20
_SPLIT_KEYS = ("train", "val", "test")


def _yaml_file(directory: Path) -> Path | None:
    for name in YAML_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def _split_dirs(directory: Path) -> list[Path]:
    return [
        p for p in sorted(directory.iterdir()) if p.is_dir() and split_of_name(p.name) is not None
    ]


def _detect(path: Path) -> bool:
    if path.is_file():
        if path.suffix.lower() not in (".yaml", ".yml"):
            return False
        with open(path, "rb") as fh:
            return b"names" in fh.read(_MAX_YAML_BYTES)
    if not path.is_dir():
        return False
    if _yaml_file(path) is not None:
        return True
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return True
    return any((d / "images").is_dir() and (d / "labels").is_dir() for d in _split_dirs(path))


def label_path(image: Path, root: Path) -> Path:
    """Where YOLO keeps an image's labels: the last ``images`` folder below ``root`` becomes
    ``labels`` (folders above the dataset root are never renamed); without one, beside it."""
    relative = image.relative_to(root).parts
    parts = list(relative)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return (root / Path(*parts)).with_suffix(".txt")
    return image.with_suffix(".txt")


@register_detection_reader("yolo", detect=_detect, layout=_LAYOUT)
def read_yolo(path: Path) -> DetectionIndex:
    """YOLO: images/ + labels/ with normalised 'class cx cy w h' lines and a class-name list."""
    if path.is_file():
        yaml_path: Path | None = path
        root = path.parent
    elif path.is_dir():
        yaml_path = _yaml_file(path)
        root = path
    else:
        raise DataError(f"{path} is neither a file nor a folder; expected {_LAYOUT}")
    root = root.resolve()
    config: dict[str, Any] = {}
    yaml_name = ""
    if yaml_path is not None:
        yaml_path = yaml_path.resolve()
        yaml_name = rel(yaml_path, root)
        config = _load_yaml(yaml_path, yaml_name)
    names = _names(config, yaml_name) if "names" in config else _names_file(root)
    if any(config.get(key) for key in _SPLIT_KEYS):
        sources = _yaml_sources(config, root, yaml_name)
    else:
        sources = _folder_sources(root)

    issues: list[Issue] = []
    images: list[RawImage] = []
    matched: set[Path] = set()
    label_dirs: list[Path] = []
    for split, directory, files in sources:
        if directory is not None:
            swapped = label_path(directory / "x", root).parent
            if swapped != directory and swapped not in label_dirs:
                label_dirs.append(swapped)
        for image in files:
            labels = label_path(image, root)
            matched.add(labels)
            images.append(_read_labels(image, labels, split, names, root, issues))
    if not images:
        raise DataError(f"{root}: no images found; expected {_LAYOUT}")
    issues.extend(_orphans(label_dirs, matched, root))
    return build_index(
        root, images, classes=sorted(set(names.values())), format="yolo", issues=issues
    )


# ------------------------------------------------------------------------ configuration
def _load_yaml(file: Path, name: str) -> dict[str, Any]:
    data = read_annotation_bytes(file, limit=_MAX_YAML_BYTES)
    try:
        obj = yaml.safe_load(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DataError(f"{name}: malformed YAML{at}: {problem}") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise DataError(
            f"{name}: expected a mapping (names, train, val...), found {type(obj).__name__}"
        )
    return obj


def _class_name(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: class name {value!r} is not text")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: a class name is empty")
    return text


def _names(config: dict[str, Any], name: str) -> dict[int, str]:
    raw = config["names"]
    where = f"{name}: names"
    out: dict[int, str] = {}
    if isinstance(raw, list):
        for i, value in enumerate(raw):
            out[i] = _class_name(value, f"{where}[{i}]")
    elif isinstance(raw, dict):
        for key, value in raw.items():
            if isinstance(key, bool) or not (
                isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())
            ):
                raise DataError(f"{where}: key {key!r} is not a class id (0, 1, 2...)")
            out[int(key)] = _class_name(value, f"{where}[{key}]")
    else:
        raise DataError(f"{where} must be a list or a mapping of id: name, found {raw!r}")
    if not out:
        raise DataError(f"{where} is empty; list the class names")
    _no_duplicate_names(out, where)
    nc = config.get("nc")
    if nc is not None and nc != len(out):
        raise DataError(f"{name}: nc is {nc!r} but names lists {len(out)} classes")
    return out


def _no_duplicate_names(names: dict[int, str], where: str) -> None:
    seen: dict[str, int] = {}
    for cid, cname in names.items():
        if cname in seen:
            raise DataError(
                f"{where}: class ids {seen[cname]} and {cid} are both named {cname!r}; give "
                "every class a distinct name"
            )
        seen[cname] = cid


def _names_file(root: Path) -> dict[int, str]:
    for directory in (root, root / "labels"):
        for file_name in CLASS_NAME_FILES:
            file = directory / file_name
            if not file.is_file():
                continue
            name = rel(file, root)
            try:
                text = read_annotation_bytes(file, limit=_MAX_YAML_BYTES).decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
            lines = [line.strip() for line in text.splitlines()]
            while lines and not lines[-1]:
                lines.pop()
            out = {}
            for i, line in enumerate(lines):
                if not line:
                    raise DataError(f"{name}:{i + 1}: empty class name (ids are line numbers)")
                out[i] = line
            if not out:
                raise DataError(f"{name} is empty; write one class name per line")
            _no_duplicate_names(out, name)
            return out
    raise DataError(
        f"{root}: no class names found; add a data.yaml with 'names: [...]' or a classes.txt "
        "with one class name per line (line 1 = class 0)"
    )


# ------------------------------------------------------------------------ images
Source = tuple[str | None, Path | None, list[Path]]


def _images_under(directory: Path, root: Path) -> list[Path]:
    files = _files_under(directory, root)
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)


def _folder_sources(root: Path) -> list[Source]:
    images = root / "images"
    if images.is_dir():
        subs = _split_dirs(images)
        if not subs:
            return [(None, images, _images_under(images, root))]
        sources: list[Source] = [(split_of_name(d.name), d, _images_under(d, root)) for d in subs]
        loose = [p for p in sorted(images.iterdir()) if p.is_file()]
        loose = [p for p in loose if p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            sources.append((None, None, loose))
        return sources
    return [
        (split_of_name(d.name), d / "images", _images_under(d / "images", root))
        for d in _split_dirs(root)
        if (d / "images").is_dir()
    ]


def _base(config: dict[str, Any], root: Path, name: str) -> Path:
    raw = config.get("path")
    if raw is None or raw == "":
        return root
    if not isinstance(raw, str):
        raise DataError(f"{name}: path is {raw!r}; expected a folder")
    try:
        return resolve_under(root, raw, root, f"{name}: path")
    except DataError:
        candidate = Path(raw).expanduser()
        if candidate.is_absolute() and candidate.resolve() == root:
            return root
        _log.warning(
            "%s: path %r is outside the dataset folder; reading train/val/test relative to %s",
            name,
            raw,
            root,
        )
        return root


def _resolve_entry(base: Path, entry: str, root: Path, where: str) -> Path:
    try:
        return resolve_under(base, entry, root, where)
    except DataError:
        parts = PurePosixPath(entry.strip().replace("\\", "/")).parts
        stripped = list(parts)
        while stripped and stripped[0] == "..":
            stripped.pop(0)
        if stripped and len(stripped) < len(parts):
            candidate = resolve_under(root, "/".join(stripped), root, where)
            if candidate.exists():
                return candidate
        raise


def _yaml_sources(config: dict[str, Any], root: Path, name: str) -> list[Source]:
    base = _base(config, root, name)
    sources: list[Source] = []
    for key in _SPLIT_KEYS:
        value = config.get(key)
        if not value:
            continue
        entries = value if isinstance(value, list) else [value]
        for entry in entries:
            where = f"{name}: {key}"
            if not isinstance(entry, str):
                raise DataError(f"{where}: {entry!r} is not a path")
            target = _resolve_entry(base, entry, root, where)
            if target.is_dir():
                sources.append((key, target, _images_under(target, root)))
            elif target.is_file() and target.suffix.lower() == ".txt":
                sources.append((key, None, _list_file(target, root)))
            elif target.is_file() and target.suffix.lower() in IMAGE_EXTENSIONS:
                sources.append((key, None, [target]))
            else:
                raise DataError(
                    f"{where}: {entry!r} ({target}) is not a folder of images or a .txt list"
                )
    return sources


def _list_file(file: Path, root: Path) -> list[Path]:
    """Image paths listed one per line, relative to the list's folder."""
    name = rel(file, root)
    try:
        text = read_annotation_bytes(file).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(resolve_under(file.parent, line, root, f"{name}:{lineno}"))
    return out


# ------------------------------------------------------------------------ labels
def _read_labels(
    image: Path,
    labels: Path,
    split: str | None,
    names: dict[int, str],
    root: Path,
    issues: list[Issue],
) -> RawImage:
    raw = RawImage(path=image, source=rel(image, root), split=split, normalised=True)
    if not labels.is_file():
        return raw  # a negative
    name = rel(labels, root)
    raw.source = name
    for lineno, tokens in _lines(labels, name):
        where = f"{name}:{lineno}"
        cid_value = parse_number(tokens[0], where, "the class id")
        if cid_value != int(cid_value):
            raise DataError(f"{where}: the class id {tokens[0]!r} is not a whole number")
        cid = int(cid_value)
        numbers = [parse_number(t, where, f"value {i + 1}") for i, t in enumerate(tokens[1:])]
        if len(numbers) == 4:
            cx, cy, w, h = numbers
        elif len(numbers) >= 6 and len(numbers) % 2 == 0:
            xs, ys = numbers[0::2], numbers[1::2]
            cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
            w, h = max(xs) - min(xs), max(ys) - min(ys)
        else:
            raise DataError(
                f"{where}: expected 'class cx cy w h' (5 fields) or a polygon 'class x1 y1 x2 y2 "
                f"x3 y3 ...', found {len(tokens)} fields"
            )
        if cid not in names:
            ids = sorted(names)
            known = f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ids
            issues.append(
                Issue(
                    "unknown_class",
                    where,
                    f"class id {cid} is not in the class names (ids {known})",
                    "dropped",
                )
            )
            continue
        raw.boxes.append(RawBox((cx, cy, w, h), names[cid], where))
    return raw


def _lines(file: Path, name: str) -> list[tuple[int, list[str]]]:
    try:
        text = read_annotation_bytes(file).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            out.append((lineno, stripped.split()))
    return out


def _orphans(label_dirs: list[Path], matched: set[Path], root: Path) -> list[Issue]:
    """Label files in the label folders that no image uses."""
    out = []
    for directory in label_dirs:
        if not directory.is_dir():
            continue
        for file in sorted(_files_under(directory, root)):
            if file.suffix.lower() != ".txt" or file in matched or file.name in CLASS_NAME_FILES:
                continue
            name = rel(file, root)
            try:
                n = len(_lines(file, name))
            except DataError:
                n = 0
            out.append(
                Issue(
                    "missing_image",
                    name,
                    f"no image for this label file ({n} box(es)); expected it under "
                    f"{rel(_image_dir_for(directory, root), root)}/ with the same stem",
                    "dropped",
                )
            )
    return out


def _image_dir_for(label_dir: Path, root: Path) -> Path:
    parts = list(label_dir.relative_to(root).parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            parts[i] = "images"
            break
    return root.joinpath(*parts)
