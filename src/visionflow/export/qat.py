"""Quantisation-aware fine-tuning: teach a float model the INT8 graph's rounding.

Post-training INT8 (:mod:`visionflow.export.quantize`) loses its last 1-1.5 points on a
fine-tuned model to per-tensor 8-bit activations (BENCHMARKS.md, "Weight ranges that cannot
saturate"); no calibration method recovers them. This module fine-tunes a copy of the model
for a few hundred steps with the INT8 graph's rounding simulated in the forward pass:

* every activation that ONNX Runtime quantises in front of a convolution or the linear head
  is rounded to ``uint8`` per tensor, with min-max ranges measured on the calibration images
  (re-measured before every epoch, as the weights move);
* every weight is rounded per output channel exactly as :func:`~visionflow.export.quantize.
  weight_overrides` will quantise it: depthwise 8-bit, 1x1 pair-bounded, others 7-bit, the
  first convolution in float (``full_range``: 8-bit everywhere);
* gradients pass the rounding straight through (``torch.fake_quantize_*``); batch norm keeps
  its running statistics (the model is in eval mode), so folding it into the convolutions at
  export scales each output channel's weights by one factor, which moves no weight off its
  grid (every range above scales with the channel);
* the loss is cross-entropy on the true labels plus the float model's softened predictions
  (distillation from the model being quantised), so the copy learns the rounding without
  drifting from what was validated.

The result is an ordinary float model: exporting it and quantising it with the same
post-training tool gives the INT8 graph, whose accuracy the export then measures like any
other (:func:`visionflow.export.exporter.export_run`). Nothing here changes the FP32 graph.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ExportError
from visionflow.export.quantize import _pair_maxima, weight_kind

__all__ = ["QATResult", "quantization_aware_finetune"]


@dataclass
class QATResult:
    """The fine-tuned copy and what it took."""

    model: nn.Module
    epochs: int
    steps: int
    images: int
    seconds: float
    lr: float
    losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "images": self.images,
            "seconds": round(self.seconds, 1),
            "lr": self.lr,
            "loss_per_epoch": [round(v, 4) for v in self.losses],
        }


class _WeightRounding(nn.Module):
    """Per-output-channel symmetric rounding of a weight (a parametrisation): ``kind`` is
    ``"depthwise"`` / ``"full"`` (8-bit), ``"pair"`` (1x1 pair-bounded) or ``"reduced"`` (7-bit).

    Scales are ONNX Runtime's for symmetric ``int8`` weights, ``max|w| / 127`` (8-bit) and
    ``max|w| / 64`` (7-bit, its "reduced range" [-64, 64]), with ``max|w|`` the pair bound for
    ``"pair"``: the same grid, or the rounding errors the fine-tune learns are not the graph's.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.enabled = True  # off while calibrating: the quantiser calibrates the float model

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.kind == "pair":  # the bound weight_overrides gives ONNX Runtime
            rows = w.detach().reshape(w.shape[0], -1).cpu().numpy()
            absmax = torch.from_numpy(_pair_maxima(rows)).to(w.device)
        else:
            absmax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
        qmax = 64 if self.kind == "reduced" else 127
        scale = (absmax / qmax).clamp_min(1e-12).float()
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax, qmax)


class _ActivationRounding:
    """Rounds one tensor to ``uint8`` per tensor, as a forward pre-hook (a module's input) or
    forward hook (its output); ``observe`` records min/max instead (a calibration pass)."""

    def __init__(self) -> None:
        self.low = 0.0
        self.high = 0.0
        self.observe = False

    def reset(self) -> None:
        self.low, self.high = 0.0, 0.0

    def round(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self.low = min(self.low, float(x.detach().min()))
            self.high = max(self.high, float(x.detach().max()))
            return x
        # ONNX Runtime's uint8 range always holds 0: scale (high - low) / 255, zero point
        # round(-low / scale)
        scale = max(self.high - self.low, 1e-8) / 255.0
        zero = round(-self.low / scale)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    def input_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.round(args[0]), *args[1:])

    def output_hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        return self.round(out)


def _weight_kind(module: nn.Module, full_range: bool) -> str:
    if full_range:
        return "full"
    if isinstance(module, nn.Conv2d):
        return weight_kind(module.weight.shape, module.groups)
    return "reduced"


def _instrument(
    model: nn.Module, full_range: bool
) -> tuple[list[_ActivationRounding], list[Any], list[nn.Module]]:
    """Round what the INT8 graph rounds: the input and weights of every convolution (but the
    first) and linear layer, and the output of every batch norm (after folding, a convolution's
    output: for a ReLU-family network the rest of the tensors the graph quantises, such as
    the inputs of residual additions). Returns the activation hooks, their handles and the
    parametrised modules."""
    hooks: list[_ActivationRounding] = []
    handles: list[Any] = []
    rounded: list[nn.Module] = []
    first = True
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            hook = _ActivationRounding()
            handles.append(module.register_forward_hook(hook.output_hook))
            hooks.append(hook)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if first and isinstance(module, nn.Conv2d):
            first = False  # stays in float in the INT8 graph, and its input with it
            continue
        hook = _ActivationRounding()
        handles.append(module.register_forward_pre_hook(hook.input_hook))
        hooks.append(hook)
        kind = _weight_kind(module, full_range)
        parametrize.register_parametrization(module, "weight", _WeightRounding(kind))
        rounded.append(module)
    if not rounded:
        raise ExportError("quantisation-aware fine-tuning found no convolution or linear layer")
    return hooks, handles, rounded


def _calibrate(
    model: nn.Module,
    hooks: list[_ActivationRounding],
    pixels: np.ndarray,
    pre: Preprocessing,
    batch_size: int,
) -> None:
    """Min-max ranges of the hooked tensors in the float model, as the quantiser measures them."""
    weights = [m for m in model.modules() if isinstance(m, _WeightRounding)]
    for hook in hooks:
        hook.reset()
        hook.observe = True
    for w in weights:
        w.enabled = False
    try:
        with torch.inference_mode():
            for start in range(0, len(pixels), batch_size):
                model(torch.from_numpy(pre.normalize(pixels[start : start + batch_size])))
    finally:
        for hook in hooks:
            hook.observe = False
        for w in weights:
            w.enabled = True


def quantization_aware_finetune(
    model: nn.Module,
    pre: Preprocessing,
    pixels: np.ndarray,
    targets: np.ndarray,
    calibration: np.ndarray,
    *,
    epochs: int = 2,
    lr: float = 3e-5,
    batch_size: int = 32,
    temperature: float = 2.0,
    full_range: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> QATResult:
    """Fine-tune a copy of ``model`` with the INT8 graph's rounding simulated.

    Args:
        model: The trained classifier (left untouched).
        pre: Its preprocessing (``pixels`` are normalised with it).
        pixels: ``uint8`` NHWC training images.
        targets: Their class ids (``-1``: no label; such images only follow the float model).
        calibration: ``uint8`` NHWC images whose min-max ranges set the activation rounding
            (the same ones the post-training quantiser calibrates on).
        epochs: Passes over ``pixels``.
        lr: AdamW learning rate (every parameter; small: the model only adapts to rounding;
            measured on tf_efficientnet_lite0: 3e-5 for two epochs beat 1e-5 for one on
            three runs, 1e-4 diverged).
        batch_size: Images per step.
        temperature: Softening of the float model's predictions in the distillation term.
        full_range: Round weights to 8 bits everywhere (as ``quantize_int8(full_range=True)``).
        seed: Order of the images.
        progress: Called with a line per epoch.

    Returns:
        The fine-tuned float copy (no hooks left) and what it took.

    Raises:
        ExportError: no images, or the model has no layer to quantise.
    """
    if len(pixels) == 0 or len(calibration) == 0:
        raise ExportError("quantisation-aware fine-tuning needs training and calibration images")
    if epochs < 1:
        raise ExportError(f"quantisation-aware fine-tuning needs at least one epoch, got {epochs}")
    if len(pixels) != len(targets):
        raise ExportError(f"{len(pixels)} images but {len(targets)} targets")
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    teacher = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    student = copy.deepcopy(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(True)
    hooks, handles, rounded = _instrument(student, full_range)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    steps, losses = 0, []
    try:
        for epoch in range(1, epochs + 1):
            _calibrate(student, hooks, calibration, pre, batch_size)
            order = rng.permutation(len(pixels))
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                idx = np.sort(order[start : start + batch_size])
                x = torch.from_numpy(pre.normalize(pixels[idx]))
                y = labels[idx]
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / temperature, dim=1)
                logits = student(x)
                loss = F.kl_div(
                    F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean"
                ) * (temperature**2)
                known = y >= 0
                if bool(known.any()):
                    loss = loss + F.cross_entropy(logits[known], y[known])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            losses.append(total / max(1, count))
            say(f"quantisation-aware epoch {epoch}/{epochs}: loss {losses[-1]:.4f}")
    finally:
        for handle in handles:
            handle.remove()
        for module in rounded:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return QATResult(
        model=student,
        epochs=epochs,
        steps=steps,
        images=len(pixels),
        seconds=time.perf_counter() - started,
        lr=lr,
        losses=losses,
    )
