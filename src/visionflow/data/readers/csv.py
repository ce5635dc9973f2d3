"""A label file: one row per image, the layout of exported annotations and spreadsheets.

A ``.csv`` or ``.tsv`` file (or a folder holding exactly one of ``labels.csv``, ``labels.tsv``,
``annotations.csv``) with a header row, a path column and a label column, and optionally a split
column. Paths are relative to the file's folder, which is the dataset root; a path that leads out
of the root (absolute, ``..``, a symlink) is refused, because a label file is user input and must
not make visionflow read arbitrary files. Missing images are kept: the data checks report them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

from visionflow.data.index import DatasetIndex, Sample
from visionflow.data.readers import register_reader
from visionflow.errors import DataError

__all__ = [
    "LABEL_COLUMNS",
    "LABEL_FILE_NAMES",
    "PATH_COLUMNS",
    "SPLIT_VALUES",
    "parse_split",
    "read_csv",
    "resolve_in_root",
]

#: File names that make a folder a CSV dataset, in the order they are looked for.
LABEL_FILE_NAMES = ("labels.csv", "labels.tsv", "annotations.csv")
#: Accepted names of the path column (case-insensitive), by priority.
PATH_COLUMNS = ("path", "file", "filename", "image", "filepath")
#: Accepted names of the label column (case-insensitive), by priority.
LABEL_COLUMNS = ("label", "class", "category", "target")
#: Accepted values of the split column (case-insensitive) and the split each one means.
SPLIT_VALUES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}

_SUFFIXES = (".csv", ".tsv")
_LAYOUT = (
    "a .csv/.tsv file with a header and path + label columns (optional split), or a folder "
    "holding labels.csv, labels.tsv or annotations.csv"
)
_SNIFF_BYTES = 64 * 1024


def _label_files(directory: Path) -> list[Path]:
    return [directory / n for n in LABEL_FILE_NAMES if (directory / n).is_file()]


def _detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in _SUFFIXES
    return path.is_dir() and len(_label_files(path)) == 1


@register_reader("csv", detect=_detect, layout=_LAYOUT)
def read_csv(path: Path) -> DatasetIndex:
    """A label file: path and label columns (optional split), paths relative to the file."""
    file = _label_file(path)
    root = file.parent.resolve()
    rows = [(line, row) for line, row in _rows(file) if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"{file} is empty; expected a header row with a path and a label column")
    header = rows[0][1]
    columns = [c.strip().lower() for c in header]
    path_col = _find_column(columns, PATH_COLUMNS, "path", file, header)
    label_col = _find_column(columns, LABEL_COLUMNS, "label", file, header)
    split_col = columns.index("split") if "split" in columns else None

    samples: list[Sample] = []
    for line, row in rows[1:]:
        where = f"{file.name} line {line}"
        raw_path = _cell(row, path_col).strip()
        if not raw_path:
            raise DataError(f"{where}: the path is empty")
        label = _cell(row, label_col).strip()
        if not label:
            raise DataError(f"{where}: the label of '{raw_path}' is empty")
        split = None
        if split_col is not None:
            split = parse_split(_cell(row, split_col), where)
        full = resolve_in_root(raw_path, root, where)
        samples.append(Sample(path=full, label=label, split=split, source=f"{file.name}:{line}"))
    if not samples:
        raise DataError(f"{file} has a header but no rows")
    return DatasetIndex(root=root, samples=samples, format="csv")


def parse_split(value: str, where: str) -> str | None:
    """Canonical split name of a cell (``None`` when empty).

    Raises:
        DataError: The value is not a split name; ``where`` (file and line) is in the message.
    """
    text = value.strip().lower()
    if not text:
        return None
    if text not in SPLIT_VALUES:
        raise DataError(
            f"{where}: invalid split {value.strip()!r}; expected train, val (or valid, "
            "validation) or test"
        )
    return SPLIT_VALUES[text]


def resolve_in_root(raw: str, root: Path, where: str) -> Path:
    """Absolute path of ``raw`` (relative to ``root``), refusing anything that leaves the root.

    Backslashes are read as separators so that label files written on Windows work.

    Raises:
        DataError: The path is absolute or its resolved location (after ``..`` and symlinks)
            is outside ``root``.
    """
    text = raw.replace("\\", "/")
    escape = DataError(f"{where}: path '{raw}' escapes the dataset root {root}")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise escape
    candidate = Path(os.path.normpath(root / text))
    try:
        resolved = (root / text).resolve()
    except (OSError, RuntimeError):  # symlink loop
        raise escape from None
    if not resolved.is_relative_to(root) or not candidate.is_relative_to(root):
        raise escape
    return candidate


def _label_file(path: Path) -> Path:
    if path.is_dir():
        found = _label_files(path)
        if not found:
            raise DataError(
                f"{path}: no label file found; expected one of {', '.join(LABEL_FILE_NAMES)}"
            )
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise DataError(
                f"{path} holds several label files ({names}); pass the one to use as the "
                "dataset path"
            )
        return found[0]
    if not path.is_file():
        raise DataError(f"{path} is not a file; the csv layout expects {_LAYOUT}")
    return path


def _rows(file: Path) -> list[tuple[int, list[str]]]:
    """All rows of the file with their (1-based) line numbers; BOM-tolerant UTF-8."""
    try:
        with open(file, encoding="utf-8-sig", newline="") as fh:
            sample = fh.read(_SNIFF_BYTES)
            fh.seek(0)
            reader = csv.reader(fh, delimiter=_delimiter(file, sample))
            return [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{file}: malformed CSV ({exc})") from None
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from None


def _delimiter(file: Path, sample: str) -> str:
    """Tab for ``.tsv``; otherwise sniffed from the first lines (only the delimiter is taken
    from the sniffer: its quoting guesses are unreliable, the rest stays Excel's dialect)."""
    if file.suffix.lower() == ".tsv":
        return "\t"
    head = "\n".join(sample.splitlines()[:20])
    try:
        return csv.Sniffer().sniff(head, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _find_column(
    columns: list[str], names: Sequence[str], what: str, file: Path, header: list[str]
) -> int:
    for name in names:
        if name in columns:
            return columns.index(name)
    found = ", ".join(repr(c) for c in header) or "none"
    raise DataError(
        f"{file}: no {what} column; expected one of {', '.join(names)} in the header row, "
        f"found columns: {found}"
    )


def _cell(row: list[str], index: int) -> str:
    return row[index] if index < len(row) else ""
