"""Drift monitoring: live traffic compared with the bundle's reference statistics.

A :class:`DriftMonitor` is a :class:`~visionflow.serve.runtime.PredictionHook`: after each
answered request (never on its path) it appends to a bounded sliding window per model version
what the model saw, summarised:

* the embedding projected on the bundle's PCA components, ``(features - mean) @ components.T``;
* the predicted class and the top probability (confidence);
* the brightness and contrast of the pixels (mean and standard deviation / 255, on a 4x
  sub-sampled grid: cheap).

On request (``GET /v1/models/{name}/drift``, ``/metrics``), at most once per ``interval_s`` and
only when new traffic arrived, the window is tested against ``model.json["reference"]`` (the
validation images at export time, see :func:`visionflow.export.exporter.reference_statistics`):

* two-sample Kolmogorov-Smirnov per projected component against the reference ``points``;
* chi-square on predicted-class counts against the reference predicted-class shares (a 2 x K
  contingency table: the reference is a sample too);
* two-sample KS on confidence against the reference confidence points.

Brightness and contrast are reported (live median, share of live images outside the reference's
1-99 % range) but do not raise the alert: the reference describes the original files and the
live window the model's input (resized and cropped), which differ slightly by construction.

Detectors are not monitored here: every test above needs a classifier's embedding, class
probabilities and the reference statistics a classifier bundle carries, none of which a detector
has, and made-up stand-ins would raise alerts that mean nothing. A detector's report says
``unsupported``; what its live traffic looks like is in ``/metrics``
(``visionflow_detections_per_image``, ``visionflow_detection_score``, ``visionflow_detections``
by label), where drift in object counts or scores shows.

Every p-value is Bonferroni-adjusted by the number of tests; the window *drifts* (``alert``)
when it holds at least ``min_samples`` images and some adjusted p-value is below ``alpha``.
The *drift score* is the largest KS statistic over the embedding components: 0 when the live
and reference distributions coincide, 1 when they do not overlap (an effect size, unlike the
p-values it does not grow with the window).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from visionflow.serve.runtime import ModelSource, PredictionEvent, PredictionHook

__all__ = ["DriftMonitor", "Reference", "render_html"]

log = logging.getLogger("visionflow.serve")


@dataclass(frozen=True)
class Reference:
    """The parts of a bundle's ``reference`` statistics the tests use."""

    classes: list[str]
    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d)
    points: np.ndarray  # (n, k)
    predicted: np.ndarray  # (classes,) shares
    images: int
    confidence: np.ndarray  # (n,)
    image: dict[str, dict[str, float]]

    @classmethod
    def from_meta(cls, meta: Any, classes: list[str]) -> Reference | None:
        """From a bundle manifest; None when it holds no (usable) reference statistics."""
        ref = meta.get("reference") if hasattr(meta, "get") else None
        if not isinstance(ref, dict):
            return None
        try:
            emb = ref["embedding"]
            mean = np.asarray(emb["mean"], np.float32)
            components = np.asarray(emb["components"], np.float32)
            points = np.asarray(emb["points"], np.float32).reshape(-1, len(components))
            predicted = np.asarray([float(ref["predicted"].get(c, 0.0)) for c in classes])
            confidence = np.asarray(ref["confidence"]["points"], np.float32)
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("the bundle's reference statistics are malformed; no drift monitoring")
            return None
        if components.ndim != 2 or components.shape[1] != mean.shape[0]:
            return None
        image: dict[str, dict[str, float]] = (
            ref["image"] if isinstance(ref.get("image"), dict) else {}
        )
        return cls(list(classes), mean, components, points, predicted,
                   int(ref.get("images", len(points))), confidence, image)  # fmt: skip


@dataclass
class _Window:
    reference: Reference
    size: int
    projected: deque[np.ndarray] = field(init=False)
    predicted: deque[int] = field(init=False)
    confidence: deque[float] = field(init=False)
    brightness: deque[float] = field(init=False)
    contrast: deque[float] = field(init=False)
    seen: int = 0  # images ever added (changes tell that a report is stale)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        n = self.size
        self.projected, self.predicted = deque(maxlen=n), deque(maxlen=n)
        self.confidence, self.brightness = deque(maxlen=n), deque(maxlen=n)
        self.contrast = deque(maxlen=n)

    def add(self, event: PredictionEvent) -> None:
        ref = self.reference
        feats = np.asarray(event.features, np.float32)
        if feats.ndim != 2 or feats.shape[1] != ref.mean.shape[0]:
            return
        projected = (feats - ref.mean) @ ref.components.T
        probs = np.asarray(event.probabilities)
        top = probs.argmax(axis=1)
        conf = probs[np.arange(len(top)), top]
        grid = np.asarray(event.pixels[:, ::4, ::4], np.float32).reshape(len(top), -1)
        bright = grid.mean(axis=1) / 255.0
        contrast = grid.std(axis=1) / 255.0
        with self.lock:
            for i in range(len(top)):
                self.projected.append(projected[i])
                self.predicted.append(int(top[i]))
                self.confidence.append(float(conf[i]))
                self.brightness.append(float(bright[i]))
                self.contrast.append(float(contrast[i]))
            self.seen += len(top)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            k = self.reference.components.shape[0]
            return {
                "projected": np.asarray(self.projected, np.float32).reshape(-1, k),
                "predicted": np.asarray(self.predicted, np.int64),
                "confidence": np.asarray(self.confidence, np.float64),
                "brightness": np.asarray(self.brightness, np.float64),
                "contrast": np.asarray(self.contrast, np.float64),
                "seen": self.seen,
            }


def _image_summary(ref: Reference, snap: dict[str, Any], key: str) -> dict[str, Any]:
    q = ref.image.get(key) or {}
    live = snap[key]
    out: dict[str, Any] = {
        "reference_median": q.get("q50"),
        "live_median": float(np.median(live)) if len(live) else None,
        "outside_reference_range": None,
    }
    if len(live) and "q01" in q and "q99" in q:
        outside = (live < q["q01"]) | (live > q["q99"])
        out["outside_reference_range"] = float(outside.mean())
    return out


def _tests(ref: Reference, snap: dict[str, Any]) -> list[dict[str, Any]]:
    """Every test's statistic and raw p-value (scipy, imported here: only reports need it)."""
    from scipy import stats

    out: list[dict[str, Any]] = []
    n = len(snap["predicted"])
    if n == 0:
        return out
    if len(ref.points):
        for j in range(ref.points.shape[1]):
            res = stats.ks_2samp(snap["projected"][:, j], ref.points[:, j])
            out.append({"test": f"embedding_pc{j}", "kind": "ks", "statistic": float(res.statistic),
                        "p_value": float(res.pvalue)})  # fmt: skip
    live = np.bincount(snap["predicted"], minlength=len(ref.classes))[: len(ref.classes)]
    reference = ref.predicted * max(ref.images, 1)
    table = np.vstack([reference, live]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] >= 2 and table[0].sum() > 0:
        chi = stats.chi2_contingency(table, correction=False)
        out.append({"test": "predicted_classes", "kind": "chi2", "statistic": float(chi.statistic),
                    "p_value": float(chi.pvalue)})  # fmt: skip
    if len(ref.confidence):
        res = stats.ks_2samp(snap["confidence"], ref.confidence)
        out.append({"test": "confidence", "kind": "ks", "statistic": float(res.statistic),
                    "p_value": float(res.pvalue)})  # fmt: skip
    return out


class DriftMonitor(PredictionHook):
    """Sliding windows of live traffic per model version, tested lazily against the bundle's
    reference statistics (see the module docstring).

    Args:
        source: Where the served models are (their manifests hold the reference).
        window: Images kept per model version (the most recent).
        min_samples: Images a window needs before it may alert.
        alpha: Family-wise significance level (Bonferroni over the tests).
        interval_s: A report is recomputed at most this often (and only after new traffic).
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        window: int = 500,
        min_samples: int = 100,
        alpha: float = 0.01,
        interval_s: float = 5.0,
    ) -> None:
        self.source = source
        self.window = window
        self.min_samples = min_samples
        self.alpha = alpha
        self.interval_s = interval_s
        self._windows: dict[tuple[str, int], _Window | None] = {}
        self._reports: dict[tuple[str, int], tuple[float, int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the hook
    def after_predict(self, event: PredictionEvent) -> None:
        if event.task != "classify":  # a detector: see the module docstring
            return
        win = self._window(event.model, event.version, event.classes)
        if win is not None and len(event.labels):
            win.add(event)

    def _window(self, name: str, version: int, classes: list[str] | None = None) -> _Window | None:
        key = (name, version)
        with self._lock:
            if key in self._windows:
                return self._windows[key]
        lm = self.source.loaded(name, version)
        if lm is None:
            return None
        if lm.task != "classify":
            with self._lock:
                return self._windows.setdefault(key, None)
        ref = Reference.from_meta(getattr(lm.model, "meta", None), classes or lm.classes)
        win = _Window(ref, self.window) if ref is not None else None
        with self._lock:
            return self._windows.setdefault(key, win)

    def versions(self) -> list[tuple[str, int]]:
        """Model versions with a window."""
        with self._lock:
            return sorted(k for k, w in self._windows.items() if w is not None)

    # ---------------------------------------------------------------- reports
    def report(self, name: str, version: int) -> dict[str, Any]:
        """The drift report of one model version (cached for ``interval_s``)."""
        key = (name, version)
        with self._lock:
            known = key in self._windows
            win = self._windows.get(key)
        if not known:
            win = self._window(name, version)
        base: dict[str, Any] = {
            "model": name, "version": version, "window": self.window,
            "min_samples": self.min_samples, "alpha": self.alpha,
        }  # fmt: skip
        if win is None:
            lm = self.source.loaded(name, version)
            if lm is not None and lm.task != "classify":
                return base | {
                    "status": "unsupported", "samples": 0, "alert": False, "drift_score": None,
                    "tests": [],
                    "message": f"{name} version {version} is a detector: drift tests need a "
                    "classifier's embeddings and class probabilities; watch "
                    "visionflow_detections_per_image and visionflow_detection_score in "
                    "/metrics instead",
                }  # fmt: skip
            loaded = lm is not None
            return base | {
                "status": "no_reference" if loaded else "not_loaded",
                "samples": 0, "alert": False, "drift_score": None, "tests": [],
                "message": "the bundle holds no reference statistics (export it again)"
                if loaded else "this version is not loaded, so it has seen no traffic",
            }  # fmt: skip
        now = time.monotonic()
        with self._lock:
            cached = self._reports.get(key)
        if cached is not None and (cached[1] == win.seen or now - cached[0] < self.interval_s):
            return cached[2]
        snap = win.snapshot()
        result = base | self._evaluate(win.reference, snap)
        with self._lock:
            self._reports[key] = (now, snap["seen"], result)
        return result

    def _evaluate(self, ref: Reference, snap: dict[str, Any]) -> dict[str, Any]:
        n = len(snap["predicted"])
        tests = _tests(ref, snap) if n >= 2 else []
        m = max(1, len(tests))
        for t in tests:
            t["p_adjusted"] = min(1.0, t["p_value"] * m)
        enough = n >= self.min_samples
        alert = enough and any(t["p_adjusted"] < self.alpha for t in tests)
        ks = [t["statistic"] for t in tests if t["test"].startswith("embedding_pc")]
        live_shares = np.bincount(snap["predicted"], minlength=len(ref.classes))[
            : len(ref.classes)
        ] / max(n, 1)
        status = "collecting" if not enough else "drift" if alert else "ok"
        return {
            "status": status,
            "samples": n,
            "seen": snap["seen"],
            "alert": alert,
            "drift_score": max(ks) if ks else None,
            "min_p_adjusted": min((t["p_adjusted"] for t in tests), default=None),
            "tests": tests,
            "classes": {
                c: {"reference": float(ref.predicted[i]), "live": float(live_shares[i])}
                for i, c in enumerate(ref.classes)
            },
            "confidence": {"reference_mean": float(ref.confidence.mean())
                           if len(ref.confidence) else None,
                           "live_mean": float(snap["confidence"].mean()) if n else None},
            "image": {k: _image_summary(ref, snap, k) for k in ("brightness", "contrast")},
            "computed_at": time.time(),
        }  # fmt: skip

    def snapshot(self, name: str, version: int) -> tuple[Reference, dict[str, Any]] | None:
        """The reference and the current window (for plots)."""
        with self._lock:
            win = self._windows.get((name, version))
        return (win.reference, win.snapshot()) if win is not None else None

    # ---------------------------------------------------------------- metrics
    def collector(self) -> Collector:
        """A Prometheus collector exporting every window's report as gauges."""
        return _DriftCollector(self)


class _DriftCollector(Collector):
    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Any]:
        return []  # families are only known at collect time: never collected on registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "version"]
        score = GaugeMetricFamily(
            "visionflow_drift_score",
            "Largest KS statistic over the embedding components (0 = like the reference).",
            labels=labels,
        )
        alert = GaugeMetricFamily(
            "visionflow_drift_alert", "1 while the window drifts from the reference.",
            labels=labels,
        )  # fmt: skip
        samples = GaugeMetricFamily(
            "visionflow_drift_window_samples", "Images in the drift window.", labels=labels
        )
        p_values = GaugeMetricFamily(
            "visionflow_drift_p_value",
            "Bonferroni-adjusted p-value of each drift test.",
            labels=[*labels, "test"],
        )
        for name, version in self.monitor.versions():
            try:
                rep = self.monitor.report(name, version)
            except Exception:  # a scrape must not fail because of one window
                log.exception("drift report of %s v%s failed", name, version)
                continue
            values = [name, str(version)]
            samples.add_metric(values, float(rep["samples"]))
            alert.add_metric(values, 1.0 if rep["alert"] else 0.0)
            if rep.get("drift_score") is not None:
                score.add_metric(values, float(rep["drift_score"]))
            for t in rep.get("tests", []):
                p_values.add_metric([*values, t["test"]], float(t["p_adjusted"]))
        yield from (score, alert, samples, p_values)


# ------------------------------------------------------------------------------ HTML report
def _figure(ref: Reference, snap: dict[str, Any], report: dict[str, Any]) -> str:
    """A PNG (base64) of reference vs live distributions."""
    from matplotlib.figure import Figure  # Agg through the object API: thread-safe

    k = min(ref.points.shape[1] if ref.points.ndim == 2 else 0, 4)
    panels = k + 2
    cols = 3
    rows = (panels + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes: list[Any] = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for j in range(k):
        ax = axes[j]
        live = snap["projected"][:, j]
        both = np.concatenate([ref.points[:, j], live]) if len(live) else ref.points[:, j]
        bins = np.histogram_bin_edges(both, bins=20)
        ax.hist(ref.points[:, j], bins=bins, density=True, alpha=0.5, label="reference")
        if len(live):
            ax.hist(live, bins=bins, density=True, alpha=0.5, label="live")
        ax.set_title(f"embedding component {j}")
        ax.legend(fontsize=7)
    ax = axes[k]
    x = np.arange(len(ref.classes))
    live_shares = [report["classes"][c]["live"] for c in ref.classes]
    ax.bar(x - 0.2, ref.predicted, width=0.4, label="reference")
    ax.bar(x + 0.2, live_shares, width=0.4, label="live")
    ax.set_xticks(x, ref.classes, rotation=45, ha="right", fontsize=7)
    ax.set_title("predicted-class shares")
    ax.legend(fontsize=7)
    ax = axes[k + 1]
    bins = np.linspace(0, 1, 21)
    ax.hist(ref.confidence, bins=bins, density=True, alpha=0.5, label="reference")
    if len(snap["confidence"]):
        ax.hist(snap["confidence"], bins=bins, density=True, alpha=0.5, label="live")
    ax.set_title("confidence")
    ax.legend(fontsize=7)
    for ax in axes[panels:]:
        ax.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(report: dict[str, Any], monitor: DriftMonitor) -> str:
    """A small self-contained page: verdict, tests, and the distributions as an inline PNG."""
    e = html.escape
    name, version = report["model"], report["version"]
    status = report["status"]
    colour = {"drift": "#b00020", "ok": "#1b7f3b"}.get(status, "#555")
    rows = "".join(
        f"<tr><td>{e(t['test'])}</td><td>{e(t['kind'])}</td><td>{t['statistic']:.3f}</td>"
        f"<td>{t['p_value']:.3g}</td><td>{t['p_adjusted']:.3g}</td>"
        f"<td>{'drift' if t['p_adjusted'] < report['alpha'] else ''}</td></tr>"
        for t in report.get("tests", [])
    )
    snapshot = monitor.snapshot(name, version)
    image = ""
    if snapshot is not None and report.get("samples"):
        png = _figure(snapshot[0], snapshot[1], report)
        image = f'<img alt="reference vs live distributions" src="data:image/png;base64,{png}">'
    score = report.get("drift_score")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Drift: {e(name)} v{version}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:first-child{{text-align:left}}.status{{color:{colour};font-weight:bold}}</style></head>
<body><h1>Drift report: {e(name)} version {version}</h1>
<p class="status">status: {e(status)}{" — ALERT" if report.get("alert") else ""}</p>
<p>{report.get("samples", 0)} images in the window (at most {report["window"]}; an alert needs
at least {report["min_samples"]}); alpha {report["alpha"]} (Bonferroni-adjusted p-values);
drift score {"n/a" if score is None else f"{score:.3f}"}.</p>
{f"<p>{e(report['message'])}</p>" if report.get("message") else ""}
<table><tr><th>test</th><th>kind</th><th>statistic</th><th>p</th><th>p adjusted</th><th></th></tr>
{rows}</table>
{image}
</body></html>
"""
