"""Image transforms built from :class:`~visionflow.data.preprocess.Preprocessing`.

Evaluation transforms are fully determined by the preprocessing (so prediction and export can
rebuild them from a saved run); training transforms add an augmentation policy on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ConfigError

__all__ = ["AUGMENT_POLICIES", "batch_mixer", "eval_transform", "train_transform"]

AUGMENT_POLICIES = ("none", "light", "medium", "heavy")

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def _to_tensor(pre: Preprocessing) -> list[Any]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
    ]


def eval_transform(pre: Preprocessing) -> Callable[[Any], torch.Tensor]:
    """Resize the short side to ``pre.resize_size``, centre-crop ``pre.input_size``, normalise.

    The resize and crop are :meth:`Preprocessing.resize_crop` (PIL), the same code ONNX Runtime
    prediction runs without torch, so training-time evaluation and every prediction path agree.
    """
    return v2.Compose([_ResizeCrop(pre), *_to_tensor(pre)])


class _ResizeCrop:
    """Picklable (for DataLoader workers) wrapper of :meth:`Preprocessing.resize_crop`."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    def __call__(self, image: Any) -> Any:
        if isinstance(image, Image.Image):
            return self.pre.resize_crop(image)
        # tensors (tests, callers with decoded arrays) take torchvision's equivalent path
        interp = _INTERP[self.pre.interpolation]
        image = v2.functional.resize(image, self.pre.resize_size, interpolation=interp,
                                     antialias=True)  # fmt: skip
        return v2.functional.center_crop(image, self.pre.input_size)


def train_transform(
    pre: Preprocessing,
    policy: str = "medium",
    *,
    hflip: bool = True,
    strength: float = 1.0,
) -> Callable[[Any], torch.Tensor]:
    """Training transform for an augmentation ``policy``.

    * ``none``: the evaluation transform (useful for feature extraction and debugging).
    * ``light``: RandomResizedCrop (scale 0.6-1) and horizontal flip.
    * ``medium``: RandomResizedCrop (scale 0.35-1), flip, TrivialAugmentWide.
    * ``heavy``: RandomResizedCrop (scale 0.25-1), flip, RandAugment, RandomErasing.

    ``strength`` (0-2) scales RandAugment's magnitude and the random-erasing probability.
    Horizontal flips are optional because they change the meaning of text, digits and some parts.
    """
    if policy not in AUGMENT_POLICIES:
        raise ConfigError(f"augment policy must be one of {AUGMENT_POLICIES}, got {policy!r}")
    if policy == "none":
        return eval_transform(pre)
    interp = _INTERP[pre.interpolation]
    min_scale = {"light": 0.6, "medium": 0.35, "heavy": 0.25}[policy]
    ops: list[Any] = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            pre.input_size, scale=(min_scale, 1.0), interpolation=interp, antialias=True
        ),
    ]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    # the geometric ops of the auto-augment policies run on tensors, where torchvision only
    # offers nearest and bilinear sampling
    aug_interp = InterpolationMode.BILINEAR
    if policy == "medium":
        ops.append(v2.TrivialAugmentWide(interpolation=aug_interp))
    elif policy == "heavy":
        magnitude = round(min(30, max(1, 9 * strength)))
        ops.append(v2.RandAugment(num_ops=2, magnitude=magnitude, interpolation=aug_interp))
    ops.extend(_to_tensor(pre)[1:])
    if policy == "heavy":
        ops.append(v2.RandomErasing(p=min(1.0, 0.25 * strength), value=0))
    return v2.Compose(ops)


def batch_mixer(
    num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp and/or CutMix on whole batches (alpha > 0 enables each); ``None`` when both are off.

    The returned callable maps ``(images, int labels)`` to ``(images, soft labels)``.
    """
    mixers: list[Any] = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixers:
        return None
    mixer = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def apply(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_images, out_labels = mixer(images, labels)
        return out_images, out_labels

    return apply
