"""What ``visionflow predict`` does for a detector (a run's :class:`~visionflow.api.DetectorModel`
or a bundle's :class:`~visionflow.export.detect_runtime.DetectionBundleModel`): detect, print
one row per box (table, CSV or JSON), and with ``--draw`` write a copy of each image with its
boxes drawn. The command itself (:func:`visionflow.cli.predict`) decodes the images and reports
the unreadable ones, as it does for classifiers.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table

from visionflow.errors import ConfigError
from visionflow.prediction import Detections

__all__ = ["DRAWING_SUFFIX", "drawing_paths", "report_detections"]

#: What ``--draw`` appends to an image's stem: ``photo.jpg`` -> ``photo.boxes.png``.
DRAWING_SUFFIX = ".boxes.png"


def drawing_paths(sources: Sequence[str], folder: Path) -> list[Path]:
    """Where the drawings of ``sources`` go in ``folder``: ``<stem>.boxes.png``, numbered
    (``<stem>-2.boxes.png``) when two inputs share a stem or the name is an input's own path,
    so no input image is ever overwritten."""
    inputs = {Path(s).resolve() for s in sources}
    taken: set[Path] = set()
    out = []
    for source in sources:
        stem = Path(source).stem or "image"
        n = 1
        while True:
            name = f"{stem}{DRAWING_SUFFIX}" if n == 1 else f"{stem}-{n}{DRAWING_SUFFIX}"
            path = folder / name
            if path.resolve() not in inputs and path not in taken:
                break
            n += 1
        taken.add(path)
        out.append(path)
    return out


def report_detections(
    model: Any,
    images: Sequence[Image.Image],
    sources: Sequence[str],
    *,
    fmt: str,
    threshold: float | None,
    draw: Path | None,
    errors: list[dict[str, str]],
    console: Console,
) -> list[Detections]:
    """Detect objects in the decoded ``images`` and print them; returns the detections.

    Args:
        model: Anything with ``classes``, ``score_threshold`` and
            ``predict(images, score_threshold=...) -> list[Detections]``.
        images: Decoded RGB images.
        sources: The path each image came from (shown, and names the drawings).
        fmt: ``"table"``, ``"csv"`` or ``"json"``.
        threshold: Display threshold (default: the model's).
        draw: Folder for the drawings (created), or ``None``.
        errors: The inputs that could not be read, carried into the JSON output.
        console: Where the table and the JSON go.

    Raises:
        ConfigError: ``threshold`` is outside ``[0, 1]``, or ``draw`` is an existing file.
    """
    from visionflow.evaluate.draw import draw_detections

    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    used = float(model.score_threshold if threshold is None else threshold)
    found = [
        _named(d, src)
        for d, src in zip(model.predict(list(images), score_threshold=used), sources, strict=True)
    ]
    drawn: list[Path | None] = [None] * len(found)
    if draw is not None:
        if draw.exists() and not draw.is_dir():
            raise ConfigError(f"--draw {draw} is a file; give a folder for the drawings")
        draw.mkdir(parents=True, exist_ok=True)
        for k, (image, result, target) in enumerate(
            zip(images, found, drawing_paths(sources, draw), strict=True)
        ):
            picture = draw_detections(
                image, result.boxes, result.labels, result.scores, classes=model.classes
            )
            picture.save(target)
            drawn[k] = target
    if fmt == "json":
        rows = []
        for result, drawing in zip(found, drawn, strict=True):
            row = result.to_json()
            if drawing is not None:
                row["drawing"] = str(drawing)
            rows.append(row)
        console.print_json(
            json.dumps({"score_threshold": used, "predictions": rows, "errors": errors})
        )
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["source", "label", "score", "x1", "y1", "x2", "y2"])
        for result in found:
            if not len(result):
                writer.writerow([result.source, "", "", "", "", "", ""])
            for box, score, label in zip(result.boxes, result.scores, result.labels, strict=True):
                writer.writerow(
                    [result.source, label, f"{score:.6f}", *(f"{float(v):.2f}" for v in box)]
                )
        sys.stdout.write(buf.getvalue())
    else:
        table = Table(title=f"detections scoring at least {used:g}")
        for col in ("image", "label", "score", "box (x1, y1, x2, y2)"):
            table.add_column(col, justify="right" if col == "score" else "left")
        for result in found:
            if not len(result):
                table.add_row(result.source, "[dim](none)[/]", "", "")
            for box, score, label in zip(result.boxes, result.scores, result.labels, strict=True):
                coords = ", ".join(f"{float(v):.0f}" for v in box)
                table.add_row(result.source, label, f"{score:.3f}", coords)
        console.print(table)
        if draw is not None:
            console.print(f"drawings: [bold]{draw}[/]", highlight=False)
    return found


def _named(result: Detections, source: str) -> Detections:
    from dataclasses import replace

    return replace(result, source=source)
