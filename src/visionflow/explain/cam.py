"""Class-activation maps: where in an image a trained classifier found the evidence for a class.

The maps come from the ``grad-cam`` package (import name ``pytorch_grad_cam``): Grad-CAM and its
relatives weight the activations of one late feature layer by how much they raise the score of
a class, and the result is up-sampled to the model's input size. What this module adds:

* a **method registry** (:data:`CAM_METHODS`, :func:`register_cam_method`);
* :func:`find_target_layer`, which picks that layer for any timm backbone by tracing one dummy
  forward pass: the module whose output ``forward_features`` returns (the module feeding the
  head) for CNNs, the last block's first norm for ViT-like token models (with a
  reshape to the token grid), channels-last (``NHWC``) stages permuted; when the last map is
  smaller than 2x2 at this input size (a 32 px run of a stride-32 network), the deepest
  ``feature_info`` stage that still has a 2x2 map is used instead;
* :func:`explain`, which runs a method on images exactly as prediction preprocesses them, with
  gradients enabled even inside ``torch.inference_mode`` and with frozen parameters, and leaves
  the model as it found it (train/eval flags, ``requires_grad``, ``.grad``, no hooks left);
* overlay PNGs (the heat map on the image the model saw, optionally next to the original),
  written atomically under collision-free names;
* :func:`cam_gallery_section`, a report section of correctly and wrongly classified images,
  and :func:`run_gallery_section`, its never-failing, deadline-aware form for training runs.
"""

from __future__ import annotations

import difflib
import functools
import html
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from visionflow._io import _fsync_dir
from visionflow.data.images import DEFAULT_MAX_PIXELS, load_image
from visionflow.data.index import Sample
from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ConfigError, ImageDecodeError
from visionflow.evaluate.report import ReportSection, html_image
from visionflow.prediction import ImageInput, as_list, to_image

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "CAM_METHODS",
    "CamMethod",
    "CamModel",
    "Explainable",
    "Explanation",
    "TargetLayer",
    "cam_gallery_section",
    "explain",
    "find_target_layer",
    "register_cam_method",
    "resolve_method",
    "run_gallery_section",
]

_log = logging.getLogger(__name__)

#: Overlays smaller than this (side, pixels) are enlarged by an integer factor for viewing.
MIN_DISPLAY_SIDE = 128


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class CamMethod:
    """A CAM method: its name, the ``pytorch_grad_cam`` class (or a subclass) that computes it
    and what it does.

    ``load`` returns the class; it imports ``pytorch_grad_cam`` (OpenCV, matplotlib) only when
    a map is made, so ``visionflow`` starts fast. ``uses_target`` is false for methods that
    ignore the class (EigenCAM shows the principal component of the activations).
    """

    name: str
    load: Callable[[], Any]
    description: str
    uses_target: bool = True

    def cam_class(self) -> Any:
        return self.load()


#: Registered methods by name (see :func:`register_cam_method`).
CAM_METHODS: dict[str, CamMethod] = {}


def register_cam_method(
    name: str,
    cam_class: str | Callable[[], Any],
    description: str,
    *,
    uses_target: bool = True,
) -> CamMethod:
    """Register a CAM method under ``name``: a class name of ``pytorch_grad_cam`` or a function
    returning a :class:`pytorch_grad_cam.base_cam.BaseCAM` subclass. A duplicate name is an
    error."""
    key = name.lower()
    if key in CAM_METHODS:
        raise ConfigError(f"CAM method {key!r} is already registered")
    load = _package_class(cam_class) if isinstance(cam_class, str) else cam_class
    method = CamMethod(key, load, description, uses_target)
    CAM_METHODS[key] = method
    return method


def _package_class(class_name: str) -> Callable[[], Any]:
    def load() -> Any:
        import pytorch_grad_cam

        return getattr(pytorch_grad_cam, class_name)

    return load


@functools.cache
def _eigencam() -> Any:
    """``pytorch_grad_cam.EigenCAM`` with a thin SVD and a fixed sign.

    The package takes a full SVD of the ``(H*W, C)`` activations, whose ``C x C`` factor costs
    1.6 s per image for a 1280-channel EfficientNet map; the first principal component needs
    only the thin one. Its sign is arbitrary, so it is chosen to make the strongest response
    positive (as Seg-Eigen-CAM does), instead of whatever LAPACK returns.
    """
    from pytorch_grad_cam import EigenCAM

    class _EigenCAM(EigenCAM):
        def get_cam_image(
            self,
            input_tensor: Any,
            target_layer: Any,
            targets: Any,
            activations: Any,
            grads: Any,
            eigen_smooth: bool = False,
        ) -> np.ndarray:
            return _first_component(np.asarray(activations))

    return _EigenCAM


def _first_component(batch: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` activations to ``(N, H, W)``: projection on the first principal axis."""
    out = []
    for acts in np.nan_to_num(batch.astype(np.float64)):
        flat = acts.reshape(acts.shape[0], -1).T
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        projection = (flat @ vt[0]).reshape(acts.shape[1:])
        if abs(projection.min()) > abs(projection.max()):
            projection = -projection
        out.append(projection)
    return np.asarray(out, dtype=np.float32)


register_cam_method("gradcam", "GradCAM", "gradients averaged per channel weight the activations")
register_cam_method(
    "gradcam++", "GradCAMPlusPlus", "second-order gradient weights; sharper with several objects"
)
register_cam_method("xgradcam", "XGradCAM", "activation-normalised gradient weights")
register_cam_method("hirescam", "HiResCAM", "gradients times activations element-wise")
register_cam_method(
    "layercam", "LayerCAM", "positive gradients times activations, position by position"
)
register_cam_method(
    "eigencam",
    _eigencam,
    "first principal component of the activations (no gradients; the same for every class)",
    uses_target=False,
)


def resolve_method(name: str) -> CamMethod:
    """The registered method called ``name`` (case-insensitive)."""
    method = CAM_METHODS.get(str(name).lower())
    if method is None:
        raise ConfigError(
            f"unknown CAM method {name!r}{_did_you_mean(str(name).lower(), CAM_METHODS)}; "
            f"choose one of {sorted(CAM_METHODS)}"
        )
    return method


def _did_you_mean(value: str, choices: Sequence[str] | dict[str, Any]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------- model
class Explainable(Protocol):
    """What :func:`explain` needs of a model: :class:`visionflow.api.ClassifierModel` has it,
    :class:`CamModel` wraps a bare network."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def classes(self) -> Sequence[str]: ...

    @property
    def preprocessing(self) -> Preprocessing: ...

    @property
    def device(self) -> torch.device: ...


@dataclass
class CamModel:
    """A network (images -> logits) with its class names, preprocessing and device."""

    model: nn.Module
    classes: Sequence[str]
    preprocessing: Preprocessing
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


# ----------------------------------------------------------------------------- target layer
@dataclass(frozen=True)
class TargetLayer:
    """The layer a CAM is computed on.

    Attributes:
        module: The module whose output is used.
        name: Its dotted name inside the model given to :func:`find_target_layer`.
        kind: ``"conv"`` (NCHW maps), ``"nhwc"`` (channels-last maps) or ``"tokens"``.
        grid: Height and width of its map at the traced input size.
        reshape: Turns the module's output into ``(N, C, H, W)``; ``None`` for NCHW maps.
    """

    module: nn.Module
    name: str
    kind: str
    grid: tuple[int, int]
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None


class _TokensToGrid:
    """``(N, prefix + H*W, C)`` tokens to ``(N, C, H, W)`` (class/register tokens dropped)."""

    def __init__(self, prefix: int) -> None:
        self.prefix = prefix

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        n, count, channels = tokens.shape
        side = math.isqrt(count - self.prefix)
        grid = tokens[:, self.prefix :, :].reshape(n, side, side, channels)
        return grid.permute(0, 3, 1, 2)


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def find_target_layer(model: nn.Module, input_size: int) -> TargetLayer:
    """Pick the layer to compute CAMs on for ``model`` at ``input_size`` pixels.

    ``model`` is a :class:`~visionflow.models.heads.TaskModel` (its backbone is searched) or a
    backbone. One dummy forward pass (no gradients, eval mode, restored afterwards) records every
    module's output; the choice is described in the module docstring.

    Raises:
        ConfigError: The backbone fails on a ``input_size`` image, or has no layer with a
            spatial map or token grid (an MLP, or a network that pools early).
    """
    backbone = getattr(model, "backbone", None)
    prefix = "backbone." if isinstance(backbone, nn.Module) else ""
    net: nn.Module = backbone if isinstance(backbone, nn.Module) else model
    arch = type(net).__name__
    order = {id(m): i for i, (_, m) in enumerate(net.named_modules())}
    names = {id(m): n for n, m in net.named_modules() if n}
    records: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            records.append((module, output))

    handles = [m.register_forward_hook(hook) for n, m in net.named_modules() if n]
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    forward = getattr(net, "forward_features", None)
    try:
        with _preserved_state(net), torch.no_grad():
            x = torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype)
            final = forward(x) if callable(forward) else net(x)
    except Exception as exc:
        raise ConfigError(
            f"backbone {arch} fails on a {input_size}x{input_size} image ({exc}); "
            "a CAM needs the model to run at its preprocessing input size"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    try:
        return _choose_layer(net, prefix, final, records, order, names, input_size)
    finally:
        records.clear()


def _choose_layer(
    net: nn.Module,
    prefix: str,
    final: Any,
    records: list[tuple[nn.Module, torch.Tensor]],
    order: dict[int, int],
    names: dict[int, str],
    input_size: int,
) -> TargetLayer:
    arch = type(net).__name__

    def layer(module: nn.Module, kind: str, out: torch.Tensor) -> TargetLayer:
        if kind == "tokens":
            count = int(out.shape[1])
            n_prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
            side = math.isqrt(max(count - n_prefix, 0))
            if side * side != count - n_prefix and n_prefix == 0 and _square(count - 1):
                n_prefix, side = 1, math.isqrt(count - 1)  # a class token timm did not declare
            if side < 1 or side * side != count - n_prefix:
                raise ConfigError(
                    f"backbone {arch}: {count} tokens ({n_prefix} prefix) do not form a square "
                    f"grid at {input_size} px, so a CAM cannot be laid over the image"
                )
            return TargetLayer(
                module, prefix + names[id(module)], kind, (side, side), _TokensToGrid(n_prefix)
            )
        grid = (int(out.shape[1]), int(out.shape[2])) if kind == "nhwc" else _hw(out)
        reshape = _nhwc_to_nchw if kind == "nhwc" else None
        return TargetLayer(module, prefix + names[id(module)], kind, grid, reshape)

    def producer(target: torch.Tensor) -> tuple[nn.Module, torch.Tensor] | None:
        same = [(m, o) for m, o in records if o is target]
        if same:  # the outermost of the modules returning this very tensor
            return min(same, key=lambda r: order[id(r[0])])
        shaped = [(m, o) for m, o in records if o.shape == target.shape]
        return shaped[-1] if shaped else None

    nhwc = str(getattr(net, "output_fmt", "NCHW")).upper().endswith("NHWC")
    kind4 = "nhwc" if nhwc else "conv"

    def big_enough(out: torch.Tensor) -> bool:
        if out.ndim != 4:
            return False
        h, w = (out.shape[1], out.shape[2]) if nhwc else (out.shape[2], out.shape[3])
        return h >= 2 and w >= 2

    if isinstance(final, torch.Tensor) and final.ndim == 3:
        blocks = getattr(net, "blocks", None)
        last = blocks[-1] if isinstance(blocks, nn.Sequential | nn.ModuleList) else None
        norm1 = getattr(last, "norm1", None) if last is not None else None
        if isinstance(norm1, nn.Module) and id(norm1) in names:
            # with class-token pooling only the tokens entering the last attention reach the
            # head, so the final norm's patch tokens would get no gradient at all
            outs = [o for m, o in records if m is norm1 and o.ndim == 3]
            if outs:
                return layer(norm1, "tokens", outs[-1])
        found = producer(final)
        if found is not None:
            return layer(found[0], "tokens", found[1])
    if isinstance(final, torch.Tensor) and final.ndim == 4 and big_enough(final):
        found = producer(final)
        if found is not None:
            return layer(found[0], kind4, found[1])
    # the last map is too small at this size (or not a map): the deepest stage that is not
    for info in reversed(_feature_modules(net)):
        module = _submodule(net, info)
        outs = [o for m, o in records if m is module and big_enough(o)]
        if module is not None and outs:
            return layer(module, kind4, outs[-1])
    for module, out in reversed(records):
        if big_enough(out):
            return layer(module, kind4, out)
    raise ConfigError(
        f"backbone {arch} has no layer with a spatial feature map (at least 2x2) or a token grid "
        f"at {input_size} px, so no class-activation map can be computed for it; CAMs work for "
        "CNN and ViT-like timm backbones (a larger input size may help a tiny one)"
    )


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _hw(out: torch.Tensor) -> tuple[int, int]:
    return int(out.shape[2]), int(out.shape[3])


def _feature_modules(net: nn.Module) -> list[str]:
    info = getattr(net, "feature_info", None)
    if info is None:
        return []
    try:
        return [str(entry["module"]) for entry in info if isinstance(entry, dict)]
    except (TypeError, KeyError):
        return []


def _submodule(net: nn.Module, name: str) -> nn.Module | None:
    try:
        return net.get_submodule(name)
    except AttributeError:
        return None


@contextmanager
def _preserved_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters inside; every module's mode, every parameter's
    ``requires_grad`` and ``.grad`` as they were afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


# ----------------------------------------------------------------------------- explain
@dataclass(frozen=True)
class Explanation:
    """One image's class-activation map.

    Attributes:
        source: The input (a path, or ``<PIL.Image>``/``<array>``/``<bytes>``).
        method: The CAM method.
        predicted: The model's top class and its ``probability``.
        target: The class the map explains (``predicted`` unless one was requested) and its
            ``target_probability``.
        cam: ``float32`` map of shape ``(input_size, input_size)`` in ``[0, 1]``, aligned with
            the resized, centre-cropped image the model saw (1 = strongest evidence).
        overlay: The PNG written (``None`` when no output folder was given).
        layer: The layer the map was computed on.
    """

    source: str
    method: str
    predicted: str
    probability: float
    target: str
    target_probability: float
    cam: np.ndarray
    overlay: Path | None
    layer: str

    def to_json(self) -> dict[str, Any]:
        peak_row, peak_col = np.unravel_index(int(np.argmax(self.cam)), self.cam.shape)
        return {
            "source": self.source,
            "method": self.method,
            "predicted": self.predicted,
            "probability": self.probability,
            "target": self.target,
            "target_probability": self.target_probability,
            "overlay": str(self.overlay) if self.overlay is not None else None,
            "layer": self.layer,
            "cam_size": list(self.cam.shape),
            "cam_peak": {"row": int(peak_row), "col": int(peak_col)},
        }


def explain(
    subject: Explainable,
    inputs: ImageInput | Sequence[ImageInput],
    *,
    method: str = "gradcam",
    target: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    sources: Sequence[str] | None = None,
    side_by_side: bool = True,
    batch_size: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    layer: TargetLayer | None = None,
) -> list[Explanation]:
    """Class-activation maps of ``subject``'s predictions, one :class:`Explanation` per input.

    Args:
        subject: A :class:`~visionflow.api.ClassifierModel` or a :class:`CamModel`.
        inputs: Paths, PIL images, ``HxW[xC]`` arrays or encoded bytes, as for ``predict``.
        method: A name of :data:`CAM_METHODS` (``gradcam``, ``gradcam++``, ``eigencam``...).
        target: Explain this class for every image instead of each image's prediction.
        out_dir: Write an overlay PNG per image here (created if needed; existing files are
            never replaced: a taken name gets ``-1``, ``-2``...). ``None``: no files.
        sources: Names for the inputs (overlay file names, :attr:`Explanation.source`); default:
            the paths as given.
        side_by_side: The overlay PNG also shows the original image on the left.
        batch_size: Images per forward/backward pass.
        max_pixels: Decompression-bomb guard for decoded files.
        layer: The layer to use (default: :func:`find_target_layer`).

    Raises:
        ConfigError: Unknown method or class, or a backbone with no usable layer.
        ImageDecodeError: An input file is missing or not a decodable image (names the file).
    """
    cam_method = resolve_method(method)
    classes = list(subject.classes)
    target_index = _class_index(target, classes) if target is not None else None
    items = as_list(inputs)
    if sources is not None and len(sources) != len(items):
        raise ConfigError(f"sources: {len(sources)} names for {len(items)} inputs")
    names = list(sources) if sources is not None else [_source_name(i) for i in items]
    pre = subject.preprocessing
    model = subject.model
    chosen = layer or find_target_layer(model, pre.input_size)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results: list[Explanation] = []
    with _preserved_state(model), torch.inference_mode(False), torch.enable_grad():
        # gradients start at the target layer: registered first, this hook hands the CAM's own
        # hooks (and the rest of the network) a copy of its output that requires grad, so the
        # backward pass stops there instead of running through the whole frozen backbone
        leaf = chosen.module.register_forward_hook(_gradient_starts_here)
        cam = None
        try:
            cam = cam_method.cam_class()(
                model=model, target_layers=[chosen.module], reshape_transform=chosen.reshape
            )
            for start in range(0, len(items), max(1, batch_size)):
                chunk = items[start : start + max(1, batch_size)]
                images = [to_image(item, max_pixels)[0] for item in chunk]
                crops = [pre.resize_crop(image) for image in images]
                pixels = np.stack([np.asarray(c, dtype=np.uint8) for c in crops])
                x = torch.from_numpy(pre.normalize(pixels)).to(subject.device)
                x = x.contiguous(memory_format=torch.channels_last)
                targets = None
                if target_index is not None:
                    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

                    targets = [ClassifierOutputTarget(target_index) for _ in chunk]
                maps = cam(input_tensor=x, targets=targets)
                probs = torch.softmax(cam.outputs.detach().float(), dim=1).cpu().numpy()
                cam.outputs = None  # drop the graph
                for j, (image, crop) in enumerate(zip(images, crops, strict=True)):
                    results.append(
                        _explanation(
                            names[start + j],
                            start + j,
                            cam_method.name,
                            classes,
                            probs[j],
                            target_index,
                            maps[j],
                            image,
                            crop,
                            out,
                            side_by_side,
                            chosen.name,
                        )
                    )
        finally:
            leaf.remove()
            if cam is not None:
                cam.activations_and_grads.release()
    return results


def _gradient_starts_here(module: nn.Module, inputs: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        # a clone, so an in-place operation after the layer does not touch a leaf
        return output.detach().requires_grad_(True).clone()
    return None


def _explanation(
    source: str,
    position: int,
    method: str,
    classes: list[str],
    probs: np.ndarray,
    target_index: int | None,
    grey: np.ndarray,
    image: Image.Image,
    crop: Image.Image,
    out: Path | None,
    side_by_side: bool,
    layer: str,
) -> Explanation:
    predicted = int(np.argmax(probs))
    shown = predicted if target_index is None else target_index
    cam_map = np.clip(np.nan_to_num(np.asarray(grey, dtype=np.float32)), 0.0, 1.0)
    overlay = None
    if out is not None:
        png = _overlay_png(crop, cam_map, image if side_by_side else None)
        stem = _file_stem(source, position)
        suffix = f".{method}" + (f".{_safe(classes[shown])}" if target_index is not None else "")
        overlay = _write_new(out, stem + suffix, ".png", png)
    return Explanation(
        source=source,
        method=method,
        predicted=classes[predicted],
        probability=float(probs[predicted]),
        target=classes[shown],
        target_probability=float(probs[shown]),
        cam=cam_map,
        overlay=overlay,
        layer=layer,
    )


def _class_index(label: str, classes: list[str]) -> int:
    if label in classes:
        return classes.index(label)
    raise ConfigError(
        f"target class {label!r} is not a class of this model{_did_you_mean(label, classes)}; "
        f"its classes are {classes}"
    )


def _source_name(item: ImageInput) -> str:
    if isinstance(item, str | Path):
        return str(item)
    if isinstance(item, Image.Image):
        return "<PIL.Image>"
    if isinstance(item, bytes):
        return "<bytes>"
    return "<array>"


# ----------------------------------------------------------------------------- overlays
def overlay_image(
    crop: Image.Image, cam_map: np.ndarray, original: Image.Image | None = None
) -> Image.Image:
    """The heat map (jet colours, half transparent) on ``crop``, the image the model saw;
    with ``original`` to its left, scaled to the same height, when given."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(crop.convert("RGB"), dtype=np.float32) / 255.0
    blended = Image.fromarray(show_cam_on_image(rgb, cam_map, use_rgb=True, image_weight=0.5))
    side = blended.width
    if side < MIN_DISPLAY_SIDE:
        factor = math.ceil(MIN_DISPLAY_SIDE / side)
        blended = blended.resize((side * factor, side * factor), Image.Resampling.NEAREST)
    if original is None:
        return blended
    height = blended.height
    width = max(1, min(3 * height, round(original.width * height / max(1, original.height))))
    left = original.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    gap = max(2, height // 32)
    canvas = Image.new("RGB", (width + gap + blended.width, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(blended, (width + gap, 0))
    return canvas


def _overlay_png(crop: Image.Image, cam_map: np.ndarray, original: Image.Image | None) -> bytes:
    import io

    buf = io.BytesIO()
    overlay_image(crop, cam_map, original).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def _safe(text: str, limit: int = 60) -> str:
    cleaned = _UNSAFE.sub("-", text).strip("-.")
    return cleaned[:limit] or "x"


def _file_stem(source: str, position: int) -> str:
    if source.startswith("<") and source.endswith(">"):
        return f"image-{position:04d}"
    return _safe(Path(source).stem)


def _write_new(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write ``data`` atomically to ``folder/stem+suffix``, or ``stem-1+suffix``... when taken.

    The bytes go to a fsynced temp file that is hard-linked to the first free name (a link
    never replaces an existing file, so two writers cannot take the same name), then removed.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        for n in range(100_000):
            target = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            try:
                os.link(tmp, target)
            except FileExistsError:
                continue
            except OSError:  # no hard links here (some network/FAT file systems)
                if target.exists():
                    continue
                os.replace(tmp, target)
            _fsync_dir(folder)
            return target
        raise ConfigError(f"{folder}: no free file name for {stem}{suffix}; empty the folder")
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- report
def cam_gallery_section(
    model: Explainable,
    samples: Sequence[Sample],
    out_dir: str | os.PathLike[str],
    *,
    correct: int = 6,
    incorrect: int = 6,
    method: str = "gradcam",
    probabilities: np.ndarray | None = None,
    batch_size: int = 6,
    stop: Callable[[], bool] | None = None,
    split: str | None = None,
) -> ReportSection:
    """A report section of heat maps: up to ``correct`` correctly and ``incorrect`` wrongly
    classified ``samples`` (labelled images), each with its given and predicted label.

    Correct examples are taken class by class in turn (most confident first), mistakes most
    confident first: those are the ones worth looking at. Unreadable files are left out.

    Args:
        model: The classifier (see :class:`Explainable`).
        samples: Labelled images of a held-out split.
        out_dir: Where the overlay PNGs go (they are also embedded in the HTML).
        probabilities: Already computed class probabilities of ``samples`` (rows in order,
            columns in class order), e.g. the run's evaluation; default: predicted here.
        batch_size: Images per CAM pass.
        stop: Called between batches; ``True`` leaves the remaining images out (a deadline).
        split: The split's name for the text (``"test"``...).
    """
    started = time.monotonic()
    cam_method = resolve_method(method)
    classes = list(model.classes)
    labelled = [s for s in samples if s.label is not None and s.label in classes]
    notes: list[str] = []
    if len(labelled) < len(samples):
        notes.append(f"{len(samples) - len(labelled)} image(s) without a known label left out")
    probs = probabilities
    if probs is not None and (probs.ndim != 2 or probs.shape[0] != len(samples)):
        probs = None  # not aligned with the samples: predict here
    if probs is None:
        probs = _predict(model, [s.path for s in labelled], batch_size, notes)
    else:
        keep = [i for i, s in enumerate(samples) if s.label is not None and s.label in classes]
        probs = np.asarray(probs)[keep]
    chosen_ok, chosen_bad = _pick(labelled, probs, classes, correct, incorrect)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    layer = find_target_layer(model.model, model.preprocessing.input_size)
    shown: dict[str, list[tuple[Sample, Explanation]]] = {"ok": [], "bad": []}
    queue = [("ok", s) for s in chosen_ok] + [("bad", s) for s in chosen_bad]
    for start in range(0, len(queue), max(1, batch_size)):
        if stop is not None and stop():
            notes.append(f"{len(queue) - start} image(s) left out: the time budget ran out")
            break
        batch: list[tuple[str, Sample, Image.Image]] = []
        for group, sample in queue[start : start + max(1, batch_size)]:
            try:
                batch.append((group, sample, load_image(sample.path)))
            except ImageDecodeError as exc:
                notes.append(f"{sample.path.name}: {exc.reason}")
        if not batch:
            continue
        found = explain(
            model,
            [image for _, _, image in batch],
            method=cam_method.name,
            out_dir=folder,
            sources=[str(s.path) for _, s, _ in batch],
            batch_size=len(batch),
            layer=layer,
        )
        for (group, sample, _), expl in zip(batch, found, strict=True):
            shown[group].append((sample, expl))
    seconds = time.monotonic() - started
    where = f" of the {html.escape(split)} split" if split else ""
    parts = [
        f"<p>Where the model looked: <strong>{html.escape(cam_method.name)}</strong> "
        f"({html.escape(cam_method.description)}) on layer <code>{html.escape(layer.name)}</code>"
        f" ({layer.grid[0]}x{layer.grid[1]} map), for images{where}. Left: the image; right: the "
        "part the model saw (resized, centre-cropped) with the heat map of the predicted class "
        f"(red: strongest evidence). {len(queue)} image(s), {seconds:.1f} s.</p>"
    ]
    ok_total = int(sum(1 for s, p in zip(labelled, probs, strict=True) if _right(s, p, classes)))
    bad_total = len(labelled) - ok_total
    parts.append(f"<h3>Correctly classified ({len(shown['ok'])} of {ok_total} shown)</h3>")
    parts.append(_figures(shown["ok"]) if shown["ok"] else "<p>none</p>")
    parts.append(f"<h3>Misclassified ({len(shown['bad'])} of {bad_total} shown)</h3>")
    parts.append(_figures(shown["bad"]) if shown["bad"] else "<p>none</p>")
    if notes:
        parts.append(
            '<ul class="warnings">'
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes[:20])
            + "</ul>"
        )
    return ReportSection(title=f"Grad-CAM gallery ({cam_method.name})", html="\n".join(parts))


def _right(sample: Sample, probs: np.ndarray, classes: list[str]) -> bool:
    return classes[int(np.argmax(probs))] == sample.label


def _pick(
    samples: list[Sample], probs: np.ndarray, classes: list[str], n_ok: int, n_bad: int
) -> tuple[list[Sample], list[Sample]]:
    ok: dict[str, list[tuple[float, int]]] = {}
    bad: list[tuple[float, int]] = []
    for i, (sample, row) in enumerate(zip(samples, probs, strict=True)):
        conf = float(np.max(row))
        if _right(sample, row, classes):
            ok.setdefault(str(sample.label), []).append((-conf, i))
        else:
            bad.append((-conf, i))
    queues = [sorted(v) for _, v in sorted(ok.items())]
    picked_ok: list[int] = []
    while len(picked_ok) < n_ok and any(queues):
        for q in queues:
            if q and len(picked_ok) < n_ok:
                picked_ok.append(q.pop(0)[1])
    picked_bad = [i for _, i in sorted(bad)[: max(0, n_bad)]]
    return [samples[i] for i in picked_ok], [samples[i] for i in picked_bad]


def _predict(
    model: Explainable, paths: list[Path], batch_size: int, notes: list[str]
) -> np.ndarray:
    pre = model.preprocessing
    rows = np.zeros((len(paths), len(model.classes)), dtype=np.float32)
    net = model.model
    with _preserved_state(net), torch.no_grad():
        for start in range(0, len(paths), max(1, batch_size)):
            idx, crops = [], []
            for i in range(start, min(len(paths), start + max(1, batch_size))):
                try:
                    crops.append(np.asarray(pre.resize_crop(load_image(paths[i])), np.uint8))
                    idx.append(i)
                except ImageDecodeError as exc:
                    notes.append(f"{paths[i].name}: {exc.reason}")
                    rows[i] = np.nan
            if not crops:
                continue
            x = torch.from_numpy(pre.normalize(np.stack(crops))).to(model.device)
            logits = net(x.contiguous(memory_format=torch.channels_last)).float()
            rows[idx] = torch.softmax(logits, dim=1).cpu().numpy()
    return rows


def _figures(items: list[tuple[Sample, Explanation]]) -> str:
    figures = []
    for sample, expl in items:
        caption = (
            f"given <strong>{html.escape(str(sample.label))}</strong> · predicted "
            f"<strong>{html.escape(expl.predicted)}</strong> ({100 * expl.probability:.1f}%)"
            f"<br><code>{html.escape(sample.path.name)}</code>"
        )
        image = (
            html_image(expl.overlay, f"{sample.path.name}: heat map")
            if expl.overlay is not None
            else ""
        )
        figures.append(
            f'<figure style="margin:0;max-width:300px">{image}'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return (
        '<div style="display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start">'
        + "".join(figures)
        + "</div>"
    )


def run_gallery_section(
    model: nn.Module,
    classes: Sequence[str],
    preprocessing: Preprocessing,
    device: torch.device,
    samples: Sequence[Sample],
    logits: torch.Tensor | None,
    out_dir: str | os.PathLike[str],
    *,
    expired: Callable[[], bool],
    split: str | None = None,
    console: Console | None = None,
    images: int = 6,
) -> ReportSection:
    """The training report's gallery: :func:`cam_gallery_section` that never raises.

    Skipped with a one-line note when ``expired()`` (the run's deadline) is already true, stops
    between batches when it becomes true, and turns any failure into a note plus a logged
    warning, so a CAM problem never fails a finished training run. ``model`` is moved to
    ``device``; ``logits`` are the evaluation's outputs for ``samples`` (rows in order).
    """
    title = "Grad-CAM gallery"
    if expired():
        return ReportSection(title, "<p>Skipped: the run's time budget had run out.</p>")
    try:
        probs = None
        if logits is not None and logits.ndim == 2 and logits.shape[0] == len(samples):
            probs = torch.softmax(logits.detach().float(), dim=1).cpu().numpy()
        model.to(device)  # a probe's new head may still be on the CPU
        subject = CamModel(model, list(classes), preprocessing, device)
        return cam_gallery_section(
            subject,
            samples,
            out_dir,
            correct=images,
            incorrect=images,
            probabilities=probs,
            stop=expired,
            split=split,
        )
    except Exception as exc:
        message = f"the Grad-CAM gallery could not be made: {type(exc).__name__}: {exc}"
        _log.warning(message)
        if console is not None:
            from rich.markup import escape

            console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
        return ReportSection(title, f"<p>Not available: {html.escape(message)}</p>")
