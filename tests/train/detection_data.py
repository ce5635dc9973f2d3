"""A small learnable detection dataset for training tests: coloured squares on noise.

A plain module (not a ``conftest.py``) so the training and export tests can share it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from visionflow.data.detection import DetectionIndex, DetectionSample
from visionflow.data.detection.writers import write_detection

CLASSES = ["red", "green"]
_COLOURS = {"red": (230, 40, 40), "green": (40, 220, 60)}


def make_dataset(root: Path, *, images: int = 16, size: int = 64, seed: int = 0) -> Path:
    """``images`` noisy ``size`` x ``size`` PNGs, each with one or two class squares, written
    as a YOLO dataset under ``root / "yolo"`` through visionflow's writer; returns its path."""
    rng = np.random.default_rng(seed)
    src = root / "src"
    src.mkdir(parents=True)
    samples = []
    for k in range(images):
        pixels = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
        boxes, labels = [], []
        for j in range(1 + k % 2):
            side = int(rng.integers(size // 4, size // 2))
            x = int(rng.integers(0, size - side)) if j == 0 else size - side
            y = int(rng.integers(0, size - side))
            label = CLASSES[(k + j) % 2]
            pixels[y : y + side, x : x + side] = _COLOURS[label]
            boxes.append((x, y, x + side, y + side))
            labels.append(label)
        path = src / f"img_{k:03d}.png"
        Image.fromarray(pixels).save(path)
        samples.append(
            DetectionSample(path=path, width=size, height=size, boxes=boxes, labels=labels)
        )
    index = DetectionIndex(root=src, samples=samples, classes=list(CLASSES), format="synthetic")
    write_detection(index, root / "yolo", format="yolo", images="copy")
    return root / "yolo"
