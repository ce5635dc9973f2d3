"""Helpers the detection readers share: image sizes from headers, paths kept inside the dataset
root, bounded reads of annotation files, strict numbers, and XML parsed without a DTD."""

from __future__ import annotations

import math
import os
import stat
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from xml.parsers import expat

from PIL import Image, UnidentifiedImageError

from visionflow._cpu import cpu_count
from visionflow.data.images import _OPEN_LOCK, DEFAULT_MAX_PIXELS
from visionflow.errors import DataError

__all__ = [
    "MAX_ANNOTATION_BYTES",
    "XmlDocument",
    "check_links",
    "finite_number",
    "image_sizes",
    "lexical_under",
    "parse_number",
    "parse_xml",
    "read_annotation_bytes",
    "read_image_size",
    "resolve_under",
]

#: Largest annotation file read (COCO's train2017 instances file is about 450 MB).
MAX_ANNOTATION_BYTES = 2 * 2**30
#: Largest Pascal VOC XML file read: one image's objects take a few kilobytes.
MAX_XML_BYTES = 16 * 2**20

_ORIENTATION_TAG = 0x0112
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # transposes: width and height trade places


def read_image_size(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an image from its header, as :func:`~visionflow.data.images.
    load_image` will return it (EXIF orientation applied), without decoding the pixels.

    Raises:
        DataError: Missing, not a regular file, empty, not an image, or larger than
            ``max_pixels``; the message is the reason alone (the caller adds where).
    """
    name = os.fspath(path)
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise DataError("file not found") from None
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError("not a regular file")
    if info.st_size == 0:
        raise DataError("empty file")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(name)
    except UnidentifiedImageError:
        raise DataError("not an image (unidentified format)") from None
    except Exception as exc:
        raise DataError(f"cannot read the image header ({exc})") from None
    try:
        width, height = im.size
        try:
            orientation = int(im.getexif().get(_ORIENTATION_TAG, 1))
        except Exception:  # a broken EXIF block is not fatal, as in load_image
            orientation = 1
    finally:
        im.close()
    if width <= 0 or height <= 0:
        raise DataError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise DataError(f"image has {width * height} pixels, more than the limit of {max_pixels}")
    if orientation in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    return width, height


def image_sizes(
    paths: Iterable[Path], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[Path, tuple[int, int] | str]:
    """Header size of every path, or the reason it has none (read on a few threads)."""
    unique = list(dict.fromkeys(paths))

    def one(path: Path) -> tuple[int, int] | str:
        try:
            return read_image_size(path, max_pixels=max_pixels)
        except DataError as exc:
            return str(exc)

    if len(unique) < 16:
        return {p: one(p) for p in unique}
    with ThreadPoolExecutor(max_workers=min(8, cpu_count())) as pool:
        return dict(zip(unique, pool.map(one, unique), strict=True))


def lexical_under(base: Path, raw: str, root: Path, where: str) -> Path:
    """``raw`` joined to ``base`` and normalised (``..`` folded), without touching the disk.

    Backslashes count as separators (annotations written on Windows).

    Raises:
        DataError: ``raw`` is empty or absolute, or its ``..`` lead out of ``root``.
    """
    text = raw.strip().replace("\\", "/")
    if not text:
        raise DataError(f"{where}: the image path is empty")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise _escape(raw, root, where)
    candidate = Path(os.path.normpath(base / text))
    if not candidate.is_relative_to(root):
        raise _escape(raw, root, where)
    return candidate


def check_links(candidate: Path, raw: str, root: Path, where: str) -> Path:
    """``candidate`` (inside ``root`` by name) after making sure no symlink leads it out.

    Raises:
        DataError: Resolving the links leaves ``root``, or they loop.
    """
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError):  # symlink loop
        raise _escape(raw, root, where) from None
    if not resolved.is_relative_to(root):
        raise _escape(raw, root, where)
    return candidate


def resolve_under(base: Path, raw: str, root: Path, where: str) -> Path:
    """Absolute path of ``raw`` relative to ``base``, refusing anything that leaves ``root``.

    ``root`` must be resolved (no symlinks in it: the readers resolve it once). The returned path
    keeps the names as written (links inside the root are not replaced by their targets) and
    need not exist.

    Raises:
        DataError: ``raw`` is empty or absolute, or leads (through ``..`` or a symlink) out of
            ``root``; ``where`` names the file and entry.
    """
    return check_links(lexical_under(base, raw, root, where), raw, root, where)


def _escape(raw: str, root: Path, where: str) -> DataError:
    return DataError(f"{where}: path '{raw}' escapes the dataset root {root}")


def read_annotation_bytes(path: Path, *, limit: int = MAX_ANNOTATION_BYTES) -> bytes:
    """The bytes of an annotation file, refusing non-regular and oversized files.

    Raises:
        DataError: Missing, unreadable, not a regular file or above ``limit`` bytes.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise DataError(
                f"{path}: {info.st_size} bytes, more than the {limit} bytes an annotation file "
                "may have"
            )
        with open(path, "rb") as fh:
            return fh.read(limit + 1)[:limit]
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def finite_number(value: Any, where: str, what: str) -> float:
    """``value`` as a finite float; JSON/YAML numbers only (no strings, no booleans).

    Raises:
        DataError: Not a number, or NaN/infinite; ``where`` and ``what`` are in the message.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: {what} is {value!r}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise DataError(f"{where}: {what} is {value!r}; it must be a finite number")
    return number


def parse_number(text: str, where: str, what: str) -> float:
    """A number written as text (XML, YOLO lines) as a finite float.

    Raises:
        DataError: Not a number, or NaN/infinite.
    """
    try:
        number = float(text.strip())
    except ValueError:
        raise DataError(f"{where}: {what} is {text.strip()!r}, not a number") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: {what} is {text.strip()!r}; it must be a finite number")
    return number


class _ForbiddenDeclaration(Exception):
    pass


@dataclass(frozen=True)
class XmlDocument:
    """A parsed XML file: its root element and the line each element starts on."""

    root: ET.Element
    lines: dict[int, int]

    def line(self, element: ET.Element) -> int | None:
        """The 1-based line where ``element`` starts."""
        return self.lines.get(id(element))


def parse_xml(path: Path) -> XmlDocument:
    """Parse a (small) XML file into an element tree, refusing any DTD.

    The standard library's parsers expand internal entities ("billion laughs"); defusedxml is not
    a dependency of visionflow, so the tree is built here from expat events with every document
    type declaration refused: annotation files never need one. External entities are never
    fetched (expat does not, without a handler).

    Raises:
        DataError: The file is too large, not well-formed XML, or declares a DTD or entities;
            the message names the file and the line.
    """
    data = read_annotation_bytes(path, limit=MAX_XML_BYTES)
    parser = expat.ParserCreate()
    stack: list[ET.Element] = []
    root: list[ET.Element] = []
    text: list[str] = []
    lines: dict[int, int] = {}

    def refuse(*_: Any) -> None:
        raise _ForbiddenDeclaration

    def start(tag: str, attrs: dict[str, str]) -> None:
        _flush(stack, text)
        element = ET.Element(tag, attrs)
        lines[id(element)] = parser.CurrentLineNumber
        if stack:
            stack[-1].append(element)
        else:
            root.append(element)
        stack.append(element)

    def end(_tag: str) -> None:
        _flush(stack, text)
        stack.pop()

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse  # type: ignore[assignment]
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        parser.Parse(data, True)
    except _ForbiddenDeclaration:
        raise DataError(
            f"{path}: line {parser.CurrentLineNumber}: XML document type declarations and "
            "entities are refused (an annotation file needs none); remove the <!DOCTYPE ...> block"
        ) from None
    except expat.ExpatError as exc:
        raise DataError(
            f"{path}: malformed XML at line {exc.lineno}, column {exc.offset}: "
            f"{expat.ErrorString(exc.code)}"
        ) from None
    if not root:
        raise DataError(f"{path}: no XML element found")
    return XmlDocument(root[0], lines)


def _flush(stack: list[ET.Element], text: list[str]) -> None:
    """Give the collected character data to the open element (as text or as the tail of its
    last child), the way ElementTree would."""
    if not text:
        return
    joined = "".join(text)
    text.clear()
    if not stack:
        return
    parent = stack[-1]
    if len(parent):
        last = parent[-1]
        last.tail = (last.tail or "") + joined
    else:
        parent.text = (parent.text or "") + joined
