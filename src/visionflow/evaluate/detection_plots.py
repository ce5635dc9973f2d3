"""PNG plots of detection metrics: precision-recall curves and AP per class.

Both take a :class:`~visionflow.evaluate.detection.DetectionMetrics` or its JSON form
(``to_json(curves=True)`` for the curves, e.g. read back from ``metrics.json``), draw with the
figure helpers of :mod:`visionflow.evaluate.plots` (Agg canvas, no pyplot state, atomic write)
and return the path written. A class without ground truth has no AP and no curve: it is named
as such instead of being drawn as a zero.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from visionflow.errors import DataError
from visionflow.evaluate.detection import DetectionMetrics
from visionflow.evaluate.plots import _empty, _label, _new_figure, _number, _save, _tight

__all__ = ["plot_ap_by_class", "plot_pr_curves"]

_NO_GT = "no ground truth"
#: Above this many legend entries the PR legend moves beside the axes in a smaller font.
_LEGEND_COMPACT = 12
#: Classes without ground truth named in the PR legend (the rest are counted).
_NAMES_SHOWN = 4


def _fields(metrics: DetectionMetrics | Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``per_class`` and ``pr_curves`` (``None`` when absent) of either form of the metrics."""
    if isinstance(metrics, DetectionMetrics):
        return metrics.per_class, metrics.pr_curves
    if isinstance(metrics, Mapping) and isinstance(metrics.get("per_class"), Mapping):
        return dict(metrics["per_class"]), metrics.get("pr_curves")
    raise DataError(
        "expected DetectionMetrics or its to_json() dict with a 'per_class' mapping, "
        f"got {type(metrics).__name__}"
    )


def plot_pr_curves(
    metrics: DetectionMetrics | Mapping[str, Any], path: str | os.PathLike[str]
) -> Path:
    """Precision against recall at IoU 0.5, one curve per class, AP@.5 in the legend.

    The curves are COCO's: interpolated precision at 101 recall points, dropping to 0 past the
    highest recall the detector reached. Classes without ground truth are named in one legend
    entry ("no ground truth: ...", the first few names and a count).

    Raises:
        DataError: ``metrics`` is a dict without ``pr_curves`` (write it with
            ``to_json(curves=True)``).
    """
    per_class, curves = _fields(metrics)
    if not isinstance(curves, Mapping):
        raise DataError(
            "the metrics carry no 'pr_curves'; pass the DetectionMetrics object or the dict of "
            "to_json(curves=True)"
        )
    with_curve: list[tuple[str, np.ndarray, np.ndarray, float]] = []
    without: list[str] = []
    for name, values in per_class.items():
        curve = curves.get(name)
        ap_50 = _number(values.get("ap_50") if isinstance(values, Mapping) else None)
        recall = precision = np.zeros(0)
        if isinstance(curve, Mapping):
            recall = np.array([_number(r) for r in curve.get("recall", [])])
            precision = np.array([_number(p) for p in curve.get("precision", [])])
        if np.isnan(ap_50) or recall.size == 0 or recall.shape != precision.shape:
            without.append(_label(name))
        else:
            with_curve.append((_label(name), recall, precision, ap_50))
    entries = len(with_curve) + bool(without)
    compact = entries > _LEGEND_COMPACT
    fig = _new_figure(10 if compact else 8, 6)
    ax = fig.subplots()
    ax.set_title("Precision-recall per class (IoU 0.5)")
    if not per_class:
        _empty(ax, "no classes")
        return _save(fig, path)
    colours = colormaps["tab10" if len(with_curve) <= 10 else "tab20"]
    for i, (name, recall, precision, ap_50) in enumerate(with_curve):
        ax.plot(
            recall,
            precision,
            drawstyle="steps-post",
            linewidth=1.5,
            color=colours(i % colours.N),
            linestyle="-" if i < colours.N else "--",
            label=f"{name} (AP@.5 {ap_50:.3f})",
        )
    if without:
        # An invisible artist puts the classes without a curve in the legend, with the reason.
        shown = ", ".join(without[:_NAMES_SHOWN])
        more = f" and {len(without) - _NAMES_SHOWN} more" if len(without) > _NAMES_SHOWN else ""
        ax.plot([], [], " ", label=f"{_NO_GT}: {shown}{more}")
    if not with_curve:
        ax.text(0.5, 0.5, _NO_GT, ha="center", va="center", color="0.4", transform=ax.transAxes)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    if compact:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6, ncol=1 + entries // 40)
    else:
        ax.legend(loc="best", fontsize=8)
    _tight(fig)
    return _save(fig, path)


def plot_ap_by_class(
    metrics: DetectionMetrics | Mapping[str, Any], path: str | os.PathLike[str]
) -> Path:
    """Horizontal bars of AP@.5 and AP@[.5:.95] per class, worst at the bottom.

    The labels carry the number of ground-truth boxes; a class without any shows "no ground
    truth" in place of its bars (sorted below every class with an AP).
    """
    per_class, _ = _fields(metrics)
    items = [
        (str(name), values if isinstance(values, Mapping) else {})
        for name, values in per_class.items()
    ]
    items.sort(key=lambda kv: (np.nan_to_num(_number(kv[1].get("ap_50")), nan=-1.0), kv[0]))
    n = len(items)
    fig = _new_figure(8, min(max(2.5, 0.4 * n + 1.4), 60.0))
    ax = fig.subplots()
    ax.set_title("AP per class")
    if n == 0:
        _empty(ax, "no classes")
        return _save(fig, path)
    ap_50 = np.array([_number(v.get("ap_50")) for _, v in items])
    ap = np.array([_number(v.get("ap")) for _, v in items])
    y = np.arange(n)
    height = 0.38
    ax.barh(
        y + height / 2,
        np.nan_to_num(ap_50),
        height=height,
        color="tab:blue",
        edgecolor="black",
        label="AP@.5",
    )
    ax.barh(
        y - height / 2,
        np.nan_to_num(ap),
        height=height,
        color="tab:orange",
        edgecolor="black",
        label="AP@[.5:.95]",
    )
    for i in np.flatnonzero(np.isnan(ap_50) & np.isnan(ap)):
        ax.text(0.01, float(i), _NO_GT, va="center", fontsize=8, color="0.4")
    labels = []
    for name, values in items:
        gt = values.get("gt")
        labels.append(_label(name) + (f" (n={gt})" if gt is not None else ""))
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9 if n <= 40 else 6)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel("average precision")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _tight(fig)
    return _save(fig, path)
