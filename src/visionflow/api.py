"""The Python API: :class:`AutoClassifier` to train, :func:`load` to use a trained model."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console

from visionflow._io import read_json, run_task
from visionflow.config import TrainConfig, load_train_config
from visionflow.data.preprocess import Preprocessing
from visionflow.data.transforms import eval_transform
from visionflow.errors import CheckpointError, ConfigError
from visionflow.models.backbones import create_backbone
from visionflow.models.heads import LinearHead, TaskModel
from visionflow.prediction import (
    Detections,
    ImageInput,
    Prediction,
    as_list,
    evaluate_dataset,
    expand_inputs,
    to_image,
    top_k,
)
from visionflow.train.checkpoint import load_weights
from visionflow.train.device import configure_threads, select_device
from visionflow.train.recipe import RunResult, train_classifier

if TYPE_CHECKING:
    from visionflow.explain.cam import Explanation
    from visionflow.export.detect_runtime import DetectionBundleModel
    from visionflow.export.runtime import BundleModel

__all__ = [
    "AutoClassifier",
    "AutoDetector",
    "ClassifierModel",
    "DetectorModel",
    "Prediction",
    "expand_inputs",
    "load",
]


class ClassifierModel:
    """A trained classifier loaded from a run directory; predicts on the CPU or GPU.

    Use :func:`load` rather than the constructor.
    """

    def __init__(
        self,
        model: TaskModel,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        *,
        run_dir: Path | None = None,
        device: torch.device | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.run_dir = run_dir
        self.device = device or torch.device("cpu")
        self.info = dict(info or {})
        self._transform = eval_transform(preprocessing)
        self.model.to(self.device).eval()
        self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto") -> ClassifierModel:
        run = Path(run_dir)
        if not (run / "model.json").is_file() or not (run / "model.safetensors").is_file():
            raise CheckpointError(
                f"{run} holds no trained model (model.json / model.safetensors missing); "
                "was the run finished? `visionflow train --resume` continues a killed one"
            )
        info = read_json(run / "model.json")
        if info.get("task") != "classify":
            raise CheckpointError(f"{run}: task {info.get('task')!r} is not classification")
        configure_threads()
        backbone = create_backbone(info["backbone"], weights=None)
        head = LinearHead(int(info["feature_dim"]), len(info["classes"]))
        model = TaskModel(backbone, head)
        load_weights(run / "model.safetensors", model)
        pre = Preprocessing.from_json(info["preprocessing"])
        return cls(
            model, info["classes"], pre, run_dir=run, device=select_device(device), info=info
        )

    def _batches(
        self, items: Sequence[ImageInput], batch_size: int, max_pixels: int
    ) -> Iterator[tuple[torch.Tensor, list[str]]]:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            tensors, names = [], []
            for item in chunk:
                image, name = to_image(item, max_pixels)
                tensors.append(self._transform(image))
                names.append(name)
            yield torch.stack(tensors), names

    def predict_proba(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 32,
        max_pixels: int = 64_000_000,
    ) -> np.ndarray:
        """Class probabilities, one row per input (columns in :attr:`classes` order)."""
        probs, _ = self.predict_proba_features(inputs, batch_size=batch_size, max_pixels=max_pixels)
        return probs

    @torch.inference_mode()
    def predict_proba_features(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 32,
        max_pixels: int = 64_000_000,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and pooled backbone features (the head's input), one row per
        input, from one forward pass (active learning needs both)."""
        probs, feats = [], []
        for batch, _ in self._batches(as_list(inputs), batch_size, max_pixels):
            x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
            features = self.model.features(x)
            probs.append(torch.softmax(self.model.head(features).float(), dim=1).cpu())
            feats.append(features.float().cpu())
        if not probs:
            dim = int(self.info.get("feature_dim", 0))
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, dim), np.float32)
        return torch.cat(probs).numpy(), torch.cat(feats).numpy()

    def predict(
        self, inputs: ImageInput | Sequence[ImageInput], *, topk: int = 3, batch_size: int = 32
    ) -> list[Prediction]:
        """Top label, probability and top-k alternatives per input."""
        items = as_list(inputs)
        probs = self.predict_proba(items, batch_size=batch_size)
        return top_k(probs, self.classes, items, topk)

    def evaluate(self, data: str | Path, *, batch_size: int = 32) -> dict[str, Any]:
        """Metrics on a labelled dataset (same class names); unreadable files are skipped."""
        return evaluate_dataset(self.predict_proba, self.classes, data, batch_size=batch_size)

    def explain(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        method: str = "gradcam",
        target: str | None = None,
        out_dir: str | Path | None = None,
        sources: Sequence[str] | None = None,
        side_by_side: bool = True,
        batch_size: int = 8,
    ) -> list[Explanation]:
        """Class-activation maps (Grad-CAM, ``gradcam++``, ``eigencam``...) of the predictions,
        or of class ``target``; overlay PNGs go to ``out_dir`` when given. See
        :func:`visionflow.explain.cam.explain`. The model is left as it was."""
        from visionflow.explain.cam import explain

        return explain(
            self,
            inputs,
            method=method,
            target=target,
            out_dir=out_dir,
            sources=sources,
            side_by_side=side_by_side,
            batch_size=batch_size,
        )


class DetectorModel:
    """A trained detector loaded from a run directory; detects on the CPU or GPU (PyTorch).

    Use :func:`load` rather than the constructor. A bundle of the same run answers the same
    through ONNX Runtime (:class:`~visionflow.export.detect_runtime.DetectionBundleModel`).

    Attributes:
        model: The torchvision detector, in eval mode.
        classes: Class names in id order.
        info: The run's ``model.json``.
        score_threshold: Detections below it are not returned by default (the best F1 on the
            run's validation split).
    """

    task = "detect"

    def __init__(self, model: torch.nn.Module, info: dict[str, Any], run_dir: Path) -> None:
        self.model = model
        self.info = info
        self.run_dir = run_dir
        self.classes: list[str] = list(info["classes"])
        self.score_threshold = float(info.get("score_threshold", 0.3))

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto") -> DetectorModel:
        from visionflow.export.detection import load_detector_run

        configure_threads()
        model, info = load_detector_run(run_dir, device=device)
        return cls(model, info, Path(run_dir))

    def predict(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        score_threshold: float | None = None,
        max_pixels: int = 64_000_000,
    ) -> list[Detections]:
        """Boxes, scores and class names per input (paths, PIL images, arrays or bytes)."""
        from visionflow.export.detection import torch_detect

        threshold = self.score_threshold if score_threshold is None else score_threshold
        return torch_detect(
            self.model, self.classes, inputs, score_threshold=threshold, max_pixels=max_pixels
        )

    #: :meth:`predict` under the name bundles use (the server calls it).
    detect = predict

    def evaluate(self, data: str | Path) -> dict[str, Any]:
        """COCO metrics on a labelled detection dataset (COCO, VOC or YOLO)."""
        from visionflow.export.detect_runtime import evaluate_dataset as evaluate_detections_on

        return evaluate_detections_on(
            lambda path: self.predict(path, score_threshold=0.0)[0], self.classes, data
        )


def load(
    path: str | Path, *, device: str = "auto"
) -> ClassifierModel | DetectorModel | BundleModel | DetectionBundleModel:
    """Load a trained model: a run directory (``runs/<name>``, PyTorch) or a bundle (a ``.vfb``
    file or an exported directory, ONNX Runtime; verified before use). Classifiers and
    detectors alike: the ``task`` of the result says which."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    from visionflow.export.runtime import is_bundle, load_bundle

    if is_bundle(p):
        return load_bundle(p)
    if p.is_dir():
        if run_task(p) == "detect":
            return DetectorModel.from_run(p, device=device)
        return ClassifierModel.from_run(p, device=device)
    raise CheckpointError(f"{p}: expected a run directory or a model bundle (.vfb)")


def default_run_name(data: str | Path) -> str:
    """``<dataset folder>-<YYYYmmdd-HHMMSS>``, filesystem-safe."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data).resolve().name or "data").strip("-")
    return f"{stem or 'data'}-{datetime.now():%Y%m%d-%H%M%S}"


class AutoClassifier:
    """Train an image classifier within a time budget.

    Example::

        clf = visionflow.AutoClassifier(budget="10m").fit("data/flowers")
        clf.evaluate("data/flowers_test")
        clf.predict(["a.jpg", "b.jpg"])
        clf.export("flowers.vfb")

    Args:
        budget: Wall-clock budget such as ``"10m"`` (``None``: no limit).
        preset: ``fast``, ``medium`` or ``best``.
        config: A YAML/JSON settings file.
        runs_dir: Parent directory of run directories.
        name: Run name (default: dataset name plus a timestamp).
        verbose: Print progress and the data report to the terminal.
        search: Search hyper-parameters, then refit the best (``True``, the default), run the
            single default recipe (``False``), or search with these
            :class:`~visionflow.config.SearchConfig` settings (a dict: ``workers``,
            ``storage``, ``trials``, ``pruner``, ``space``...). Settings given as keywords pin
            the search parameters of the same name.
        **settings: Any :class:`~visionflow.config.TrainConfig` field (``backbone``,
            ``img_size``...).
    """

    def __init__(
        self,
        *,
        budget: str | float | None = "10m",
        preset: str | None = None,
        config: str | Path | None = None,
        runs_dir: str | Path = "runs",
        name: str | None = None,
        verbose: bool = False,
        search: bool | dict[str, Any] = True,
        **settings: Any,
    ) -> None:
        self.budget = budget
        self.search = search
        self.preset = preset
        self.config = config
        self.runs_dir = runs_dir
        self.name = name
        self.verbose = verbose
        self.settings = settings

    def _resolved_config(self) -> TrainConfig:
        overrides = dict(self.settings)
        overrides["budget"] = str(self.budget) if self.budget is not None else None
        return load_train_config(preset=self.preset, file=self.config, overrides=overrides)

    def fit(self, data: str | Path) -> AutoClassifier:
        """Check the data, train and evaluate; the run lands in ``runs_dir/name``."""
        cfg = self._resolved_config()
        name = self.name or default_run_name(data)
        console = Console(stderr=True) if self.verbose else None
        run_dir = Path(self.runs_dir) / name
        search = self.search
        if search is True or isinstance(search, dict):
            from visionflow.config import load_search_config
            from visionflow.search.runner import search_classifier

            scfg = load_search_config(
                file=self.config, overrides=search if isinstance(search, dict) else None
            )
            found = search_classifier(
                data, cfg, scfg, run_dir=run_dir, explicit=set(self.settings), console=console
            )
            self.search_ = {"study": found.study, "best": found.best, "counts": found.counts}
            self.result_: RunResult = found.refit
        else:
            self.result_ = train_classifier(data, cfg, run_dir=run_dir, console=console)
        self.run_dir_ = self.result_.run_dir
        self.model_ = ClassifierModel.from_run(self.run_dir_, device=cfg.device)
        self.classes_ = self.model_.classes
        return self

    def _fitted(self) -> ClassifierModel:
        if not hasattr(self, "model_"):
            raise ConfigError("this AutoClassifier is not fitted yet; call .fit(data) first")
        return self.model_

    def predict(self, inputs: ImageInput | Sequence[ImageInput]) -> list[str]:
        """Predicted labels (paths, PIL images or HxW[xC] arrays)."""
        return [p.label for p in self._fitted().predict(inputs, topk=1)]

    def predict_proba(self, inputs: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        return self._fitted().predict_proba(inputs)

    def evaluate(self, data: str | Path) -> dict[str, Any]:
        return self._fitted().evaluate(data)

    def explain(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        method: str = "gradcam",
        target: str | None = None,
        out_dir: str | Path | None = None,
    ) -> list[Explanation]:
        """Class-activation maps of the fitted model (see :meth:`ClassifierModel.explain`)."""
        return self._fitted().explain(inputs, method=method, target=target, out_dir=out_dir)

    def export(
        self, out: str | Path, *, int8: bool = False, fp16: bool = False, overwrite: bool = False
    ) -> Path:
        """Write the fitted model as a verified bundle (see
        :func:`visionflow.export.exporter.export_run`); returns its path."""
        from visionflow.export.exporter import export_run

        self._fitted()
        return export_run(self.run_dir_, out, int8=int8, fp16=fp16, overwrite=overwrite).path


class AutoDetector:
    """Train an object detector within a time budget.

    Example::

        det = visionflow.AutoDetector(budget="15m").fit("data/screws_coco")
        det.evaluate("data/screws_test")
        det.predict(["a.jpg"])[0].to_json()
        det.export("screws.vfb")

    Args:
        budget: Wall-clock budget such as ``"15m"`` (``None``: no limit).
        preset: ``fast``, ``medium`` or ``best`` (they set the budget).
        config: A YAML/JSON settings file.
        runs_dir: Parent directory of run directories.
        name: Run name (default: dataset name plus a timestamp).
        verbose: Print progress to the terminal.
        **settings: Any :class:`~visionflow.config.DetectConfig` field (``detector``,
            ``backbone``, ``img_size``...).
    """

    def __init__(
        self,
        *,
        budget: str | float | None = "10m",
        preset: str | None = None,
        config: str | Path | None = None,
        runs_dir: str | Path = "runs",
        name: str | None = None,
        verbose: bool = False,
        **settings: Any,
    ) -> None:
        self.budget = budget
        self.preset = preset
        self.config = config
        self.runs_dir = runs_dir
        self.name = name
        self.verbose = verbose
        self.settings = settings

    def fit(self, data: str | Path) -> AutoDetector:
        """Check the data, train and evaluate; the run lands in ``runs_dir/name``."""
        from visionflow.config import load_detect_config
        from visionflow.train.detection import train_detector

        overrides = dict(self.settings)
        overrides["budget"] = str(self.budget) if self.budget is not None else "none"
        cfg = load_detect_config(preset=self.preset, file=self.config, overrides=overrides)
        run_dir = Path(self.runs_dir) / (self.name or default_run_name(data))
        console = Console(stderr=True) if self.verbose else None
        self.result_ = train_detector(data, cfg, run_dir=run_dir, console=console)
        self.run_dir_ = self.result_.run_dir
        self.model_ = DetectorModel.from_run(self.run_dir_, device=cfg.device)
        self.classes_ = self.model_.classes
        return self

    def _fitted(self) -> DetectorModel:
        if not hasattr(self, "model_"):
            raise ConfigError("this AutoDetector is not fitted yet; call .fit(data) first")
        return self.model_

    def predict(
        self, inputs: ImageInput | Sequence[ImageInput], *, score_threshold: float | None = None
    ) -> list[Detections]:
        """Boxes, scores and class names per input."""
        return self._fitted().predict(inputs, score_threshold=score_threshold)

    def evaluate(self, data: str | Path) -> dict[str, Any]:
        return self._fitted().evaluate(data)

    def export(self, out: str | Path, *, int8: bool = False, overwrite: bool = False) -> Path:
        """Write the fitted detector as a verified bundle (ONNX with post-processing)."""
        from visionflow.export.exporter import export_run

        self._fitted()
        return export_run(self.run_dir_, out, int8=int8, overwrite=overwrite).path
