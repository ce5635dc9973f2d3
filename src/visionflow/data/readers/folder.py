"""The folder-per-class layout, the way most people arrange a classification dataset.

``root/<class>/<file>`` where files may sit in nested sub-folders of the class folder, or the same
under fixed split folders: ``root/{train,val,test}/<class>/<file>`` (``valid`` and ``validation``
mean ``val``). Every regular file under a class folder becomes a sample whatever its extension, so
that the data checks can name the files that are not images instead of silently ignoring them.
Hidden entries, OS junk and symlinks that lead out of the dataset root are skipped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from visionflow.data.index import DatasetIndex, Sample
from visionflow.data.readers import register_reader
from visionflow.errors import DataError

__all__ = ["SPLIT_FOLDERS", "read_folder"]

_log = logging.getLogger(__name__)

#: First-level folder names that mean "a fixed split", and the split each one means.
SPLIT_FOLDERS = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}

# Files and folders operating systems and tools leave behind (compared in lower case).
_JUNK = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "@eadir"})

_LAYOUT = (
    "a folder per class, root/<class>/<images> (images may be in sub-folders), optionally "
    "under root/train, root/val and root/test"
)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK


def _subdirs(directory: Path, root: Path) -> list[Path]:
    """Visible sub-folders of ``directory`` that stay inside ``root`` (sorted by name)."""
    out = []
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        _log.warning("cannot list %s: %s", directory, exc)
        return []
    for entry in entries:
        if _ignored(entry.name):
            continue
        path = Path(entry.path)
        try:
            if not entry.is_dir():
                continue
        except OSError:
            continue
        if entry.is_symlink() and not _inside(path, root):
            _log.warning("skipping %s: the symlink points outside the dataset root %s", path, root)
            continue
        out.append(path)
    return out


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # broken link, loop
        return False


def _files_under(top: Path, root: Path) -> list[Path]:
    """Every regular file below ``top``, recursively, never leaving ``root``.

    Symlinked folders inside the root are followed once (a visited set stops link cycles);
    symlinks whose target is outside the root, or broken, are skipped with a warning.
    """
    found: list[Path] = []
    visited: set[Path] = set()
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            real = directory.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real in visited:
            continue
        visited.add(real)
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            _log.warning("cannot list %s: %s", directory, exc)
            continue
        for entry in entries:
            if _ignored(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_symlink() and not _inside(path, root):
                _log.warning(
                    "skipping %s: the symlink is broken or points outside the dataset root %s",
                    path,
                    root,
                )
                continue
            try:
                if entry.is_dir():
                    stack.append(path)
                elif entry.is_file():
                    found.append(path)
            except OSError:
                continue
    return found


def _detect(path: Path) -> bool:
    return path.is_dir() and bool(_subdirs(path, path.resolve()))


@register_reader("folder", detect=_detect, layout=_LAYOUT)
def read_folder(path: Path) -> DatasetIndex:
    """A folder per class: root/<class>/<images>, optionally under train/val/test folders."""
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; the folder layout expects {_LAYOUT}")
    root = path.resolve()
    top = _subdirs(root, root)
    split_layout = (
        bool(top)
        and all(d.name.lower() in SPLIT_FOLDERS for d in top)
        and any(_subdirs(d, root) for d in top)
    )
    class_dirs: list[tuple[Path, str | None]] = []
    if split_layout:
        for split_dir in top:
            split = SPLIT_FOLDERS[split_dir.name.lower()]
            class_dirs.extend((d, split) for d in _subdirs(split_dir, root))
    else:
        class_dirs = [(d, None) for d in top]
    if not class_dirs:
        raise DataError(f"{root}: no class folders found; expected {_LAYOUT}")

    samples: list[Sample] = []
    for class_dir, split_name in class_dirs:
        label = class_dir.name
        for file in _files_under(class_dir, root):
            rel = file.relative_to(root).as_posix()
            samples.append(Sample(path=root / rel, label=label, split=split_name, source=rel))
    if not samples:
        raise DataError(f"{root}: the class folders contain no files; expected {_LAYOUT}")
    samples.sort(key=lambda s: s.source or "")
    classes = sorted({d.name for d, _ in class_dirs})
    return DatasetIndex(root=root, samples=samples, classes=classes, format="folder")
