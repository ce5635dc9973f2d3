"""The one training loop.

:class:`Engine` trains a :class:`~visionflow.models.heads.TaskModel` for any
:class:`~visionflow.models.tasks.Task`: AdamW with per-depth learning rates, linear warm-up then
cosine decay, optional freeze-then-unfreeze of the backbone, MixUp/CutMix, gradient clipping,
autocast and channels_last, early stopping on the task's monitored metric, a wall-clock
deadline, and an atomic checkpoint every epoch from which :meth:`Engine.fit` resumes exactly.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from visionflow.data.transforms import batch_mixer
from visionflow.models.backbones import backbone_parameter_groups
from visionflow.models.heads import TaskModel
from visionflow.models.tasks.base import Task
from visionflow.train.budget import Deadline
from visionflow.train.callbacks import Callback, StopTraining
from visionflow.train.checkpoint import load_checkpoint, save_checkpoint, save_weights
from visionflow.train.device import autocast_dtype

__all__ = ["Engine", "FitConfig", "FitResult", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class FitConfig:
    """Hyper-parameters of one fit; names are stable (they are stored in runs and studies)."""

    epochs: int = 10
    lr: float = 1e-3
    backbone_lr: float | None = None
    layer_decay: float = 1.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    freeze_epochs: int = 0
    grad_clip: float | None = 1.0
    patience: int | None = 5
    min_delta: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    #: Keep the backbone's normalisation statistics fixed (BatchNorm in eval mode) while its
    #: weights train: a head fitted on frozen features stays valid, and tiny batches of a small
    #: dataset don't replace ImageNet statistics with noisy ones.
    bn_frozen: bool = False
    channels_last: bool = True
    amp: str = "auto"
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metric: float | None
    stopped: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


class Engine:
    """Fits one model on one task.

    Args:
        model: Backbone + head.
        task: Loss and metrics.
        config: Hyper-parameters.
        device: Where to train.
        deadline: Wall-clock budget shared with the rest of the run.
        callbacks: Progress bars, loggers, pruners.
        checkpoint_dir: Where the per-epoch checkpoint goes (``None``: no checkpoints).
        phase: A name for this fit in history and progress ("finetune").
        replan: Called once with the first epoch's seconds; returns the total number of epochs
            to run (the budget planner's second, better-informed guess). The learning-rate
            schedule follows the new length.
    """

    def __init__(
        self,
        model: TaskModel,
        task: Task,
        config: FitConfig,
        *,
        device: torch.device | str = "cpu",
        deadline: Deadline | None = None,
        callbacks: Sequence[Callback] = (),
        checkpoint_dir: str | Path | None = None,
        phase: str = "finetune",
        replan: Callable[[float], int] | None = None,
    ) -> None:
        self.model = model
        self.task = task
        self.config = config
        self.device = torch.device(device)
        self.deadline = deadline or Deadline(None)
        self.callbacks = list(callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.phase = phase
        self.planned_epochs = config.epochs
        self.replan = replan
        #: Call ``replan`` after every epoch with the running mean epoch time, not only once.
        self.replan_every_epoch = False
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- set-up
    def _param_groups(self) -> list[dict[str, Any]]:
        cfg = self.config
        backbone_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr * 0.1
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()

        def add(params: Iterable[nn.Parameter], lr: float, tag: str) -> None:
            decay: list[nn.Parameter] = []
            no_decay: list[nn.Parameter] = []
            for p in params:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                (no_decay if _is_no_decay(names.get(id(p), ""), p) else decay).append(p)
            if decay:
                groups.append(
                    {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay, "tag": tag}
                )
            if no_decay:
                groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "tag": tag})

        stages = backbone_parameter_groups(self.model.backbone)
        depth = len(stages)
        for i, stage in enumerate(stages):
            add(stage, backbone_lr * cfg.layer_decay ** (depth - 1 - i), f"backbone.{i}")
        add(self.model.backbone.parameters(), backbone_lr, "backbone.rest")
        add(self.model.head.parameters(), cfg.lr, "head")
        return groups

    def _scheduler(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        first_total = max(1, self.planned_epochs * steps_per_epoch)
        warmup = min(first_total - 1, round(self.config.warmup_epochs * steps_per_epoch))
        floor = self.config.min_lr_ratio
        unfreeze = self.config.freeze_epochs * steps_per_epoch

        def decay(step: int) -> float:
            # read on every step: a re-plan after the first epoch stretches or shrinks the decay
            total = max(1, self.planned_epochs * steps_per_epoch)
            progress = min(1.0, self._decay_progress(step - warmup, max(1, total - warmup)))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        def factor(step: int) -> float:
            return (step + 1) / (warmup + 1) if step < warmup else decay(step)

        def backbone_factor(step: int) -> float:
            # A frozen backbone warms up from the step it starts training, on the same decay.
            # Counted from step 0, its warm-up was spent while it could not move and it started
            # at the full rate: measured on digits (LP-FT, 1-3 frozen epochs, lr 2e-4 to 6e-4),
            # validation fell from the probe's 92 % to 10-29 % in the first unfrozen epoch.
            since = step - unfreeze
            if since < 0:
                return 0.0
            return min(1.0, (since + 1) / (warmup + 1)) * decay(max(step, warmup))

        backbone = backbone_factor if unfreeze > 0 else factor
        lambdas: list[Callable[[int], float]] = [
            backbone if str(g.get("tag", "")).startswith("backbone") else factor
            for g in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    def _decay_progress(self, done: int, total: int) -> float:
        """How far the cosine decay is (0..1, clipped by the caller) after ``done`` of ``total``
        optimiser steps past the warm-up; subclasses may measure it otherwise (the clock)."""
        return done / total

    def _set_backbone_frozen(self, frozen: bool) -> None:
        for p in self.model.backbone.parameters():
            p.requires_grad_(not frozen)

    def _train_mode(self, frozen: bool) -> None:
        self.model.train()
        if frozen:  # frozen BN statistics must not drift either
            self.model.backbone.eval()
        elif self.config.bn_frozen:
            for module in self.model.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.config.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _autocast(self) -> Any:
        dtype = autocast_dtype(self.device, self.config.amp)
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------- evaluation
    def predict(
        self, loader: DataLoader[Any], *, on_batch: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs and targets of a whole loader, in order, on the CPU.

        ``on_batch(n)`` is called after each batch of ``n`` images (progress bars).
        """
        self.model.eval()
        # moved outside inference mode: parameters converted inside it would become inference
        # tensors that can never require gradients again (the model may be fine-tuned later)
        self.model.to(self.device)
        if self.config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        outputs, targets = [], []
        with torch.inference_mode():
            for images, target in loader:
                with self._autocast():
                    out = self.model(self._prepare(images))
                outputs.append(out.float().cpu())
                targets.append(torch.as_tensor(target))
                if on_batch is not None:
                    on_batch(len(images))
        if not outputs:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(outputs), torch.cat(targets)

    def validate(self, loader: DataLoader[Any]) -> dict[str, Any]:
        """The task's metrics on a whole loader (what early stopping and selection read)."""
        outputs, targets = self.predict(loader)
        return self.task.metrics(outputs, targets)

    def _forward_loss(
        self,
        images: Any,
        targets: Any,
        mixer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
        frozen: bool,
    ) -> tuple[torch.Tensor, int, int | None]:
        """One training batch's loss, its size and (when it means anything) correct top-1s."""
        images = self._prepare(images)
        targets = torch.as_tensor(targets).to(self.device)
        hard = targets
        if mixer is not None and not frozen:
            images, targets = mixer(images, targets)
        with self._autocast():
            outputs = self.model(images)
        loss = self.task.loss(outputs, targets)
        n = self.task.batch_size(hard)
        correct = None
        if not targets.dtype.is_floating_point and outputs.ndim == 2:
            correct = int((outputs.detach().argmax(1) == hard).sum())
        return loss, n, correct

    # ---------------------------------------------------------------- fitting
    def fit(
        self,
        train_loader: DataLoader[Any],
        val_loader: DataLoader[Any] | None = None,
        *,
        resume: bool = False,
        on_improve: Callable[[dict[str, Any]], None] | None = None,
    ) -> FitResult:
        """Train until the planned epochs, early stopping, a callback or the deadline stops it.

        The best epoch's weights (by the task's monitored validation metric) are restored at
        the end. With ``resume=True`` the checkpoint in ``checkpoint_dir`` is loaded first and
        training continues after its last completed epoch.
        """
        cfg = self.config
        started = time.monotonic()
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        self._scaler = torch.amp.GradScaler(
            self.device.type,
            enabled=autocast_dtype(self.device, cfg.amp) == torch.float16,
        )
        steps_per_epoch = max(1, len(train_loader))
        scheduler = self._scheduler(optimizer, steps_per_epoch)
        mixer = None
        num_classes = getattr(self.task, "num_classes", None)
        if num_classes:
            mixer = batch_mixer(num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix)

        start_epoch, best_metric, best_epoch, bad_epochs = 0, None, None, 0
        best_loss: float | None = None
        best_state: dict[str, torch.Tensor] | None = None
        if resume and self.checkpoint_dir is not None:
            state = load_checkpoint(
                self.checkpoint_dir, model=self.model, optimizer=optimizer, scheduler=scheduler
            )
            self.history = list(state.get("history", []))
            start_epoch = int(state["epoch"]) + 1
            self.planned_epochs = int(state.get("planned_epochs", self.planned_epochs))
            best_metric, best_epoch = state.get("best_metric"), state.get("best_epoch")
            bad_epochs = int(state.get("bad_epochs", 0))
            best_loss = state.get("best_loss")
            if self._scaler.is_enabled() and state.get("grad_scaler"):
                # fp16: continue with the loss scale reached, not the initial 65536 (whose
                # overflowing first steps would be skipped again)
                self._scaler.load_state_dict(state["grad_scaler"])
            best_path = self.checkpoint_dir.parent / "best.safetensors"
            if best_path.is_file():
                from safetensors.torch import load_file

                best_state = load_file(str(best_path))
        else:
            seed_everything(cfg.seed)

        for cb in self.callbacks:
            cb.on_fit_start(self)
        stopped = "epochs"
        epoch_seconds: float | None = None
        try:
            for epoch in itertools.count(start_epoch):
                if epoch >= self.planned_epochs:
                    break
                if epoch_seconds is not None and not self.deadline.allows(epoch_seconds):
                    stopped = "budget"
                    break
                if self.deadline.expired():
                    stopped = "budget"
                    break
                t0 = time.monotonic()
                record = self._train_epoch(
                    epoch, train_loader, optimizer, scheduler, mixer, steps_per_epoch
                )
                if record is None:
                    stopped = "budget"
                    break
                if val_loader is not None:
                    val = self.validate(val_loader)
                    record.update({f"val_{k}": v for k, v in val.items()})
                record["seconds"] = time.monotonic() - t0
                epoch_seconds = (
                    record["seconds"]
                    if epoch_seconds is None
                    else 0.5 * epoch_seconds + 0.5 * record["seconds"]
                )
                metric = record.get(f"val_{self.task.monitor}")
                val_loss = record.get("val_loss")
                improved = metric is not None and (
                    best_metric is None
                    or metric > best_metric + cfg.min_delta
                    # equal accuracy on a small val set: the lower loss is the better model
                    or (metric >= best_metric and _lower(val_loss, best_loss))
                )
                if val_loader is None:
                    improved = True
                if improved:
                    best_metric, best_epoch, bad_epochs = metric, epoch, 0
                    best_loss = val_loss
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                    }
                    if self.checkpoint_dir is not None:
                        save_weights(self.checkpoint_dir.parent / "best.safetensors", self.model)
                    if on_improve is not None:
                        on_improve(record)
                else:
                    bad_epochs += 1
                record["best"] = bool(improved)
                self.history.append(record)
                if self.checkpoint_dir is not None:
                    save_checkpoint(
                        self.checkpoint_dir,
                        model=self.model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        state={
                            "phase": self.phase,
                            "epoch": epoch,
                            "planned_epochs": self.planned_epochs,
                            "history": self.history,
                            "best_metric": best_metric,
                            "best_epoch": best_epoch,
                            "bad_epochs": bad_epochs,
                            "best_loss": best_loss,
                            "grad_scaler": self._scaler.state_dict(),
                            "config": cfg.to_json(),
                        },
                    )
                if self.replan is not None and self.replan_every_epoch:
                    # the running mean follows a machine whose speed changes under the run
                    self.planned_epochs = max(epoch + 1, self.replan(epoch_seconds))
                elif self.replan is not None and epoch == start_epoch and not resume:
                    # the first real epoch is the best estimate of what the rest will cost
                    self.planned_epochs = max(epoch + 1, self.replan(record["seconds"]))
                for cb in self.callbacks:
                    cb.on_epoch_end(self, record)
                if cfg.patience is not None and bad_epochs >= cfg.patience:
                    stopped = "early_stopping"
                    break
        except StopTraining as exc:
            stopped = f"callback: {exc}" if str(exc) else "callback"
        finally:
            for cb in self.callbacks:
                cb.on_fit_end(self)
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return FitResult(
            history=self.history,
            best_epoch=best_epoch,
            best_metric=best_metric,
            stopped=stopped,
            seconds=time.monotonic() - started,
        )

    def _train_epoch(
        self,
        epoch: int,
        loader: DataLoader[Any],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        mixer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
        steps: int,
    ) -> dict[str, Any] | None:
        """One pass over ``loader``; ``None`` when the deadline ran out mid-epoch."""
        cfg = self.config
        frozen = epoch < cfg.freeze_epochs
        self._set_backbone_frozen(frozen)
        self._train_mode(frozen)
        # Per-epoch seeds make a resumed run draw the same batches and augmentations.
        torch.manual_seed(cfg.seed * 10_007 + epoch)
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(cfg.seed * 10_007 + epoch)
        sampler_gen = getattr(getattr(loader, "sampler", None), "generator", None)
        if isinstance(sampler_gen, torch.Generator):
            sampler_gen.manual_seed(cfg.seed * 10_007 + epoch)
        for cb in self.callbacks:
            cb.on_epoch_start(self, epoch, steps)
        total_loss, total_correct, total_hard, seen = 0.0, 0, 0, 0
        t0 = time.monotonic()
        for step, (images, targets) in enumerate(loader):
            if self.deadline.expired():
                return None
            loss, n, correct = self._forward_loss(images, targets, mixer, frozen)
            optimizer.zero_grad(set_to_none=True)
            self._scaler.scale(loss).backward()
            if cfg.grad_clip:
                self._scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.grad is not None], cfg.grad_clip
                )
            scale = self._scaler.get_scale() if self._scaler.is_enabled() else None
            self._scaler.step(optimizer)
            self._scaler.update()
            # fp16: a step with inf/NaN gradients is skipped and the scale lowered; the schedule
            # follows the optimiser's real steps (as Accelerate does), and PyTorch's "scheduler
            # before optimizer" warning stays quiet
            if scale is None or self._scaler.get_scale() >= scale:
                scheduler.step()
            value = float(loss.detach())
            total_loss += value * n
            seen += n
            if correct is not None:
                total_correct += correct
                total_hard += n
            for cb in self.callbacks:
                cb.on_batch_end(self, step, value)
        seconds = time.monotonic() - t0
        return {
            "epoch": epoch,
            "phase": self.phase,
            "frozen": frozen,
            "lr": optimizer.param_groups[-1]["lr"],
            "train_loss": total_loss / max(1, seen),
            "train_accuracy": total_correct / total_hard if total_hard else None,
            "train_images_per_second": seen / seconds if seconds > 0 else None,
            "train_images": seen,
        }


def _lower(value: float | None, reference: float | None) -> bool:
    if value is None or reference is None or math.isnan(value):
        return False
    return value < reference
