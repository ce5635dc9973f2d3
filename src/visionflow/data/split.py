"""Train/val/test splits: made stratified and seeded, or taken from the dataset or a file.

A split is a :class:`~visionflow.data.index.Split` of positions into one
:class:`~visionflow.data.index.DatasetIndex`. On disk (:func:`save_split`) it is written with
paths relative to the dataset root instead, so that it still means the same images when the
index is rebuilt and positions shift.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from visionflow._io import atomic_write_json
from visionflow.data.index import SPLIT_NAMES, DatasetIndex, Split
from visionflow.data.readers.csv import PATH_COLUMNS, SPLIT_VALUES
from visionflow.errors import ConfigError, DataError

__all__ = ["load_split", "save_split", "stratified_split"]


def stratified_split(
    index: DatasetIndex,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Split:
    """Split an index per class, so every split has about the same class proportions.

    When every sample already carries a split (a ``train/val/test`` folder layout or a split
    column), that split is used as given (``method="given"``); if it has no validation samples
    and ``val_fraction > 0``, a stratified validation part is carved out of its training part.

    Otherwise, within each class, ``round(n * fraction)`` samples go to test and to val; a class
    with at least 3 samples gets at least one of each (for a non-zero fraction) and always keeps
    at least one for training. Unlabelled samples form their own group.

    Raises:
        ConfigError: A fraction is outside ``[0, 1)`` or the two sum to 1 or more.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction must be below 1 (got {val_fraction} + "
            f"{test_fraction}); nothing would be left to train on"
        )
    rng = np.random.default_rng(seed)
    if index.samples and all(s.split is not None for s in index.samples):
        given: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
        for i, s in enumerate(index.samples):
            given[str(s.split)].append(i)
        carved = not given["val"] and val_fraction > 0 and bool(given["train"])
        if carved:
            train, val, _ = _stratify(index, given["train"], val_fraction, 0.0, rng)
            given["train"], given["val"] = train, val
        return Split(
            train=sorted(given["train"]),
            val=sorted(given["val"]),
            test=sorted(given["test"]),
            seed=seed if carved else None,
            method="given",
        )
    train, val, test = _stratify(
        index, list(range(len(index.samples))), val_fraction, test_fraction, rng
    )
    return Split(train=train, val=val, test=test, seed=seed, method="stratified")


def _stratify(
    index: DatasetIndex,
    positions: list[int],
    val_fraction: float,
    test_fraction: float,
    rng: np.random.Generator,
) -> tuple[list[int], list[int], list[int]]:
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i in positions:
        groups[index.samples[i].label].append(i)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    # sorted labels (unlabelled last) so the generator is consumed in a fixed order
    for label in sorted(groups, key=lambda lab: (lab is None, lab or "")):
        members = np.asarray(sorted(groups[label]), dtype=np.int64)
        shuffled = [int(i) for i in rng.permutation(members)]
        n_val, n_test = _counts(len(shuffled), val_fraction, test_fraction)
        test.extend(shuffled[:n_test])
        val.extend(shuffled[n_test : n_test + n_val])
        train.extend(shuffled[n_test + n_val :])
    return sorted(train), sorted(val), sorted(test)


def _counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of ``n`` samples of a class go to val and to test."""
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n >= 3:
        if val_fraction > 0:
            n_val = max(n_val, 1)
        if test_fraction > 0:
            n_test = max(n_test, 1)
    while n_val + n_test > n - 1 and n_val + n_test > 0:  # keep one for training
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def save_split(split: Split, index: DatasetIndex, path: str | os.PathLike[str]) -> Path:
    """Write ``split`` as JSON with paths relative to the dataset root (POSIX), atomically.

    The file holds ``{"method", "seed", "train": [paths], "val": [...], "test": [...]}`` and is
    read back by :func:`load_split`.
    """
    root = Path(index.root)

    def rel(position: int) -> str:
        file = index.samples[position].path
        try:
            return file.relative_to(root).as_posix()
        except ValueError:
            return file.as_posix()

    obj: dict[str, Any] = {"method": split.method, "seed": split.seed}
    for name in SPLIT_NAMES:
        obj[name] = [rel(i) for i in split[name]]
    return atomic_write_json(path, obj)


def load_split(path: str | os.PathLike[str], index: DatasetIndex) -> Split:
    """Read a split file and map its paths onto the positions of ``index``.

    Accepts the JSON written by :func:`save_split`, or a CSV/TSV with a header holding a path
    column and a ``split`` column (``train``, ``val``/``valid``/``validation``, ``test``).
    Paths are relative to the dataset root or absolute. Paths that are not in the index are
    ignored and samples of the index missing from the file are left out of every split.

    Raises:
        DataError: The file is unreadable or malformed, names an unknown split, lists a sample
            twice, or matches no sample of the index at all.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"split file {file} does not exist") from None
    except UnicodeDecodeError:
        raise DataError(f"split file {file} is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"split file {file}: cannot read ({exc.strerror or exc})") from None
    is_json = file.suffix.lower() == ".json" or (
        file.suffix.lower() not in (".csv", ".tsv") and text.lstrip().startswith("{")
    )
    entries = _json_entries(file, text) if is_json else _csv_entries(file, text)
    seed = None
    if is_json:
        raw_seed = json.loads(text).get("seed")
        seed = raw_seed if isinstance(raw_seed, int) and not isinstance(raw_seed, bool) else None

    root = Path(index.root)
    lookup: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(index.samples):
        lookup[os.path.normpath(s.path)].append(i)

    out: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    seen: dict[str, str] = {}
    matched = 0
    for raw, split, where in entries:
        key = _normalise(raw, root)
        if key in seen:
            raise DataError(
                f"{where}: '{raw}' is listed twice (also at {seen[key]}); each image may be in "
                "one split only"
            )
        seen[key] = where
        positions = lookup.get(key)
        if not positions:
            continue
        matched += 1
        out[split].extend(positions)
    if matched == 0:
        example = entries[0][0] if entries else None
        detail = f" (for example '{example}')" if example is not None else " (it lists none)"
        raise DataError(
            f"split file {file}: none of its paths{detail} is an image of the dataset at "
            f"{root}; paths must be relative to the dataset root or absolute"
        )
    return Split(
        train=sorted(set(out["train"])),
        val=sorted(set(out["val"])),
        test=sorted(set(out["test"])),
        seed=seed,
        method="file",
    )


def _normalise(raw: str, root: Path) -> str:
    text = raw.strip().replace("\\", "/")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        return os.path.normpath(text)
    return os.path.normpath(root / text)


def _json_entries(file: Path, text: str) -> list[tuple[str, str, str]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"split file {file}: invalid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"split file {file}: expected a JSON object with train/val/test lists")
    entries: list[tuple[str, str, str]] = []
    for key, value in obj.items():
        if key in ("method", "seed"):
            continue
        split = SPLIT_VALUES.get(str(key).lower())
        if split is None:
            raise DataError(
                f"split file {file}: unknown split {key!r}; expected train, val (or valid, "
                "validation) or test"
            )
        if not isinstance(value, list):
            raise DataError(f"split file {file}: {key!r} must be a list of paths")
        for n, item in enumerate(value):
            if not isinstance(item, str):
                kind = "a position" if isinstance(item, int) else type(item).__name__
                raise DataError(
                    f"split file {file}: {key}[{n}] is {kind}, not a path; split files hold "
                    "paths relative to the dataset root (write them with save_split)"
                )
            entries.append((item, split, f"{file.name} {key}[{n}]"))
    return entries


def _csv_entries(file: Path, text: str) -> list[tuple[str, str, str]]:
    first = text.split("\n", 1)[0]
    delimiter = (
        "\t" if file.suffix.lower() == ".tsv" or ("\t" in first and "," not in first) else ","
    )
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise DataError(f"split file {file}: malformed CSV ({exc})") from None
    rows = [(line, row) for line, row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"split file {file} is empty; expected a header 'path,split'")
    columns = [c.strip().lower() for c in rows[0][1]]
    path_col = next((columns.index(c) for c in PATH_COLUMNS if c in columns), None)
    if path_col is None or "split" not in columns:
        raise DataError(
            f"split file {file}: the header must have a path and a split column (path,split), "
            f"found {', '.join(repr(c) for c in rows[0][1])}"
        )
    split_col = columns.index("split")
    entries: list[tuple[str, str, str]] = []
    for line, row in rows[1:]:
        where = f"{file.name} line {line}"
        raw = row[path_col].strip() if path_col < len(row) else ""
        value = row[split_col].strip() if split_col < len(row) else ""
        if not raw:
            raise DataError(f"{where}: the path is empty")
        split = SPLIT_VALUES.get(value.lower())
        if split is None:
            raise DataError(
                f"{where}: unknown split {value!r} for '{raw}'; expected train, val (or valid, "
                "validation) or test"
            )
        entries.append((raw, split, where))
    return entries
