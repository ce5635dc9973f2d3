"""Data-quality findings as report sections: label suspects, duplicates and leakage, outliers,
the embedding map; a stand-alone review page; and the hook that adds them to a training run's
report from the run's cached features.

Sections are :class:`~visionflow.evaluate.report.ReportSection` (trusted HTML): every value that
comes from the dataset (paths, labels) is escaped here, and images are small PNG thumbnails
written next to the report and embedded with :func:`~visionflow.evaluate.report.html_image`.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape

from visionflow._io import atomic_write, atomic_write_bytes
from visionflow.data.images import load_image
from visionflow.data.index import DatasetIndex, Split
from visionflow.errors import ImageDecodeError
from visionflow.evaluate.overfit import Finding
from visionflow.evaluate.report import LIST_CAP, ReportSection, html_image
from visionflow.explain.quality import QualityConfig, QualityResult, analyze_quality

__all__ = [
    "RunQuality",
    "duplicate_section",
    "embedding_map_section",
    "label_issue_section",
    "outlier_section",
    "quality_sections",
    "run_quality_report",
    "thumbnail",
    "write_review_page",
]

_log = logging.getLogger(__name__)

#: Side of the thumbnails in pixels (small images are enlarged, pixelated, to this size).
THUMB = 64


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def thumbnail(source: Path, thumbs_dir: Path, *, size: int = THUMB) -> Path | None:
    """A PNG thumbnail of ``source`` in ``thumbs_dir`` (named by a hash of the source path);
    ``None`` when the image cannot be decoded."""
    name = hashlib.sha256(str(source).encode()).hexdigest()[:20] + f"-{size}.png"
    target = thumbs_dir / name
    if target.is_file():
        return target
    try:
        image = load_image(source)
    except ImageDecodeError:
        return None
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # tiny images (icons, digits) are enlarged with visible pixels rather than blurred
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC
    image = image.resize(new, resample)
    return atomic_write(target, lambda tmp: image.save(tmp, format="PNG"))


def _thumb_html(result: QualityResult, rel: str, thumbs_dir: Path) -> str:
    path = thumbnail(Path(result.root) / rel, thumbs_dir)
    if path is None:
        return '<span class="missing">unreadable</span>'
    return html_image(path, rel)


def _more(total: int, shown: int) -> str:
    return (
        f"<p>… and {total - shown} more (all of them are in quality.json)</p>"
        if total > shown
        else ""
    )


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="quality"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _finding_html(level: str, title: str, detail: str) -> str:
    return (
        f'<div class="finding {level}"><span class="level">{_esc(level)}</span> '
        f"<strong>{_esc(title)}</strong><p>{_esc(detail)}</p></div>"
    )


def label_issue_section(
    result: QualityResult, thumbs_dir: Path, *, limit: int = LIST_CAP
) -> ReportSection:
    """Label suspects, most suspicious first: thumbnail, path, given and suggested label."""
    issues = result.label_issues
    parts = []
    if result.estimated_label_errors is None:
        parts.append("<p>Labels were not checked.</p>")
    else:
        likely = sum(1 for x in issues if x.likely)
        parts.append(
            f"<p>{len(issues)} image(s) whose out-of-fold prediction disagrees with their label; "
            f"cleanlab estimates {result.estimated_label_errors} label error(s) and marks "
            f"{likely} as likely. Score = 1 − p(given label), out of fold.</p>"
        )
    rows = []
    for x in issues[:limit]:
        rows.append(
            [
                _thumb_html(result, x.path, thumbs_dir),
                f"<code>{_esc(x.path)}</code>",
                _esc(x.given),
                _esc(x.suggested),
                f"{x.suggested_probability:.2f}",
                f"{x.score:.3f}",
                "yes" if x.likely else "",
                _esc(x.split or ""),
            ]
        )
    if rows:
        parts.append(
            _table(
                ["image", "path", "given", "suggested", "p(suggested)", "score", "likely", "split"],
                rows,
            )
        )
        parts.append(_more(len(issues), len(rows)))
    return ReportSection("Data quality: label suspects", "\n".join(p for p in parts if p))


def duplicate_section(
    result: QualityResult, thumbs_dir: Path, *, limit: int = LIST_CAP
) -> ReportSection:
    """Duplicate groups (exact and near), with a leakage warning naming the files."""
    parts = []
    for leak in result.leaks[:limit]:
        parts.append(
            _finding_html(
                "warning",
                "Leakage: the same image in several splits",
                f"{leak.describe()}. Held-out accuracy is inflated: the model was in effect "
                "trained on these held-out images. Drop the held-out copies.",
            )
        )
    groups = result.duplicate_groups
    if not groups:
        parts.append("<p>No exact or near duplicates found.</p>")
    else:
        extra = sum(len(g.positions) - 1 for g in groups)
        parts.append(
            f"<p>{len(groups)} group(s) of copies ({extra} extra image(s)); "
            f"{sum(1 for g in groups if not g.labels_agree)} with disagreeing labels, "
            f"{len(result.leaks)} spanning splits.</p>"
        )
        rows = []
        for g in groups[:limit]:
            thumbs = " ".join(_thumb_html(result, p, thumbs_dir) for p in g.paths[:6])
            members = "<br>".join(
                f"<code>{_esc(p)}</code> [{_esc(lab)}{', ' + _esc(s) if s else ''}]"
                for p, lab, s in zip(g.paths, g.labels, g.splits, strict=True)
            )
            note = []
            if not g.labels_agree:
                note.append("labels disagree")
            if g.spans_splits:
                note.append("<strong>leakage</strong>")
            rows.append(
                [
                    f"g{g.id}",
                    thumbs,
                    members,
                    _esc(", ".join(g.kinds)),
                    f"{g.similarity:.3f}",
                    ", ".join(note),
                ]
            )
        parts.append(
            _table(["group", "images", "members", "matched by", "similarity", "note"], rows)
        )
        parts.append(_more(len(groups), len(rows)))
    return ReportSection("Data quality: duplicates and leakage", "\n".join(p for p in parts if p))


def outlier_section(
    result: QualityResult, thumbs_dir: Path, *, limit: int = LIST_CAP
) -> ReportSection:
    """Images far from the rest of the data in embedding space, most extreme first."""
    if not result.outliers:
        body = "<p>No outliers found.</p>"
    else:
        rows = [
            [
                _thumb_html(result, o.path, thumbs_dir),
                f"<code>{_esc(o.path)}</code>",
                _esc(o.label if o.label is not None else ""),
                f"{o.score:.1f}",
                f"{o.distance:.3f}",
                "" if o.class_distance is None else f"{o.class_distance:.3f}",
            ]
            for o in result.outliers[:limit]
        ]
        body = (
            f"<p>{len(result.outliers)} image(s) unusually far from their nearest neighbours "
            "(score = robust z of the mean cosine distance to them). Check that they belong in "
            "the dataset.</p>"
            + _table(["image", "path", "label", "score", "distance", "to own class"], rows)
            + _more(len(result.outliers), len(rows))
        )
    return ReportSection("Data quality: outliers", body)


def embedding_map_section(result: QualityResult) -> ReportSection:
    """The embedding map PNG, when one was written."""
    if result.map_path is None:
        return ReportSection("Data quality: embedding map", "<p>No map (no embeddings).</p>")
    return ReportSection(
        "Data quality: embedding map",
        f"<figure>{html_image(result.map_path, 'embedding map')}<figcaption>Images in 2-D, "
        "coloured by label; black crosses: likely label errors; red rings: outliers."
        "</figcaption></figure>",
    )


_TITLES = (
    ("leakage", "Leakage across splits"),
    ("mislabelled", "Label errors"),
    ("different labels", "Copies with different labels"),
    ("duplicates", "Duplicates"),
    ("outlier", "Outliers"),
    ("unreadable", "Unreadable files"),
)


def _warning_title(warning: str) -> str:
    return next((title for key, title in _TITLES if key in warning), "Data quality")


def quality_sections(result: QualityResult, thumbs_dir: Path) -> list[ReportSection]:
    """All four sections, preceded by a summary of the warnings and notes."""
    summary = []
    for w in result.warnings:
        level = "warning" if w.startswith("leakage") else "info"
        summary.append(_finding_html(level, _warning_title(w), w))
    if result.notes:
        summary.append(
            '<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in result.notes) + "</ul>"
        )
    if not summary:
        summary.append("<p>No data-quality problems found.</p>")
    return [
        ReportSection("Data quality: summary", "\n".join(summary)),
        label_issue_section(result, thumbs_dir),
        duplicate_section(result, thumbs_dir),
        outlier_section(result, thumbs_dir),
        embedding_map_section(result),
    ]


_PAGE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1200px;padding:1.5rem;color:#1d2330;line-height:1.45}
h2{border-bottom:2px solid #e3e6ec;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #d6dae2;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f2f4f8}td img{image-rendering:pixelated;margin:1px}
.finding{border-left:6px solid;padding:.4rem .8rem;margin:.5rem 0;border-radius:3px}
.finding p{margin:.3rem 0 0}
.finding .level{text-transform:uppercase;font-size:.75rem;font-weight:700;margin-right:.4rem}
.finding.info{border-color:#3b82c4;background:#eef5fc}
.finding.warning{border-color:#d99a1e;background:#fdf6e6}
figure img{max-width:100%}.missing{color:#c8372d}code{font-size:.85rem}
"""


def write_review_page(
    result: QualityResult, path: str | os.PathLike[str], *, thumbs_dir: Path, review_csv: str
) -> Path:
    """A self-contained HTML page of every finding with thumbnails, for reviewing the CSV."""
    sections = quality_sections(result, thumbs_dir)
    body = "\n".join(f"<section><h2>{_esc(s.title)}</h2>\n{s.html}\n</section>" for s in sections)
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>visionflow clean: {_esc(result.root)}</title><style>{_PAGE_CSS}</style></head>"
        f"<body><h1>Data quality of {_esc(result.root)}</h1>"
        f"<p>{result.num_analysed} of {result.num_images} images analysed. Edit the "
        f"<code>action</code> column of <code>{_esc(review_csv)}</code> (keep, drop, relabel), "
        "then run <code>visionflow clean DATA --apply</code>.</p>\n"
        f"{body}\n</body></html>\n"
    )
    return atomic_write_bytes(path, doc.encode("utf-8"))


# ----------------------------------------------------------------------------- training runs
@dataclass
class RunQuality:
    """What the data-quality checks add to a training run's report."""

    sections: list[ReportSection] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    result: QualityResult | None = None
    seconds: float = 0.0


def run_quality_report(
    index: DatasetIndex,
    split: Split,
    features: Callable[[str], tuple[Any, Any] | None] | Mapping[str, tuple[Any, Any] | None],
    out_dir: Path,
    *,
    expired: bool = False,
    config: QualityConfig | None = None,
    console: Console | None = None,
) -> RunQuality:
    """Data-quality sections and findings for a training run; never raises.

    Uses the run's cached frozen features: ``features(split)`` (or ``features[split]``) is
    ``(features, targets)``, or ``None`` when the run did not compute them, so the checks cost
    no forward pass. Images of splits without features are still compared by their pixels
    (duplicates, leakage across the run's split). Writes ``quality.json``, the map and the
    thumbnails into ``out_dir``. Skipped, with a note, when the run's deadline has expired; any
    error becomes a note and a logged warning. A leak is also printed on ``console``.
    """
    t0 = time.monotonic()
    title = "Data quality"
    if expired:
        return RunQuality(
            [ReportSection(title, "<p>Skipped: the run's time budget was used up.</p>")]
        )
    try:
        get = features.get if isinstance(features, Mapping) else features
        positions: list[int] = []
        rows: list[np.ndarray] = []
        for name in ("train", "val", "test"):
            if not split[name]:
                continue
            got = get(name)
            if got is None:
                continue
            feats = np.asarray(got[0], dtype=np.float32)
            if feats.ndim != 2 or len(feats) != len(split[name]):
                continue
            positions.extend(split[name])
            rows.append(feats)
        if not rows:
            return RunQuality(
                [
                    ReportSection(
                        title,
                        "<p>Skipped: this run computed no frozen features (the linear probe did "
                        "not run), and the checks do not pay for a forward pass of their own. "
                        "Run <code>visionflow clean DATA</code> instead.</p>",
                    )
                ]
            )
        result = analyze_quality(
            index,
            split,
            features=np.concatenate(rows),
            feature_positions=positions,
            check=False,
            out_dir=out_dir,
            config=config or QualityConfig(map_method="lda"),
            progress=False,
        )
        result.save(out_dir / "quality.json")
        sections = quality_sections(result, out_dir / "thumbs")
        findings = []
        if result.leaks:
            names = "; ".join(leak.describe() for leak in result.leaks[:5])
            more = f" and {len(result.leaks) - 5} more" if len(result.leaks) > 5 else ""
            detail = (
                f"{len(result.leaks)} duplicate group(s) span the run's splits, so the held-out "
                f"accuracy is inflated: {names}{more}. Remove the held-out copies (visionflow "
                "clean DATA) and train again."
            )
            findings.append(
                Finding("warning", "Leakage: near-duplicate images in different splits", detail)
            )
            if console is not None:
                console.print(f"[yellow]warning:[/] leakage: {escape(detail)}", highlight=False)
        likely = sum(1 for x in result.label_issues if x.likely)
        if likely:
            findings.append(
                Finding(
                    "info",
                    "Possible label errors",
                    f"{likely} image(s) look mislabelled (see 'Data quality: label suspects'); "
                    "review them with visionflow clean DATA.",
                )
            )
        return RunQuality(sections, findings, result, time.monotonic() - t0)
    except Exception as exc:  # the report must never fail the training run
        _log.warning("data-quality checks failed: %s", exc, exc_info=True)
        return RunQuality(
            [ReportSection(title, f"<p>Skipped: the checks failed ({_esc(exc)}).</p>")],
            seconds=time.monotonic() - t0,
        )
