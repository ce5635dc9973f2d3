"""Boxes drawn on images: what ``visionflow predict --draw`` writes and the report's gallery
shows. Pillow only (no matplotlib), so it is cheap enough to run on every predicted image.

Style, chosen so a person can read a crowded image at a glance:

* one colour per class, the same in every image and every run (a hash of the class name picks
  it from a palette of 20 well-separated colours; give ``classes`` to colour by position
  instead, which never gives two classes of one model the same colour);
* predictions: solid boxes with ``label score`` on a filled tag in the box's colour (black or
  white text, whichever contrasts), above the box when there is room, else inside it;
* ground truth: dashed boxes in the class colour with the label on a tag under the box, so
  the two never hide each other's text.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visionflow.errors import DataError

__all__ = ["PALETTE", "class_colour", "draw_detections"]

#: Well-separated colours (Tableau 20 reordered: saturated first), RGB.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)


def class_colour(label: str, classes: Sequence[str] | None = None) -> tuple[int, int, int]:
    """The colour of ``label``: by its position in ``classes`` when given (and listed), else by
    a CRC-32 of its name, so it is the same in every image, run and process."""
    if classes is not None and label in classes:
        return PALETTE[list(classes).index(label) % len(PALETTE)]
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _boxes(value: Any, n: int | None, what: str) -> np.ndarray:
    arr = np.asarray(value if value is not None else np.zeros((0, 4)), dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DataError(f"{what} must be N x 4 (x1, y1, x2, y2), got shape {tuple(arr.shape)}")
    if n is not None and len(arr) != n:
        raise DataError(f"{what}: {len(arr)} boxes but {n} labels; give one label per box")
    if not np.isfinite(arr).all():
        raise DataError(f"{what} hold NaN or infinite coordinates")
    return arr


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError, TypeError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    luma = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luma > 150 else (255, 255, 255)


def _dashed_rectangle(
    draw: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    colour: tuple[int, int, int],
    width: int,
    dash: int,
) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in (
        ((x1, y1), (x2, y1)),
        ((x2, y1), (x2, y2)),
        ((x2, y2), (x1, y2)),
        ((x1, y2), (x1, y1)),
    ):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            draw.line(
                [
                    (ax + (bx - ax) * t0, ay + (by - ay) * t0),
                    (ax + (bx - ax) * t1, ay + (by - ay) * t1),
                ],
                fill=colour,
                width=width,
            )


def _tag(
    draw: ImageDraw.ImageDraw,
    text: str,
    anchor: tuple[float, float],
    colour: tuple[int, int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    size: tuple[int, int],
    *,
    below: bool,
) -> None:
    """``text`` on a filled tag at the box corner ``anchor``, kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = min(max(0.0, anchor[0]), max(0.0, size[0] - tw))
    if below:
        y = anchor[1] if anchor[1] + th <= size[1] else anchor[1] - th
    else:
        y = anchor[1] - th if anchor[1] - th >= 0 else anchor[1]
    y = min(max(0.0, y), max(0.0, size[1] - th))
    draw.rectangle([x, y, x + tw, y + th], fill=colour)
    draw.text((x + 2 - left, y + 2 - top), text, fill=_text_colour(colour), font=font)


def draw_detections(
    image: Image.Image,
    boxes: Any,
    labels: Sequence[str],
    scores: Any = None,
    *,
    truth_boxes: Any = None,
    truth_labels: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
) -> Image.Image:
    """A copy of ``image`` with detections (and optionally the ground truth) drawn on it.

    Args:
        image: The image the boxes are in (pixels of this image).
        boxes: ``N x 4`` ``(x1, y1, x2, y2)`` predicted boxes (array, list or tensor).
        labels: ``N`` class names.
        scores: ``N`` confidences shown after the names, or ``None``.
        truth_boxes: ``M x 4`` ground-truth boxes, drawn dashed.
        truth_labels: ``M`` ground-truth class names (required with ``truth_boxes``).
        classes: The model's class list, to colour classes by position (see
            :func:`class_colour`).

    Returns:
        A new RGB image; ``image`` is not modified.

    Raises:
        DataError: Boxes of the wrong shape or with non-finite values, or counts of boxes,
            labels and scores that differ.
    """
    labels = [str(lbl) for lbl in labels]
    pred = _boxes(boxes, len(labels), "boxes")
    score_arr = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if score_arr is not None and len(score_arr) != len(labels):
        raise DataError(f"scores: {len(score_arr)} scores but {len(labels)} labels")
    truth_names = [str(lbl) for lbl in (truth_labels or [])]
    if truth_boxes is not None and truth_labels is None:
        raise DataError("truth_boxes need truth_labels (one class name per box)")
    truth = _boxes(truth_boxes, len(truth_names), "truth_boxes")

    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    size = out.size
    draw = ImageDraw.Draw(out)
    short = min(size)
    width = max(1, round(short / 250))
    font = _font(max(9, min(24, round(short / 40))))
    # ground truth first, so predictions are drawn over it
    for box, name in zip(truth, truth_names, strict=True):
        colour = class_colour(name, classes)
        x1, y1, x2, y2 = (float(v) for v in box)
        _dashed_rectangle(draw, (x1, y1, x2, y2), colour, width, dash=max(4, 4 * width))
        _tag(draw, f"{name} (truth)", (x1, y2), colour, font, size, below=True)
    # weakest first, so the strongest box and tag end on top
    order = np.arange(len(labels)) if score_arr is None else np.argsort(score_arr, kind="stable")
    for k in order:
        colour = class_colour(labels[k], classes)
        x1, y1, x2, y2 = (float(v) for v in pred[k])
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colour, width=width + 1)
        text = labels[k] if score_arr is None else f"{labels[k]} {score_arr[k]:.2f}"
        _tag(draw, text, (x1, y1), colour, font, size, below=False)
    return out
