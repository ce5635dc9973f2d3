"""Prometheus metrics of one app, in a registry of its own (several apps may share a process).

Every series that concerns a model carries ``model`` and ``version`` labels (empty for requests
that reach no model, such as ``/healthz``). A classifier's answers feed ``visionflow_predictions``
and ``visionflow_confidence``; a detector's feed ``visionflow_detections`` (objects by label),
``visionflow_detections_per_image`` and ``visionflow_detection_score``: what a detector's drift
is watched by (the drift monitor's tests need a classifier's embeddings and probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from visionflow.prediction import Detections

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

_LATENCY = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CONFIDENCE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_OBJECTS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 300)


class ServeMetrics:
    """The series a server exports; ``registry`` is what ``/metrics`` renders."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "visionflow_requests", "HTTP requests answered.",
            ["endpoint", "method", "status", "model", "version"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "visionflow_errors", "Requests answered with an error, by error code.",
            ["endpoint", "code", "model", "version"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "visionflow_request_duration_seconds", "Time from request to answer.",
            ["endpoint", "model", "version"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "visionflow_batch_size", "Images per ONNX Runtime call.",
            ["model", "version"], buckets=_BATCH, registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "visionflow_inference_seconds", "Time of one ONNX Runtime batch.",
            ["model", "version"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "visionflow_queue_depth", "Images waiting for a batch.",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.predictions = Counter(
            "visionflow_predictions", "Images predicted, by top label.",
            ["model", "version", "label"], registry=r,
        )  # fmt: skip
        self.confidence = Histogram(
            "visionflow_confidence", "Probability of the top label.",
            ["model", "version"], buckets=_CONFIDENCE, registry=r,
        )  # fmt: skip
        self.detections = Counter(
            "visionflow_detections", "Objects detected (at or above the request's threshold).",
            ["model", "version", "label"], registry=r,
        )  # fmt: skip
        self.detections_per_image = Histogram(
            "visionflow_detections_per_image", "Objects detected per image.",
            ["model", "version"], buckets=_OBJECTS, registry=r,
        )  # fmt: skip
        self.detection_score = Histogram(
            "visionflow_detection_score", "Score of each detected object.",
            ["model", "version"], buckets=_CONFIDENCE, registry=r,
        )  # fmt: skip
        self.loaded = Gauge(
            "visionflow_model_loaded", "1 while a model version is loaded and warm.",
            ["model", "version"], registry=r,
        )  # fmt: skip

    def observe_predictions(
        self, model: str, version: str, labels: Sequence[str], confidences: Sequence[float]
    ) -> None:
        for label, p in zip(labels, confidences, strict=True):
            self.predictions.labels(model, version, label).inc()
            self.confidence.labels(model, version).observe(p)

    def observe_detections(
        self, model: str, version: str, detections: Sequence[Detections]
    ) -> None:
        per_image = self.detections_per_image.labels(model, version)
        score = self.detection_score.labels(model, version)
        for found in detections:
            per_image.observe(len(found))
            for label, s in zip(found.labels, found.scores, strict=True):
                self.detections.labels(model, version, label).inc()
                score.observe(float(s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
