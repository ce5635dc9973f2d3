"""Review and apply data-quality findings without touching the user's files.

The workflow behind ``visionflow clean``:

1. :func:`run_clean` analyses a dataset (:func:`~visionflow.explain.quality.analyze_quality`)
   and writes, into an output folder outside the dataset, ``review.csv`` (one row per finding:
   ``path, issue, given_label, suggested_label, score, group, split, action, detail``, with a
   default action), ``review.html`` (the same findings with thumbnails), ``quality.json`` and
   the embedding map.
2. A person edits the ``action`` column (``keep``, ``drop`` or ``relabel``; for ``relabel`` the
   ``suggested_label`` column is the new label and may be edited too).
3. :func:`apply_review` writes a cleaned copy of the dataset description into
   ``OUT/cleaned``: ``labels.csv`` (path, label and, when the source had one, split), which
   visionflow's CSV reader accepts, and ``images/``, hard links to the original files (copies
   where hard links are not possible, or with ``copy=True``). Dropped images are left out,
   relabelled ones get their new label in ``labels.csv``. ``visionflow train OUT/cleaned``
   trains on it.

The original files are never deleted, moved or edited, and an output folder inside the dataset
is refused. Note that a hard link *is* the original file: editing an image in
``cleaned/images`` in place edits the original too (use ``copy=True`` to prevent that).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow._io import atomic_write_bytes
from visionflow.data.index import DatasetIndex
from visionflow.errors import ConfigError, DataError
from visionflow.explain.quality import QualityConfig, QualityResult, analyze_quality

__all__ = [
    "ACTIONS",
    "ISSUES",
    "REVIEW_COLUMNS",
    "ApplyResult",
    "CleanResult",
    "ReviewRow",
    "apply_review",
    "check_out_dir",
    "read_review_csv",
    "review_rows",
    "run_clean",
    "write_review_csv",
]

#: What a review row may ask for.
ACTIONS = ("keep", "drop", "relabel")
#: Columns of ``review.csv``, in order.
REVIEW_COLUMNS = (
    "path",
    "issue",
    "given_label",
    "suggested_label",
    "score",
    "group",
    "split",
    "action",
    "detail",
)
#: Kinds of finding in the ``issue`` column.
ISSUES = ("label_issue", "duplicate", "leakage", "outlier", "unreadable")
_MARKER = ".visionflow-cleaned"
_CLEANED = "cleaned"


@dataclass
class ReviewRow:
    """One finding about one image; ``line`` is its line in the CSV it was read from."""

    path: str
    issue: str
    given_label: str
    suggested_label: str
    score: float | None
    group: str
    split: str
    action: str
    detail: str
    line: int | None = None

    def cells(self) -> list[str]:
        return [
            self.path,
            self.issue,
            self.given_label,
            self.suggested_label,
            "" if self.score is None else f"{self.score:.4f}",
            self.group,
            self.split,
            self.action,
            self.detail,
        ]


def review_rows(result: QualityResult, *, relabel_confidence: float = 0.8) -> list[ReviewRow]:
    """One row per finding, with a default action.

    Defaults: a likely label error whose suggested label has an out-of-fold probability of at
    least ``relabel_confidence`` is ``relabel``, other suspects ``keep`` (review them); in a
    duplicate group whose labels agree the first member (a train copy when there is one) is
    ``keep`` and the others ``drop``; in a group whose labels disagree every member is ``keep``
    (choose a label, or drop); outliers are ``keep`` (review them); unreadable files ``drop``.
    """
    rows: list[ReviewRow] = []
    for b in result.unreadable:
        rows.append(ReviewRow(b.path, "unreadable", "", "", None, "", "", "drop", b.reason))
    for x in result.label_issues:
        confident = x.likely and x.suggested_probability >= relabel_confidence
        detail = f"rank {x.rank}; p({x.suggested}) = {x.suggested_probability:.2f} out of fold"
        if x.likely:
            detail += "; likely a label error"
        rows.append(
            ReviewRow(
                x.path,
                "label_issue",
                x.given,
                x.suggested,
                x.score,
                "",
                x.split or "",
                "relabel" if confident else "keep",
                detail,
            )
        )
    for g in result.duplicate_groups:
        first = g.paths[0]
        for k, (p, lab, split) in enumerate(zip(g.paths, g.labels, g.splits, strict=True)):
            leak = g.spans_splits and split != g.splits[0]
            action = "drop" if k > 0 and g.labels_agree else "keep"
            how = "exact copy" if g.kinds == ["exact"] else f"near duplicate ({', '.join(g.kinds)})"
            if k == 0:
                detail = f"{how} group of {len(g.paths)}; this copy is kept by default"
            else:
                detail = f"{how} of {first}"
            if not g.labels_agree:
                labels = sorted({str(v) for v in g.labels if v is not None})
                detail += f"; labels disagree ({', '.join(labels)}): choose one or drop"
            if leak:
                detail += (
                    f"; LEAKAGE: also in {g.splits[0]} as {first}, held-out accuracy is inflated"
                )
            rows.append(
                ReviewRow(
                    p,
                    "leakage" if leak else "duplicate",
                    lab or "",
                    "",
                    g.similarity,
                    f"g{g.id}",
                    split or "",
                    action,
                    detail,
                )
            )
    for o in result.outliers:
        rows.append(
            ReviewRow(
                o.path,
                "outlier",
                o.label or "",
                "",
                o.score,
                "",
                o.split or "",
                "keep",
                f"mean cosine distance {o.distance:.3f} to its nearest images",
            )
        )
    return rows


def write_review_csv(rows: list[ReviewRow], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` as ``review.csv`` (UTF-8, header :data:`REVIEW_COLUMNS`), atomically."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(REVIEW_COLUMNS)
    for row in rows:
        writer.writerow(row.cells())
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def read_review_csv(path: str | os.PathLike[str], index: DatasetIndex) -> list[ReviewRow]:
    """Read and check an (edited) review file against the dataset.

    Raises:
        DataError: The file is missing or not CSV, lacks a column, or a row names a path that
            is not in the dataset, an unknown action, or (for ``relabel``) a label that is not
            one of the dataset's classes; the message names the file and line.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(
            f"review file {file} does not exist; run visionflow clean DATA --out DIR first "
            "(it writes DIR/review.csv)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"review file {file}: cannot read it as UTF-8 text ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        lines = [(reader.line_num, r) for r in reader]
    except csv.Error as exc:
        raise DataError(f"review file {file}: malformed CSV ({exc})") from None
    lines = [(n, r) for n, r in lines if any(c.strip() for c in r)]
    if not lines:
        raise DataError(
            f"review file {file} is empty; expected the header {','.join(REVIEW_COLUMNS)}"
        )
    header = [c.strip().lower() for c in lines[0][1]]
    needed = ("path", "action", "suggested_label")
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(
            f"{file.name} line {lines[0][0]}: the header lacks the column(s) "
            f"{', '.join(missing)}; keep the header visionflow clean wrote "
            f"({','.join(REVIEW_COLUMNS)})"
        )
    col = {name: header.index(name) for name in REVIEW_COLUMNS if name in header}
    known = {_rel(s.path, index.root) for s in index.samples}
    classes = set(index.classes)

    def cell(row: list[str], name: str) -> str:
        i = col.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    rows = []
    for n, raw in lines[1:]:
        where = f"{file.name} line {n}"
        p = cell(raw, "path").replace("\\", "/")
        if not p:
            raise DataError(f"{where}: the path is empty")
        if p not in known:
            raise DataError(
                f"{where}: '{p}' is not an image of the dataset at {index.root}; paths are "
                "relative to the dataset root, as visionflow clean wrote them"
            )
        action = cell(raw, "action").lower()
        if action not in ACTIONS:
            raise DataError(
                f"{where}: unknown action {cell(raw, 'action')!r} for '{p}'; use one of "
                f"{', '.join(ACTIONS)}"
            )
        label = cell(raw, "suggested_label")
        if action == "relabel" and label not in classes:
            shown = repr(label) if label else "an empty suggested_label"
            raise DataError(
                f"{where}: cannot relabel '{p}' to {shown}: the new label (suggested_label "
                f"column) must be one of the dataset's classes: {', '.join(sorted(classes))}"
            )
        score_text = cell(raw, "score")
        try:
            score = float(score_text) if score_text else None
        except ValueError:
            score = None
        rows.append(
            ReviewRow(
                p,
                cell(raw, "issue"),
                cell(raw, "given_label"),
                label,
                score,
                cell(raw, "group"),
                cell(raw, "split"),
                action,
                cell(raw, "detail"),
                n,
            )
        )
    return rows


@dataclass
class ApplyResult:
    """What :func:`apply_review` wrote."""

    out_dir: Path
    labels_csv: Path
    kept: int
    dropped: int
    relabelled: int
    linked: int
    copied: int
    by_issue: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "labels_csv": str(self.labels_csv),
            "kept": self.kept,
            "dropped": self.dropped,
            "relabelled": self.relabelled,
            "linked": self.linked,
            "copied": self.copied,
            "by_issue": self.by_issue,
        }


def check_out_dir(index: DatasetIndex, out: str | os.PathLike[str]) -> Path:
    """``out`` resolved; refuses a folder inside the dataset, or one that holds it.

    Raises:
        ConfigError: ``out`` is the dataset root or inside it (visionflow never writes into a
            user's dataset), or the dataset lies inside ``out/cleaned`` (which apply replaces).
    """
    root = Path(index.root).resolve()
    target = Path(out).expanduser().resolve()
    if target == root or target.is_relative_to(root):
        raise ConfigError(
            f"--out {out} is inside the dataset {root}; choose a folder outside it (visionflow "
            "never writes into your dataset)"
        )
    if root.is_relative_to(target / _CLEANED):
        raise ConfigError(
            f"the dataset {root} lies inside {target / _CLEANED}, which --apply replaces; "
            "choose another --out"
        )
    return target


def apply_review(
    index: DatasetIndex,
    rows: list[ReviewRow],
    out: str | os.PathLike[str],
    *,
    copy: bool = False,
) -> ApplyResult:
    """Write ``OUT/cleaned`` (``labels.csv`` + ``images/``) honouring the rows' actions.

    Per image: any ``drop`` row drops it; otherwise a ``relabel`` row gives it the row's
    ``suggested_label``; images without rows are kept as they are. A previous ``cleaned``
    folder written by visionflow is replaced (the new one is built aside, then swapped in).

    Raises:
        DataError: Two rows relabel the same image to different labels (both lines named).
        ConfigError: ``out`` is inside the dataset.
    """
    target = check_out_dir(index, out)
    drops: set[str] = set()
    relabel: dict[str, tuple[str, str]] = {}
    for row in rows:
        if row.action == "drop":
            drops.add(row.path)
        elif row.action == "relabel":
            where = f"line {row.line}" if row.line is not None else "a row"
            prev = relabel.get(row.path)
            if prev is not None and prev[0] != row.suggested_label:
                raise DataError(
                    f"review {where}: '{row.path}' is relabelled to {row.suggested_label!r} but "
                    f"{prev[1]} relabels it to {prev[0]!r}; keep one"
                )
            relabel[row.path] = (row.suggested_label, where)
    root = Path(index.root)
    has_split = any(s.split is not None for s in index.samples)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cleaned.", dir=target))
    kept = relabelled = linked = copied = 0
    seen: set[str] = set()
    try:
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        writer.writerow(["path", "label", "split"] if has_split else ["path", "label"])
        for s in index.samples:
            rel = _rel(s.path, root)
            if rel in drops or rel in seen or s.label is None:
                continue
            seen.add(rel)
            dest = staging / "images" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if _place(s.path, dest, copy=copy):
                linked += 1
            else:
                copied += 1
            label = s.label
            if rel in relabel and relabel[rel][0] != label:
                label = relabel[rel][0]
                relabelled += 1
            cells = [f"images/{rel}", label]
            if has_split:
                cells.append(s.split or "")
            writer.writerow(cells)
            kept += 1
        (staging / "labels.csv").write_text(buf.getvalue(), encoding="utf-8")
        (staging / _MARKER).write_text("written by visionflow clean --apply\n", encoding="utf-8")
        _swap(staging, target / _CLEANED)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    dropped = len({_rel(s.path, root) for s in index.samples} & drops)
    return ApplyResult(
        out_dir=target / _CLEANED,
        labels_csv=target / _CLEANED / "labels.csv",
        kept=kept,
        dropped=dropped,
        relabelled=relabelled,
        linked=linked,
        copied=copied,
        by_issue=_by_issue(rows),
    )


def _place(source: Path, dest: Path, *, copy: bool) -> bool:
    """Hard-link ``source`` at ``dest`` (True), or copy it when linking is not possible."""
    if not copy:
        try:
            os.link(source, dest)
            return True
        except OSError:
            pass
    shutil.copy2(source, dest)
    return False


def _swap(staging: Path, final: Path) -> None:
    """Put ``staging`` in place of ``final``; an existing ``final`` must be ours (marker)."""
    if final.exists():
        if not (final / _MARKER).is_file():
            raise ConfigError(
                f"{final} exists and was not written by visionflow clean; move it away or "
                "choose another --out"
            )
        trash = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


def _rel(path: Path, root: Path | str) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


@dataclass
class CleanResult:
    """What :func:`run_clean` wrote."""

    quality: QualityResult
    out_dir: Path
    review_csv: Path
    review_html: Path
    quality_json: Path
    #: Review rows per issue and default action: ``{"duplicate": {"keep": 3, "drop": 3}}``.
    by_issue: dict[str, dict[str, int]]

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "review_csv": str(self.review_csv),
            "review_html": str(self.review_html),
            "quality_json": str(self.quality_json),
            "by_issue": {k: dict(v) for k, v in self.by_issue.items()},
            "warnings": list(self.quality.warnings),
            "notes": list(self.quality.notes),
            "estimated_label_errors": self.quality.estimated_label_errors,
            "timings": {k: round(v, 3) for k, v in self.quality.timings.items()},
        }


def run_clean(
    index: DatasetIndex,
    out: str | os.PathLike[str],
    *,
    backbone: str = "tf_efficientnet_lite0",
    weights: str | os.PathLike[str] | None = None,
    img_size: int | None = None,
    device: str = "auto",
    config: QualityConfig | None = None,
    progress: bool | None = None,
) -> CleanResult:
    """Analyse ``index`` and write ``review.csv``, ``review.html``, ``quality.json`` and the
    embedding map into ``out`` (embeddings are cached in ``out/cache``, so a second run only
    re-reads them).

    Raises:
        ConfigError: ``out`` is inside the dataset.
    """
    target = check_out_dir(index, out)
    cfg = config or QualityConfig()
    result = analyze_quality(
        index,
        backbone=backbone,
        weights=weights,
        img_size=img_size,
        cache_dir=target / "cache",
        device=device,
        out_dir=target,
        config=cfg,
        progress=progress,
    )
    from visionflow.explain.quality_report import write_review_page

    rows = review_rows(result, relabel_confidence=cfg.relabel_confidence)
    review = write_review_csv(rows, target / "review.csv")
    quality_json = result.save(target / "quality.json")
    page = write_review_page(
        result, target / "review.html", thumbs_dir=target / "thumbs", review_csv=review.name
    )
    return CleanResult(
        quality=result,
        out_dir=target,
        review_csv=review,
        review_html=page,
        quality_json=quality_json,
        by_issue=_by_issue(rows),
    )


def _by_issue(rows: list[ReviewRow]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        counter = out.setdefault(row.issue or "?", {})
        counter[row.action] = counter.get(row.action, 0) + 1
    return out
