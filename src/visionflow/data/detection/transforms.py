"""Box-aware augmentation and the PyTorch dataset of detection records.

The transforms are torchvision ``transforms.v2`` pipelines over ``(image, target)`` where
``target["boxes"]`` is a :class:`torchvision.tv_tensors.BoundingBoxes` (``XYXY``, with the
image's ``canvas_size``), so every geometric operation moves the boxes with the pixels:

* :func:`detection_train_transform`: photometric jitter (``ColorJitter``), zoom-out
  (``RandomZoomOut``: the image on a larger mean-coloured canvas, objects get smaller), SSD's IoU
  crop (``RandomIoUCrop``: objects get larger; skipped for images without boxes), horizontal
  flip, a random longer side (scale jitter), then ``ClampBoundingBoxes`` and
  ``SanitizeBoundingBoxes``, which drops the boxes a crop left empty or smaller than a pixel
  together with their labels and crowd flags;
* :func:`detection_eval_transform`: the longer side resized to ``size``, nothing random.

Both end with float32 images in ``[0, 1]`` and no normalisation: torchvision's detection models
normalise inside (``GeneralizedRCNNTransform``), and so will ours.

:class:`DetectionDataset` serves ``(image, {"boxes": float32 N x 4, "labels": int64 N,
"iscrowd": int64 N, "image_id": int})``; :func:`collate_detection` batches them as the lists
torchvision detection models take. With a ``seed`` the augmentation of sample ``i`` in epoch ``e``
is the same whatever the worker, the order or the process (the global torch RNG is forked and
restored around it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visionflow.data.detection.records import DetectionSample
from visionflow.data.images import DEFAULT_MAX_PIXELS, load_image
from visionflow.errors import ConfigError, DataError

__all__ = [
    "DetectionDataset",
    "collate_detection",
    "detection_eval_transform",
    "detection_train_transform",
]

#: Canvas colour of zoom-out: ImageNet's mean RGB, as in torchvision's SSD reference recipe.
ZOOM_OUT_FILL = (124, 116, 104)

Target = dict[str, Any]


def _labels_and_crowd(inputs: Any) -> tuple[torch.Tensor, ...]:
    """What ``SanitizeBoundingBoxes`` must filter together with the boxes (module level, so
    the transform pickles into DataLoader workers)."""
    target = inputs[1]
    return tuple(target[key] for key in ("labels", "iscrowd") if key in target)


def _has_boxes(inputs: Any) -> bool:
    flat, _ = tree_flatten(inputs)
    return any(isinstance(x, tv_tensors.BoundingBoxes) and x.shape[0] > 0 for x in flat)


class _IoUCrop(v2.RandomIoUCrop):
    """SSD's IoU crop applied with probability ``p``, and never to an image without boxes (its
    search for a crop holding a box centre would spin through every trial in vain)."""

    def __init__(self, p: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.p = p

    def forward(self, *inputs: Any) -> Any:
        passthrough = inputs if len(inputs) > 1 else inputs[0]
        if not _has_boxes(passthrough) or float(torch.rand(1)) >= self.p:
            return passthrough
        return super().forward(*inputs)


class _ResizeLongSide(v2.Transform):
    """Resize so the longer side is ``size`` times a factor drawn from ``scale_range``
    (aspect ratio kept); with ``scale_range=(1, 1)`` a deterministic resize for evaluation."""

    def __init__(self, size: int, scale_range: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        self.size = size
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        scale = lo if lo == hi else lo + (hi - lo) * float(torch.rand(1))
        factor = self.size * scale / max(height, width)
        return {
            "size": [max(1, round(height * factor)), max(1, round(width * factor))],
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


def _finish() -> list[Any]:
    return [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_and_crowd),
        v2.ToDtype(torch.float32, scale=True),
    ]


def detection_train_transform(
    size: int = 512,
    *,
    hflip: bool = True,
    photometric: float = 0.5,
    zoom_out: float = 0.5,
    max_zoom_out: float = 2.0,
    iou_crop: float = 0.5,
    scale_range: tuple[float, float] = (0.75, 1.0),
) -> Callable[..., Any]:
    """A box-aware training augmentation ending at a longer side near ``size``.

    Args:
        size: Longer side of the output, before scale jitter.
        hflip: Random horizontal flips (off for text, digits, left/right classes).
        photometric: Probability of brightness/contrast/saturation/hue jitter.
        zoom_out: Probability of placing the image on a canvas up to ``max_zoom_out`` times
            larger (objects get smaller).
        max_zoom_out: Largest canvas side as a multiple of the image's (at least 1).
        iou_crop: Probability of SSD's IoU crop (objects get larger; boxes whose centre leaves
            the crop are dropped, the others clipped).
        scale_range: The longer side is ``size`` times a factor drawn from this range.

    Raises:
        ConfigError: A size, probability or range out of bounds.
    """
    _check_size(size)
    for name, p in (("photometric", photometric), ("zoom_out", zoom_out), ("iou_crop", iou_crop)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{name} is a probability in [0, 1], got {p}")
    if max_zoom_out < 1.0:
        raise ConfigError(f"max_zoom_out must be at least 1, got {max_zoom_out}")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ConfigError(
            f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}"
        )
    ops: list[Any] = [v2.ToImage()]
    if photometric > 0:
        jitter = v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)
        ops.append(v2.RandomApply([jitter], p=photometric))
    if zoom_out > 0 and max_zoom_out > 1.0:
        ops.append(v2.RandomZoomOut(fill=ZOOM_OUT_FILL, side_range=(1.0, max_zoom_out), p=zoom_out))
    if iou_crop > 0:
        ops.append(_IoUCrop(p=iou_crop))
    if hflip:
        ops.append(v2.RandomHorizontalFlip(p=0.5))
    ops.append(_ResizeLongSide(size, (lo, hi)))
    ops.extend(_finish())
    return v2.Compose(ops)


def detection_eval_transform(size: int = 512) -> Callable[..., Any]:
    """Resize the longer side to ``size`` (aspect kept); boxes follow; nothing random."""
    _check_size(size)
    return v2.Compose([v2.ToImage(), _ResizeLongSide(size), *_finish()])


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ConfigError(f"size must be an integer of at least 8 pixels, got {size!r}")


class DetectionDataset(Dataset[tuple[torch.Tensor, Target]]):
    """Detection records -> ``(float image C x H x W, target)``, as torchvision models take.

    Args:
        samples: The records to serve, in order.
        classes: The class list; a box's label id is its position plus ``label_offset``.
        transform: A transform of ``(image, target)`` (see :func:`detection_train_transform`);
            ``None`` only converts the image to a float tensor.
        label_offset: Added to every class id. 1 (default) leaves 0 for the background, as
            torchvision's Faster R-CNN, RetinaNet, SSD and FCOS expect.
        seed: When set, each sample's augmentation is drawn from a generator seeded with
            ``(seed, epoch, index)`` (see :meth:`set_epoch`), so it is reproducible.
        max_pixels: Decompression-bomb guard passed to the decoder.
    """

    def __init__(
        self,
        samples: Sequence[DetectionSample],
        classes: Sequence[str],
        transform: Callable[..., Any] | None = None,
        *,
        label_offset: int = 1,
        seed: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.label_offset = label_offset
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Draw different (still reproducible) augmentations in each epoch."""
        self.epoch = int(epoch)

    def target(self, i: int) -> Target:
        """Sample ``i``'s target before any transform (boxes as ``BoundingBoxes``).

        Raises:
            DataError: A box names a class outside ``classes``.
        """
        sample = self.samples[i]
        ids = {name: k for k, name in enumerate(self.classes)}
        unknown = sorted(set(sample.labels) - set(ids))
        if unknown:
            raise DataError(
                f"{sample.source or sample.path}: class(es) {unknown} are not in the class list "
                f"{self.classes}"
            )
        boxes = torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                boxes, format="XYXY", canvas_size=(sample.height, sample.width)
            ),
            "labels": torch.tensor(
                [ids[name] + self.label_offset for name in sample.labels], dtype=torch.int64
            ),
            "iscrowd": torch.tensor(sample.iscrowd, dtype=torch.int64),
            "image_id": i,
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        sample = self.samples[i]
        image = load_image(sample.path, max_pixels=self.max_pixels)
        if image.size != (sample.width, sample.height):
            raise DataError(
                f"{sample.path}: the image is {image.width}x{image.height} pixels but its record "
                f"says {sample.width}x{sample.height}; the file changed since the dataset was "
                "read: read it again"
            )
        target = self.target(i)
        out_image: Any
        if self.transform is None:
            out_image = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        elif self.seed is None:
            out_image, target = self.transform(image, target)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sample_seed(self.seed, self.epoch, i))
                out_image, target = self.transform(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor).to(torch.float32)
        return out_image.as_subclass(torch.Tensor), target


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing the three numbers (nearby inputs give unrelated streams)."""
    words = [value & 0xFFFFFFFFFFFFFFFF for value in (seed, epoch, index)]  # non-negative
    state = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Images and targets as two lists (images differ in size; detection models batch them)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
