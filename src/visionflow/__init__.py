"""visionflow: offline-first AutoML for computer vision.

Public names only; everything else lives in the stage packages (data, models, train,
evaluate). Heavy imports (torch, timm) happen on first use, so ``import visionflow`` and
``visionflow --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "AutoClassifier",
    "AutoDetector",
    "ClassifierModel",
    "DetectorModel",
    "__version__",
    "load",
]

if TYPE_CHECKING:
    from pathlib import Path

    from visionflow.api import AutoClassifier, AutoDetector, ClassifierModel, DetectorModel
    from visionflow.export.detect_runtime import DetectionBundleModel
    from visionflow.export.runtime import BundleModel


def load(
    path: str | Path, *, device: str = "auto"
) -> ClassifierModel | DetectorModel | BundleModel | DetectionBundleModel:
    """Load a trained model: a bundle (``.vfb`` file or exported directory) on ONNX Runtime,
    verified first and without importing PyTorch, or a run directory (``runs/<name>``)."""
    from visionflow.export.runtime import is_bundle, load_bundle

    if is_bundle(path):
        return load_bundle(path)
    from visionflow import api

    return api.load(path, device=device)


def __getattr__(name: str) -> Any:
    if name in {"AutoClassifier", "AutoDetector", "ClassifierModel", "DetectorModel"}:
        from visionflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'visionflow' has no attribute {name!r}")
