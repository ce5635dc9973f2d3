"""Frozen-backbone features of a list of images, cached on disk as safetensors.

One cache shared by every stage that needs pretrained features without training: the recipe's
linear probe (:mod:`visionflow.train.recipe`) and the data-quality checks
(:mod:`visionflow.explain.quality`). An entry is keyed by the backbone, its weights (sha256, or
the source for random initialisation), the preprocessing, the class list and every sample's
path, label, size and modification time, so a changed or replaced file, a relabelled image or
another input size is a new entry, never a stale hit. Entries are written under a unique name and
renamed, so processes sharing a cache folder never read half a file; a damaged entry is deleted
and recomputed, never trusted.

:func:`compute_features` is the stand-alone path (resolve weights, build the backbone, run it on
ONNX Runtime on CPU where that pays, else PyTorch); the recipe keeps its own loader and engine
and only shares the cache functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from visionflow.data.images import DEFAULT_MAX_PIXELS
from visionflow.data.index import Sample
from visionflow.data.preprocess import Preprocessing
from visionflow.models.weights import ResolvedWeights

__all__ = [
    "ONNX_MIN_IMAGES",
    "FeatureSet",
    "compute_features",
    "feature_cache_path",
    "file_stamp",
    "load_cached_features",
    "save_cached_features",
]


#: Fewer images than this are run with PyTorch: exporting and checking the ONNX graph (a few
#: seconds) would cost more than it saves.
ONNX_MIN_IMAGES = 200


def file_stamp(path: Path) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a file, ``(-1, -1)`` when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def feature_cache_path(
    cache_dir: Path,
    backbone: str,
    weights: ResolvedWeights,
    preprocessing: Preprocessing,
    classes: Sequence[str],
    samples: Sequence[Sample],
) -> Path:
    """Where the features of ``samples`` for this backbone, weights and preprocessing live."""
    key_src = json.dumps(
        {
            "backbone": backbone,
            "weights": weights.sha256 or weights.source,
            "pre": preprocessing.to_json(),
            "classes": list(classes),
            # a changed or replaced file changes its size or modification time
            "samples": [[s.path.as_posix(), s.label, *file_stamp(s.path)] for s in samples],
        }
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{backbone}-{key}.safetensors"


def load_cached_features(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(features, targets)`` stored at ``path``, or ``None`` when absent or damaged (a damaged
    entry is deleted)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        cached = load_file(str(path))
        return cached["features"], cached["targets"]
    except Exception:  # a damaged cache entry is recomputed, never trusted
        path.unlink(missing_ok=True)
        return None


def save_cached_features(path: Path, features: torch.Tensor, targets: torch.Tensor) -> Path:
    """Store ``(features, targets)`` at ``path`` (unique temp name, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # written under a unique name, then renamed: workers sharing a cache never see half a file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"features": features.contiguous(), "targets": targets.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return path


@dataclass
class FeatureSet:
    """Features of a list of samples, in order, and how they were obtained.

    Attributes:
        features: ``(n, dim)`` float32 features.
        targets: ``(n,)`` class ids (``-1`` for unlabelled samples).
        backbone: timm name of the backbone.
        weights: Provenance of its weights (:meth:`ResolvedWeights.provenance`).
        preprocessing: The preprocessing the images went through.
        backend: ``"cache"``, ``"onnxruntime"`` or ``"torch"``.
        seconds: Time spent computing (or reading) them.
        path: The cache entry, when a cache folder was given.
    """

    features: torch.Tensor
    targets: torch.Tensor
    backbone: str
    weights: dict[str, object]
    preprocessing: Preprocessing
    backend: str
    seconds: float
    path: Path | None = None


def compute_features(
    samples: Sequence[Sample],
    *,
    backbone: str = "tf_efficientnet_lite0",
    weights: str | os.PathLike[str] | None = None,
    img_size: int | None = None,
    classes: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    onnx: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_batch: Callable[[int], None] | None = None,
) -> FeatureSet:
    """Pooled features of a frozen pretrained backbone for every sample, cached on disk.

    Args:
        samples: The images (their labels only fill ``targets``).
        backbone: timm model name.
        weights: As :func:`~visionflow.models.weights.resolve_weights` takes them (``None``:
            packaged weights, then the local hub cache, then the hub).
        img_size: Input size (default: the weights' own).
        classes: Class names for ``targets`` (default: the sorted labels of ``samples``).
        cache_dir: Folder of the cache (and of the exported ONNX backbone); ``None``: no cache.
        batch_size: Images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...; ONNX Runtime is used on CPU only.
        onnx: Run the frozen backbone on ONNX Runtime on CPU (checked against PyTorch, with a
            fallback to it) when there are at least :data:`ONNX_MIN_IMAGES` images.
        max_pixels: Decompression-bomb guard of the decoder.
        on_batch: Called with the number of images after every batch (progress bars).

    Raises:
        ConfigError: Unknown backbone or device.
        WeightsError: The weights cannot be found or loaded.
        ImageDecodeError: An image cannot be decoded (run the data checks first).
    """
    from visionflow.data.loading import ImageDataset, make_loader
    from visionflow.data.transforms import eval_transform
    from visionflow.models.backbones import create_backbone, feature_dim
    from visionflow.models.onnx_features import onnx_feature_extractor
    from visionflow.models.weights import resolve_weights
    from visionflow.train.device import select_device

    t0 = time.monotonic()
    resolved = resolve_weights(backbone, weights)
    pre = resolved.preprocessing
    if img_size is not None:
        pre = pre.with_size(img_size)
    names = (
        list(classes)
        if classes is not None
        else sorted({s.label for s in samples if s.label is not None})
    )
    provenance = resolved.provenance()
    path = None
    if cache_dir is not None:
        path = feature_cache_path(Path(cache_dir), backbone, resolved, pre, names, samples)
        cached = load_cached_features(path)
        if cached is not None:
            if on_batch is not None:
                on_batch(len(samples))
            return FeatureSet(
                cached[0],
                cached[1],
                backbone,
                provenance,
                pre,
                "cache",
                time.monotonic() - t0,
                path,
            )
    torch_device = select_device(device)
    # random initialisation is seeded, so that "weights none" features are reproducible
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_backbone(backbone, weights=resolved).eval()
    dataset = ImageDataset(
        samples, {n: i for i, n in enumerate(names)}, eval_transform(pre), max_pixels=max_pixels
    )
    loader = make_loader(dataset, batch_size=batch_size)
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None
    backend = "torch"
    with contextlib.ExitStack() as stack:
        if onnx and torch_device.type == "cpu" and len(samples) >= ONNX_MIN_IMAGES:
            # the exported graph is kept next to the features (reused by the next call)
            onnx_dir = (
                Path(cache_dir)
                if cache_dir is not None
                else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            )
            ident = (resolved.sha256 or resolved.source)[:16]
            found = onnx_feature_extractor(
                model,
                pre.input_size,
                onnx_dir / f"{backbone}-{pre.input_size}-{ident}.onnx",
                threads=torch.get_num_threads(),
            )
            if found is not None:
                extractor, backend = found, "onnxruntime"
        if extractor is None:
            model.to(torch_device)

            def run_torch(images: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return model(images.to(torch_device)).float().cpu()

            extractor = run_torch
        outs, tgts = [], []
        for images, target in loader:
            outs.append(extractor(images))
            tgts.append(torch.as_tensor(target))
            if on_batch is not None:
                on_batch(len(images))
    feats = torch.cat(outs) if outs else torch.empty(0, feature_dim(model))
    targets = torch.cat(tgts) if tgts else torch.empty(0, dtype=torch.long)
    if path is not None:
        save_cached_features(path, feats, targets)
    return FeatureSet(
        feats, targets, backbone, provenance, pre, backend, time.monotonic() - t0, path
    )
