"""visionflow: offline-first AutoML for computer vision.

Public names only; everything else lives in the stage packages (data, models, train,
evaluate). Heavy imports (torch, timm) happen on first use, so ``import visionflow`` and
``visionflow --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AutoClassifier", "ClassifierModel", "__version__", "load"]

if TYPE_CHECKING:
    from visionflow.api import AutoClassifier, ClassifierModel, load


def __getattr__(name: str) -> Any:
    if name in {"AutoClassifier", "ClassifierModel", "load"}:
        from visionflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'visionflow' has no attribute {name!r}")
