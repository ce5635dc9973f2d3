"""A self-contained HTML report of a run: one file, inline CSS, images as data URIs.

The report opens offline in any browser and can be mailed or attached to a ticket as it is.
Everything that comes from the user (class names, paths, config values, phase names) is
HTML-escaped; only :class:`ReportSection` bodies are inserted as given, because the caller builds
them (with :func:`html_table` and :func:`html_image`, which escape for it).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow._io import atomic_write_bytes
from visionflow.evaluate.overfit import Finding

__all__ = [
    "ReportContext",
    "ReportSection",
    "html_image",
    "html_table",
    "render_report",
    "write_report",
]

NA = "n/a"
#: At most this many entries of each data-quality list are written into the report.
LIST_CAP = 100


@dataclass
class ReportSection:
    """An extra section: ``html`` is trusted, already-escaped markup."""

    title: str
    html: str


@dataclass
class ReportContext:
    """Everything the report shows; build it with keywords."""

    title: str
    run_name: str
    created_at: str
    summary: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]
    findings: list[Finding]
    data_report: dict[str, Any] | None
    config: dict[str, Any]
    weights: dict[str, Any]
    phases: list[dict[str, Any]]
    images: dict[str, Path]
    extra_sections: list[ReportSection] = field(default_factory=list)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """A value as escaped display text; ``None`` and NaN become ``n/a``."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return NA
        return _esc(f"{value:.4g}")
    if isinstance(value, int):
        return _esc(str(value))
    if isinstance(value, dict | list | tuple):
        return _esc(json.dumps(value, ensure_ascii=False, default=str))
    return _esc(value)


def _pct(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return NA
    return f"{100 * value:.2f}%"


def html_table(
    rows: list[dict[str, Any]] | list[list[Any]], headers: list[str] | None = None
) -> str:
    """An escaped HTML table from dict rows (columns = union of keys) or list rows."""
    dict_rows = [r for r in rows if isinstance(r, dict)]
    if dict_rows:
        if headers is None:
            headers = []
            for row in dict_rows:
                headers.extend(k for k in row if k not in headers)
        body: list[list[Any]] = [[row.get(h) for h in headers] for row in dict_rows]
    else:
        body = [list(r) for r in rows if isinstance(r, list | tuple)]
    parts = ["<table>"]
    if headers:
        parts.append(
            "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr></thead>"
        )
    parts.append("<tbody>")
    for cells in body:
        parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def html_image(path: Path, alt: str) -> str:
    """An ``<img>`` with the PNG at ``path`` embedded as a base64 data URI."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f'<p class="missing">image {_esc(alt)} could not be read: {_esc(exc.strerror)}</p>'
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{_esc(alt)}">'


def _kv_table(mapping: dict[str, Any]) -> str:
    if not mapping:
        return f"<p>{NA}</p>"
    return html_table([[k, v] for k, v in mapping.items()], headers=["key", "value"])


def _section(title: str, body: str, anchor: str | None = None) -> str:
    ident = f' id="{_esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{_esc(title)}</h2>\n{body}\n</section>"


def _findings_html(findings: list[Finding]) -> str:
    if not findings:
        return f"<p>{NA}</p>"
    items = []
    for f in findings:
        level = f.level if f.level in ("info", "warning", "problem") else "info"
        items.append(
            f'<div class="finding {level}"><span class="level">{_esc(f.level)}</span> '
            f"<strong>{_esc(f.title)}</strong><p>{_esc(f.detail)}</p></div>"
        )
    return "\n".join(items)


_METRIC_COLUMNS = (
    ("n", "images"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("macro_f1", "macro-F1"),
    ("weighted_f1", "weighted-F1"),
)


#: Detection metrics columns (COCO's), shown when a split's metrics carry ``map``.
_DETECTION_COLUMNS = (
    ("images", "images"),
    ("gt_boxes", "boxes"),
    ("map", "mAP@[.5:.95]"),
    ("map_50", "mAP@.5"),
    ("map_75", "mAP@.75"),
    ("map_small", "AP small"),
    ("map_medium", "AP medium"),
    ("map_large", "AP large"),
    ("mar_100", "AR@100"),
)


def _is_detection(metrics: dict[str, dict[str, Any]]) -> bool:
    return any(isinstance(m, dict) and "map" in m for m in metrics.values())


def _detection_metrics_html(splits: list[tuple[str, dict[str, Any]]]) -> str:
    rows = [[name, *(m.get(key) for key, _ in _DETECTION_COLUMNS)] for name, m in splits]
    return html_table(rows, headers=["split", *(label for _, label in _DETECTION_COLUMNS)])


def _metrics_html(metrics: dict[str, dict[str, Any]]) -> str:
    splits = [(name, m) for name, m in metrics.items() if isinstance(m, dict)]
    if not splits:
        return f"<p>{NA}</p>"
    if _is_detection(metrics):
        return _detection_metrics_html(splits)
    topk: list[str] = []
    for _, m in splits:
        found = m.get("top_k")
        if isinstance(found, dict):
            topk.extend(k for k in found if k not in topk)
    headers = ["split", *(label for _, label in _METRIC_COLUMNS), *topk, "ECE", "log loss"]
    parts = ["<table><thead><tr>"]
    parts.extend(f"<th>{_esc(h)}</th>" for h in headers)
    parts.append("</tr></thead><tbody>")
    for name, m in splits:
        tk_raw = m.get("top_k")
        tk: dict[str, Any] = tk_raw if isinstance(tk_raw, dict) else {}
        cells = [_esc(name), _fmt(m.get("n"))]
        cells += [_pct(m.get(key)) for key, _ in _METRIC_COLUMNS[1:]]
        cells += [_pct(tk.get(k)) for k in topk]
        cells += [_fmt(m.get("ece")), _fmt(m.get("log_loss"))]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _per_class_html(metrics: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    for split in ("test", "val"):
        m = metrics.get(split)
        if isinstance(m, dict) and isinstance(m.get("per_class"), dict) and m["per_class"]:
            if "map" in m:  # detection: COCO AP per class
                keys = ("ap", "ap_50", "ap_75", "gt", "predictions")
                rows = [
                    [name, *((v if isinstance(v, dict) else {}).get(k) for k in keys)]
                    for name, v in m["per_class"].items()
                ]
                headers = ["class", "AP@[.5:.95]", "AP@.5", "AP@.75", "boxes", "detections"]
                return split, html_table(rows, headers=headers)
            rows = []
            for name, v in m["per_class"].items():
                v = v if isinstance(v, dict) else {}
                rows.append(
                    [name, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
                )
            table = html_table(rows, headers=["class", "precision", "recall", "F1", "support"])
            return split, table
    return None


def _images_html(images: dict[str, Path]) -> str:
    if not images:
        return f"<p>{NA}</p>"
    figures = []
    for caption, path in images.items():
        figures.append(
            f"<figure>{html_image(Path(path), str(caption))}"
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )
    return "\n".join(figures)


#: (history key, column header): the classification columns, then detection's.
_HISTORY_COLUMNS = (
    ("epoch", "epoch"),
    ("phase", "phase"),
    ("lr", "lr"),
    ("train_loss", "train loss"),
    ("train_accuracy", "train acc."),
    ("val_loss", "val loss"),
    ("val_accuracy", "val acc."),
    ("val_map", "val mAP@[.5:.95]"),
    ("val_map_50", "val mAP@.5"),
    ("seconds", "seconds"),
    ("best", "best"),
)


def _history_html(history: list[dict[str, Any]]) -> str:
    records = [r for r in history if isinstance(r, dict)]
    if not records:
        return f"<p>{NA}</p>"
    # a column is shown when some epoch has it (detection has no accuracy, classification
    # no mAP); the first three and the last two always are
    columns = [
        (key, header)
        for i, (key, header) in enumerate(_HISTORY_COLUMNS)
        if i < 3 or i >= len(_HISTORY_COLUMNS) - 2 or any(r.get(key) is not None for r in records)
    ]
    rows = [[r.get(k) for k, _ in columns] for r in records]
    return html_table(rows, headers=[header for _, header in columns])


def _capped_list(title: str, entries: list[Any], render: Any) -> str:
    shown = entries[:LIST_CAP]
    items = "".join(f"<li>{render(e)}</li>" for e in shown)
    more = len(entries) - len(shown)
    tail = f"<p>… and {more} more</p>" if more > 0 else ""
    return (
        f"<details><summary>{_esc(title)} ({len(entries)})</summary><ul>{items}</ul>{tail}"
        "</details>"
    )


def _path_reason(entry: Any) -> str:
    if isinstance(entry, dict):
        return f"<code>{_fmt(entry.get('path'))}</code>: {_fmt(entry.get('reason'))}"
    return _fmt(entry)


def _duplicate(entry: Any) -> str:
    if isinstance(entry, list | tuple):
        return ", ".join(f"<code>{_fmt(p)}</code>" for p in entry)
    return _fmt(entry)


def _conflict(entry: Any) -> str:
    if not isinstance(entry, dict):
        return _fmt(entry)
    paths = entry.get("paths")
    paths_html = _duplicate(paths) if isinstance(paths, list | tuple) else _fmt(paths)
    return f"{paths_html} — labels {_fmt(entry.get('labels'))} (sha256 {_fmt(entry.get('sha256'))})"


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _data_html(report: dict[str, Any] | None) -> str:
    if not isinstance(report, dict):
        return f"<p>{NA}</p>"
    unreadable = _as_list(report.get("unreadable"))
    duplicates = _as_list(report.get("duplicates"))
    conflicts = _as_list(report.get("conflicts"))
    tiny = _as_list(report.get("tiny"))
    overview = {
        "root": report.get("root"),
        "format": report.get("format"),
        "files": report.get("num_files"),
        "usable": report.get("num_usable"),
        "classes": len(_as_list(report.get("classes"))) if "classes" in report else None,
        "imbalance ratio": report.get("imbalance_ratio"),
        "unreadable": len(unreadable) if "unreadable" in report else None,
        "duplicate groups": len(duplicates) if "duplicates" in report else None,
        "label conflicts": len(conflicts) if "conflicts" in report else None,
        "tiny images": len(tiny) if "tiny" in report else None,
    }
    parts = [_kv_table(overview)]
    warnings = _as_list(report.get("warnings"))
    if warnings:
        parts.append(
            '<ul class="warnings">' + "".join(f"<li>{_fmt(w)}</li>" for w in warnings) + "</ul>"
        )
    counts = report.get("counts")
    if isinstance(counts, dict) and counts:
        small = report.get("small_classes")
        small = small if isinstance(small, dict) else {}
        rows = [[name, count, "small" if name in small else ""] for name, count in counts.items()]
        parts.append("<h3>Images per class</h3>")
        parts.append(html_table(rows, headers=["class", "images", "note"]))
    for key, title in (("size_stats", "Image sizes"), ("modes", "Colour modes")):
        value = report.get(key)
        if isinstance(value, dict) and value:
            parts.append(f"<h3>{_esc(title)}</h3>")
            parts.append(_kv_table(value))
    if unreadable:
        parts.append(_capped_list("Unreadable files", unreadable, _path_reason))
    if duplicates:
        parts.append(_capped_list("Duplicate groups", duplicates, _duplicate))
    if conflicts:
        parts.append(_capped_list("Same image, different labels", conflicts, _conflict))
    if tiny:
        parts.append(_capped_list("Tiny images", tiny, _path_reason))
    return "\n".join(parts)


def _config_html(config: dict[str, Any]) -> str:
    if not config:
        return f"<p>{NA}</p>"
    text = json.dumps(config, indent=2, ensure_ascii=False, default=str, sort_keys=False)
    return f"<pre>{_esc(text)}</pre>"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1.5rem;color:#1d2330;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #e3e6ec;padding-bottom:.2rem;margin-top:2rem}
.meta{color:#5a6270}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
th,td{border:1px solid #d6dae2;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f2f4f8}tbody tr:nth-child(even){background:#fafbfc}
.finding{border-left:6px solid;padding:.4rem .8rem;margin:.5rem 0;border-radius:3px}
.finding p{margin:.3rem 0 0}
.finding .level{text-transform:uppercase;font-size:.75rem;font-weight:700;margin-right:.4rem}
.finding.info{border-color:#3b82c4;background:#eef5fc}
.finding.warning{border-color:#d99a1e;background:#fdf6e6}
.finding.problem{border-color:#c8372d;background:#fcebea}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #e3e6ec}
figcaption{color:#5a6270;font-size:.9rem}
pre{background:#f5f6f8;padding:.8rem;overflow:auto;font-size:.85rem}
details{margin:.4rem 0}summary{cursor:pointer;font-weight:600}
code{font-size:.85rem}.missing{color:#c8372d}
"""


def render_report(ctx: ReportContext) -> str:
    """The full HTML document of ``ctx`` as a string."""
    sections = [
        _section("Summary", _kv_table(ctx.summary), "summary"),
        _section("Findings", _findings_html(ctx.findings), "findings"),
        _section("Metrics", _metrics_html(ctx.metrics), "metrics"),
    ]
    per_class = _per_class_html(ctx.metrics)
    if per_class is None:
        sections.append(_section("Per-class metrics", f"<p>{NA}</p>", "per-class"))
    else:
        split, table = per_class
        sections.append(_section(f"Per-class metrics ({split})", table, "per-class"))
    sections += [
        _section("Plots", _images_html(ctx.images), "plots"),
        _section("Training history", _history_html(ctx.history), "history"),
        _section(
            "Phases and time",
            html_table(ctx.phases) if ctx.phases else f"<p>{NA}</p>",
            "phases",
        ),
        _section("Data", _data_html(ctx.data_report), "data"),
        _section("Weights", _kv_table(ctx.weights), "weights"),
        _section("Configuration", _config_html(ctx.config), "config"),
    ]
    sections += [_section(s.title, s.html) for s in ctx.extra_sections]
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(ctx.title)}</title><style>{_CSS}</style></head><body>\n"
        f"<header><h1>{_esc(ctx.title)}</h1>"
        f'<p class="meta">run <strong>{_esc(ctx.run_name)}</strong> · created '
        f"{_esc(ctx.created_at)}</p></header>\n"
        f"{body}\n</body></html>\n"
    )


def write_report(ctx: ReportContext, path: str | os.PathLike[str]) -> Path:
    """Render ``ctx`` and write it atomically to ``path`` (UTF-8)."""
    return atomic_write_bytes(path, render_report(ctx).encode("utf-8"))
