"""A bundle's model on ONNX Runtime: prediction without PyTorch.

Nothing here imports torch: preprocessing is the bundle's own
(:meth:`~visionflow.data.preprocess.Preprocessing.resize_crop` in PIL, normalisation inside the
graph), so a server or an edge device needs only numpy, Pillow and onnxruntime.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionflow._cpu import cpu_count
from visionflow._io import read_json
from visionflow.data.images import DEFAULT_MAX_PIXELS
from visionflow.data.preprocess import Preprocessing
from visionflow.errors import BundleError, DataError
from visionflow.export.bundle import Bundle, open_bundle
from visionflow.prediction import (
    ImageInput,
    Prediction,
    as_list,
    evaluate_dataset,
    to_image,
    top_k,
)

if TYPE_CHECKING:
    from visionflow.export.detect_runtime import DetectionBundleModel

__all__ = ["GRAPHS", "BundleModel", "is_bundle", "load_bundle", "make_session", "softmax"]

#: Graph kinds a bundle may hold, by file.
GRAPHS = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


def make_session(
    path: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None
) -> Any:
    """The one way visionflow opens an ONNX Runtime session: all graph optimisations,
    sequential execution, ``threads`` intra-op threads (default: the CPUs this process may
    use), no inter-op pool; ``providers`` in order of preference, those not available skipped,
    the CPU as the fallback."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(1, int(threads or cpu_count()))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    available = set(ort.get_available_providers())
    chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
    return ort.InferenceSession(str(path), options, providers=chosen or ["CPUExecutionProvider"])


class BundleModel:
    """A classifier from a bundle; use :func:`load_bundle` (or ``visionflow.load``).

    Attributes:
        bundle: The verified bundle (its ``meta`` is the manifest).
        classes: Class names, in logit order.
        preprocessing: How images become graph inputs.
        graph: The graph file in use (``model.onnx``, ``model.int8.onnx``...).
    """

    def __init__(self, bundle: Bundle, session: Any, graph: str) -> None:
        self.bundle = bundle
        self.session = session
        self.graph = graph
        self.classes: list[str] = list(bundle.meta["classes"])
        self.preprocessing = Preprocessing.from_json(bundle.meta["preprocessing"])

    @property
    def meta(self) -> dict[str, Any]:
        return self.bundle.meta

    @property
    def version_info(self) -> dict[str, Any]:
        """Name, backbone and creation time: what a server reports with each answer."""
        return {k: self.meta.get(k) for k in ("name", "backbone", "created_at")}

    def pixels(
        self, inputs: ImageInput | Sequence[ImageInput], *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> np.ndarray:
        """``uint8`` graph input for ``inputs`` (decoded safely, resized, cropped)."""
        images = [to_image(item, max_pixels)[0] for item in as_list(inputs)]
        return self.preprocessing.pixels(images)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and features for a ``uint8`` batch from :meth:`pixels`."""
        side = self.preprocessing.input_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (side, side, 3):
            raise DataError(
                f"graph input must be uint8 (batch, {side}, {side}, 3), got {pixels.dtype} "
                f"{tuple(pixels.shape)}"
            )
        if len(pixels) == 0:
            dim = int(self.meta.get("feature_dim", 0))
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, dim), np.float32)
        logits, features = self.session.run(["logits", "features"], {"images": pixels})
        return np.asarray(logits, np.float32), np.asarray(features, np.float32)

    def _batches(
        self, items: list[ImageInput], batch_size: int, max_pixels: int
    ) -> Iterator[np.ndarray]:
        for start in range(0, len(items), batch_size):
            yield self.pixels(items[start : start + batch_size], max_pixels=max_pixels)

    def predict_proba(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> np.ndarray:
        """Class probabilities, one row per input (columns in :attr:`classes` order)."""
        rows = [
            softmax(self.run(b)[0]) for b in self._batches(as_list(inputs), batch_size, max_pixels)
        ]
        if not rows:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(rows)

    def predict(
        self, inputs: ImageInput | Sequence[ImageInput], *, topk: int = 3, batch_size: int = 32
    ) -> list[Prediction]:
        """Top label, probability and top-k alternatives per input."""
        items = as_list(inputs)
        return top_k(self.predict_proba(items, batch_size=batch_size), self.classes, items, topk)

    def evaluate(self, data: str | Path, *, batch_size: int = 32) -> dict[str, Any]:
        """Metrics on a labelled dataset (same class names); unreadable files are skipped."""
        return evaluate_dataset(self.predict_proba, self.classes, data, batch_size=batch_size)

    def embed(
        self, inputs: ImageInput | Sequence[ImageInput], *, batch_size: int = 32
    ) -> np.ndarray:
        """The pooled backbone features of each input."""
        rows = [
            self.run(b)[1] for b in self._batches(as_list(inputs), batch_size, DEFAULT_MAX_PIXELS)
        ]
        dim = int(self.meta.get("feature_dim", 0))
        return np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def is_bundle(path: str | Path) -> bool:
    """A bundle is a file (an archive) or a directory whose ``model.json`` names its format
    (a run directory's ``model.json`` does not)."""
    path = Path(path)
    if path.is_file():
        return True
    manifest = path / "model.json"
    if not manifest.is_file():
        return False
    try:
        return "format" in read_json(manifest)
    except (OSError, ValueError):
        return True  # a damaged bundle: let the bundle reader say what is wrong


def load_bundle(
    path: str | Path,
    *,
    graph: str = "default",
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> BundleModel | DetectionBundleModel:
    """Open, verify and load a bundle (directory or ``.vfb``) on ONNX Runtime.

    A classification bundle gives a :class:`BundleModel`, a detection bundle (task
    ``"detect"``) a :class:`~visionflow.export.detect_runtime.DetectionBundleModel`.

    Args:
        path: The bundle.
        graph: ``"default"`` (what the export chose), ``"fp32"``, ``"int8"`` or ``"fp16"``.
        threads: Intra-op threads (default: the CPUs this process may use).
        providers: ONNX Runtime execution providers in order of preference (those not
            available are skipped; the CPU is the fallback).
        cache_dir: Where archives are extracted.
    """
    bundle = open_bundle(path, cache_dir=cache_dir)
    if bundle.meta.get("task") == "detect":
        from visionflow.export.detect_runtime import load_detection_bundle

        return load_detection_bundle(bundle, graph=graph, threads=threads, providers=providers)
    if bundle.meta.get("task") != "classify":
        raise BundleError(f"{path}: task {bundle.meta.get('task')!r} is not classification")
    session, name = open_graph(bundle, graph, GRAPHS, threads=threads, providers=providers)
    return BundleModel(bundle, session, name)


def open_graph(
    bundle: Bundle,
    graph: str,
    graphs: dict[str, str],
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    kind: str = "",
) -> tuple[Any, str]:
    """The ONNX Runtime session of one of a bundle's graphs and the graph's file name.

    ``graph`` is ``"default"`` (the manifest's ``default_graph``) or a key of ``graphs``
    (kind -> file, the graphs this kind of bundle may hold; ``kind`` names it in errors).

    Raises:
        BundleError: The graph asked for is unknown or absent, or ONNX Runtime cannot load it.
    """
    if graph == "default":
        name = str(bundle.meta.get("default_graph", "model.onnx"))
    elif graph in graphs:
        name = graphs[graph]
    else:
        raise BundleError(
            f"graph must be 'default' or one of {sorted(graphs)}{kind}, got {graph!r}"
        )
    if not bundle.has(name):
        have = [k for k, v in graphs.items() if bundle.has(v)]
        raise BundleError(f"{bundle.source} holds no {graph} graph ({name}); it has {have}")
    try:
        session = make_session(bundle.file(name), threads=threads, providers=providers)
    except Exception as exc:
        raise BundleError(f"{bundle.source}: ONNX Runtime cannot load {name}: {exc}") from exc
    return session, name
