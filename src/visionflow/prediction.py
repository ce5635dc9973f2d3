"""What every prediction path shares, without torch: inputs to images, probabilities to results.

Used by the PyTorch model of a run (:mod:`visionflow.api`) and by the ONNX Runtime model of a
bundle (:mod:`visionflow.export.runtime`), so both accept the same inputs and answer alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionflow.data.images import IMAGE_EXTENSIONS, load_image, load_image_bytes
from visionflow.errors import DataError

__all__ = [
    "Detections",
    "ImageInput",
    "Prediction",
    "as_list",
    "evaluate_dataset",
    "expand_inputs",
    "to_image",
    "top_k",
]

#: What prediction accepts: a path, a decoded PIL image, an ``HxW[xC]`` array or encoded bytes.
ImageInput = str | Path | Image.Image | np.ndarray | bytes


@dataclass(frozen=True)
class Prediction:
    """One image's prediction: the top label, its probability and the top-k alternatives."""

    source: str
    label: str
    probability: float
    topk: list[tuple[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "label": self.label,
            "probability": self.probability,
            "topk": [{"label": lbl, "probability": p} for lbl, p in self.topk],
        }


@dataclass(frozen=True)
class Detections:
    """One image's detections, strongest first.

    Attributes:
        source: Where the image came from (a path, or ``"<bytes>"``/``"<image 3>"``).
        width: The image's width in pixels (boxes are in this image's pixels).
        height: The image's height in pixels.
        boxes: ``N x 4`` float ``(x1, y1, x2, y2)`` in the input image's pixels.
        scores: ``N`` confidences in ``[0, 1]``.
        labels: ``N`` class names.
    """

    source: str
    width: int
    height: int
    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "width": self.width,
            "height": self.height,
            "detections": [
                {
                    "label": label,
                    "score": round(float(score), 6),
                    "box": [round(float(v), 2) for v in box],
                }
                for box, score, label in zip(self.boxes, self.scores, self.labels, strict=True)
            ],
        }


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Paths as given, with directories expanded (recursively) to the image files inside."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            out.extend(found)
        else:
            out.append(path)
    return out


def to_image(item: ImageInput, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode one input to RGB (through the one safe decoder for files and bytes)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB"), "<PIL.Image>"
    if isinstance(item, bytes):
        return load_image_bytes(item, name="<bytes>", max_pixels=max_pixels), "<bytes>"
    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8:
            scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
            arr = np.clip(arr.astype(np.float64) * scale, 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise DataError(f"array of shape {item.shape} is not an HxW or HxWxC image")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return Image.fromarray(arr[:, :, :3]), "<array>"
    return load_image(item, max_pixels=max_pixels), str(item)


def as_list(inputs: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(inputs, str | Path | Image.Image | np.ndarray | bytes):
        return [inputs]
    return list(inputs)


def top_k(
    probs: np.ndarray, classes: Sequence[str], items: Sequence[ImageInput], k: int
) -> list[Prediction]:
    """One :class:`Prediction` per row of ``probs`` (columns in ``classes`` order)."""
    k = max(1, min(k, len(classes)))
    out = []
    for item, row in zip(items, probs, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        source = str(item) if isinstance(item, str | Path) else type(item).__name__
        out.append(
            Prediction(
                source=source,
                label=classes[int(order[0])],
                probability=float(row[order[0]]),
                topk=[(classes[int(i)], float(row[i])) for i in order],
            )
        )
    return out


def evaluate_dataset(
    predict_proba: Callable[..., np.ndarray],
    classes: Sequence[str],
    data: str | Path,
    *,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Metrics of a model (its ``predict_proba``) on a labelled dataset with the same class
    names; unreadable files are skipped and listed under ``"skipped"``."""
    from visionflow.data.checks import check_dataset
    from visionflow.data.readers import read_dataset
    from visionflow.evaluate.metrics import classification_metrics

    index = read_dataset(data)
    report, clean = check_dataset(index)
    unknown = sorted(
        {s.label for s in clean.samples if s.label is not None and s.label not in classes}
    )
    if unknown:
        raise DataError(f"{data}: labels {unknown} are not classes of this model ({list(classes)})")
    samples = [s for s in clean.samples if s.label is not None]
    if not samples:
        raise DataError(f"{data}: no labelled, readable images to evaluate on")
    probs = predict_proba([s.path for s in samples], batch_size=batch_size)
    mapping = {c: i for i, c in enumerate(classes)}
    y = np.array([mapping[s.label] for s in samples if s.label is not None])
    metrics = classification_metrics(y, probs, list(classes))
    metrics["skipped"] = [b.__dict__ for b in report.unreadable]
    return metrics
