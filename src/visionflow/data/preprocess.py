"""Preprocessing: the one definition of how an image becomes a model input.

It comes from the pretrained weights (size, mean, std, interpolation, crop) and is stored in the
run and later in the bundle, so training, PyTorch prediction and ONNX prediction agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from visionflow.errors import ConfigError

__all__ = ["INTERPOLATIONS", "Preprocessing"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """How to turn an RGB image into a normalised tensor for one model.

    Attributes:
        input_size: Square side in pixels fed to the network.
        mean: Per-channel mean (RGB, 0-1 scale) subtracted after scaling to 0-1.
        std: Per-channel standard deviation divided out after the mean.
        interpolation: Resize filter: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        crop_pct: Evaluation resizes the short side to ``input_size / crop_pct`` and centre-crops
            ``input_size``; 1.0 means resize straight to the input size.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise ConfigError(f"preprocessing.input_size must be >= 8, got {self.input_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocessing.interpolation must be one of {INTERPOLATIONS}, "
                f"got {self.interpolation!r}"
            )
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ConfigError(f"preprocessing.crop_pct must be in [0.1, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("preprocessing.mean and .std need 3 values, std > 0")

    @property
    def resize_size(self) -> int:
        """Short-side size before the centre crop at evaluation time."""
        return math.floor(self.input_size / self.crop_pct)

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize the short side to :attr:`resize_size` and centre-crop :attr:`input_size`.

        The one geometric step of evaluation-time preprocessing, in PIL, shared by the training
        loop's evaluation transform, PyTorch prediction and ONNX Runtime prediction (which must
        not need torch), so the three see the same pixels.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        short = self.resize_size
        if width <= height:
            size = (short, max(1, int(short * height / width)))
        else:
            size = (max(1, int(short * width / height)), short)
        if size != image.size:
            image = image.resize(size, _PIL_FILTERS[self.interpolation])
        width, height = image.size
        side = self.input_size
        if width < side or height < side:  # only when crop_pct > 1 would allow it; pad like TF
            canvas = Image.new("RGB", (max(width, side), max(height, side)))
            canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
            image, width, height = canvas, canvas.width, canvas.height
        left = round((width - side) / 2.0)
        top = round((height - side) / 2.0)
        return image.crop((left, top, left + side, top + side))

    def pixels(self, images: list[Image.Image]) -> np.ndarray:
        """``uint8`` batch ``(N, input_size, input_size, 3)`` of resized, cropped images: the
        input of exported graphs, which normalise inside (see :meth:`normalize`)."""
        side = self.input_size
        out = np.empty((len(images), side, side, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            out[i] = np.asarray(self.resize_crop(image), dtype=np.uint8)
        return out

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """``uint8`` NHWC pixels to the ``float32`` NCHW tensor the network takes:
        ``(pixels / 255 - mean) / std``, computed as ``pixels * scale + shift`` like the graph."""
        scale, shift = self.affine()
        x = pixels.astype(np.float32).transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x * scale[None, :, None, None] + shift[None, :, None, None])

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``scale`` and ``shift`` with ``normalised = pixel * scale + shift``."""
        std = np.asarray(self.std, dtype=np.float64)
        mean = np.asarray(self.mean, dtype=np.float64)
        return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)

    def with_size(self, input_size: int) -> Preprocessing:
        return replace(self, input_size=int(input_size))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Preprocessing:
        unknown = set(obj) - {"input_size", "mean", "std", "interpolation", "crop_pct"}
        if unknown:
            raise ConfigError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(
            input_size=int(obj.get("input_size", 224)),
            mean=_triple(obj.get("mean", (0.485, 0.456, 0.406)), "mean"),
            std=_triple(obj.get("std", (0.229, 0.224, 0.225)), "std"),
            interpolation=str(obj.get("interpolation", "bicubic")),
            crop_pct=float(obj.get("crop_pct", 0.875)),
        )

    @classmethod
    def from_timm_config(cls, cfg: dict[str, Any]) -> Preprocessing:
        """Build from a timm ``pretrained_cfg`` / ``resolve_data_config`` dict."""
        size = cfg.get("input_size", (3, 224, 224))
        side = int(size[-1]) if isinstance(size, list | tuple) else int(size)
        interp = str(cfg.get("interpolation", "bicubic"))
        if interp not in INTERPOLATIONS:
            interp = "bicubic"
        return cls(
            input_size=side,
            mean=_triple(cfg.get("mean", (0.485, 0.456, 0.406)), "mean"),
            std=_triple(cfg.get("std", (0.229, 0.224, 0.225)), "std"),
            interpolation=interp,
            crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
        )


_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    vals = [float(v) for v in value]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ConfigError(f"preprocessing.{name} needs 3 values, got {value!r}")
    return (vals[0], vals[1], vals[2])
