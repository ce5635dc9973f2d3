"""A detection bundle's model on ONNX Runtime: boxes without PyTorch.

The graph (written by :mod:`visionflow.export.detection`) is the whole detector, resize and
post-processing included, so the only thing a client does is decode the image:

* input ``image``: ``uint8`` RGB pixels ``(height, width, 3)`` of one image, any size (the
  graph resizes, normalises and pads inside exactly as the PyTorch model does);
* outputs ``boxes`` ``(n, 4)`` float ``(x1, y1, x2, y2)`` in the input image's pixels,
  ``scores`` ``(n,)`` strongest first and ``labels`` ``(n,)`` int64 **0-based** class ids (the
  detector's background offset is already subtracted in the graph).

The graph keeps every detection above the detector's own (low) score threshold, up to its
``detections_per_img``; :meth:`DetectionBundleModel.detect` then applies the display threshold
(the bundle's ``score_threshold`` unless the caller gives one). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.data.images import DEFAULT_MAX_PIXELS
from visionflow.errors import BundleError, ConfigError, DataError
from visionflow.export.bundle import Bundle
from visionflow.prediction import Detections, ImageInput, as_list, to_image

__all__ = [
    "DETECTION_GRAPHS",
    "DetectionBundleModel",
    "detections_from_arrays",
    "evaluate_dataset",
    "evaluate_detector",
    "run_detection_graph",
]

#: Graph kinds a detection bundle may hold, by file.
DETECTION_GRAPHS = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
#: The graph's input and outputs, by name.
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")
#: Display threshold of bundles whose manifest records none.
DEFAULT_SCORE_THRESHOLD = 0.3


def run_detection_graph(
    session: Any, pixels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes, scores, labels)`` of one image's ``uint8`` ``(H, W, 3)`` pixels.

    Raises:
        DataError: ``pixels`` is not a ``uint8`` ``(H, W, 3)`` array.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DataError(
            f"the detection graph takes uint8 (height, width, 3) RGB pixels, got {pixels.dtype} "
            f"{tuple(pixels.shape)}"
        )
    boxes, scores, labels = session.run(
        list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(pixels)}
    )
    return (
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(scores, np.float32).reshape(-1),
        np.asarray(labels, np.int64).reshape(-1),
    )


class DetectionBundleModel:
    """An object detector from a bundle; use :func:`visionflow.load` or
    :func:`visionflow.export.runtime.load_bundle`.

    Attributes:
        bundle: The verified bundle (its ``meta`` is the manifest).
        session: The ONNX Runtime session of :attr:`graph`.
        graph: The graph file in use (``model.onnx`` or ``model.int8.onnx``).
        classes: Class names; a graph label ``k`` is ``classes[k]``.
        score_threshold: The display threshold :meth:`detect` applies by default.
    """

    task = "detect"

    def __init__(self, bundle: Bundle, session: Any, graph: str) -> None:
        self.bundle = bundle
        self.session = session
        self.graph = graph
        self.classes: list[str] = [str(c) for c in bundle.meta["classes"]]
        self.score_threshold = float(bundle.meta.get("score_threshold", DEFAULT_SCORE_THRESHOLD))

    @property
    def meta(self) -> dict[str, Any]:
        return self.bundle.meta

    @property
    def version_info(self) -> dict[str, Any]:
        """Name, backbone, detector and creation time: what a server reports with each answer."""
        info = {k: self.meta.get(k) for k in ("name", "backbone", "created_at")}
        info["detector"] = (self.meta.get("detector") or {}).get("name")
        return info

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph's raw ``(boxes, scores, labels)`` for one image's ``uint8`` pixels."""
        boxes, scores, labels = run_detection_graph(self.session, pixels)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise BundleError(
                f"{self.bundle.source}: {self.graph} returned label {int(labels.max())} but the "
                f"bundle has {len(self.classes)} classes; the graph and model.json disagree"
            )
        return boxes, scores, labels

    def detect(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        score_threshold: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> list[Detections]:
        """Detections of each input (a path, PIL image, array, encoded bytes, or a list).

        Args:
            inputs: The images; files and bytes go through the one safe decoder.
            score_threshold: Keep detections scoring at least this (default:
                :attr:`score_threshold`; 0 keeps everything the graph returns).
            max_pixels: Largest image (width x height) decoded.

        Raises:
            ConfigError: ``score_threshold`` is outside ``[0, 1]``.
            ImageDecodeError: An input cannot be decoded.
        """
        threshold = _threshold(self.score_threshold if score_threshold is None else score_threshold)
        out = []
        for item in as_list(inputs):
            image, source = to_image(item, max_pixels)
            boxes, scores, labels = self.run(np.asarray(image, dtype=np.uint8))
            out.append(
                detections_from_arrays(
                    source, image.size, boxes, scores, labels, threshold, self.classes
                )
            )
        return out

    #: :meth:`detect` under the name PyTorch models of runs use
    #: (:class:`visionflow.api.DetectorModel`), so either answers ``predict``.
    predict = detect

    def evaluate(self, data: str | Path) -> dict[str, Any]:
        """COCO metrics on a labelled detection dataset; see :func:`evaluate_dataset`."""
        return evaluate_dataset(
            lambda path: self.detect(path, score_threshold=0.0)[0], self.classes, data
        )


def _threshold(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"score threshold must be in [0, 1], got {value}")
    return value


def detections_from_arrays(
    source: str,
    size: tuple[int, int],
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    classes: Sequence[str],
) -> Detections:
    """One image's :class:`Detections` from the graph's arrays: those scoring at least
    ``threshold``, strongest first, labels named from ``classes``."""
    keep = scores >= threshold
    order = np.argsort(-scores[keep], kind="stable")
    return Detections(
        source=source,
        width=int(size[0]),
        height=int(size[1]),
        boxes=boxes[keep][order].astype(np.float32).reshape(-1, 4),
        scores=scores[keep][order].astype(np.float32),
        labels=[classes[int(k)] for k in labels[keep][order]],
    )


def evaluate_dataset(
    detect: Callable[[Path], Detections], classes: Sequence[str], data: str | Path
) -> dict[str, Any]:
    """COCO metrics of ``detect`` (one image path -> its detections, every score kept: mAP
    needs the low ones) on a labelled detection dataset (COCO, VOC or YOLO) with the same class
    names. The dataset is checked first (:func:`~visionflow.data.detection.check_detection`);
    images that cannot be read are skipped and listed under ``"skipped"``.

    Raises:
        DataError: The dataset cannot be read, names a class the model does not know, or has
            no readable image.
    """
    from visionflow.data.detection import check_detection, read_detection

    index = read_detection(data)
    report, clean = check_detection(index)
    result = evaluate_detector(
        detect,
        classes,
        [(s.path, list(s.boxes), list(s.labels), list(s.iscrowd)) for s in clean.samples],
        where=str(data),
    )
    result["skipped"] = [
        i.to_json() for i in report.issues if i.kind in ("unreadable_image", "missing_image")
    ]
    return result


def evaluate_detector(
    detect: Callable[[Path], Detections],
    classes: Sequence[str],
    samples: Sequence[tuple[Path, list[Any], list[str], list[bool]]],
    *,
    where: str,
) -> dict[str, Any]:
    """COCO metrics (:func:`visionflow.evaluate.detection.evaluate_detections`) of ``detect``
    (one image path -> its detections, all scores kept) on ``samples`` of
    ``(path, boxes, class names, crowd flags)``.

    Raises:
        DataError: A sample's class is not one of ``classes``, or there is nothing to score.
    """
    from visionflow.evaluate.detection import evaluate_detections

    mapping = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lbl for _, _, labels, _ in samples for lbl in labels if lbl not in mapping})
    if unknown:
        raise DataError(
            f"{where}: classes {unknown} are not classes of this model ({list(classes)})"
        )
    if not samples:
        raise DataError(f"{where}: no readable images to evaluate on")
    preds, truths = [], []
    for path, boxes, labels, crowd in samples:
        found = detect(path)
        preds.append(
            {
                "boxes": found.boxes,
                "scores": found.scores,
                "labels": np.asarray([mapping[lbl] for lbl in found.labels], dtype=np.int64),
            }
        )
        truths.append(
            {
                "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                "labels": np.asarray([mapping[lbl] for lbl in labels], dtype=np.int64),
                "iscrowd": np.asarray(crowd or [False] * len(labels), dtype=bool),
                "width": found.width,
                "height": found.height,
            }
        )
    return evaluate_detections(preds, truths, list(classes)).to_json()


def load_detection_bundle(
    bundle: Bundle,
    *,
    graph: str = "default",
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> DetectionBundleModel:
    """The :class:`DetectionBundleModel` of an opened, verified detection bundle.

    Raises:
        BundleError: The graph asked for is unknown or absent, or ONNX Runtime cannot load it.
    """
    from visionflow.export.runtime import open_graph

    for key in ("classes",):
        if not isinstance(bundle.meta.get(key), list) or not bundle.meta[key]:
            raise BundleError(f"{bundle.source}: model.json has no {key!r} list")
    session, name = open_graph(
        bundle,
        graph,
        DETECTION_GRAPHS,
        threads=threads,
        providers=providers,
        kind=" for a detection bundle",
    )
    return DetectionBundleModel(bundle, session, name)
