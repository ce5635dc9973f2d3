"""Serving: a FastAPI app over ONNX Runtime with dynamic batching (``visionflow serve``).

Torch-free: importing this package loads FastAPI, numpy, Pillow and ONNX Runtime only.
"""

from visionflow.serve.app import create_app
from visionflow.serve.runtime import (
    BundleSource,
    ModelSource,
    PredictionEvent,
    PredictionHook,
    RegistrySource,
    StaticSource,
    VersionSelector,
)
from visionflow.serve.settings import ServeSettings

__all__ = [
    "BundleSource",
    "ModelSource",
    "PredictionEvent",
    "PredictionHook",
    "RegistrySource",
    "ServeSettings",
    "StaticSource",
    "VersionSelector",
    "create_app",
]
