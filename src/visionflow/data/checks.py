"""Data-health checks: what is wrong with a dataset before any training time is spent on it.

:func:`check_dataset` decodes every file completely (so a truncated JPEG is caught here, not in
the middle of an epoch), hashes its bytes and returns a :class:`DataReport` plus a cleaned
:class:`~visionflow.data.index.DatasetIndex`:

* unreadable files (missing, empty, truncated, not an image, too large) are dropped;
* exact duplicates with the same label keep one copy (the first by path);
* label conflicts (the same bytes under different labels) drop every copy, since there is no
  way to tell which label is right;
* tiny images are only reported: they may be legitimate (icons, digits).

The cleaned index keeps the input's class list, so class ids stay stable even when a class
loses all its images (the report then names that class as too small). Paths in the report are
relative to the dataset root (POSIX separators) when the file lies under it.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visionflow._io import atomic_write_json, sha256_file
from visionflow._progress import transient_bar
from visionflow.data.images import DEFAULT_MAX_PIXELS, ImageInfo, inspect_image
from visionflow.data.index import DatasetIndex
from visionflow.errors import ConfigError, DataError, ImageDecodeError

__all__ = ["BadFile", "DataReport", "check_dataset"]

#: Largest/smallest class ratio above which the report warns about imbalance.
IMBALANCE_WARNING = 10.0
#: How many entries of each list :meth:`DataReport.render` prints before "and N more".
_RENDER_LIMIT = 20


@dataclass
class BadFile:
    """A file the checks flagged, and why (a reason a person can act on)."""

    path: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class DataReport:
    """The outcome of :func:`check_dataset`; everything a person needs to fix a dataset.

    Attributes:
        root: The dataset root.
        format: The reader that produced the index (``"folder"``, ``"csv"``...).
        num_files: Samples in the input index.
        num_usable: Samples in the cleaned index (labelled and unlabelled).
        classes: Class names, as in the input index.
        counts: Usable labelled images per class (every class present, possibly 0).
        imbalance_ratio: Largest over smallest class count; ``inf`` when a class has none.
        unreadable: Files that could not be decoded, with the decoder's reason.
        duplicates: Groups of paths with byte-identical content and the same label; only the
            first path of each group is kept.
        conflicts: ``{"sha256", "paths", "labels"}`` for identical bytes under different labels;
            every copy is dropped.
        tiny: Images whose shorter side is below ``min_side`` (kept, only reported).
        small_classes: Classes with fewer than ``min_per_class`` usable images, and their count.
        size_stats: ``{"width": {"min", "median", "max"}, "height": {...}}`` over usable images.
        modes: Original Pillow mode of each readable file -> number of files.
        warnings: Human-readable summary lines.
        num_unlabelled: Usable samples without a label (not part of ``counts``).
    """

    root: str
    format: str
    num_files: int
    num_usable: int
    classes: list[str]
    counts: dict[str, int]
    imbalance_ratio: float
    unreadable: list[BadFile] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    tiny: list[BadFile] = field(default_factory=list)
    small_classes: dict[str, int] = field(default_factory=dict)
    size_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    num_unlabelled: int = 0

    # ------------------------------------------------------------------ output
    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (an infinite imbalance ratio becomes ``None``)."""
        ratio = self.imbalance_ratio
        return {
            "root": self.root,
            "format": self.format,
            "num_files": self.num_files,
            "num_usable": self.num_usable,
            "num_unlabelled": self.num_unlabelled,
            "classes": list(self.classes),
            "counts": dict(self.counts),
            "imbalance_ratio": ratio if ratio == ratio and ratio != float("inf") else None,
            "unreadable": [b.to_json() for b in self.unreadable],
            "duplicates": [list(g) for g in self.duplicates],
            "conflicts": [
                {"sha256": c["sha256"], "paths": list(c["paths"]), "labels": list(c["labels"])}
                for c in self.conflicts
            ],
            "tiny": [b.to_json() for b in self.tiny],
            "small_classes": dict(self.small_classes),
            "size_stats": {k: dict(v) for k, v in self.size_stats.items()},
            "modes": dict(self.modes),
            "warnings": list(self.warnings),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically."""
        return atomic_write_json(path, self.to_json())

    def render(self, console: Console) -> None:
        """Print a compact summary: a table of counts per class, then each list of problems."""
        table = Table(
            title=f"{self.root} ({self.format}): {self.num_usable} of {self.num_files} usable",
            title_justify="left",
        )
        table.add_column("class")
        table.add_column("images", justify="right")
        table.add_column("share", justify="right")
        total = sum(self.counts.values()) or 1
        for name in self.classes:
            n = self.counts.get(name, 0)
            style = "red" if name in self.small_classes else None
            table.add_row(name, str(n), f"{100 * n / total:.1f}%", style=style)
        if self.num_unlabelled:
            table.add_row("(unlabelled)", str(self.num_unlabelled), "", style="dim")
        console.print(table)
        _render_list(
            console,
            "Unreadable files (excluded)",
            [f"{b.path}: {b.reason}" for b in self.unreadable],
        )
        _render_list(
            console,
            "Duplicates (first kept)",
            [" = ".join(group) for group in self.duplicates],
        )
        _render_list(
            console,
            "Label conflicts (all copies excluded)",
            [
                ", ".join(f"{p} [{lab}]" for p, lab in zip(c["paths"], c["labels"], strict=True))
                for c in self.conflicts
            ],
        )
        if self.tiny and len(self.tiny) == self.num_usable:
            # a dataset of small images (digits, icons) is not a list of problems
            reasons = sorted({b.reason for b in self.tiny})
            detail = reasons[0] if len(reasons) == 1 else f"{len(reasons)} different sizes"
            console.print(
                f"[bold]Tiny images (kept)[/]: all {len(self.tiny)} usable images ({detail}); "
                "the full list is in the JSON report",
                highlight=False,
            )
        else:
            _render_list(
                console, "Tiny images (kept)", [f"{b.path}: {b.reason}" for b in self.tiny]
            )
        _render_list(console, "Warnings", list(self.warnings), style="yellow")

    # ------------------------------------------------------------------ verdict
    def raise_for_problems(self, *, min_per_class: int) -> None:
        """Raise if the usable data cannot train a classifier.

        Raises:
            DataError: No usable labelled image, fewer than two classes with images, or classes
                with fewer than ``min_per_class`` usable images (named, with their counts).
        """
        where = f"{self.root}"
        labelled = sum(self.counts.values())
        dropped = self._dropped_hint()
        if labelled == 0:
            raise DataError(f"{where}: no usable labelled images{dropped}")
        present = [name for name in self.classes if self.counts.get(name, 0) > 0]
        if len(present) < 2:
            found = ", ".join(f"{n!r} ({self.counts[n]})" for n in present)
            raise DataError(
                f"{where}: fewer than 2 classes have usable images (found {found}); a classifier "
                "needs at least two classes"
            )
        small = {
            name: self.counts.get(name, 0)
            for name in self.classes
            if self.counts.get(name, 0) < min_per_class
        }
        if small:
            listed = ", ".join(f"{name!r} has {n}" for name, n in small.items())
            raise DataError(
                f"{where}: {len(small)} class(es) have fewer than {min_per_class} usable images "
                f"({listed}){dropped}. Add images to these classes, remove them from the "
                "dataset, or lower min_per_class"
            )

    def _dropped_hint(self) -> str:
        parts = []
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable")
        if self.conflicts:
            parts.append(f"{sum(len(c['paths']) for c in self.conflicts)} in label conflicts")
        return f" ({' and '.join(parts)} excluded; see the data report)" if parts else ""


def _render_list(console: Console, title: str, lines: list[str], style: str = "red") -> None:
    if not lines:
        return
    console.print(f"[bold {style}]{title}[/] ({len(lines)})")
    for line in lines[:_RENDER_LIMIT]:
        console.print(f"  {line}", markup=False, highlight=False)
    if len(lines) > _RENDER_LIMIT:
        console.print(f"  ... and {len(lines) - _RENDER_LIMIT} more")


# ---------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class _FileResult:
    info: ImageInfo | None
    sha256: str | None
    reason: str | None


def _check_file(path: Path, max_pixels: int) -> _FileResult:
    try:
        image, info = inspect_image(path, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return _FileResult(None, None, exc.reason)
    image.close()  # only the verdict and the header facts are kept, not the pixels
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return _FileResult(None, None, f"cannot read file ({exc.strerror or exc})")
    return _FileResult(info, digest, None)


def check_dataset(
    index: DatasetIndex,
    *,
    min_side: int = 16,
    min_per_class: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[DataReport, DatasetIndex]:
    """Decode and hash every sample; report problems and return a cleaned index.

    Args:
        index: The dataset as read by a reader.
        min_side: Images whose shorter side is below this are reported as tiny (and kept).
        min_per_class: Classes with fewer usable images are reported in ``small_classes``.
        max_pixels: Largest ``width * height`` decoded; larger files count as unreadable.
        workers: Decoding threads (default ``min(8, cpu count)``).
        progress: Show a progress bar on stderr.

    Returns:
        The report and the cleaned index (same root, format and class list as ``index``,
        samples in their original order minus the excluded ones).

    Raises:
        ConfigError: ``workers`` is below 1.
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    root = Path(index.root)
    paths = sorted({s.path for s in index.samples}, key=lambda p: p.as_posix())
    results = dict(zip(paths, _run(paths, max_pixels, workers, progress), strict=True))

    def rel(path: Path) -> str:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return path.as_posix()

    # positions sorted by path, so every list below and every "first" is deterministic
    order = sorted(range(len(index.samples)), key=lambda i: (rel(index.samples[i].path), i))
    unreadable = [BadFile(rel(p), r.reason) for p, r in results.items() if r.reason is not None]
    unreadable.sort(key=lambda b: b.path)

    by_hash: dict[str, list[int]] = defaultdict(list)
    for i in order:
        digest = results[index.samples[i].path].sha256
        if digest is not None:
            by_hash[digest].append(i)

    dropped: set[int] = {i for i in order if results[index.samples[i].path].sha256 is None}
    duplicates: list[list[str]] = []
    conflicts: list[dict[str, Any]] = []
    for digest, group in by_hash.items():
        if len(group) < 2:
            continue
        samples = [index.samples[i] for i in group]
        labels = {s.label for s in samples if s.label is not None}
        if len(labels) > 1:
            conflicts.append(
                {
                    "sha256": digest,
                    "paths": [rel(s.path) for s in samples],
                    "labels": [s.label for s in samples],
                }
            )
            dropped.update(group)
        else:
            # keep a labelled copy when there is one, else the first by path
            keep = min(group, key=lambda i: index.samples[i].label is None)
            duplicates.append([rel(s.path) for s in samples])
            dropped.update(i for i in group if i != keep)
    duplicates.sort()
    conflicts.sort(key=lambda c: c["paths"])

    kept = [i for i in range(len(index.samples)) if i not in dropped]
    clean = index.subset(kept)

    infos = {s.path: results[s.path].info for s in clean.samples}
    tiny = []
    for path, info in sorted(infos.items(), key=lambda kv: rel(kv[0])):
        if info is not None and min(info.width, info.height) < min_side:
            tiny.append(
                BadFile(
                    rel(path),
                    f"{info.width}x{info.height} pixels, shorter side below {min_side}",
                )
            )
    modes = Counter(r.info.mode for r in results.values() if r.info is not None)
    counts = clean.counts()
    num_unlabelled = sum(1 for s in clean.samples if s.label is None)
    small = {name: n for name, n in counts.items() if n < min_per_class}
    nonzero = [n for n in counts.values() if n > 0]
    every_class_has_images = bool(counts) and len(nonzero) == len(counts)
    ratio = max(nonzero) / min(nonzero) if every_class_has_images else float("inf")

    report = DataReport(
        root=str(root),
        format=index.format,
        num_files=len(index.samples),
        num_usable=len(clean.samples),
        classes=list(index.classes),
        counts=counts,
        imbalance_ratio=ratio,
        unreadable=unreadable,
        duplicates=duplicates,
        conflicts=conflicts,
        tiny=tiny,
        small_classes=small,
        size_stats=_size_stats([i for i in infos.values() if i is not None]),
        modes=dict(sorted(modes.items())),
        num_unlabelled=num_unlabelled,
    )
    report.warnings = _warnings(report, min_side=min_side, min_per_class=min_per_class)
    return report, clean


def _run(paths: list[Path], max_pixels: int, workers: int, progress: bool) -> list[_FileResult]:
    """Check every path (in parallel); results in the order of ``paths``."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=workers) as pool, _bar(progress, len(paths)) as advance:
        out = []
        for result in pool.map(lambda p: _check_file(p, max_pixels), paths):
            out.append(result)
            advance()
        return out


@contextmanager
def _bar(enabled: bool, total: int) -> Iterator[Any]:
    if not enabled:
        yield lambda: None
        return
    bar = transient_bar(Console(stderr=True), label="checking images", remaining=False)
    with bar:
        task = bar.add_task("check", total=total)
        yield lambda: bar.advance(task)


def _size_stats(infos: list[ImageInfo]) -> dict[str, dict[str, float]]:
    if not infos:
        return {}
    out = {}
    for name, values in (
        ("width", [i.width for i in infos]),
        ("height", [i.height for i in infos]),
    ):
        out[name] = {
            "min": min(values),
            "median": float(statistics.median(values)),
            "max": max(values),
        }
    return out


def _warnings(report: DataReport, *, min_side: int, min_per_class: int) -> list[str]:
    out = []
    if report.unreadable:
        out.append(f"{len(report.unreadable)} unreadable file(s) excluded")
    if report.duplicates:
        extra = sum(len(g) - 1 for g in report.duplicates)
        out.append(
            f"{len(report.duplicates)} group(s) of exact duplicates: {extra} extra cop"
            f"{'y' if extra == 1 else 'ies'} excluded"
        )
    if report.conflicts:
        n = sum(len(c["paths"]) for c in report.conflicts)
        out.append(
            f"{len(report.conflicts)} identical image(s) carry different labels: all {n} "
            "copies excluded; fix their labels to use them"
        )
    if report.tiny:
        out.append(f"{len(report.tiny)} image(s) have a side shorter than {min_side} pixels")
    for name, n in report.small_classes.items():
        out.append(f"class {name!r} has {n} usable image(s), fewer than {min_per_class}")
    present = sum(1 for n in report.counts.values() if n > 0)
    if present < 2:
        out.append(f"only {present} class(es) have usable images; at least 2 are needed")
    elif report.imbalance_ratio >= IMBALANCE_WARNING and report.imbalance_ratio != float("inf"):
        out.append(
            f"classes are imbalanced: the largest has {report.imbalance_ratio:.1f}x the images "
            "of the smallest"
        )
    if report.num_unlabelled:
        out.append(f"{report.num_unlabelled} usable image(s) have no label")
    return out
