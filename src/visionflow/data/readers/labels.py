"""Labels filled in by a person (the CSV ``visionflow select`` writes), merged into a dataset.

:func:`merge_labels` adds the rows of one or more label files to a dataset's index, so that
``visionflow train DATA --labels to_label.csv`` trains on both. A label file has a header with a
path column and a label column (the names the CSV reader accepts: ``path``/``file``/...,
``label``/``class``/...); other columns (``suggested_label``, ``confidence``...) are ignored.

Rules, each one so that a half-filled or hand-edited file cannot silently change the data:

* a row whose label is empty is skipped (not yet labelled) and counted;
* a label must be one of the dataset's classes (a class with a handful of new images could not
  be split and evaluated; add it to the dataset as a folder instead), a file must exist, and a
  row must have the header's columns; otherwise a :class:`~visionflow.errors.DataError` names
  the file and line;
* paths are relative to the label file's folder, or absolute: the file is a command-line
  argument, trusted like the dataset path itself (``select`` writes absolute paths for pools
  outside the CSV's folder), but every path must be a regular file;
* an image already in the dataset (the same path, or the same bytes under another name) is not
  added again, and keeps the dataset's label; the same image listed twice in the label files
  counts once, and twice with different labels is an error naming both lines;
* new rows go where the run's split puts them: stratified with the rest, or into ``train``
  when the dataset's split is fixed (``train/val/test`` folders, a split column) or comes from
  a split file that does not list them.
"""

from __future__ import annotations

import csv
import difflib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow._io import sha256_file
from visionflow.data.index import DatasetIndex, Sample, Split
from visionflow.data.readers.csv import LABEL_COLUMNS, PATH_COLUMNS, _delimiter, _find_column
from visionflow.errors import DataError

__all__ = ["LabelMerge", "merge_labels"]

_SNIFF_BYTES = 64 * 1024


@dataclass
class LabelMerge:
    """The outcome of :func:`merge_labels`.

    Attributes:
        index: The dataset's samples followed by the added rows (class list unchanged).
        added: The samples added, in file order.
        files: The label files read.
        empty: ``"file line N"`` of every row skipped because its label is empty.
        already: One line per row skipped because its image is already in the dataset.
        repeated: One line per row skipped because an earlier row added the same image.
    """

    index: DatasetIndex
    added: list[Sample] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "added": len(self.added),
            "added_per_class": _counts(self.added),
            "skipped_empty_label": len(self.empty),
            "skipped_in_dataset": list(self.already),
            "skipped_repeated": list(self.repeated),
        }

    def summary(self) -> str:
        """One line for people: what was added and what was skipped, and why."""
        names = ", ".join(Path(f).name for f in self.files)
        parts = [f"{len(self.added)} labelled image(s) added from {names}"]
        if self.empty:
            parts.append(f"{len(self.empty)} row(s) with an empty label skipped")
        if self.already:
            parts.append(f"{len(self.already)} already in the dataset")
        if self.repeated:
            parts.append(f"{len(self.repeated)} listed twice")
        return "; ".join(parts)

    def complete_split(self, split: Split, index: DatasetIndex) -> Split:
        """``split`` with the added images it leaves out (a split file that predates them)
        put into ``train``; ``index`` is the (checked) index the split refers to."""
        assigned = set(split.train) | set(split.val) | set(split.test)
        added = {os.path.normpath(s.path) for s in self.added}
        extra = [
            i
            for i, s in enumerate(index.samples)
            if i not in assigned and os.path.normpath(s.path) in added
        ]
        if not extra:
            return split
        return Split(
            train=sorted([*split.train, *extra]),
            val=list(split.val),
            test=list(split.test),
            seed=split.seed,
            method=split.method,
        )


def _counts(samples: list[Sample]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for s in samples:
        out[str(s.label)] += 1
    return dict(sorted(out.items()))


@dataclass
class _Row:
    file: Path
    line: int
    path: Path
    label: str

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line}"


def _read_rows(file: Path, classes: list[str]) -> tuple[list[_Row], list[str]]:
    """The labelled rows of one file and the ``where`` of its empty-label rows."""
    if not file.is_file():
        raise DataError(f"labels file {file} does not exist")
    try:
        with open(file, encoding="utf-8-sig", newline="") as fh:
            sample = fh.read(_SNIFF_BYTES)
            fh.seek(0)
            reader = csv.reader(fh, delimiter=_delimiter(file, sample))
            lines: list[tuple[int, list[str]]] = []
            try:
                for row in reader:
                    lines.append((reader.line_num, row))
            except csv.Error as exc:
                raise DataError(
                    f"{file} line {reader.line_num}: malformed CSV ({exc}); save it as CSV "
                    "from a spreadsheet, or fix the quoting on that line"
                ) from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
        ) from None
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror or exc})") from None
    lines = [(n, row) for n, row in lines if any(cell.strip() for cell in row)]
    if not lines:
        raise DataError(f"{file} is empty; expected a header row with path and label columns")
    header = [c.strip().lower() for c in lines[0][1]]
    path_col = _find_column(header, PATH_COLUMNS, "path", file, lines[0][1])
    label_col = _find_column(header, LABEL_COLUMNS, "label", file, lines[0][1])
    needed = max(path_col, label_col) + 1
    rows: list[_Row] = []
    empty: list[str] = []
    lookup = set(classes)
    for line, cells in lines[1:]:
        where = f"{file} line {line}"
        if len(cells) > len(header) or len(cells) < needed:
            raise DataError(
                f"{where}: expected {len(header)} columns ({', '.join(lines[0][1])}), found "
                f"{len(cells)}; a comma inside a path or label needs the cell in double quotes"
            )
        raw = cells[path_col].strip()
        if not raw:
            raise DataError(f"{where}: the path is empty")
        label = cells[label_col].strip()
        if not label:
            empty.append(where)
            continue
        if label not in lookup:
            close = difflib.get_close_matches(label, classes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                f"{where}: label {label!r} of '{raw}' is not a class of the dataset{hint}; "
                f"the classes are {', '.join(classes)} (a new class needs its own folder in "
                "the dataset)"
            )
        path = _resolve(raw, file.parent, where)
        rows.append(_Row(file, line, path, label))
    return rows, empty


def _resolve(raw: str, base: Path, where: str) -> Path:
    text = raw.replace("\\", "/")
    path = Path(os.path.normpath(Path(text) if os.path.isabs(text) else base / text))
    if not path.exists():
        raise DataError(f"{where}: '{raw}' does not exist (looked for {path})")
    if not path.is_file():
        raise DataError(f"{where}: '{raw}' is not a regular file ({path})")
    return path


def merge_labels(index: DatasetIndex, label_files: Sequence[str | os.PathLike[str]]) -> LabelMerge:
    """Add the labelled rows of ``label_files`` to ``index`` (see the module docstring for
    the rules).

    Args:
        index: The dataset as read (its class list is the set of allowed labels).
        label_files: CSV/TSV files with path and label columns, read in order.

    Returns:
        A :class:`LabelMerge` whose ``index`` holds the dataset's samples and then the added
        ones; ``index`` itself is not changed.

    Raises:
        DataError: A file is missing or not UTF-8 CSV, lacks a path or label column, or a row
            is malformed, names a missing file or an unknown class, or gives an image a
            different label than an earlier row; the message names the file and line.
    """
    classes = list(index.classes)
    merge = LabelMerge(index=index)
    rows: list[_Row] = []
    for item in label_files:
        file = Path(item).expanduser()
        found, empty = _read_rows(file, classes)
        merge.files.append(str(file))
        merge.empty.extend(empty)
        rows.extend(found)

    # the dataset's own images, by path and (for files of a size some row has) by content
    by_path = {os.path.normpath(s.path): s for s in index.samples}
    sizes = {_size(r.path) for r in rows}
    by_hash: dict[str, Sample] = {}
    for s in index.samples:
        if rows and _size(s.path) in sizes:
            try:
                by_hash.setdefault(sha256_file(s.path), s)
            except OSError:
                continue
    fixed_split = bool(index.samples) and all(s.split is not None for s in index.samples)

    taken: dict[str, _Row] = {}  # sha256 -> the row that added it
    for row in rows:
        try:
            digest = sha256_file(row.path)
        except OSError as exc:
            raise DataError(
                f"{row.where}: cannot read {row.path} ({exc.strerror or exc})"
            ) from None
        same = by_path.get(os.path.normpath(row.path)) or by_hash.get(digest)
        if same is not None:
            note = f"{row.where}: {row.path} is in the dataset as {same.path}"
            if same.label != row.label:
                note += f" (labelled {same.label!r} there; that label is kept)"
            merge.already.append(note)
            continue
        first = taken.get(digest)
        if first is not None:
            if first.label != row.label:
                raise DataError(
                    f"{row.where}: {row.path} is labelled {row.label!r}, but {first.where} "
                    f"labels the same image ({first.path}) {first.label!r}; keep one of them"
                )
            merge.repeated.append(f"{row.where}: same image as {first.where}")
            continue
        taken[digest] = row
        split = "train" if fixed_split else None
        merge.added.append(
            Sample(
                path=row.path, label=row.label, split=split, source=f"{row.file.name}:{row.line}"
            )
        )
    merge.index = DatasetIndex(
        root=index.root,
        samples=[*index.samples, *merge.added],
        classes=classes,
        format=index.format,
    )
    return merge


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1
