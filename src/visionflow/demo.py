"""The built-in demo dataset: scikit-learn's handwritten digits as a folder of PNG images.

The 1,797 8x8 grey-level digits ship inside scikit-learn, so the demo works with no network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_digits"]


def write_digits(root: str | Path, *, limit_per_class: int | None = None) -> Path:
    """Write ``root/<digit>/<n>.png`` (idempotent: existing files are kept) and return root."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    seen: dict[int, int] = {}
    for image, target in zip(digits.images, digits.target, strict=True):
        label = int(target)
        n = seen.get(label, 0)
        if limit_per_class is not None and n >= limit_per_class:
            continue
        seen[label] = n + 1
        path = root / str(label) / f"{n:04d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
    return root
