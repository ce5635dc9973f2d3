"""Training an object detector within a wall-clock budget: ``visionflow train --task detect``.

The same :class:`~visionflow.train.engine.Engine` as classification runs the epochs (AdamW,
gradient clipping, the best epoch by validation mAP kept, an atomic checkpoint per epoch to
resume from, the deadline); :class:`DetectionEngine` changes what a batch is (lists of images
of different sizes and their box targets), which parameters form the backbone, how validation
is scored, and the schedule (warm-up, then cosine decay over the budget's training seconds).
After training, the NMS IoU threshold is chosen on validation and the display threshold is the
score with the best F1 there.

A finished run directory holds (the contract with export, prediction and the report):

* ``model.json``: ``{"task": "detect", "classes", "detector": detector_info(model),
  "score_threshold", "metrics", "timing", ...}`` and ``model.safetensors`` (the detector's
  state dict);
* ``index.json`` (the cleaned :class:`~visionflow.data.detection.DetectionIndex`), ``split.json``
  (positions into it), ``config.json``, ``data_report.json``;
* ``metrics.json`` (COCO metrics of the val and test splits, per class, with the PR curves;
  ``nms_selection``), ``history.json``, ``report.html`` and ``gallery/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from visionflow._io import atomic_write_json, read_json
from visionflow.config import DetectConfig
from visionflow.data.detection import DetectionIndex, DetectionSample
from visionflow.data.detection.checks import check_detection
from visionflow.data.detection.readers import read_detection
from visionflow.data.detection.records import detection_split
from visionflow.data.detection.transforms import (
    DetectionDataset,
    collate_detection,
    detection_train_transform,
)
from visionflow.data.index import Split
from visionflow.errors import CheckpointError, ConfigError, DataError
from visionflow.models.detection import build_detector, detector_info, set_nms_threshold
from visionflow.models.tasks.detection import DetectionTask
from visionflow.models.weights import resolve_weights
from visionflow.train.budget import Deadline, format_seconds
from visionflow.train.callbacks import Callback, RichProgress, StopTraining
from visionflow.train.checkpoint import save_weights
from visionflow.train.device import configure_threads, select_device
from visionflow.train.engine import Engine, FitConfig, _is_no_decay

__all__ = ["AUTO_DETECTOR", "DetectionEngine", "DetectionRunResult", "Trial", "train_detector"]

#: What ``detector="auto"`` trains (see BENCHMARKS.md "Object detection").
AUTO_DETECTOR = "fcos"
#: Parameters under this prefix are the backbone's (timm feature model inside the detector).
_BACKBONE_PREFIX = "backbone.body."
#: Augmentation strength -> arguments of :func:`detection_train_transform`.
_AUGMENT: dict[str, dict[str, Any]] = {
    "none": {"photometric": 0.0, "zoom_out": 0.0, "iou_crop": 0.0, "scale_range": (1.0, 1.0)},
    "light": {"photometric": 0.5, "zoom_out": 0.0, "iou_crop": 0.0, "scale_range": (0.8, 1.0)},
    "medium": {"photometric": 0.5, "zoom_out": 0.3, "iou_crop": 0.3, "scale_range": (0.75, 1.0)},
    "heavy": {"photometric": 0.8, "zoom_out": 0.5, "iou_crop": 0.5, "scale_range": (0.6, 1.0)},
}
_STATE = "run_state.json"


class DetectionEngine(Engine):
    """The engine for torchvision detectors built by :func:`build_detector`.

    Differences from classification: a batch is a list of images and a list of targets, the
    detector returns its own losses in training mode (summed by :class:`DetectionTask`), the
    backbone is ``model.backbone.body`` (the stages :func:`build_detector` froze stay frozen),
    and validation runs the detector in eval mode and scores it with COCO's protocol.
    """

    def __init__(self, model: nn.Module, task: DetectionTask, config: FitConfig, **kwargs: Any):
        super().__init__(model, task, config, **kwargs)  # type: ignore[arg-type]
        self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.eval_seconds_per_image: float | None = None
        #: Seconds on the deadline's clock when the warm-up ended (set at the first decay step).
        self._warm_end: float | None = None

    def _backbone(self) -> nn.Module:
        body = self.model.backbone.body
        assert isinstance(body, nn.Module)  # built by build_detector
        return body

    def _param_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr * 0.1
        groups: list[dict[str, Any]] = []
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if name not in self._trainable:
                continue
            part = "backbone" if name.startswith(_BACKBONE_PREFIX) else "head"
            no_decay = _is_no_decay(name, param)
            buckets.setdefault((part, no_decay), []).append(param)
        for (part, no_decay), params in sorted(buckets.items()):
            groups.append(
                {
                    "params": params,
                    "lr": backbone_lr if part == "backbone" else cfg.lr,
                    "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "tag": part,
                }
            )
        return groups

    def _decay_progress(self, done: int, total: int) -> float:
        """The cosine decay runs over whichever ends first: the steps of ``epochs`` or the
        training budget measured in seconds from the end of the warm-up. Under a budget the
        decay follows the clock, so a machine that slows down mid-run shortens the schedule
        smoothly (both measures only grow, so the learning rate never rises again after the
        warm-up), and the last epoch that fits in the budget ends near the floor."""
        progress = done / total
        deadline = self.deadline
        if deadline.seconds is not None:
            if self._warm_end is None:
                self._warm_end = deadline.elapsed()
            span = max(1e-6, deadline.seconds - self._warm_end)
            progress = max(progress, (deadline.elapsed() - self._warm_end) / span)
        return progress

    def _set_backbone_frozen(self, frozen: bool) -> None:
        for name, param in self.model.named_parameters():
            if name.startswith(_BACKBONE_PREFIX):
                param.requires_grad_(not frozen and name in self._trainable)

    def _train_mode(self, frozen: bool) -> None:
        self.model.train()
        if frozen:
            self._backbone().eval()

    def _forward_loss(
        self, images: Any, targets: Any, mixer: Any, frozen: bool
    ) -> tuple[torch.Tensor, int, int | None]:
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [
            {
                "boxes": t["boxes"].to(self.device),
                "labels": t["labels"].to(self.device),
            }
            for t in targets
        ]
        with self._autocast():
            losses = self.model(images, targets)
        return self.task.loss(losses, targets), len(images), None

    def detect(
        self, loader: DataLoader[Any], *, on_batch: Callable[[int], None] | None = None
    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
        """Detections (eval mode) and targets of a whole loader, in order, on the CPU."""
        self.model.eval()
        self.model.to(self.device)
        outputs: list[dict[str, torch.Tensor]] = []
        targets: list[dict[str, Any]] = []
        with torch.inference_mode():
            for images, batch_targets in loader:
                with self._autocast():
                    found = self.model([image.to(self.device) for image in images])
                outputs.extend({k: v.float().cpu() for k, v in o.items()} for o in found)
                targets.extend(batch_targets)
                if on_batch is not None:
                    on_batch(len(images))
        return outputs, targets

    def validate(self, loader: DataLoader[Any]) -> dict[str, Any]:
        started = time.monotonic()
        outputs, targets = self.detect(loader)
        metrics = self.task.metrics(outputs, targets)  # type: ignore[arg-type]
        #: Seconds per image of the last validation (what evaluating after training will cost).
        self.eval_seconds_per_image = (time.monotonic() - started) / max(1, len(targets))
        return metrics


@dataclass
class DetectionRunResult:
    """What :func:`train_detector` returns: where the run is and how it did."""

    run_dir: Path
    metrics: dict[str, dict[str, Any]]
    detector: str
    seconds: float
    report_path: Path | None
    score_threshold: float


class _EpochLog(Callback):
    """One line per epoch (when there is a console): loss, validation mAP, time left."""

    def __init__(self, console: Console | None, deadline: Deadline, run_dir: Path) -> None:
        self.console = console
        self.deadline = deadline
        self.run_dir = run_dir

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        state_path = self.run_dir / _STATE
        state = read_json(state_path) if state_path.is_file() else {}
        state["elapsed"] = self.deadline.elapsed()
        atomic_write_json(state_path, state)
        if self.console is None:
            return
        val = record.get("val_map_50")
        self.console.print(
            f"epoch {record['epoch'] + 1}/{engine.planned_epochs}  loss {record['train_loss']:.3f}"
            + (
                f"  val mAP@.5 {val:.3f}  mAP {record.get('val_map', 0.0):.3f}"
                if val is not None
                else ""
            )
            + f"  ({record['seconds']:.0f} s{', best' if record.get('best') else ''})"
        )


def auto_img_size(samples: Sequence[DetectionSample], detector: str) -> int:
    """The side a detector works at when none is given.

    SSDlite works at its fixed 320 square. The FPN detectors use the images' median longer
    side rounded up to a multiple of 32 and kept in 256..512: small images are upscaled a bit
    (small objects get more feature-map cells) and large ones are not processed at full size on
    a CPU budget.
    """
    if detector == "ssdlite":
        return 320
    if not samples:
        return 512
    longer = float(np.median([max(s.width, s.height) for s in samples]))
    return int(min(512, max(256, math.ceil(longer / 32) * 32)))


def train_detector(
    data: str | Path,
    config: DetectConfig | None = None,
    *,
    run_dir: str | Path,
    resume: bool = False,
    console: Console | None = None,
    trial: Trial | None = None,
) -> DetectionRunResult:
    """Read, check and split a detection dataset, train a detector within the budget, evaluate
    it (COCO mAP on val and test) and write the run directory (see the module docstring).

    Args:
        data: A COCO, Pascal VOC or YOLO dataset (auto-detected; ``config.format`` pins it).
        config: Settings; defaults to :class:`~visionflow.config.DetectConfig()`.
        run_dir: Where the run goes. A run directory with a finished model is refused unless
            ``resume`` (which then continues from the last epoch's checkpoint).
        resume: Continue a killed run from its checkpoint, with its own config and budget.
        console: Where progress is printed (``None``: silent).
        trial: Run as a search trial (:mod:`visionflow.search.detection`): on the trial's
            already checked data and split, reporting the validation mAP after every epoch
            (the trial may stop it), then scored on validation only: no NMS choice, no test
            evaluation, no report, no saved model.

    Raises:
        DataError: The dataset is unreadable or holds no boxes to learn from.
        ConfigError: Unknown detector or backbone, or a split without training images.
        CheckpointError: ``run_dir`` holds a finished run (without ``resume``) or nothing to
            resume.
    """
    run = Path(run_dir)
    if resume:
        if not (run / "config.json").is_file():
            raise CheckpointError(f"{run} holds no detection run to resume (config.json missing)")
        cfg = DetectConfig(**read_json(run / "config.json"))
        data = read_json(run / "run_state.json").get("data", data)
        spent = float(read_json(run / _STATE).get("elapsed", 0.0))
    else:
        if (run / "model.json").is_file():
            raise CheckpointError(
                f"{run} already holds a finished run; choose another --name or remove it"
            )
        cfg = config or DetectConfig()
        spent = 0.0
    deadline = Deadline(cfg.budget_seconds(), spent=spent)
    run.mkdir(parents=True, exist_ok=True)
    configure_threads()
    device = select_device(cfg.device)
    say = (lambda line: console.print(line)) if console is not None else (lambda line: None)

    if trial is not None:
        index, split = trial.data
    else:
        index, split = _prepare_data(Path(data), cfg, run, say)
    classes = list(index.classes)
    detector = AUTO_DETECTOR if cfg.detector == "auto" else cfg.detector
    train_samples = [index.samples[i] for i in split.train]
    img_size = cfg.img_size or auto_img_size(train_samples, detector)
    weights = resolve_weights(cfg.backbone, cfg.weights)
    model = build_detector(
        detector,
        backbone=cfg.backbone,
        num_classes=len(classes),
        weights=weights,
        img_size=img_size,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
        trainable_layers=cfg.trainable_layers,
    )
    atomic_write_json(
        run / _STATE,
        {"data": str(Path(data).resolve()), "elapsed": deadline.elapsed(), "detector": detector},
    )
    say(
        f"training {detector} on {cfg.backbone} ({weights.source} weights) at {img_size} px: "
        f"{len(classes)} classes, {len(split.train)}/{len(split.val)}/{len(split.test)} images "
        f"(train/val/test), budget {cfg.budget or 'none'}"
    )
    train_loader = _loader(
        DetectionDataset(
            train_samples,
            classes,
            detection_train_transform(img_size, hflip=cfg.hflip, **_AUGMENT[cfg.augment]),
            seed=cfg.seed,
            max_pixels=cfg.max_pixels,
        ),
        cfg,
        device,
        shuffle=True,
    )
    val_loader = (
        _loader(_eval_dataset(index, split.val, cfg), cfg, device, shuffle=False)
        if split.val
        else None
    )
    task = DetectionTask(classes)
    # images evaluated after training: the NMS choice's validation passes (the final
    # evaluation reuses the chosen one), then test (a search trial evaluates nothing after
    # training: its score is the best epoch's)
    evaluated = 0 if trial is not None else len(split.val) * len(NMS_CANDIDATES) + len(split.test)
    train_deadline = Deadline(_train_seconds(deadline, evaluated, None), spent=deadline.elapsed())

    def replan(epoch_seconds: float) -> int:
        # called after every epoch: what finishing costs is re-measured (validation speed);
        # the engine stops before an epoch that no longer fits, the schedule follows the clock
        train_deadline.seconds = _train_seconds(deadline, evaluated, engine.eval_seconds_per_image)
        return cfg.epochs

    engine = DetectionEngine(
        model,
        task,
        FitConfig(
            epochs=cfg.epochs,
            lr=cfg.lr,
            backbone_lr=cfg.backbone_lr,
            weight_decay=cfg.weight_decay,
            warmup_epochs=cfg.warmup_epochs,
            grad_clip=cfg.grad_clip,
            patience=cfg.patience,
            channels_last=False,
            amp=cfg.amp,
            seed=cfg.seed,
        ),
        device=device,
        deadline=train_deadline,
        callbacks=[
            RichProgress(console),
            _EpochLog(console, deadline, run),
            *([trial] if trial is not None else []),
        ],
        checkpoint_dir=run / "checkpoint",
        phase="detect",
        replan=replan,
    )
    engine.replan_every_epoch = True
    fit_started = deadline.elapsed()
    fit = engine.fit(train_loader, val_loader, resume=resume)
    if fit.best_epoch is None and not engine.history:
        raise DataError(
            f"the budget ({cfg.budget}) ran out before one epoch of {detector} finished; "
            "give a larger --budget, a smaller --img-size or --detector ssdlite"
        )
    say(
        f"trained {len(engine.history)} epochs in {format_seconds(fit.seconds)} "
        f"(stopped: {fit.stopped}); evaluating"
    )
    if trial is not None:
        return _trial_result(run, engine, val_loader, fit, detector, deadline)
    timing = {"before_training": round(fit_started, 1), "training": round(fit.seconds, 1)}
    evaluation_started = deadline.elapsed()
    chosen = _choose_nms(engine, val_loader, cfg, deadline, len(split.val) + len(split.test))
    nms, detected = chosen if chosen is not None else (None, None)
    if nms is not None:
        say(f"NMS IoU threshold {nms['chosen']} (val mAP by threshold: {nms['val_map']})")
    known = {"val": detected} if detected is not None else {}
    metrics, results, predictions = _evaluate(engine, index, split, cfg, classes, known)
    threshold = _score_threshold(predictions.get("val"), classes)
    timing["evaluation"] = round(deadline.elapsed() - evaluation_started, 1)
    info = detector_info(model)
    headline = {
        name: {k: m.get(k) for k in ("map", "map_50", "map_75")} for name, m in metrics.items()
    }
    save_weights(run / "model.safetensors", model)
    atomic_write_json(run / "history.json", engine.history)
    atomic_write_json(
        run / "metrics.json",
        {
            **metrics,
            "fit": {"best_epoch": fit.best_epoch, "stopped": fit.stopped},
            "nms_selection": nms,
        },
    )
    report_started = deadline.elapsed()
    from visionflow.evaluate.detection_report import write_detection_report

    report_path = write_detection_report(
        run,
        config=cfg.model_dump(mode="json"),
        index=index,
        split=split,
        metrics=metrics,
        results=results,
        predictions=predictions,
        history=engine.history,
        detector=info,
        weights=weights.provenance() if weights.source != "none" else None,
        threshold=threshold,
        seconds=deadline.elapsed(),
        device=str(device),
        stopped=fit.stopped,
    )
    seconds = deadline.elapsed()
    timing["report"] = round(seconds - report_started, 1)
    atomic_write_json(
        run / "model.json",
        {
            "task": "detect",
            "classes": classes,
            "detector": info,
            "backbone": cfg.backbone,
            "score_threshold": threshold,
            "metrics": headline,
            "epochs": len(engine.history),
            "best_epoch": fit.best_epoch,
            "seconds": round(seconds, 1),
            "timing": timing,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    say(
        f"done in {format_seconds(seconds)} (evaluation {timing['evaluation']:.0f} s, report "
        f"{timing['report']:.0f} s): {run}"
    )
    return DetectionRunResult(
        run_dir=run,
        metrics=metrics,
        detector=detector,
        seconds=seconds,
        report_path=report_path,
        score_threshold=threshold,
    )


#: NMS IoU thresholds tried on validation after training (the configured one is added).
NMS_CANDIDATES = (0.4, 0.5, 0.6, 0.7)


class Trial(Callback):
    """What a search trial gives :func:`train_detector`: the checked data and split it shares
    with the other trials, and ``on_epoch(epoch, val_map) -> stop?`` called after every epoch
    (the pruner's report); a stop ends the fit and :attr:`stopped` says so."""

    def __init__(
        self,
        data: tuple[DetectionIndex, Split],
        on_epoch: Callable[[int, float], bool],
    ) -> None:
        self.data = data
        self.on_epoch = on_epoch
        self.stopped = False

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        value = record.get(f"val_{DetectionTask.monitor}")
        if value is not None and self.on_epoch(int(record["epoch"]), float(value)):
            self.stopped = True
            raise StopTraining("pruned")


def _trial_result(
    run: Path,
    engine: DetectionEngine,
    val_loader: DataLoader[Any] | None,
    fit: Any,
    detector: str,
    deadline: Deadline,
) -> DetectionRunResult:
    """A trial's outcome: the best epoch's validation metrics (what the search compares)."""
    best = next((r for r in engine.history if r.get("epoch") == fit.best_epoch), None)
    val = {k[4:]: v for k, v in (best or {}).items() if k.startswith("val_")}
    atomic_write_json(run / "history.json", engine.history)
    return DetectionRunResult(
        run_dir=run,
        metrics={"val": val} if val_loader is not None else {},
        detector=detector,
        seconds=deadline.elapsed(),
        report_path=None,
        score_threshold=0.0,
    )


def _choose_nms(
    engine: DetectionEngine,
    val_loader: DataLoader[Any] | None,
    cfg: DetectConfig,
    deadline: Deadline,
    evaluated: int,
) -> tuple[dict[str, Any], tuple[list[Any], list[Any]]] | None:
    """Pick the NMS IoU threshold with the best validation mAP@[.5:.95] among
    :data:`NMS_CANDIDATES` and the configured one, and set it on the model; returns the choice
    and the validation detections and targets at it (the final evaluation reuses them).

    How much overlapping objects overlap is a property of the data (crowded shelves need a
    high threshold, isolated objects a low one), and trying a threshold costs one validation
    pass, no training. Skipped without a validation split, when ``nms_thresh`` was given
    explicitly (it is not the default), or when the passes would not fit in the budget next to
    the final evaluation. Ties keep the configured threshold.
    """
    if val_loader is None or cfg.nms_thresh != DetectConfig.model_fields["nms_thresh"].default:
        return None
    per_image = engine.eval_seconds_per_image or 0.3
    candidates = sorted({cfg.nms_thresh, *NMS_CANDIDATES})
    n_val = len(val_loader.dataset)  # type: ignore[arg-type]
    needed = per_image * (n_val * (len(candidates) - 1) + evaluated) * 1.5 + 15.0
    if not deadline.allows(needed):
        return None
    scores: dict[float, float] = {}
    found: dict[float, tuple[list[Any], list[Any]]] = {}
    for value in candidates:
        set_nms_threshold(engine.model, value)
        found[value] = engine.detect(val_loader)
        metrics = engine.task.metrics(*found[value])  # type: ignore[arg-type]
        scores[value] = float(metrics.get("map") or 0.0)
    best = max(candidates, key=lambda v: (scores[v], v == cfg.nms_thresh))
    set_nms_threshold(engine.model, best)
    summary = {"chosen": best, "val_map": {str(v): round(m, 4) for v, m in scores.items()}}
    return summary, found[best]


def _train_seconds(deadline: Deadline, evaluated: int, per_image: float | None) -> float | None:
    """The part of the budget training may use: the rest pays for evaluating ``evaluated``
    val and test images after training (at the measured seconds per image, 0.3 s until
    measured, with a 50 % margin for a busy machine) and for the report (15 s; nothing when
    nothing is evaluated: a search trial)."""
    if deadline.seconds is None:
        return None
    if evaluated == 0:
        return deadline.seconds
    finish = 15.0 + 1.5 * (0.3 if per_image is None else per_image) * evaluated
    return max(0.0, deadline.seconds - finish)


def _prepare_data(
    data: Path, cfg: DetectConfig, run: Path, say: Callable[[str], None]
) -> tuple[DetectionIndex, Split]:
    """Read, check, clean and split the dataset; write index/split/config/data report."""
    if (run / "index.json").is_file() and (run / "split.json").is_file():
        # a resumed run (or a search's refit) trains on exactly the data and split it started
        # with; config.json records what this training uses
        index = DetectionIndex.load(run / "index.json")
        atomic_write_json(run / "config.json", cfg.model_dump(mode="json"))
        return index, Split.from_json(read_json(run / "split.json"))
    raw = read_detection(data, format=cfg.format)
    report, index = check_detection(raw, max_pixels=cfg.max_pixels)
    report.save(run / "data_report.json")
    for line in report.to_json().get("warnings", []):
        say(f"[yellow]warning[/]: {line}")
    if index.num_boxes == 0:
        raise DataError(
            f"{data}: no usable boxes after the checks (see {run / 'data_report.json'}); a "
            "detector needs labelled objects to learn from"
        )
    split = detection_split(
        index, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed
    )
    if not split.train:
        raise ConfigError(
            f"{data}: the split left no training images ({len(index)} images); lower "
            "--val-fraction/--test-fraction or label more images"
        )
    if not any(index.samples[i].boxes for i in split.train):
        raise DataError(f"{data}: none of the {len(split.train)} training images has a box")
    index.save(run / "index.json")
    atomic_write_json(run / "split.json", split.to_json())
    atomic_write_json(run / "config.json", cfg.model_dump(mode="json"))
    return index, split


def _loader(
    dataset: DetectionDataset, cfg: DetectConfig, device: torch.device, *, shuffle: bool
) -> DataLoader[Any]:
    from visionflow.train.recipe import _auto_workers

    workers = _auto_workers(device, cfg.num_workers)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if shuffle else max(1, cfg.batch_size),
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) > cfg.batch_size,
        collate_fn=collate_detection,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed) if shuffle else None,
    )


def _eval_dataset(index: DetectionIndex, positions: list[int], cfg: DetectConfig) -> Any:
    """Images at their own size (the detector resizes inside and answers in their pixels)."""
    return DetectionDataset(
        [index.samples[i] for i in positions], index.classes, None, max_pixels=cfg.max_pixels
    )


def _evaluate(
    engine: DetectionEngine,
    index: DetectionIndex,
    split: Split,
    cfg: DetectConfig,
    classes: list[str],
    known: dict[str, tuple[list[Any], list[Any]]],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, tuple[list[Any], list[Any]]]]:
    """Full COCO metrics (per class, by size, PR curves) of the kept model on val and test:
    as JSON, as result objects, and the per-image predictions and targets behind them.
    ``known`` holds a split's detections and targets already computed with the model as it is
    (the NMS choice's validation pass), which are not computed again."""
    from visionflow.evaluate.detection import evaluate_detections

    metrics: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    predictions: dict[str, tuple[list[Any], list[Any]]] = {}
    for name in ("val", "test"):
        positions = split[name]
        if not positions:
            continue
        if name in known:
            outputs, targets = known[name]
        else:
            dataset = _eval_dataset(index, positions, cfg)
            outputs, targets = engine.detect(_loader(dataset, cfg, engine.device, shuffle=False))
        preds, truth = DetectionTask(classes).to_evaluation(outputs, targets)
        result = evaluate_detections(preds, truth, classes)
        metrics[name] = result.to_json(curves=True)
        results[name] = result
        predictions[name] = (preds, truth)
    return metrics, results, predictions


def _score_threshold(found: tuple[list[Any], list[Any]] | None, classes: list[str]) -> float:
    """The display threshold: the score with the best F1 at IoU .5 on validation (0.3 without
    a validation split)."""
    if found is None:
        return 0.3
    from visionflow.evaluate.detection import best_score_threshold

    preds, truth = found
    best = best_score_threshold(preds, truth, classes)
    return float(best.threshold) if best.threshold is not None else 0.3
