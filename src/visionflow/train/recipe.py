"""The classification recipe: from a folder of images to an evaluated model in a run directory.

Stages, each recorded in ``state.json`` so ``--resume`` continues where a killed run stopped:

1. **check**: read the dataset, run the data-health checks, drop unusable files, split.
2. **probe**: extract frozen features once, fit a linear probe (strong on small data).
3. **finetune**: start from the probe head and fine-tune the whole network with discriminative
   learning rates, augmentation and early stopping, for as many epochs as the budget allows.
4. **evaluate**: keep whichever of probe and fine-tune is better on validation, then measure it
   on the test split and write metrics, plots and ``report.html``.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn
from torch.utils.data import DataLoader

from visionflow._io import atomic_write_json, read_json
from visionflow._progress import transient_bar
from visionflow.config import TrainConfig
from visionflow.data.checks import check_dataset
from visionflow.data.index import DatasetIndex, Split
from visionflow.data.loading import DecodedImageCache, ImageDataset, balanced_sampler, make_loader
from visionflow.data.preprocess import Preprocessing
from visionflow.data.readers import read_dataset
from visionflow.data.readers.labels import merge_labels
from visionflow.data.split import load_split, stratified_split
from visionflow.data.transforms import eval_transform, train_transform
from visionflow.errors import BudgetError, CheckpointError, DataError
from visionflow.evaluate.metrics import classification_metrics, reliability_bins
from visionflow.evaluate.overfit import diagnose
from visionflow.evaluate.plots import (
    plot_confusion_matrix,
    plot_learning_curves,
    plot_per_class,
    plot_reliability,
)
from visionflow.evaluate.report import ReportContext, ReportSection, write_report
from visionflow.models.backbones import create_backbone, feature_dim
from visionflow.models.features import (
    feature_cache_path,
    load_cached_features,
    save_cached_features,
)
from visionflow.models.heads import LinearHead, TaskModel
from visionflow.models.onnx_features import OnnxFeatureExtractor, onnx_feature_extractor
from visionflow.models.tasks.classification import ClassificationTask
from visionflow.models.weights import ResolvedWeights, resolve_weights
from visionflow.train.budget import Deadline, format_seconds
from visionflow.train.callbacks import Callback, RichProgress, StopTraining
from visionflow.train.checkpoint import load_weights, save_weights
from visionflow.train.device import configure_threads, cpu_count, select_device
from visionflow.train.engine import Engine, FitConfig, seed_everything
from visionflow.train.probe import DEFAULT_CS, ProbeResult, fit_linear_probe

__all__ = [
    "Prepared",
    "RunResult",
    "TrialOutcome",
    "WarmStart",
    "prepare_data",
    "run_trial",
    "train_classifier",
]

# Fixed costs kept in reserve at the end of the budget: final evaluation, plots, report.
_RESERVE_SECONDS = 8.0
_STATE = "state.json"
#: Share of the budget the probe's choice of ``C`` (cross-validation) may take: about 3 s on
#: an idle 2-core CPU for 240 images, but 100 s+ were seen under heavy contention.
PROBE_SELECTION_SHARE = 0.1


@dataclass
class RunResult:
    """What :func:`train_classifier` leaves behind (all of it is also on disk)."""

    run_dir: Path
    chosen: str
    metrics: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]
    phases: list[dict[str, Any]]
    seconds: float
    report_path: Path
    findings: list[dict[str, Any]] = field(default_factory=list)


class _Run:
    """Paths and persisted state of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def state(self) -> dict[str, Any]:
        p = self.path(_STATE)
        return dict(read_json(p)) if p.is_file() else {}

    def update_state(self, **values: Any) -> None:
        state = self.state()
        state.update(values)
        atomic_write_json(self.path(_STATE), state)


def _fingerprint(index: DatasetIndex) -> str:
    """A content-light fingerprint of the dataset: relative paths, labels and file sizes."""
    digest = hashlib.sha256()
    for s in index.samples:
        try:
            size = s.path.stat().st_size
        except OSError:
            size = -1
        rel = s.to_json(index.root)["path"]
        digest.update(f"{rel}\t{s.label}\t{size}\n".encode())
    return digest.hexdigest()


@dataclass
class Prepared:
    """A checked dataset and its split, shared by the trials of a search and its refit."""

    index: DatasetIndex
    split: Split
    report: dict[str, Any]

    @classmethod
    def from_run(cls, run_dir: Path) -> Prepared:
        """Read what :func:`prepare_data` wrote into ``run_dir``."""
        run_dir = Path(run_dir)
        names = ("index.json", "split.json", "data_report.json")
        missing = [n for n in names if not (run_dir / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{run_dir} holds no prepared dataset ({', '.join(missing)} missing)"
            )
        return cls(
            index=DatasetIndex.from_json(read_json(run_dir / "index.json")),
            split=Split.from_json(read_json(run_dir / "split.json")),
            report=dict(read_json(run_dir / "data_report.json")),
        )


@dataclass
class TrialOutcome:
    """What one search trial measured (validation only: a trial never sees the test split)."""

    value: float | None
    strategy: str
    probe_val: float | None
    finetune_val: float | None
    curve: list[list[float]]
    epochs: int
    train_images: int
    seconds: float
    pruned: bool
    note: str | None = None
    #: Validation loss of the part that gave ``value`` (ties on a small validation split).
    val_loss: float | None = None
    #: The probe's chosen inverse L2 strength (a refit of the trial's settings reuses it).
    probe_c: float | None = None
    #: Validation loss of the fine-tune (with ``finetune_val``, what a refit continuing the
    #: trial's weights must beat).
    finetune_loss: float | None = None
    #: The fine-tuned weights, saved when ``keep_weights`` asked for them (the refit may
    #: continue from them).
    weights: Path | None = None
    #: Images per second of the trial's frozen feature pass (``None`` when the features came
    #: from the cache): what the search compares backbones' costs by.
    feature_ips: float | None = None
    #: Why the fine-tune ended (the engine's ``stopped``: ``early_stopping``, ``epochs``,
    #: ``budget``...; ``None`` without a fine-tune).
    stopped: str | None = None
    #: The fine-tune had nothing more to give: early stopping ended it, or it ran the
    #: configured number of epochs. A refit does not continue a settled fine-tune.
    settled: bool = False
    #: Seconds of one fine-tune epoch (its validation included).
    epoch_seconds: float | None = None
    #: Seconds a trial planned like a run held back for the refit's finishing work (its
    #: final evaluation and report); 0 for other trials.
    reserved_seconds: float = 0.0

    def info(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "probe_val": self.probe_val,
            "finetune_val": self.finetune_val,
            "curve": self.curve,
            "epochs": self.epochs,
            "train_images": self.train_images,
            "seconds": round(self.seconds, 3),
            **({"val_loss": self.val_loss} if self.val_loss is not None else {}),
            **({"probe_c": self.probe_c} if self.probe_c is not None else {}),
            **({"finetune_loss": self.finetune_loss} if self.finetune_loss is not None else {}),
            **({"weights": str(self.weights)} if self.weights is not None else {}),
            **({"feature_ips": round(self.feature_ips, 3)} if self.feature_ips else {}),
            **({"note": self.note} if self.note else {}),
            **({"stopped": self.stopped} if self.stopped else {}),
            **({"settled": True} if self.settled else {}),
            **({"epoch_seconds": round(self.epoch_seconds, 3)} if self.epoch_seconds else {}),
            **(
                {"reserved_seconds": round(self.reserved_seconds, 3)}
                if self.reserved_seconds
                else {}
            ),
        }


@dataclass
class WarmStart:
    """Fine-tuned weights a refit starts from instead of the pretrained backbone: those of the
    search trial with the same settings, so its epochs are not paid twice.

    The refit keeps these weights as they are when its own fine-tune does not beat
    ``val_accuracy`` on validation (the same split the trial was scored on).
    """

    path: Path
    val_accuracy: float
    val_loss: float | None = None
    epochs: int = 0
    trial: int | None = None
    #: The trial's fine-tune had settled (:attr:`TrialOutcome.settled`): not continued.
    settled: bool = False
    #: Seconds of one of the trial's fine-tune epochs: with less time than that left, the
    #: refit keeps the weights without timing training steps first.
    epoch_seconds: float | None = None
    #: Images per second of the trial's frozen feature pass: the refit reads the features
    #: from the cache, and plans its evaluation and weight ensemble with this speed.
    feature_ips: float | None = None


class _ElapsedSaver(Callback):
    """Records the time spent after every epoch, so a resumed run keeps its total budget."""

    def __init__(self, run: _Run, deadline: Deadline) -> None:
        self.run = run
        self.deadline = deadline

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self.run.update_state(elapsed=self.deadline.elapsed())


def _auto_workers(device: torch.device, configured: int | None) -> int:
    if configured is not None:
        return configured
    if device.type == "cpu":
        # On a small CPU the decode work is tiny next to the forward/backward pass; a worker
        # process would only steal a core from the math.
        return 0 if cpu_count() <= 4 else min(4, cpu_count() // 4)
    return min(8, max(2, cpu_count() - 1))


@contextmanager
def _progress(
    enabled: bool, console: Console | None, description: str, total: int
) -> Iterator[Callable[[int], None]]:
    """A transient Rich progress bar; yields ``advance(n)`` (a no-op when disabled)."""
    if not enabled or console is None:
        yield lambda n: None
        return
    with transient_bar(console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _log(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(message)


class _Pipeline:
    """Holds what the stages share; one instance per :func:`train_classifier` call."""

    def __init__(
        self,
        config: TrainConfig,
        run: _Run,
        deadline: Deadline,
        console: Console | None,
        progress: bool,
    ) -> None:
        self.config = config
        self.run = run
        self.deadline = deadline
        self.console = console
        self.progress = progress
        self.device = select_device(config.device)
        configure_threads()
        self.phases: list[dict[str, Any]] = []
        self.feature_cache_hits = 0
        #: A search trial: no checkpoints, no final evaluation to reserve time for.
        self.trial = False
        #: Plans the fine-tune leaving time for the final evaluation (a run, and the search
        #: trial of the default recipe, which the refit finishes).
        self.plan_finish = True
        self.reserve = _RESERVE_SECONDS
        #: A refit: the fine-tune starts from the best search trial's weights.
        self.warm_start: WarmStart | None = None

    # ----------------------------------------------------------------- data
    def load_data(self, data: Path, resume: bool, prepared: Prepared | None = None) -> None:
        run, cfg = self.run, self.config
        if prepared is not None:
            self.index, self.split, self.report = prepared.index, prepared.split, prepared.report
            for name, obj in (
                ("index.json", prepared.index.to_json()),
                ("split.json", prepared.split.to_json()),
                ("data_report.json", prepared.report),
            ):
                if not run.path(name).is_file():
                    atomic_write_json(run.path(name), obj)
            return
        if resume and run.path("index.json").is_file() and run.path("split.json").is_file():
            self.index = DatasetIndex.from_json(read_json(run.path("index.json")))
            self.split = Split.from_json(read_json(run.path("split.json")))
            self.report = read_json(run.path("data_report.json"))
            return
        t0 = time.monotonic()
        raw = read_dataset(data)
        merged = merge_labels(raw, cfg.labels) if cfg.labels else None  # visionflow select
        if merged is not None:
            raw = merged.index
            atomic_write_json(run.path("labels.json"), merged.to_json())
            _log(self.console, escape(merged.summary()))  # file names may hold [brackets]
        report, clean = check_dataset(
            raw,
            min_per_class=cfg.min_per_class,
            max_pixels=cfg.max_pixels,
            progress=self.progress,
        )
        report.save(run.path("data_report.json"))
        if self.console is not None:
            report.render(self.console)
        report.raise_for_problems(min_per_class=cfg.min_per_class)
        if any(s.label is None for s in clean.samples):
            clean = clean.subset([i for i, s in enumerate(clean.samples) if s.label is not None])
        if cfg.split_file:
            split = load_split(cfg.split_file, clean)
            if merged is not None:  # rows the split file predates go to train
                split = merged.complete_split(split, clean)
        else:
            split = stratified_split(
                clean,
                val_fraction=cfg.val_fraction,
                test_fraction=cfg.test_fraction,
                seed=cfg.seed,
            )
        if not split.train or not split.val:
            raise DataError(
                f"{data}: the split left {len(split.train)} training and {len(split.val)} "
                "validation images; both need at least one (lower val/test fractions)"
            )
        atomic_write_json(run.path("index.json"), clean.to_json())
        atomic_write_json(run.path("split.json"), split.to_json())
        self.index, self.split, self.report = clean, split, report.to_json()
        self.phases.append({"name": "data checks", "seconds": time.monotonic() - t0})

    # --------------------------------------------------------------- model
    def build_model(self) -> None:
        cfg = self.config
        self.weights: ResolvedWeights = resolve_weights(cfg.backbone, cfg.weights)
        pre = self.weights.preprocessing
        if cfg.img_size is not None:
            pre = pre.with_size(cfg.img_size)
        self.preprocessing: Preprocessing = pre
        self.backbone = create_backbone(cfg.backbone, weights=self.weights)
        self.dim = feature_dim(self.backbone)
        classes = self.index.classes
        targets = torch.tensor(self.index.subset(self.split.train).targets())
        counts = torch.bincount(targets, minlength=len(classes)).float()
        ratio = float(counts.max() / counts.clamp(min=1).min())
        balance = cfg.balance
        if balance == "auto":
            balance = "weights" if ratio > 1.5 else "none"
        self.balance = balance
        class_weights = None
        if balance == "weights":
            class_weights = (counts.sum() / (len(classes) * counts.clamp(min=1))).tolist()
        self.task = ClassificationTask(
            classes,
            label_smoothing=cfg.label_smoothing,
            class_weights=class_weights,
            dropout=cfg.dropout,
        )
        self.cache = DecodedImageCache(cfg.cache_mb * 2**20)
        # "auto" is settled once the fine-tune's length is known (see finetune)
        self.augment_policy = "light" if cfg.augment == "auto" else cfg.augment
        self.workers = _auto_workers(self.device, cfg.num_workers)
        atomic_write_json(self.run.path("weights.json"), self.weights.provenance())

    def dataset(self, split: str, *, augment: bool) -> ImageDataset:
        cfg, pre = self.config, self.preprocessing
        transform = (
            train_transform(pre, self.augment_policy, hflip=cfg.hflip)
            if augment
            else eval_transform(pre)
        )
        samples = [self.index.samples[i] for i in self.split[split]]
        return ImageDataset(
            samples,
            self.index.class_to_idx,
            transform,
            cache=self.cache,
            max_side=2 * pre.input_size if augment else None,
            max_pixels=cfg.max_pixels,
        )

    def loader(self, split: str, *, augment: bool) -> DataLoader[Any]:
        ds = self.dataset(split, augment=augment)
        sampler = None
        if augment and self.balance == "sampler":
            sampler = balanced_sampler(ds.targets(), seed=self.config.seed)
        return make_loader(
            ds,
            batch_size=self.config.batch_size,
            shuffle=augment,
            sampler=sampler,
            num_workers=self.workers if augment else 0,
            seed=self.config.seed,
            drop_last=augment and len(ds) > self.config.batch_size,
            pin_memory=self.device.type == "cuda",
        )

    def _engine(self, model: TaskModel, fit: FitConfig, **kwargs: Any) -> Engine:
        kwargs.setdefault("deadline", self.deadline)
        return Engine(model, self.task, fit, device=self.device, **kwargs)

    def _training_deadline(self) -> Deadline:
        """The fine-tune's deadline: the run's, less what the plan holds back for the final
        evaluation, so epochs slower than planned stop before eating into it (the engine
        only stops an epoch that would pass its own deadline)."""
        if self.deadline.seconds is None:
            return self.deadline
        return Deadline(self.deadline.seconds - self._held_back(), spent=self.deadline.elapsed())

    def _held_back(self) -> float:
        """Seconds the fine-tune leaves for what follows it: the reserve and the final
        evaluation (none for a search trial not planned like a run)."""
        return self.reserve + self._final_eval_seconds()

    def _training_left(self) -> float:
        """Seconds left for training: the deadline's remaining time less :meth:`_held_back`."""
        return self.deadline.remaining() - self._held_back()

    # ------------------------------------------------------ weight ensemble
    def interpolate(
        self, probe: ProbeResult, model: TaskModel, summary: dict[str, Any]
    ) -> tuple[TaskModel, dict[str, Any]]:
        """WiSE-FT (Wortsman et al., 2022): mix pretrained+probe and fine-tuned weights.

        LP-FT starts from the probe, so the two ends share one basin and their average is
        often better than either on small data. The mixing weight is chosen on validation
        among a few values; 1.0 (the plain fine-tune) stays a candidate. Skipped when the budget
        cannot pay for the extra validation passes.
        """
        alphas = (0.75, 0.5)
        val_seconds = len(self.split.val) * self._seconds_per_image()
        spare = self._training_left()
        if len(self.split.val) == 0 or spare < len(alphas) * val_seconds * 1.2:
            return model, summary
        t0 = time.monotonic()
        head = self.task.build_head(self.dim)
        if isinstance(head, LinearHead):
            with torch.no_grad():
                head.fc.weight.copy_(probe.weight)
                head.fc.bias.copy_(probe.bias)
        start = {
            k: v.detach().cpu() for k, v in TaskModel(self.backbone, head).state_dict().items()
        }
        end = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        best_alpha, best_acc = 1.0, summary["val_accuracy"]
        best_loss = summary.get("val_loss")
        tried: list[dict[str, Any]] = [{"alpha": 1.0, "val_accuracy": best_acc}]
        loader = self.loader("val", augment=False)
        engine = self._engine(
            model, FitConfig(channels_last=self.config.channels_last, amp=self.config.amp)
        )
        for alpha in alphas:
            model.load_state_dict(_mix_state(start, end, alpha))
            logits, targets = engine.predict(loader)
            metrics = self.task.metrics(logits, targets)
            tried.append({"alpha": alpha, **metrics})
            better = metrics["accuracy"] > best_acc or (
                metrics["accuracy"] == best_acc
                and best_loss is not None
                and metrics["loss"] < best_loss
            )
            if better:
                best_alpha, best_acc, best_loss = alpha, metrics["accuracy"], metrics["loss"]
        model.load_state_dict(end if best_alpha == 1.0 else _mix_state(start, end, best_alpha))
        summary = {**summary, "alpha": best_alpha, "val_accuracy": best_acc}
        self.phases.append(
            {
                "name": "weight ensemble",
                "seconds": time.monotonic() - t0,
                "alpha": best_alpha,
                "tried": tried,
                "val_accuracy": best_acc,
            }
        )
        _log(
            self.console,
            f"[bold]weight ensemble[/]: fine-tuned share {best_alpha:g}, "
            f"val accuracy {_pct(best_acc)}",
        )
        return model, summary

    def _seconds_per_image(self) -> float:
        speed: float | None = getattr(self, "images_per_second", None)
        return 1.0 / speed if speed else 0.05

    # --------------------------------------------------------------- probe
    def _feature_path(self, split: str) -> Path:
        """The split's cache entry (keyed by model, weights, preprocessing and data)."""
        cache_dir = (
            Path(self.config.feature_cache).expanduser()
            if self.config.feature_cache
            else self.run.path("features")
        )
        samples = [self.index.samples[i] for i in self.split[split]]
        return feature_cache_path(cache_dir, self.config.backbone, self.weights,
                                  self.preprocessing, self.index.classes, samples)  # fmt: skip

    def cached_features(self, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The split's frozen features if they are already cached (no forward pass), else None."""
        return load_cached_features(self._feature_path(split))

    def features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features of a split, cached in the run (keyed by model, weights and data)."""
        path = self._feature_path(split)
        cached = load_cached_features(path)
        if cached is not None:
            self.feature_cache_hits += 1
            return cached
        loader = self.loader(split, augment=False)
        total = len(loader.dataset)  # type: ignore[arg-type]
        onnx = self._onnx_extractor()
        with _progress(self.progress, self.console, f"features ({split})", total) as step:
            if onnx is not None:
                outs, tgts = [], []
                for images, target in loader:
                    self._check_trial_time()
                    outs.append(onnx(images))
                    tgts.append(torch.as_tensor(target))
                    step(len(images))
                feats = torch.cat(outs) if outs else torch.empty(0, self.dim)
                targets = torch.cat(tgts) if tgts else torch.empty(0, dtype=torch.long)
            else:
                fit = FitConfig(channels_last=self.config.channels_last, amp=self.config.amp)
                extractor = TaskModel(self.backbone, nn.Identity())

                def on_batch(n: int) -> None:
                    self._check_trial_time()
                    step(n)

                feats, targets = self._engine(extractor, fit).predict(loader, on_batch=on_batch)
        save_cached_features(path, feats, targets)
        return feats, targets

    def _check_trial_time(self) -> None:
        """A search trial stops its feature pass when its time is up (a run's own probe does
        not: the refit needs it); the partial features are not cached."""
        if self.trial and self.deadline.expired():
            raise BudgetError("the trial's time ran out while extracting features")

    def _onnx_extractor(self) -> OnnxFeatureExtractor | None:
        """The frozen backbone on ONNX Runtime (CPU only; tried once per run, else None)."""
        if not self.config.onnx_features or self.device.type != "cpu":
            return None
        if not hasattr(self, "_onnx"):
            name = f"{self.config.backbone}-{self.preprocessing.input_size}.onnx"
            self._onnx = onnx_feature_extractor(
                self.backbone,
                self.preprocessing.input_size,
                self.run.path(f"features/{name}"),
                threads=torch.get_num_threads(),
            )
            if self._onnx is not None:
                self.phases.append(
                    {"name": "ONNX export (features)", "max_abs_diff": self._onnx.max_abs_diff}
                )
        return self._onnx

    def _probe_time_up(self) -> Callable[[], bool] | None:
        """When the probe's choice of ``C`` must stop: at the run's deadline, and after
        :data:`PROBE_SELECTION_SHARE` of the budget (at least 5 s), so a contended CPU cannot
        make the cross-validation eat the time the fine-tune needs."""
        budget = self.config.budget_seconds()
        if budget is None:
            return None
        cap = Deadline(max(5.0, PROBE_SELECTION_SHARE * budget))
        return lambda: self.deadline.expired() or cap.expired()

    def probe(self) -> ProbeResult:
        t0 = time.monotonic()
        self.backbone.to(self.device)
        xtr, ytr = self.features("train")
        xva, yva = self.features("val")
        extract_s = time.monotonic() - t0
        result = fit_linear_probe(
            xtr,
            ytr,
            xva,
            yva,
            num_classes=len(self.index.classes),
            class_weight="balanced" if self.balance != "none" else None,
            seed=self.config.seed,
            time_up=self._probe_time_up(),
            Cs=(self.config.probe_c,) if self.config.probe_c else DEFAULT_CS,
        )
        n = len(xtr) + len(xva)
        # features read from the cache say nothing about the network's speed
        measured = self.feature_cache_hits == 0 and extract_s > 0
        known = self.warm_start.feature_ips if self.warm_start is not None else None
        self.images_per_second = n / extract_s if measured else known
        self.phases.append(
            {
                "name": "linear probe",
                "seconds": time.monotonic() - t0,
                "val_accuracy": result.val_accuracy,
                "val_loss": result.val_loss,
                "cv_accuracy": result.cv_accuracy,
                "C": result.C,
                "C_selected_by": result.selected_by,
                "feature_cache_hits": self.feature_cache_hits,
                "refit_on_val": result.refit,
                "feature_images_per_second": self.images_per_second,
            }
        )
        cv = f", cv {result.cv_accuracy:.3f}" if result.cv_accuracy is not None else ""
        _log(
            self.console,
            f"[bold]linear probe[/]: val accuracy {_pct(result.val_accuracy)}{cv} "
            f"(C={result.C}, {format_seconds(time.monotonic() - t0)})",
        )
        return result

    # ------------------------------------------------------------ finetune
    def fit_config(self, epochs: int, lpft: bool) -> FitConfig:
        cfg = self.config
        backbone_lr = cfg.backbone_lr or (2e-4 if lpft else 3e-4)
        return FitConfig(
            epochs=epochs,
            # a probe-initialised head is already good: it moves only a little faster
            lr=cfg.lr or (backbone_lr * 2 if lpft else 1e-3),
            backbone_lr=backbone_lr,
            layer_decay=cfg.layer_decay,
            weight_decay=cfg.weight_decay,
            warmup_epochs=min(cfg.warmup_epochs, max(0.0, epochs / 5)),
            freeze_epochs=cfg.freeze_epochs,
            grad_clip=cfg.grad_clip,
            patience=cfg.patience,
            mixup=cfg.mixup,
            cutmix=cfg.cutmix,
            bn_frozen=lpft if cfg.freeze_bn is None else cfg.freeze_bn,
            channels_last=cfg.channels_last,
            amp=cfg.amp,
            seed=cfg.seed,
        )

    def _time_train_step(self, model: TaskModel, loader: DataLoader[Any]) -> float:
        """Seconds per training step, measured on a throw-away copy of the model."""
        trial = copy.deepcopy(model)
        engine = self._engine(trial, self.fit_config(1, True))
        trial.to(self.device)
        if self.config.channels_last:
            trial.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(trial.parameters(), lr=1e-6)
        trial.train()
        timings = []
        for i, (images, targets) in enumerate(loader):
            t0 = time.monotonic()
            with engine._autocast():
                out = trial(engine._prepare(images))
            loss = self.task.loss(out, torch.as_tensor(targets).to(self.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.monotonic() - t0)
            if i >= 2:
                break
        del trial, opt
        # the first step pays one-off allocation costs; the data loading is timed separately
        return min(timings[1:] or timings)

    def plan_epochs(self, model: TaskModel, loader: DataLoader[Any]) -> int:
        cfg = self.config
        if self.deadline.seconds is None:
            return cfg.epochs
        step = self._time_train_step(model, loader)
        n_val = len(self.split.val)
        per_image = 1.0 / self.images_per_second if self.images_per_second else step / 8
        # data loading and augmentation in the main process add roughly a fifth on CPU
        epoch = len(loader) * step * (1.2 if self.workers == 0 else 1.05) + n_val * per_image
        available = self._training_left()
        epochs = int(available // epoch)
        self.epoch_estimate = epoch
        return max(0, min(cfg.epochs, epochs))

    def _replan(self, first_epoch_seconds: float) -> int:
        """Total epochs once one epoch has been timed (the first plan is only an estimate)."""
        available = self._training_left()
        more = int(max(0.0, available) // (first_epoch_seconds * 1.03))
        return min(self.config.epochs, 1 + more)

    def _why_not_continue(self, warm: WarmStart) -> str | None:
        """Why the refit should keep a search trial's fine-tuned weights without training them
        further (``None``: plan epochs as usual)."""
        if warm.settled:
            return f"trial {warm.trial}'s fine-tune had settled (early stopping or its epochs)"
        available = self._training_left()
        if warm.epoch_seconds and available < warm.epoch_seconds:
            return (
                f"{max(0.0, available):.0f} s left for training, less than one of trial "
                f"{warm.trial}'s {warm.epoch_seconds:.0f} s epochs"
            )
        return None

    def _final_eval_seconds(self) -> float:
        if not self.plan_finish:
            return 0.0
        n = len(self.split.test) + len(self.split.train) + len(self.split.val)
        return n * self._seconds_per_image()

    def finetune(
        self, probe: ProbeResult | None, callbacks: list[Callback], resume: bool
    ) -> tuple[TaskModel, dict[str, Any] | None]:
        head = self.task.build_head(self.dim)
        lpft = probe is not None
        if probe is not None and isinstance(head, LinearHead):
            with torch.no_grad():
                head.fc.weight.copy_(probe.weight)
                head.fc.bias.copy_(probe.bias)
        # a copy: the pretrained backbone stays untouched for the probe's features and model
        model = TaskModel(copy.deepcopy(self.backbone), head)
        train_loader = self.loader("train", augment=True)
        state = self.run.state()
        if resume and "finetune_summary" in state:  # finished before the kill: reuse it
            load_weights(self.run.path("best.safetensors"), model)
            self.history = list(read_json(self.run.path("history.json")))
            self.phases.append(state["finetune_summary"])
            return model, state["finetune_summary"]
        warm = self.warm_start
        if warm is not None:
            load_weights(warm.path, model)
        why_not = self._why_not_continue(warm) if warm is not None else None
        if resume and "finetune_epochs" in state:
            epochs = int(state["finetune_epochs"])
        else:
            epochs = 0 if why_not else self.plan_epochs(model, train_loader)
            self.run.update_state(finetune_epochs=epochs)
        if self.config.augment == "auto":
            # strong policies pay off over many epochs; a short fine-tune converges faster
            # on lightly augmented images
            self.augment_policy = "light" if epochs < 20 else "medium"
            train_loader = self.loader("train", augment=True)
        if epochs < 1:
            if warm is not None:
                why_not = why_not or "no time to continue the search trial's fine-tune"
                _log(self.console, f"{why_not}; kept it")
                summary: dict[str, Any] = {
                    "name": "fine-tune",
                    "seconds": 0.0,
                    "epochs": 0,
                    "best_epoch": None,
                    "val_accuracy": warm.val_accuracy,
                    "val_loss": warm.val_loss,
                    "warm_start": _warm_json_of(warm, kept=True),
                    "not_continued": why_not,
                }
                self.phases.append(summary)
                return model, summary
            _log(self.console, "[yellow]budget too small for fine-tuning; keeping the probe[/]")
            return model, None
        t0 = time.monotonic()
        engine = self._engine(
            model,
            self.fit_config(epochs, lpft),
            callbacks=[*callbacks, _ElapsedSaver(self.run, self.deadline)],
            checkpoint_dir=None if self.trial else self.run.path("checkpoint"),
            replan=self._replan if self.deadline.seconds is not None else None,
            deadline=self._training_deadline(),
        )
        result = engine.fit(
            train_loader,
            self.loader("val", augment=False),
            resume=resume and self.run.path("checkpoint").exists(),
        )
        self.history = result.history
        atomic_write_json(self.run.path("history.json"), result.history)
        summary = {
            "name": "fine-tune",
            "seconds": time.monotonic() - t0,
            "planned_epochs": engine.planned_epochs,
            "first_plan": epochs,
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "val_accuracy": result.best_metric,
            "val_loss": next(
                (h.get("val_loss") for h in result.history if h["epoch"] == result.best_epoch),
                None,
            ),
            "stopped": result.stopped,
            "lr": engine.config.lr,
            "backbone_lr": engine.config.backbone_lr,
        }
        if warm is not None:
            acc, loss = result.best_metric, summary["val_loss"]
            worse = acc is None or acc < warm.val_accuracy
            if acc == warm.val_accuracy and loss is not None and warm.val_loss is not None:
                worse = loss > warm.val_loss
            if worse:  # continuing did not help: the trial's weights are the fine-tune
                load_weights(warm.path, model)
                summary.update(val_accuracy=warm.val_accuracy, val_loss=warm.val_loss)
            summary["warm_start"] = _warm_json_of(warm, kept=worse)
        self.phases.append(summary)
        self.run.update_state(finetune_summary=summary)
        return model, summary


def _warm_json_of(warm: WarmStart, kept: bool) -> dict[str, Any]:
    return {
        "trial": warm.trial,
        "epochs": warm.epochs,
        "val_accuracy": warm.val_accuracy,
        "kept_as_is": kept,
    }


def _mix_state(
    start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * end for floating tensors; integer buffers come from end."""
    out = {}
    for key, value in end.items():
        base = start[key]
        if value.is_floating_point():
            out[key] = torch.lerp(base.to(value.dtype), value, alpha)
        else:
            out[key] = value
    return out


def train_classifier(
    data: str | Path | None,
    config: TrainConfig,
    *,
    run_dir: str | Path,
    resume: bool = False,
    console: Console | None = None,
    progress: bool | None = None,
    callbacks: list[Callback] | None = None,
    on_stage: Callable[[str], None] | None = None,
    prepared: Prepared | None = None,
    report_sections: Callable[[], list[ReportSection]] | None = None,
    warm_start: WarmStart | None = None,
) -> RunResult:
    """Train, select and evaluate a classifier; everything lands in ``run_dir``.

    Args:
        data: Dataset path (folder per class, CSV...). May be ``None`` when resuming.
        config: The resolved settings.
        run_dir: Where the run is written (created if needed).
        resume: Continue a killed run in ``run_dir`` (its saved config, index and split win).
        console: Where human-readable output goes (``None``: silent).
        progress: Show progress bars (default: when ``console`` is a terminal).
        prepared: An already checked and split dataset (a search's refit): no checks again.
        report_sections: Called when the report is written; its sections are appended.
        warm_start: Fine-tuned weights (a search trial's) the fine-tune continues from; they
            are kept as they are when continuing does not improve validation accuracy.
    """
    started = time.monotonic()
    run = _Run(Path(run_dir))
    state = run.state()
    if resume:
        if not run.path("config.json").is_file():
            raise CheckpointError(f"{run.dir} is not a visionflow run (config.json missing)")
        config = TrainConfig(**read_json(run.path("config.json")))
        data = data or state.get("data")
        if state.get("stage") == "done":
            raise CheckpointError(f"{run.dir} has already finished; nothing to resume")
    elif state:
        raise CheckpointError(
            f"{run.dir} already holds a run; use --resume to continue it or another --name"
        )
    if data is None and prepared is None:
        raise DataError("no dataset given")
    data = Path(data) if data is not None else run.dir
    atomic_write_json(run.path("config.json"), config.model_dump(mode="json"))
    spent = float(state.get("elapsed", 0.0)) if resume else 0.0
    deadline = Deadline(config.budget_seconds(), spent=spent)
    if progress is None:
        progress = bool(console is not None and console.is_terminal)
    seed_everything(config.seed)
    pipe = _Pipeline(config, run, deadline, console, progress)
    pipe.warm_start = warm_start
    if not resume:
        run.update_state(stage="started", data=str(data.resolve()), elapsed=0.0, created_at=_now())

    def stage(name: str) -> None:
        run.update_state(stage=name, elapsed=deadline.elapsed())
        if on_stage is not None:
            on_stage(name)

    pipe.load_data(data, resume, prepared)
    stage("checked")
    pipe.build_model()
    cbs = list(callbacks or [])
    if progress:
        cbs.append(RichProgress(console))

    probe: ProbeResult | None = None
    strategy = config.strategy
    if strategy in {"auto", "lpft", "probe"}:
        probe = pipe.probe()
        stage("probed")
    ft_model: TaskModel | None = None
    ft_summary: dict[str, Any] | None = None
    pipe.history = []
    if strategy in {"auto", "lpft", "finetune"}:
        if strategy == "finetune" and not hasattr(pipe, "images_per_second"):
            pipe.images_per_second = None
        ft_model, ft_summary = pipe.finetune(probe, cbs, resume)
        stage("finetuned")
    if ft_model is not None and ft_summary is not None and probe is not None:
        ft_model, ft_summary = pipe.interpolate(probe, ft_model, ft_summary)

    # ------------------------------------------------------------ selection
    probe_acc = probe.val_accuracy if probe is not None else None
    ft_acc = ft_summary["val_accuracy"] if ft_summary is not None else None
    # the probe is refitted on train + val, so on a tie it is the one that saw more data
    if ft_model is not None and ft_acc is not None and (probe_acc is None or ft_acc > probe_acc):
        chosen, model = "finetune", ft_model
        trained_on = ["train"]
    else:
        if probe is None:
            raise DataError("fine-tuning produced no model within the budget; raise --budget")
        chosen = "probe"
        trained_on = ["train", "val"] if probe.refit else ["train"]
        head = LinearHead(pipe.dim, len(pipe.index.classes))
        weight, bias = probe.final_layer()
        with torch.no_grad():
            head.fc.weight.copy_(weight)
            head.fc.bias.copy_(bias)
        model = TaskModel(pipe.backbone, head)
    model.eval()
    save_weights(run.path("model.safetensors"), model)
    _log(
        console,
        f"selected [bold]{chosen}[/] (val accuracy: probe "
        f"{_pct(probe_acc)}, fine-tune {_pct(ft_acc)})",
    )

    # ------------------------------------------------------------ evaluation
    evaluator = Engine(
        model,
        pipe.task,
        FitConfig(channels_last=config.channels_last, amp=config.amp),
        device=pipe.device,
    )
    metrics: dict[str, dict[str, Any]] = {}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split in ("train", "val", "test"):
        if not pipe.split[split]:
            continue
        if chosen == "probe":
            feats, targets = pipe.features(split)
            logits = probe.logits(feats) if probe is not None else feats
        else:
            logits, targets = evaluator.predict(pipe.loader(split, augment=False))
        outputs[split] = (logits, targets)
        probs = torch.softmax(logits.float(), dim=1).numpy()
        metrics[split] = classification_metrics(targets.numpy(), probs, pipe.index.classes)
    model_info = {
        "task": "classify",
        "backbone": config.backbone,
        "classes": pipe.index.classes,
        "preprocessing": pipe.preprocessing.to_json(),
        "feature_dim": pipe.dim,
        "head": "linear",
        "chosen": chosen,
        "trained_on": trained_on,
        "weights": pipe.weights.provenance(),
        "data_fingerprint": _fingerprint(pipe.index),
        "created_at": _now(),
    }
    atomic_write_json(run.path("model.json"), model_info)
    seconds = deadline.elapsed()
    findings = diagnose(
        pipe.history,
        # a split the kept model was fitted on says nothing about generalisation
        final={
            k: {"accuracy": v["accuracy"]}
            for k, v in metrics.items()
            if k == "train" or k not in trained_on
        },
        n_val=len(pipe.split.val),
    )
    atomic_write_json(
        run.path("metrics.json"),
        {
            "chosen": chosen,
            "trained_on": trained_on,
            "seconds": seconds,
            "budget_seconds": config.budget_seconds(),
            "phases": pipe.phases,
            "splits": metrics,
            "findings": [f.to_json() for f in findings],
        },
    )
    kept = f"{chosen} (trained on {' + '.join(trained_on)})"
    alpha = ft_summary.get("alpha", 1.0) if ft_summary is not None else 1.0
    if chosen == "finetune" and alpha < 1.0:
        kept += f", weights {alpha:g} fine-tuned + {1 - alpha:g} pretrained/probe"
    extra = report_sections() if report_sections is not None else []
    from visionflow.explain.cam import run_gallery_section  # never fails; skipped past deadline

    shown = "test" if "test" in outputs else "val"
    samples = [pipe.index.samples[i] for i in pipe.split[shown]]
    gallery = run_gallery_section(
        model, pipe.index.classes, pipe.preprocessing, pipe.device, samples, outputs[shown][0],
        run.path("cam_gallery"), expired=deadline.expired, split=shown, console=console,
    )  # fmt: skip
    extra = [*extra, gallery, *_data_quality(pipe, findings)]
    report_path = _write_report(pipe, run, metrics, outputs, findings, kept, seconds, extra)
    run.update_state(stage="done", elapsed=seconds)
    return RunResult(
        run_dir=run.dir,
        chosen=chosen,
        metrics=metrics,
        history=pipe.history,
        phases=pipe.phases,
        seconds=time.monotonic() - started,
        report_path=report_path,
        findings=[f.to_json() for f in findings],
    )


def prepare_data(
    data: str | Path,
    config: TrainConfig,
    *,
    run_dir: str | Path,
    console: Console | None = None,
    progress: bool = False,
) -> Prepared:
    """Read, check and split ``data`` once; the files land in ``run_dir`` (reused on resume)."""
    run = _Run(Path(run_dir))
    if all(run.path(n).is_file() for n in ("index.json", "split.json", "data_report.json")):
        return Prepared.from_run(run.dir)
    pipe = _Pipeline(config, run, Deadline(None), console, progress)
    pipe.load_data(Path(data), resume=False)
    return Prepared(pipe.index, pipe.split, dict(pipe.report))


class _EpochReporter(Callback):
    """Sends the fine-tune's best validation accuracy so far to ``on_epoch`` after every epoch;
    stops the fit when it says so.

    The best so far, not the epoch's own: the fit keeps its best epoch, so that is what the
    trial would score if it stopped now, and one noisy epoch (LP-FT curves on small data dip
    and recover) does not get a trial pruned for a score it will not end with.
    """

    def __init__(self, on_epoch: Callable[[int, float], bool] | None) -> None:
        self.on_epoch = on_epoch
        self.curve: list[list[float]] = []
        self.pruned = False
        self.images = 0
        self.best: float | None = None

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        steps = len(self.curve) + 1
        acc = record.get("val_accuracy")
        self.images += int(record.get("train_images") or 0)
        if acc is None:
            return
        self.curve.append([float(steps), float(acc)])
        self.best = float(acc) if self.best is None else max(self.best, float(acc))
        if self.on_epoch is not None and self.on_epoch(steps, self.best):
            self.pruned = True
            raise StopTraining("pruned")


def run_trial(
    prepared: Prepared,
    config: TrainConfig,
    *,
    trial_dir: str | Path,
    deadline: Deadline,
    on_epoch: Callable[[int, float], bool] | None = None,
    keep_weights: Callable[[float], bool] | None = None,
    plan_as_run: bool = False,
) -> TrialOutcome:
    """One search trial: the recipe's probe and/or fine-tune on the shared split, scored on
    validation only (no checkpoints, no test evaluation, no report).

    ``on_epoch(epoch, val_accuracy)`` is called after every fine-tune epoch (from 1) with the
    best validation accuracy of the fine-tune so far; when it returns True the fine-tune stops
    and the outcome is marked ``pruned``. ``keep_weights(finetune_val)`` is asked, when the
    fine-tune ran and was not pruned, whether to save its weights as ``model.safetensors``
    in ``trial_dir`` (the search keeps those of its best fine-tune for the refit to continue).
    ``config.strategy`` ``auto`` runs like ``lpft``. The value is the better of the probe's
    and the fine-tune's validation accuracy (what the refit, which keeps the better of the
    two, would get). ``plan_as_run``: the fine-tune plans its epochs like a run's, leaving
    ``deadline`` time for the final evaluation (the search's default-recipe trial, which the
    refit finishes instead of training again).
    """
    t0 = time.monotonic()
    run = _Run(Path(trial_dir))
    seed_everything(config.seed)
    pipe = _Pipeline(config, run, deadline, None, False)
    pipe.trial, pipe.plan_finish = True, plan_as_run
    if not plan_as_run:
        pipe.reserve = 0.0
    pipe.load_data(run.dir, False, prepared)
    pipe.build_model()
    strategy = "lpft" if config.strategy == "auto" else config.strategy
    probe = pipe.probe() if strategy in {"probe", "lpft"} else None
    if strategy == "finetune":
        pipe.images_per_second = None
    reporter = _EpochReporter(on_epoch)
    summary: dict[str, Any] | None = None
    note = None
    model: TaskModel | None = None
    if strategy in {"lpft", "finetune"}:
        model, summary = pipe.finetune(probe, [reporter], resume=False)
        if summary is None:
            note = "no fine-tune epoch fitted in the trial's time"
    probe_val = probe.val_accuracy if probe is not None else None
    ft_val = summary["val_accuracy"] if summary is not None else None
    scores = [v for v in (probe_val, ft_val) if v is not None]
    # a fine-tune trial whose fine-tune never ran would be a probe scored under fine-tune
    # parameters that had no effect: the sampler must not learn from it
    value = max(scores) if scores and (strategy == "probe" or ft_val is not None) else None
    stopped = None if summary is None else summary.get("stopped")
    ran = int((summary or {}).get("epochs") or 0)
    from_ft = ft_val is not None and value == ft_val and (probe_val is None or ft_val > probe_val)
    val_loss = (summary or {}).get("val_loss") if from_ft else getattr(probe, "val_loss", None)
    weights = None
    # kept even when the probe gave the value: an LP-FT a few epochs in is often still below
    # its own probe, and the refit continuing it is what the single run would have done
    if (
        model is not None
        and ft_val is not None
        and not reporter.pruned
        and keep_weights is not None
        and keep_weights(ft_val)
    ):
        weights = run.path("model.safetensors")
        save_weights(weights, model)
    return TrialOutcome(
        value=value,
        strategy=strategy,
        probe_val=probe_val,
        finetune_val=ft_val,
        curve=reporter.curve,
        epochs=len(reporter.curve),
        train_images=reporter.images,
        seconds=time.monotonic() - t0,
        pruned=reporter.pruned,
        note=note,
        val_loss=None if val_loss is None else float(val_loss),
        finetune_loss=(summary or {}).get("val_loss"),
        probe_c=None if probe is None else float(probe.C),
        weights=weights,
        feature_ips=getattr(pipe, "images_per_second", None),
        stopped=stopped,
        settled=stopped == "early_stopping" or (stopped == "epochs" and ran >= config.epochs),
        epoch_seconds=float(summary["seconds"]) / ran if summary and ran else None,
        reserved_seconds=pipe._held_back(),
    )


def _data_quality(pipe: _Pipeline, findings: list[Any]) -> list[ReportSection]:
    """Data-quality sections (label suspects, duplicates and leakage, outliers, map) from the
    run's cached probe features: no forward pass, skipped past the deadline, never fails."""
    from visionflow.explain.quality_report import run_quality_report

    quality = run_quality_report(pipe.index, pipe.split, pipe.cached_features,
                                 pipe.run.path("quality"), expired=pipe.deadline.expired(),
                                 console=pipe.console)  # fmt: skip
    findings.extend(quality.findings)
    if quality.result is not None:
        pipe.phases.append({"name": "data quality", "seconds": quality.seconds})
    return quality.sections


def _write_report(
    pipe: _Pipeline,
    run: _Run,
    metrics: dict[str, dict[str, Any]],
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    findings: list[Any],
    chosen: str,
    seconds: float,
    extra_sections: list[ReportSection] | None = None,
) -> Path:
    images: dict[str, Path] = {}
    if pipe.history:
        images["Learning curves"] = plot_learning_curves(
            pipe.history, run.path("learning_curves.png")
        )
    main = metrics.get("test") or metrics["val"]
    split_name = "test" if "test" in metrics else "val"
    images[f"Confusion matrix ({split_name})"] = plot_confusion_matrix(
        main["confusion_matrix"], pipe.index.classes, run.path("confusion_matrix.png")
    )
    images[f"Per-class F1 ({split_name})"] = plot_per_class(
        main["per_class"], run.path("per_class.png")
    )
    logits, targets = outputs[split_name]
    bins = reliability_bins(targets.numpy(), torch.softmax(logits, dim=1).numpy())
    images[f"Reliability ({split_name})"] = plot_reliability(bins, run.path("reliability.png"))
    ctx = ReportContext(
        title=f"visionflow run {run.dir.name}",
        run_name=run.dir.name,
        created_at=_now(),
        summary={
            "task": "image classification",
            "backbone": pipe.config.backbone,
            "model kept": chosen,
            f"{split_name} accuracy": _pct(main.get("accuracy")),
            f"{split_name} macro-F1": _pct(main.get("macro_f1")),
            "classes": len(pipe.index.classes),
            "images (train/val/test)": "/".join(str(v) for v in pipe.split.sizes().values()),
            "duration": format_seconds(seconds),
            "budget": pipe.config.budget or "none",
            "device": str(pipe.device),
        },
        metrics={k: v for k, v in metrics.items() if k in {"val", "test"}},
        history=pipe.history,
        findings=findings,
        data_report=pipe.report if isinstance(pipe.report, dict) else None,
        config=pipe.config.model_dump(mode="json"),
        weights=pipe.weights.provenance(),
        phases=pipe.phases,
        images=images,
        extra_sections=list(extra_sections or []),
    )
    return write_report(ctx, run.path("report.html"))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
