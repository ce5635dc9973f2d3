"""``visionflow distill``: a smaller student learns from a trained run (the teacher).

The student is a pretrained timm backbone (weights resolved offline, as in training) plus a
linear head, at its *own* preprocessing (its pretrained mean, std, resize filter and crop; the
input size defaults to the teacher's). As in training (LP-FT), a pretrained student's head starts
as a linear probe on its frozen features and its BatchNorm statistics stay fixed. It is then
trained on the teacher run's training split with Hinton et al.'s loss

    ``alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)``

and the epoch with the best validation accuracy is kept (ties: lower validation loss; the
linear-probe start only when it is strictly better, as training keeps its probe). The split
is the teacher's (``index.json`` and ``split.json`` are copied), so the test images stay held out
for both models and their figures compare like with like.

**Teacher logits on the same augmented view, every step.** Caching the teacher's logits once on
un-augmented images would be cheaper, but the student would then be taught what the teacher
says about a *different* picture (a random crop and flip of it), or would have to train without
augmentation; Beyer et al. (2022, "Knowledge distillation: a good teacher is patient and
consistent") measure both as clearly worse than a teacher that sees exactly the student's crop.
So each training image is augmented once (random resized crop and flip, in ``uint8``, at the
larger of the two input sizes) and both networks get that same crop, resized to their own input
size and normalised with their own mean and std. The price is one teacher forward pass (no
gradient, eval mode) per step. Evaluation uses each model's own evaluation preprocessing.

The student's run directory has the files of a training run (``model.json`` with a
``distilled_from`` record, ``model.safetensors``, ``index.json``, ``split.json``,
``metrics.json``, ``config.json``, ``history.json``, ``state.json``), so ``visionflow.load``,
``visionflow evaluate`` and :func:`~visionflow.export.exporter.export_run` take it as they take any
run. ``config.json`` is a :class:`~visionflow.config.TrainConfig` with the settings that apply
(no label smoothing, no layer decay...); temperature and alpha are in ``distill.json`` and in
``model.json``'s ``distilled_from``.

The comparison (``distill.json``, ``distill.md``) puts teacher and student side by side:
validation and test accuracy, top-1 agreement of the student with the teacher, parameters, size
on disk (weights, and the FP32 ONNX graph when exported) and CPU latency at batch 1 (median):
ONNX Runtime on the FP32 graphs of both bundles when the student is exported (the teacher's own
``model.vfb`` when it belongs to the same model, else a temporary export), PyTorch eager on both
otherwise. The table says which.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from visionflow._io import atomic_write_bytes, atomic_write_json, read_json
from visionflow.data.index import DatasetIndex, Split
from visionflow.data.loading import DecodedImageCache, ImageDataset, make_loader
from visionflow.data.preprocess import Preprocessing
from visionflow.data.transforms import eval_transform
from visionflow.errors import BudgetError, BundleError, CheckpointError, ConfigError, DataError
from visionflow.evaluate.metrics import classification_metrics
from visionflow.models.backbones import create_backbone, feature_dim
from visionflow.models.heads import LinearHead, TaskModel
from visionflow.models.weights import resolve_weights
from visionflow.train.budget import Deadline, format_seconds, parse_budget
from visionflow.train.checkpoint import save_weights
from visionflow.train.device import autocast_dtype, configure_threads, cpu_count, select_device
from visionflow.train.engine import seed_everything
from visionflow.train.probe import fit_linear_probe

__all__ = ["DistillResult", "distill_run", "distillation_loss"]

#: Augmentation policies the paired (teacher + student) view supports.
AUGMENTS = ("none", "light", "medium")
_MIN_SCALE = {"light": 0.6, "medium": 0.35}
_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
#: Seconds kept in reserve after training for export and the latency comparison.
_EXPORT_RESERVE = 15.0


@dataclass(frozen=True)
class DistillResult:
    """What :func:`distill_run` made (all of it is also on disk in ``run_dir``).

    Attributes:
        run_dir: The student's run directory.
        bundle: The student's bundle (``run_dir/model.vfb``), or ``None`` when not exported.
        metrics: The student's metrics per split (``classification_metrics``).
        comparison: The content of ``distill.json``: teacher and student rows, agreement,
            how latency was measured, the settings.
        markdown: The content of ``distill.md``.
        history: One record per epoch.
        best_epoch: The epoch kept (from 0); ``None`` when the student is its linear-probe
            start (no epoch fitted in the budget, or the probe was better on validation).
        stopped: Why training ended: ``epochs``, ``early_stopping`` or ``budget``.
        seconds: Wall-clock time of the whole call.
    """

    run_dir: Path
    bundle: Path | None
    metrics: dict[str, dict[str, Any]]
    comparison: dict[str, Any]
    markdown: str
    history: list[dict[str, Any]]
    best_epoch: int | None
    stopped: str
    seconds: float


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, targets)``.

    The ``T^2`` keeps the soft term's gradients on the scale of the hard term's whatever the
    temperature (Hinton et al., 2015). Returns ``(loss, kl, ce)``; the KL is averaged per image.
    """
    t = float(temperature)
    s = student_logits.float()
    log_p_student = F.log_softmax(s / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, targets)
    loss = alpha * t * t * kl + (1.0 - alpha) * ce
    return loss, kl, ce


class _PairedView:
    """One augmented ``uint8`` crop (C, side, side) of an image, shared by teacher and student.

    Picklable, for DataLoader workers. ``none`` is the student's evaluation resize and crop.
    """

    def __init__(self, side: int, policy: str, hflip: bool, pre: Preprocessing) -> None:
        self.side = side
        self.policy = policy
        self.pre = pre.with_size(side)
        interp = _INTERP[pre.interpolation]
        ops: list[Any] = [v2.ToImage()]
        if policy != "none":
            ops.append(
                v2.RandomResizedCrop(
                    side, scale=(_MIN_SCALE[policy], 1.0), interpolation=interp, antialias=True
                )
            )
            if hflip:
                ops.append(v2.RandomHorizontalFlip())
            if policy == "medium":
                ops.append(v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
        self.ops = v2.Compose(ops)

    def __call__(self, image: Any) -> torch.Tensor:
        if self.policy == "none":
            image = self.pre.resize_crop(image)
        out: torch.Tensor = self.ops(image)
        return out


def _model_input(pixels: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """``uint8`` (N, C, S, S) crops -> one model's normalised input at its own size."""
    x = pixels.float()
    side = pre.input_size
    if x.shape[-1] != side or x.shape[-2] != side:
        mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(side, side), mode=mode, antialias=True, align_corners=False)
        x = x.clamp_(0.0, 255.0)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def _check_settings(
    *,
    alpha: float,
    temperature: float,
    epochs: int,
    lr: float,
    batch_size: int,
    img_size: int | None,
    augment: str,
    patience: int | None,
    budget: str | float | None,
) -> float | None:
    """Reject bad settings before anything is loaded; returns the budget in seconds."""
    checks = [
        ("alpha", alpha, 0.0 <= alpha <= 1.0, "must be in [0, 1] (the soft-label share)"),
        ("temperature", temperature, temperature > 0 and math.isfinite(temperature), "must be > 0"),
        ("epochs", epochs, epochs >= 1, "must be >= 1"),
        ("lr", lr, lr > 0 and math.isfinite(lr), "must be > 0"),
        ("batch_size", batch_size, batch_size >= 1, "must be >= 1"),
        ("img_size", img_size, img_size is None or 32 <= img_size <= 1024, "must be in [32, 1024]"),
        ("patience", patience, patience is None or patience >= 1, "must be >= 1 (or None)"),
    ]
    for name, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"distill setting {name}={value!r} {rule}")
    if augment not in AUGMENTS:
        raise ConfigError(f"distill setting augment={augment!r} must be one of {AUGMENTS}")
    return parse_budget(budget)


def _default_out(teacher_run: Path, student: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", student).strip("-") or "student"
    return teacher_run.parent / f"{teacher_run.name}-student-{safe}"


def _auto_workers(device: torch.device) -> int:
    if device.type == "cpu":
        # on a small CPU a worker process only steals a core from the math
        return 0 if cpu_count() <= 4 else min(4, cpu_count() // 4)
    return min(8, max(2, cpu_count() - 1))


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


@torch.inference_mode()
def _predict(
    model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and targets of a whole loader, in order."""
    model.eval()
    outs, tgts = [], []
    for images, targets in loader:
        with _autocast(device, amp):
            outs.append(model(images.to(device)).float().cpu())
        tgts.append(torch.as_tensor(targets))
    if not outs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(tgts)


def _autocast(device: torch.device, amp: torch.dtype | None) -> Any:
    if amp is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=amp)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if len(a) == 0:
        return None
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def _schedule(warmup: int, plan: dict[str, int], steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 1 % over ``plan["epochs"]`` (read on every step, so a
    re-plan after the first epoch stretches or shrinks the decay)."""

    def factor(step: int) -> float:
        total = max(1, plan["epochs"] * steps_per_epoch)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: TaskModel, lr: float, backbone_lr: float) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for part, part_lr in ((model.backbone, backbone_lr), (model.head, lr)):
        decay = [p for p in part.parameters() if p.ndim > 1]
        no_decay = [p for p in part.parameters() if p.ndim <= 1]
        groups.append({"params": decay, "lr": part_lr, "weight_decay": 0.05})
        groups.append({"params": no_decay, "lr": part_lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _eager_latency(model: nn.Module, side: int, repeats: int) -> float:
    """Median batch-1 milliseconds of PyTorch eager on the CPU (random input)."""
    model = model.to("cpu").eval()
    x = torch.randn(1, 3, side, side)
    times = []
    with torch.inference_mode():
        for i in range(repeats + max(3, repeats // 10)):
            start = time.perf_counter()
            model(x)
            if i >= max(3, repeats // 10):
                times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def distill_run(
    teacher_run: str | Path,
    student: str,
    *,
    out_dir: str | Path | None = None,
    weights: str | Path | None = None,
    img_size: int | None = None,
    budget: str | float | None = "5m",
    epochs: int = 30,
    temperature: float = 4.0,
    alpha: float = 0.7,
    lr: float = 1e-3,
    batch_size: int = 32,
    augment: str = "light",
    hflip: bool | None = None,
    patience: int | None = 5,
    freeze_bn: bool | None = None,
    seed: int = 0,
    device: str = "auto",
    num_workers: int | None = None,
    export: bool = True,
    bench_repeats: int = 50,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DistillResult:
    """Distil the classifier in ``teacher_run`` into a ``student`` backbone; see the module doc.

    Args:
        teacher_run: A finished classification run (``visionflow train``).
        student: timm name of the student backbone (``mobilenetv3_small_100``,
            ``tf_efficientnet_lite0``...).
        out_dir: The student's run directory (default ``<teacher_run>-student-<student>``
            next to the teacher).
        weights: The student's starting weights, resolved like training's (``None``/``auto``,
            ``package``, ``hub``, ``none`` for random initialisation, or a file/directory).
        img_size: The student's input size (default: the teacher's).
        budget: Wall-clock budget of the training (``"5m"``, seconds, ``None`` for none);
            time for the final evaluation and the export is kept in reserve.
        epochs: Upper bound on epochs (the budget or early stopping may end sooner).
        temperature: Softmax temperature ``T`` of the soft labels (> 0).
        alpha: Share of the soft-label term, in ``[0, 1]`` (1: teacher only, 0: labels only).
        lr: Head learning rate; the backbone gets 0.3x of it when pretrained, all of it when
            randomly initialised. AdamW, one warm-up epoch, cosine decay.
        batch_size: Images per step.
        augment: ``light`` (random resized crop 0.6-1 and flip), ``medium`` (crop 0.35-1, flip,
            TrivialAugment) or ``none``; teacher and student see the same view.
        hflip: Random horizontal flips (default: the teacher run's setting).
        patience: Epochs without a better validation accuracy before stopping (``None``: never).
        freeze_bn: Keep the student's BatchNorm statistics fixed (default: when it starts from
            pretrained weights, whose head is then fitted as a linear probe on its frozen
            features first, as training does; see ``TrainConfig.freeze_bn``).
        seed: Seed of initialisation, batch order and augmentation.
        device: ``auto``, ``cpu``, ``cuda``...
        num_workers: DataLoader workers (default: none on small CPUs).
        export: Export the student as ``<out_dir>/model.vfb`` and compare ONNX Runtime latency.
        bench_repeats: Batch-1 calls timed per model for the latency figure.
        overwrite: Replace an existing student run in ``out_dir``.
        progress: Called with one line per step and per epoch.

    Raises:
        ConfigError: A setting is out of range (the message names it), or ``student`` is not a
            timm model (with a "did you mean").
        CheckpointError: ``teacher_run`` is missing or not a finished classification run, or
            ``out_dir`` already holds a run.
        WeightsError: The student's weights cannot be resolved offline (the message says how
            to provide them, or use ``weights="none"``).
        BudgetError: ``budget`` is not a duration.
        DataError: The teacher's split has no training or validation images.
    """
    started = time.monotonic()
    say = progress or (lambda _line: None)
    budget_s = _check_settings(
        alpha=alpha,
        temperature=temperature,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        img_size=img_size,
        augment=augment,
        patience=patience,
        budget=budget,
    )
    deadline = Deadline(budget_s)
    teacher_dir = Path(teacher_run)
    if not teacher_dir.is_dir():
        raise CheckpointError(f"teacher run {teacher_dir} does not exist (give a run directory)")
    for name in ("model.json", "model.safetensors", "index.json", "split.json"):
        if not (teacher_dir / name).is_file():
            raise CheckpointError(
                f"{teacher_dir} is not a finished run ({name} missing); distillation needs a "
                "trained teacher and its data split"
            )
    resolved = resolve_weights(student, None if weights is None else str(weights))
    out = Path(out_dir) if out_dir is not None else _default_out(teacher_dir, student)
    if out.resolve() == teacher_dir.resolve():
        raise ConfigError("out_dir must differ from the teacher run (the teacher stays untouched)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"{out} is not empty; pass overwrite=True (--overwrite) to replace a student "
                "run there, or choose another out_dir (--out)"
            )
        if not ((out / "model.json").is_file() or (out / "state.json").is_file()):
            raise CheckpointError(f"{out} holds files but no run; refusing to overwrite it")

    configure_threads()
    dev = select_device(device)
    amp = autocast_dtype(dev, "auto")
    if amp == torch.float16:  # fp16 would need loss scaling; a short distillation goes without
        amp = None
    seed_everything(seed)

    # ------------------------------------------------------------------ teacher and data
    from visionflow.api import ClassifierModel

    teacher = ClassifierModel.from_run(teacher_dir, device=str(dev))
    t_info = dict(teacher.info)
    t_model = teacher.model.eval()
    for p in t_model.parameters():
        p.requires_grad_(False)
    t_pre = teacher.preprocessing
    index = DatasetIndex.from_json(read_json(teacher_dir / "index.json"))
    split = Split.from_json(read_json(teacher_dir / "split.json"))
    if list(index.classes) != list(teacher.classes):
        raise CheckpointError(
            f"{teacher_dir}: index.json classes {index.classes} differ from the model's "
            f"{teacher.classes}"
        )
    if not split.train or not split.val:
        raise DataError(
            f"{teacher_dir}: the split has {len(split.train)} training and {len(split.val)} "
            "validation images; distillation needs both"
        )
    t_config = (
        dict(read_json(teacher_dir / "config.json"))
        if (teacher_dir / "config.json").is_file()
        else {}
    )
    if hflip is None:
        hflip = bool(t_config.get("hflip", True))

    # ------------------------------------------------------------------ student
    s_pre = resolved.preprocessing.with_size(img_size or t_pre.input_size)
    backbone = create_backbone(student, weights=resolved)
    dim = feature_dim(backbone)
    head = LinearHead(dim, len(index.classes))
    model = TaskModel(backbone, head).to(dev)
    pretrained = resolved.source != "none"
    backbone_lr = lr * 0.3 if pretrained else lr
    say(
        f"teacher {t_info.get('backbone')} ({_parameters(t_model):,} parameters, "
        f"{t_pre.input_size} px) -> student {student} ({_parameters(model):,} parameters, "
        f"{s_pre.input_size} px, weights: {resolved.source})"
    )

    side = max(t_pre.input_size, s_pre.input_size)
    cache = DecodedImageCache(512 * 2**20)
    mapping = index.class_to_idx

    def samples(name: str) -> list[Any]:
        return [index.samples[i] for i in split[name]]

    workers = _auto_workers(dev) if num_workers is None else num_workers
    train_ds = ImageDataset(
        samples("train"),
        mapping,
        _PairedView(side, augment, hflip, s_pre),
        cache=cache,
        max_side=2 * side if augment != "none" else None,
    )
    train_loader = make_loader(
        train_ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        seed=seed,
        drop_last=len(train_ds) > batch_size,
        pin_memory=dev.type == "cuda",
    )

    def eval_loader(name: str, pre: Preprocessing) -> Any:
        ds = ImageDataset(samples(name), mapping, eval_transform(pre), cache=cache)
        return make_loader(ds, batch_size=max(batch_size, 32), seed=seed)

    # the teacher's answers on the held-out splits, once: agreement and the comparison
    t_logits: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    for name in ("val", "test"):
        if split[name]:
            t_logits[name], targets[name] = _predict(t_model, eval_loader(name, t_pre), dev, amp)
    val_loader = eval_loader("val", s_pre)

    # ------------------------------------------------------------------ head
    phases: list[dict[str, Any]] = []
    probe_state: dict[str, torch.Tensor] | None = None
    probe_acc = 0.0
    if pretrained:
        # LP-FT, as in training: a random head would send large, noisy gradients into the
        # pretrained backbone in the first steps; a linear probe on its frozen features does not
        t0 = time.monotonic()
        xtr, ytr = _predict(model.backbone, eval_loader("train", s_pre), dev, amp)
        xva, yva = _predict(model.backbone, val_loader, dev, amp)
        probe = fit_linear_probe(
            xtr, ytr, xva, yva, num_classes=len(index.classes), seed=seed, refit=False
        )
        with torch.no_grad():
            head.fc.weight.copy_(probe.weight.to(dev))
            head.fc.bias.copy_(probe.bias.to(dev))
        phases.append(
            {
                "name": "linear probe (student head)",
                "seconds": time.monotonic() - t0,
                "val_accuracy": probe.val_accuracy,
                "C": probe.C,
            }
        )
        probe_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        probe_acc = probe.val_accuracy or 0.0
        say(f"student head from a linear probe: val accuracy {_pct(probe.val_accuracy)}")
    if freeze_bn is None:
        freeze_bn = pretrained

    # ------------------------------------------------------------------ training
    optimizer = torch.optim.AdamW(_param_groups(model, lr, backbone_lr), lr=lr)
    steps = max(1, len(train_loader))
    plan = {"epochs": epochs}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(min(steps, plan["epochs"] * steps - 1), plan, steps)
    )
    n_images = sum(len(split[n]) for n in ("train", "val", "test"))
    reserve = _EXPORT_RESERVE if export else 2.0
    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best: tuple[float, float] | None = None  # (val accuracy, -val loss)
    best_epoch: int | None = None
    bad_epochs, stopped = 0, "epochs"
    epoch_seconds: float | None = None
    generator = getattr(train_loader, "generator", None)
    for epoch in range(epochs):
        if epoch >= plan["epochs"]:
            stopped = "budget"  # the plan was cut to what the budget allows
            break
        if epoch_seconds is not None and not deadline.allows(epoch_seconds + reserve):
            stopped = "budget"
            break
        t0 = time.monotonic()
        torch.manual_seed(seed * 10_007 + epoch)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed * 10_007 + epoch)
        model.train()
        if freeze_bn:
            for module in model.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "correct": 0.0, "agree": 0.0}
        seen, partial = 0, False
        for pixels, labels in train_loader:
            if deadline.remaining() < reserve:
                partial = True
                break
            pixels = pixels.to(dev, non_blocking=True)
            labels = torch.as_tensor(labels).to(dev)
            with torch.no_grad(), _autocast(dev, amp):
                soft = t_model(_model_input(pixels, t_pre)).float()
            with _autocast(dev, amp):
                logits = model(_model_input(pixels, s_pre))
            loss, kl, ce = distillation_loss(
                logits, soft, labels, temperature=temperature, alpha=alpha
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            n = len(labels)
            seen += n
            sums["loss"] += float(loss.detach()) * n
            sums["kl"] += float(kl.detach()) * n
            sums["ce"] += float(ce.detach()) * n
            pred = logits.detach().argmax(1)
            sums["correct"] += float((pred == labels).sum())
            sums["agree"] += float((pred == soft.argmax(1)).sum())
        if seen == 0:
            stopped = "budget"
            break
        t_val = time.monotonic()
        s_val, y_val = _predict(model, val_loader, dev, amp)
        eval_per_image = (time.monotonic() - t_val) / max(1, len(y_val))
        val_loss = float(F.cross_entropy(s_val, y_val)) if len(y_val) else float("nan")
        val_acc = float((s_val.argmax(1) == y_val).float().mean()) if len(y_val) else 0.0
        record = {
            "epoch": epoch,
            "phase": "distill",
            "lr": optimizer.param_groups[-1]["lr"],
            "train_loss": sums["loss"] / seen,
            "train_kl": sums["kl"] / seen,
            "train_ce": sums["ce"] / seen,
            "train_accuracy": sums["correct"] / seen,
            "train_agreement": sums["agree"] / seen,
            "train_images": seen,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "val_agreement": _agreement(s_val, t_logits["val"]),
            "seconds": time.monotonic() - t0,
            "partial": partial,
        }
        score = (val_acc, -val_loss if math.isfinite(val_loss) else -math.inf)
        # a partial epoch (the budget ran out) only counts when nothing else was validated
        improved = (best is None or score > best) and (not partial or best_state is None)
        if improved:
            best, best_epoch, bad_epochs = score, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        record["best"] = improved
        history.append(record)
        say(
            f"epoch {epoch + 1}/{plan['epochs']}: loss {record['train_loss']:.3f}, val accuracy "
            f"{_pct(val_acc)}, agreement with teacher {_pct(record['val_agreement'])}"
            + (" *" if improved else "")
        )
        if partial:
            stopped = "budget"
            break
        if epoch_seconds is None:
            epoch_seconds = record["seconds"]
            if budget_s is not None:
                # the first epoch is the best estimate of the rest; keep time for the final
                # evaluation of every split at the speed the validation pass had
                reserve += 1.5 * n_images * eval_per_image
                more = int(max(0.0, deadline.remaining() - reserve) // (epoch_seconds * 1.03))
                plan["epochs"] = min(epochs, 1 + more)
        else:
            epoch_seconds = 0.5 * epoch_seconds + 0.5 * record["seconds"]
        if patience is not None and bad_epochs >= patience:
            stopped = "early_stopping"
            break
    best_acc = history[best_epoch]["val_accuracy"] if best_epoch is not None else None
    # like training, which keeps its probe when it beats the fine-tune on validation (or no
    # fine-tune epoch fitted); a tie goes to the distilled student
    if probe_state is not None and (best_acc is None or probe_acc > best_acc):
        why = "no distillation epoch fitted" if best_acc is None else "better on validation"
        best_state, best_epoch = probe_state, None
        kept = f"its linear probe ({why}: val accuracy {_pct(probe_acc)})"
        say(f"[warning] the student is {kept}; a larger budget lets distillation catch up")
    elif best_state is not None and best_epoch is not None:
        kept = f"epoch {best_epoch + 1} (val accuracy {_pct(best_acc)})"
    else:
        raise BudgetError(
            f"the budget ({budget}) ran out before the student trained on a single batch "
            f"({format_seconds(reserve)} are kept for evaluation and export); raise it"
        )
    model.load_state_dict(best_state)
    model.eval()
    say(f"kept {kept}; stopped: {stopped}, {format_seconds(deadline.elapsed())}")

    # ------------------------------------------------------------------ the student run
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.vfb", "distill.json", "distill.md"):
        (out / stale).unlink(missing_ok=True)
    save_weights(out / "model.safetensors", model)
    metrics: dict[str, dict[str, Any]] = {}
    s_logits: dict[str, torch.Tensor] = {}
    for name in ("train", "val", "test"):
        if not split[name]:
            continue
        logits, y = _predict(model, eval_loader(name, s_pre), dev, amp)
        s_logits[name] = logits
        probs = torch.softmax(logits, dim=1).numpy()
        metrics[name] = classification_metrics(y.numpy(), probs, index.classes)
    t_metrics = {
        name: classification_metrics(
            targets[name].numpy(), torch.softmax(t_logits[name], 1).numpy(), index.classes
        )
        for name in t_logits
    }
    agreement = {name: _agreement(s_logits[name], t_logits[name]) for name in t_logits}
    t_params, s_params = _parameters(t_model), _parameters(model)
    settings = {
        "student": student,
        "weights": None if weights is None else str(weights),
        "img_size": s_pre.input_size,
        "budget": budget,
        "epochs": epochs,
        "temperature": temperature,
        "alpha": alpha,
        "lr": lr,
        "backbone_lr": backbone_lr,
        "batch_size": batch_size,
        "augment": augment,
        "hflip": hflip,
        "patience": patience,
        "freeze_bn": freeze_bn,
        "head_init": "linear probe" if pretrained else "random",
        "seed": seed,
        "teacher_view": "same augmented crop as the student, every step",
    }
    distilled_from = {
        "run": str(teacher_dir.resolve()),
        "backbone": t_info.get("backbone"),
        "preprocessing": t_pre.to_json(),
        "parameters": t_params,
        "weights": t_info.get("weights"),
        "trained_on": t_info.get("trained_on"),
        "created_at": t_info.get("created_at"),
        "data_fingerprint": t_info.get("data_fingerprint"),
        "temperature": temperature,
        "alpha": alpha,
    }
    for name in ("index.json", "split.json", "data_report.json"):
        if (teacher_dir / name).is_file():
            shutil.copyfile(teacher_dir / name, out / name)
    atomic_write_json(out / "weights.json", resolved.provenance())
    atomic_write_json(out / "history.json", history)
    atomic_write_json(out / "config.json", _train_config(settings, device, num_workers))
    atomic_write_json(
        out / "model.json",
        {
            "task": "classify",
            "backbone": student,
            "classes": list(index.classes),
            "preprocessing": s_pre.to_json(),
            "feature_dim": dim,
            "head": "linear",
            "chosen": "distill",
            "trained_on": ["train"],
            "weights": resolved.provenance(),
            "data_fingerprint": t_info.get("data_fingerprint", ""),
            "created_at": _now(),
            "distilled_from": distilled_from,
        },
    )
    train_seconds = deadline.elapsed()
    atomic_write_json(
        out / "metrics.json",
        {
            "chosen": "distill",
            "trained_on": ["train"],
            "seconds": train_seconds,
            "budget_seconds": budget_s,
            "phases": [
                *phases,
                {
                    "name": "distill",
                    "epochs": len(history),
                    "planned_epochs": plan["epochs"],
                    "best_epoch": best_epoch,
                    "kept": kept,
                    "stopped": stopped,
                },
            ],
            "splits": metrics,
            "agreement_with_teacher": agreement,
            "findings": [],
        },
    )
    atomic_write_json(
        out / "state.json",
        {
            "stage": "done",
            "kind": "distill",
            "teacher": str(teacher_dir.resolve()),
            "elapsed": train_seconds,
            "created_at": _now(),
        },
    )

    # ------------------------------------------------------------------ export and comparison
    bundle: Path | None = None
    rows = {
        "teacher": {
            "run": str(teacher_dir.resolve()),
            "backbone": t_info.get("backbone"),
            "input_size": t_pre.input_size,
            "trained_on": list(t_info.get("trained_on") or ["train"]),
            "val_accuracy": t_metrics.get("val", {}).get("accuracy"),
            "test_accuracy": t_metrics.get("test", {}).get("accuracy"),
            "parameters": t_params,
            "weights_mb": (teacher_dir / "model.safetensors").stat().st_size / 1e6,
            "onnx_mb": None,
            "latency_ms": None,
        },
        "student": {
            "run": str(out.resolve()),
            "backbone": student,
            "input_size": s_pre.input_size,
            "trained_on": ["train"],
            "val_accuracy": metrics["val"]["accuracy"],
            "test_accuracy": metrics.get("test", {}).get("accuracy"),
            "parameters": s_params,
            "weights_mb": (out / "model.safetensors").stat().st_size / 1e6,
            "onnx_mb": None,
            "latency_ms": None,
        },
    }
    from visionflow.export.bench import cpu_info

    cpu = cpu_info()
    if export:
        from visionflow.export.exporter import export_run

        say("exporting the student")
        bundle = export_run(out, out / "model.vfb", overwrite=True, progress=say).path
        with tempfile.TemporaryDirectory(prefix="vf-distill-") as tmp:
            t_bundle = _teacher_bundle(teacher_dir, t_info, Path(tmp), say)
            say(f"timing both FP32 graphs (ONNX Runtime, batch 1, {bench_repeats} calls)")
            for role, path in (("teacher", t_bundle), ("student", bundle)):
                row = _onnx_row(path, bench_repeats)
                rows[role]["onnx_mb"], rows[role]["latency_ms"] = row
        engine = "ONNX Runtime FP32"
    else:
        say(f"timing both models (PyTorch eager, batch 1, {bench_repeats} calls)")
        rows["teacher"]["latency_ms"] = _eager_latency(t_model, t_pre.input_size, bench_repeats)
        rows["student"]["latency_ms"] = _eager_latency(model, s_pre.input_size, bench_repeats)
        engine = "PyTorch eager"
    comparison = {
        "teacher": rows["teacher"],
        "student": rows["student"],
        "agreement": agreement,
        "latency": {
            "engine": engine,
            "batch": 1,
            "statistic": "median",
            "repeats": bench_repeats,
            "threads": torch.get_num_threads(),
            "machine": cpu,
        },
        "training": {
            "epochs": len(history),
            "best_epoch": best_epoch,
            "kept": kept,
            "stopped": stopped,
            "seconds": train_seconds,
        },
        "settings": settings,
        "bundle": None if bundle is None else str(bundle),
        "created_at": _now(),
    }
    markdown = comparison_markdown(comparison)
    atomic_write_json(out / "distill.json", comparison)
    atomic_write_bytes(out / "distill.md", markdown.encode("utf-8"))
    say(f"student run written: {out}")
    return DistillResult(
        run_dir=out,
        bundle=bundle,
        metrics=metrics,
        comparison=comparison,
        markdown=markdown,
        history=history,
        best_epoch=best_epoch,
        stopped=stopped,
        seconds=time.monotonic() - started,
    )


def _train_config(settings: dict[str, Any], device: str, num_workers: int | None) -> dict[str, Any]:
    """The student's ``config.json``: a TrainConfig holding the settings that applied."""
    from visionflow.config import TrainConfig

    budget = settings["budget"]
    try:
        cfg = TrainConfig(
            backbone=settings["student"],
            weights=settings["weights"],
            img_size=settings["img_size"],
            budget=None if budget is None else str(budget),
            strategy="finetune",
            epochs=settings["epochs"],
            batch_size=settings["batch_size"],
            lr=settings["lr"],
            backbone_lr=settings["backbone_lr"],
            layer_decay=1.0,
            label_smoothing=0.0,
            augment=settings["augment"],
            hflip=settings["hflip"],
            balance="none",
            freeze_bn=settings["freeze_bn"],
            patience=settings["patience"],
            seed=settings["seed"],
            device=device,
            amp="auto",
            num_workers=num_workers,
        )
    except ValidationError as exc:  # pragma: no cover - the settings were checked up front
        raise ConfigError(f"distill settings do not form a training config: {exc}") from exc
    return cfg.model_dump(mode="json")


def _teacher_bundle(
    teacher_dir: Path, info: dict[str, Any], tmp: Path, say: Callable[[str], None]
) -> Path:
    """The teacher's own ``model.vfb`` when it holds this model's FP32 graph, else a fresh
    export into ``tmp`` (the teacher's run directory is never written)."""
    from visionflow.export.exporter import export_run
    from visionflow.export.runtime import load_bundle

    own = teacher_dir / "model.vfb"
    if own.exists():
        try:
            meta = load_bundle(own).meta
            same = (meta.get("run") or {}).get("created_at") == info.get("created_at")
            if same and "fp32" in meta.get("graphs", {}):
                return own
        except BundleError:
            pass  # a damaged or foreign bundle: export afresh
    say("exporting the teacher to a temporary bundle (for the latency comparison)")
    return export_run(teacher_dir, tmp / "teacher.vfb").path


def _onnx_row(bundle: Path, repeats: int) -> tuple[float, float]:
    """(FP32 graph size in MB, batch-1 median latency in ms) of a bundle."""
    from visionflow.export.bench import benchmark_bundle

    rows = benchmark_bundle(bundle, graphs=("fp32",), torch_eager=False, repeats=repeats, batch=8)
    if not rows:
        raise BundleError(f"{bundle} holds no FP32 graph to time")
    return rows[0].size_mb, rows[0].p50_ms


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """``distill.md``: the teacher/student table and how its figures were measured."""
    lat = comparison["latency"]
    lines = [
        "# Distillation: teacher vs student",
        "",
        "| model | backbone | input | val accuracy | test accuracy | parameters | "
        "weights (MB) | ONNX FP32 (MB) | latency p50 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen_val = False
    for role in ("teacher", "student"):
        r = comparison[role]
        val = _pct(r["val_accuracy"])
        if "val" in r["trained_on"]:
            val += " *"
            seen_val = True
        lines.append(
            f"| {role} | `{r['backbone']}` | {r['input_size']} px | {val} | "
            f"{_pct(r['test_accuracy'])} | {r['parameters'] / 1e6:.2f} M | "
            f"{r['weights_mb']:.1f} | {_num(r['onnx_mb'], '.1f')} | "
            f"{_num(r['latency_ms'], '.2f')} |"
        )
    t, s = comparison["teacher"], comparison["student"]
    lines.append("")
    agree = comparison["agreement"]
    lines.append(
        f"The student agrees with the teacher's top-1 prediction on {_pct(agree.get('test'))} "
        f"of the test images ({_pct(agree.get('val'))} of the validation images); it has "
        f"{s['parameters'] / max(1, t['parameters']):.2f}x the teacher's parameters"
        + (
            f" and takes {s['latency_ms'] / t['latency_ms']:.2f}x its time per image."
            if s["latency_ms"] and t["latency_ms"]
            else "."
        )
    )
    if seen_val:
        lines += ["", "\\* seen in training (that model was fitted on train + val)."]
    machine = lat["machine"]
    lines += [
        "",
        f"Latency: {lat['engine']}, batch 1, median of {lat['repeats']} calls on "
        f"{machine['cpu']} ({lat['threads']} threads), random input at each model's size. "
        "Accuracy: each model's own evaluation preprocessing, on the teacher's split.",
        "",
        f"Settings: temperature {comparison['settings']['temperature']}, alpha "
        f"{comparison['settings']['alpha']}, {_epochs(comparison['training']['epochs'])}; kept "
        f"{comparison['training']['kept']}, stopped: {comparison['training']['stopped']}.",
    ]
    return "\n".join(lines) + "\n"
