"""Evaluate a trained classifier: metrics, a fitting diagnosis, plots and an HTML report.

The stage after training. :func:`classification_metrics` turns labels and probabilities into
JSON-safe numbers, :func:`diagnose` explains over- and underfitting in plain words, the
``plot_*`` functions draw PNGs (matplotlib, Agg canvas, no pyplot state) and
:func:`write_report` puts all of it into one self-contained HTML file.
"""

from __future__ import annotations

from visionflow.evaluate.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
)
from visionflow.evaluate.overfit import Finding, diagnose
from visionflow.evaluate.plots import (
    plot_confusion_matrix,
    plot_learning_curves,
    plot_per_class,
    plot_reliability,
)
from visionflow.evaluate.report import (
    ReportContext,
    ReportSection,
    html_image,
    html_table,
    render_report,
    write_report,
)

__all__ = [
    "Finding",
    "ReportContext",
    "ReportSection",
    "classification_metrics",
    "diagnose",
    "expected_calibration_error",
    "html_image",
    "html_table",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "plot_per_class",
    "plot_reliability",
    "reliability_bins",
    "render_report",
    "write_report",
]
