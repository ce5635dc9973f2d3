"""PNG plots of a run: learning curves, confusion matrix, reliability diagram, per-class F1.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly, so no
pyplot global state is touched (safe in threads, servers and tests), and every file is written
atomically. Each function returns the path it wrote.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from visionflow._io import atomic_write

__all__ = [
    "plot_confusion_matrix",
    "plot_learning_curves",
    "plot_per_class",
    "plot_reliability",
]

_DPI = 100
#: Above this many classes the confusion matrix cells carry no count annotations.
_ANNOTATE_MAX = 30
_LABEL_MAX = 40


def _label(text: Any) -> str:
    """A label matplotlib shows literally: no mathtext from ``$``, long names shortened."""
    s = str(text)
    if len(s) > _LABEL_MAX:
        s = s[: _LABEL_MAX - 1] + "…"
    return s.replace("$", r"\$")


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    finally:
        fig.clear()


def _tight(fig: Figure) -> None:
    # tight_layout warns (an error under pytest) when labels cannot fit; a cramped plot is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_learning_curves(
    history: list[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    metric: str = "accuracy",
    title: str | None = None,
) -> Path:
    """Loss and ``metric`` (train and validation) over all epochs of all phases.

    The x axis is the position in ``history`` (epoch numbers restart in each phase); phase
    changes are dashed vertical lines labelled with the phase name, and epochs marked ``best``
    are circled on the validation curves. ``metric`` names the history keys
    ``train_<metric>``/``val_<metric>`` (``"map"`` for detection); ``title`` its panel's title.
    """
    records = [r for r in history if isinstance(r, dict)]
    fig = _new_figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.set_title("Loss")
    ax_acc.set_title(title or metric.replace("_", " ").capitalize())
    if not records:
        _empty(ax_loss, "no training history")
        _empty(ax_acc, "no training history")
        return _save(fig, path)

    x = np.arange(1, len(records) + 1)
    keys = ("train_loss", "val_loss", f"train_{metric}", f"val_{metric}")
    series = {key: np.array([_number(r.get(key)) for r in records]) for key in keys}
    best = np.array([bool(r.get("best")) for r in records])

    for ax, kind in ((ax_loss, "loss"), (ax_acc, metric)):
        drawn = False
        for split, style in (("train", "-"), ("val", "-")):
            y = series[f"{split}_{kind}"]
            if np.all(np.isnan(y)):
                continue
            name = "train" if split == "train" else "validation"
            ax.plot(x, y, style, marker=".", label=name, color=_COLORS[split])
            drawn = True
        y_val = series[f"val_{kind}"]
        marks = best & ~np.isnan(y_val)
        if marks.any():
            ax.plot(
                x[marks],
                y_val[marks],
                "o",
                markersize=9,
                markerfacecolor="none",
                markeredgecolor="black",
                label="best",
            )
        if not drawn:
            _empty(ax, f"no {kind} recorded")
            continue
        _phase_lines(ax, records)
        ax.set_xlabel("epoch (all phases)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if not np.all(np.isnan(series[f"train_{metric}"])) or not np.all(
        np.isnan(series[f"val_{metric}"])
    ):
        ax_acc.set_ylim(-0.02, 1.02)
    _tight(fig)
    return _save(fig, path)


_COLORS = {"train": "tab:blue", "val": "tab:orange"}


def _phase_lines(ax: Any, records: Sequence[dict[str, Any]]) -> None:
    previous: object = object()
    for i, record in enumerate(records):
        phase = record.get("phase")
        if phase != previous:
            if i > 0:
                ax.axvline(i + 0.5, color="0.5", linestyle="--", linewidth=1)
            if phase is not None:
                ax.annotate(
                    _label(phase),
                    xy=(i + 0.5 if i > 0 else 1.0, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, -12),
                    textcoords="offset points",
                    fontsize=8,
                    color="0.35",
                )
            previous = phase


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
) -> Path:
    """Confusion matrix normalised by row (true class), with raw counts written in the cells.

    Counts are left out above 30 classes; the figure grows with the number of classes.
    """
    matrix = np.asarray(cm, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    n = matrix.shape[0]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n}x{n} confusion matrix")
    size = min(max(4.5, 0.45 * n + 2.5), 40.0)
    fig = _new_figure(size + 1.2, size)
    ax = fig.subplots()
    if n == 0:
        _empty(ax, "no classes")
        return _save(fig, path)
    totals = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    labels = [_label(c) for c in class_names]
    fontsize = 9 if n <= 20 else max(4, int(9 - (n - 20) / 10))
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=fontsize)
    ax.set_yticklabels(labels, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised, counts in cells)")
    if n <= _ANNOTATE_MAX:
        for i in range(n):
            for j in range(n):
                count = int(matrix[i, j])
                if count == 0 and i != j:
                    continue
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    _tight(fig)
    return _save(fig, path)


def plot_reliability(bins: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, counts below."""
    fig = _new_figure(5.5, 6.5)
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="0.5", linewidth=1, label="perfect calibration")
    lower = np.array([_number(b.get("lower")) for b in bins], dtype=np.float64)
    upper = np.array([_number(b.get("upper")) for b in bins], dtype=np.float64)
    accuracy = np.array([_number(b.get("accuracy")) for b in bins], dtype=np.float64)
    confidence = np.array([_number(b.get("confidence")) for b in bins], dtype=np.float64)
    counts = np.array([_number(b.get("count")) for b in bins], dtype=np.float64)
    valid = ~np.isnan(lower) & ~np.isnan(upper)
    width = np.where(valid, upper - lower, 0.0)
    filled = valid & ~np.isnan(accuracy)
    if filled.any():
        ax.bar(
            lower[filled],
            accuracy[filled],
            width=width[filled],
            align="edge",
            color="tab:blue",
            edgecolor="black",
            alpha=0.75,
            label="accuracy",
        )
        has_conf = filled & ~np.isnan(confidence)
        ax.plot(
            (lower[has_conf] + upper[has_conf]) / 2,
            confidence[has_conf],
            "o",
            color="tab:red",
            markersize=4,
            label="mean confidence",
        )
    else:
        ax.text(0.5, 0.5, "no predictions", ha="center", va="center", color="0.4")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (top-1 confidence)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    has_count = valid & ~np.isnan(counts)
    if has_count.any():
        ax_count.bar(
            lower[has_count],
            counts[has_count],
            width=width[has_count],
            align="edge",
            color="0.6",
            edgecolor="black",
        )
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("count")
    _tight(fig)
    return _save(fig, path)


def plot_per_class(per_class: dict[str, dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Horizontal bars of F1 per class, worst at the bottom, support in the labels."""
    items = sorted(
        ((str(name), v if isinstance(v, dict) else {}) for name, v in per_class.items()),
        key=lambda kv: (np.nan_to_num(_number(kv[1].get("f1")), nan=-1.0), kv[0]),
    )
    n = len(items)
    fig = _new_figure(8, min(max(2.5, 0.28 * n + 1.2), 60.0))
    ax = fig.subplots()
    if n == 0:
        _empty(ax, "no classes")
        return _save(fig, path)
    f1 = np.array([_number(v.get("f1")) for _, v in items])
    labels = []
    for name, v in items:
        support = v.get("support")
        suffix = f" (n={support})" if support is not None else ""
        labels.append(_label(name) + suffix)
    fontsize = 9 if n <= 40 else 6
    ax.barh(range(n), np.nan_to_num(f1, nan=0.0), color="tab:green", edgecolor="black")
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=fontsize)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel("F1")
    ax.set_title("F1 per class")
    ax.grid(True, axis="x", alpha=0.3)
    _tight(fig)
    return _save(fig, path)
