"""Object detectors: torchvision's detection models on timm backbones.

Every detector here is a torchvision detection model (Faster R-CNN with FPN, RetinaNet, FCOS,
SSDlite) whose backbone is a timm model created with ``features_only=True``, so any timm
architecture can be used and ImageNet weights come through the same resolver as for
classification (:func:`~visionflow.models.weights.resolve_weights`): the classifier model's
state dict is mapped onto the feature model (same parameter names for the kept modules; the
dropped head, e.g. ``conv_head``/``bn2``/``classifier``, is ignored) and every parameter and
buffer of the feature model must be covered, or :class:`~visionflow.errors.WeightsError`.

Contract of the built models (torchvision's):

* **Input**: a list of float RGB images ``C x H x W`` in ``[0, 1]``, unnormalised, any size
  (what :class:`~visionflow.data.detection.transforms.DetectionDataset` yields). The model
  resizes (longer side to ``img_size`` for the FPN detectors; a square ``img_size`` for SSDlite)
  and normalises inside with the backbone's mean/std (``GeneralizedRCNNTransform``), so the
  preprocessing travels with the model. Boxes come back in the input image's pixels.
* **Targets** (training): ``{"boxes": float32 N x 4 XYXY absolute pixels, "labels": int64 N}``
  with labels ``1..num_classes`` (0 is the background: class id + 1).
* **Train mode** returns a dict of losses; **eval mode** a list of
  ``{"boxes", "labels", "scores"}`` per image, labels in ``1..num_classes``.

Normalisation layers: with pretrained weights the backbone's BatchNorm layers are *frozen*
(running statistics and affine parameters fixed, as torchvision does for its detectors):
detection batches are small (2-8 images of different content), so batch statistics would be
noisy and would pull the ImageNet statistics away; frozen layers also make train and eval
compute the same function. Without pretrained weights (random initialisation) the backbone keeps
ordinary BatchNorm, which a network trained from scratch needs. The layers we add (FPN, SSDlite
extras and head) are trained from scratch in every case.
"""

from __future__ import annotations

import difflib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ConfigError, WeightsError
from visionflow.models.weights import ResolvedWeights, _arch, _listed, _require_known

__all__ = [
    "DetectorSpec",
    "TimmFeatures",
    "build_detector",
    "detector_info",
    "list_detectors",
    "rebuild_detector",
    "register_detector",
    "set_nms_threshold",
]

_NBT = "num_batches_tracked"
#: Attribute of a built detector that holds its :class:`DetectorSpec`.
_SPEC_ATTR = "visionflow_spec"
#: The value classification scores of the background column are set to before decoding.
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to rebuild a detector and to prepare its inputs (JSON-able).

    Attributes:
        name: Registered detector name (``"fasterrcnn_fpn"``...).
        backbone: timm model name of the backbone.
        num_classes: Object classes, *without* the background.
        img_size: Side the images are resized to: the longer side for the FPN detectors
            (with ``min_size``/``max_size``), both sides for SSDlite.
        min_size: Shorter-side target of ``GeneralizedRCNNTransform``.
        max_size: Longer-side cap of ``GeneralizedRCNNTransform``.
        mean: Per-channel mean applied inside the model to ``[0, 1]`` images.
        std: Per-channel standard deviation applied inside the model.
        score_thresh: Detections below this score are dropped.
        nms_thresh: IoU above which a lower-scored box of the same class is suppressed.
        detections_per_img: At most this many detections per image.
        trainable_layers: Backbone stages (counted from the deepest) that train; the others
            are frozen.
        frozen_bn: Whether the backbone's BatchNorm layers are frozen.
        out_indices: timm feature levels used (negative: counted from the deepest).
        strides: Their strides in pixels.
        fpn_channels: Width of the feature pyramid (0 for SSDlite).
        weights: Provenance of the backbone weights (``None`` for random initialisation).
    """

    name: str
    backbone: str
    num_classes: int
    img_size: int
    min_size: int
    max_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    trainable_layers: int
    frozen_bn: bool
    out_indices: tuple[int, ...]
    strides: tuple[int, ...]
    fpn_channels: int
    weights: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        """The spec as plain JSON types, plus the input contract."""
        out = asdict(self)
        for key in ("mean", "std", "out_indices", "strides"):
            out[key] = list(out[key])
        out["input"] = "RGB float [0, 1], C x H x W, unnormalised; boxes XYXY in input pixels"
        out["label_offset"] = 1
        return out


@dataclass(frozen=True)
class _Options:
    """Validated arguments common to every builder."""

    backbone: str
    num_classes: int
    weights: ResolvedWeights | None
    img_size: int
    min_size: int
    max_size: int
    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    trainable_layers: int | None
    fpn_channels: int


_Builder = Callable[[_Options], tuple[nn.Module, "DetectorSpec"]]


@dataclass(frozen=True)
class _Entry:
    builder: _Builder
    default_img_size: int
    description: str


_DETECTORS: dict[str, _Entry] = {}


def register_detector(
    name: str, *, default_img_size: int, description: str
) -> Callable[[_Builder], _Builder]:
    """Register a detector builder under ``name`` (a duplicate name is an error).

    The builder takes the validated common options and returns ``(model, spec)``.
    """

    def decorate(builder: _Builder) -> _Builder:
        if name in _DETECTORS:
            raise ConfigError(f"detector {name!r} is already registered; choose another name")
        _DETECTORS[name] = _Entry(builder, default_img_size, description)
        return builder

    return decorate


def list_detectors() -> dict[str, str]:
    """Registered detector names with a one-line description each."""
    return {name: entry.description for name, entry in sorted(_DETECTORS.items())}


def build_detector(
    name: str,
    *,
    backbone: str = "tf_efficientnet_lite0",
    num_classes: int,
    weights: ResolvedWeights | None = None,
    img_size: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    trainable_layers: int | None = None,
    fpn_channels: int = 128,
) -> nn.Module:
    """Build a registered detector on a timm backbone.

    Args:
        name: Registered detector (see :func:`list_detectors`): ``"fasterrcnn_fpn"``,
            ``"retinanet"``, ``"fcos"`` or ``"ssdlite"`` (the light CPU/edge one).
        backbone: timm model name; it must support ``features_only=True``.
        num_classes: Object classes without the background; labels are ``1..num_classes``.
        weights: Resolved ImageNet weights for ``backbone`` (``resolve_weights``); ``None``
            or source ``"none"`` gives a randomly initialised backbone.
        img_size: Input side: the longer side for the FPN detectors, the square side for
            SSDlite. Defaults to the detector's (512 for FPN ones, 320 for SSDlite).
        min_size: Shorter-side target of the internal resize (FPN detectors); default
            ``img_size``, which with ``max_size = img_size`` puts the longer side at ``img_size``.
        max_size: Longer-side cap of the internal resize (FPN detectors); default ``img_size``.
        score_thresh: Minimum score of a returned detection.
        nms_thresh: Per-class NMS IoU threshold.
        detections_per_img: Maximum detections returned per image.
        trainable_layers: Backbone stages that train, counted from the deepest (0 = frozen
            backbone; the number of stages = everything). Default: 3 with pretrained weights,
            all without.
        fpn_channels: Width of the feature pyramid and heads (FPN detectors; ignored by
            SSDlite). 128 keeps the models CPU-friendly; torchvision's own use 256.

    Returns:
        The torchvision detection model in training mode, with its :class:`DetectorSpec` (see
        :func:`detector_info`).

    Raises:
        ConfigError: Unknown detector or backbone (with a "did you mean"), a backbone without
            feature maps, or an option out of range.
        WeightsError: The weights are for another architecture, carry no tensors, or do not
            cover every tensor of the feature backbone.
    """
    entry = _DETECTORS.get(name)
    if entry is None:
        hints = difflib.get_close_matches(name, list(_DETECTORS), n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
        raise ConfigError(f"unknown detector {name!r}{hint} (known: {sorted(_DETECTORS)})")
    size = entry.default_img_size if img_size is None else int(img_size)
    opts = _Options(
        backbone=backbone,
        num_classes=int(num_classes),
        weights=weights if weights is not None and weights.source != "none" else None,
        img_size=size,
        min_size=size if min_size is None else int(min_size),
        max_size=size if max_size is None else int(max_size),
        score_thresh=float(score_thresh),
        nms_thresh=float(nms_thresh),
        detections_per_img=int(detections_per_img),
        trainable_layers=None if trainable_layers is None else int(trainable_layers),
        fpn_channels=int(fpn_channels),
    )
    _validate(opts)
    model, spec = entry.builder(opts)
    setattr(model, _SPEC_ATTR, spec)
    return model


def detector_info(model: nn.Module) -> dict[str, Any]:
    """What a bundle needs to know about a detector built by :func:`build_detector` (JSON-able).

    Thresholds are read from the model itself, so changes made after building are reported.

    Raises:
        ConfigError: ``model`` was not built by :func:`build_detector`.
    """
    spec = getattr(model, _SPEC_ATTR, None)
    if not isinstance(spec, DetectorSpec):
        raise ConfigError(
            f"{type(model).__name__} was not built by visionflow.models.detection.build_detector"
        )
    info = spec.to_json()
    info.update(_live_thresholds(model))
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return info


def rebuild_detector(info: Mapping[str, Any]) -> nn.Module:
    """An untrained detector of the architecture ``info`` describes, ready for its weights.

    ``info`` is what :func:`detector_info` returned for the trained model (it is stored as
    ``model.json["detector"]`` in runs and bundles). The backbone is built without ImageNet
    weights (the trained state dict replaces every tensor) and in eval mode; frozen and ordinary
    BatchNorm compute the same function in eval mode and have the same state-dict keys, so
    ``load_weights(path, rebuild_detector(info))`` restores the trained model exactly.

    Raises:
        ConfigError: ``info`` lacks a key or names an unknown detector or backbone.
    """
    try:
        model = build_detector(
            str(info["name"]),
            backbone=str(info["backbone"]),
            num_classes=int(info["num_classes"]),
            img_size=int(info["img_size"]),
            min_size=int(info["min_size"]),
            max_size=int(info["max_size"]),
            score_thresh=float(info["score_thresh"]),
            nms_thresh=float(info["nms_thresh"]),
            detections_per_img=int(info["detections_per_img"]),
            fpn_channels=int(info.get("fpn_channels") or 128),
        )
    except KeyError as exc:
        raise ConfigError(f"detector description lacks the key {exc.args[0]!r}") from None
    # the rebuilt spec must describe the trained model (its normalisation and provenance)
    spec = replace(
        getattr(model, _SPEC_ATTR),
        mean=tuple(info["mean"]),
        std=tuple(info["std"]),
        weights=info.get("weights"),
        trainable_layers=int(info.get("trainable_layers", 0)),
        frozen_bn=bool(info.get("frozen_bn", False)),
    )
    setattr(model, _SPEC_ATTR, spec)
    _set_normalisation(model, spec.mean, spec.std)
    return model.eval()


def _set_normalisation(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Point the model's internal transform at ``mean``/``std`` (as built from the weights)."""
    transform = getattr(model, "transform", None)
    if transform is not None:
        transform.image_mean = [float(m) for m in mean]
        transform.image_std = [float(s) for s in std]


# ----------------------------------------------------------------------------- backbone


class TimmFeatures(nn.Module):
    """A timm ``features_only`` model as a torchvision detection backbone body.

    ``forward`` returns an ``OrderedDict`` of feature maps named ``"0"``, ``"1"``... from the
    shallowest level; ``out_channels`` lists their widths and ``strides`` their strides.
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        info: Any = body.feature_info
        self.out_channels: list[int] = [int(c) for c in info.channels()]
        self.strides: list[int] = [int(r) for r in info.reduction()]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        if isinstance(feats, Mapping):
            feats = list(feats.values())
        return OrderedDict((str(i), f) for i, f in enumerate(feats))


class _FPNBackbone(nn.Module):
    """timm feature maps -> torchvision feature pyramid (``out_channels`` = pyramid width)."""

    def __init__(self, body: TimmFeatures, fpn_channels: int, extra: nn.Module) -> None:
        from torchvision.ops import FeaturePyramidNetwork

        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, fpn_channels, extra_blocks=extra)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = self.fpn(self.body(x))
        return out


class _SSDLiteBackbone(nn.Module):
    """The deepest timm levels plus SSDlite's extra downsampling blocks (depthwise separable)."""

    def __init__(self, body: TimmFeatures, extra_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.body = body
        norm = partial(_BatchNorm2d, eps=0.001, momentum=0.03)
        blocks = []
        width = body.out_channels[-1]
        for out in extra_channels:
            blocks.append(_extra_block(width, out, norm))
            width = out
        self.extra = nn.ModuleList(blocks)
        for module in self.extra.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0.0, std=0.03)
        self.out_channels = [*body.out_channels, *extra_channels]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        last = next(reversed(feats.values()))
        for i, block in enumerate(self.extra):
            last = block(last)
            feats[str(len(self.body.out_channels) + i)] = last
        return feats


class _BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that falls back on its running statistics when a training batch holds one
    value per channel (batch of 1 on SSDlite's 1x1 deepest maps), where batch statistics do
    not exist; otherwise ordinary BatchNorm (it folds into the convolution at export)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


class _GroupNorm(nn.GroupNorm):
    """GroupNorm that also takes a single 1x1 map (batch of 1 at P7 of a small or very
    elongated image): the groups still hold several values, but torch refuses any input with
    one value per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[2] * x.shape[3] != 1:
            return super().forward(x)
        n, c = x.shape[:2]
        groups = x.reshape(n, self.num_groups, -1)
        mean = groups.mean(-1, keepdim=True)
        var = groups.var(-1, unbiased=False, keepdim=True)
        y = ((groups - mean) / torch.sqrt(var + self.eps)).reshape_as(x)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def _safe_group_norms(module: nn.Module) -> None:
    """Swap every GroupNorm inside ``module`` for :class:`_GroupNorm` (same parameters)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.GroupNorm:
            safe = _GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            safe.load_state_dict(child.state_dict())
            setattr(module, name, safe)
        else:
            _safe_group_norms(child)


def _extra_block(in_ch: int, out_ch: int, norm: Callable[..., nn.Module]) -> nn.Module:
    """1x1 squeeze, 3x3 depthwise stride 2, 1x1 expand (SSDlite's extra layers)."""
    mid = out_ch // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, mid, 1, bias=False),
        norm(mid),
        nn.ReLU6(inplace=True),
        nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False),
        norm(mid),
        nn.ReLU6(inplace=True),
        nn.Conv2d(mid, out_ch, 1, bias=False),
        norm(out_ch),
        nn.ReLU6(inplace=True),
    )


def _timm_body(opts: _Options, out_indices: tuple[int, ...]) -> tuple[TimmFeatures, bool, int]:
    """The feature model with weights loaded, BN frozen and early stages frozen as asked.

    Returns the body, whether BN is frozen, and the number of trainable stages.
    """
    import timm
    from timm.layers import freeze_batch_norm_2d

    _require_known(opts.backbone)
    try:
        model: nn.Module = timm.create_model(
            opts.backbone, pretrained=False, features_only=True, out_indices=out_indices
        )
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
        raise ConfigError(
            f"backbone {opts.backbone!r} cannot give feature maps at levels {list(out_indices)} "
            f"({exc}); choose a CNN backbone such as 'tf_efficientnet_lite0' or 'resnet18'"
        ) from exc
    if opts.weights is not None:
        _load_features(model, opts.backbone, opts.weights)
    stages = _stage_of_parameters(model)
    n_stages = max(stages.values(), default=-1) + 1
    pretrained = opts.weights is not None
    trainable = opts.trainable_layers
    if trainable is None:
        trainable = min(3, n_stages) if pretrained else n_stages
    if trainable > n_stages:
        raise ConfigError(
            f"trainable_layers={trainable} but backbone {opts.backbone!r} has {n_stages} "
            f"stages at these levels; use 0..{n_stages}"
        )
    first_trained = n_stages - trainable
    for pname, param in model.named_parameters():
        if stages[pname] < first_trained:
            param.requires_grad_(False)
    if pretrained:
        model = freeze_batch_norm_2d(model)
    return TimmFeatures(model), pretrained, trainable


def _stage_of_parameters(model: nn.Module) -> dict[str, int]:
    """Each parameter's stage: the index of the first feature level at or after it.

    Stage 0 holds the stem and the first returned level; parameters registered after the
    deepest level (rare in feature models) count as the deepest stage.
    """
    info: Any = model.feature_info
    modules = [str(m) for m in info.module_name()]
    prefixes = [(m + ".", m.replace(".", "_") + ".") for m in modules]
    names = [n for n, _ in model.named_parameters()]
    last: list[int] = []
    for dotted, flat in prefixes:
        idx = [i for i, n in enumerate(names) if n.startswith(dotted) or n.startswith(flat)]
        last.append(max(idx) if idx else (last[-1] if last else -1))
    out: dict[str, int] = {}
    for i, n in enumerate(names):
        stage = next((s for s, end in enumerate(last) if i <= end), len(last) - 1)
        out[n] = stage
    return out


def _load_features(model: nn.Module, name: str, weights: ResolvedWeights) -> None:
    """Map the classifier model's tensors onto the feature model; every tensor must be covered.

    timm's feature wrappers keep the classifier model's names, except that flattened
    sequential stages are joined with ``_`` (``stages_0`` for ``stages.0``) and getter
    wrappers prefix ``model.``; all three are tried.
    """
    if _arch(weights.backbone) != _arch(name):
        raise WeightsError(
            f"weights were resolved for {weights.backbone!r} but the detector backbone is "
            f"{name!r}; resolve weights for {name!r}"
        )
    if weights.state_dict is None:
        raise WeightsError(
            f"weights for {name!r} from {weights.source} {weights.location} carry no tensors "
            "(rebuilt from provenance?); call resolve_weights again"
        )
    source = weights.state_dict
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for key, tensor in expected.items():
        src = _source_key(key, source)
        if src is None:
            if not key.endswith(_NBT):
                missing.append(key)
            continue
        if tuple(source[src].shape) != tuple(tensor.shape):
            wrong.append(f"{key} {tuple(source[src].shape)} != {tuple(tensor.shape)}")
            continue
        mapped[key] = source[src]
    if missing or wrong:
        raise WeightsError(
            f"weights from {weights.source} {weights.location} do not cover the feature "
            f"backbone {name!r}: missing {len(missing)} {_listed(missing)}, wrong shape "
            f"{len(wrong)} {_listed(wrong)}; are they for another architecture?"
        )
    try:
        model.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:  # pragma: no cover - shapes were checked above
        raise WeightsError(f"weights from {weights.location} do not fit {name!r}: {exc}") from exc


def _source_key(key: str, source: Mapping[str, torch.Tensor]) -> str | None:
    if key in source:
        return key
    if key.startswith("model.") and key[len("model.") :] in source:  # FeatureGetterNet
        return key[len("model.") :]
    head, sep, rest = key.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            candidate = f"{head[:i]}.{head[i + 1 :]}{sep}{rest}"
            if candidate in source:
                return candidate
    return None


def _mean_std(
    body: TimmFeatures, weights: ResolvedWeights | None
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The normalisation the backbone expects: the weights' own, else timm's config."""
    if weights is not None:
        pre = weights.preprocessing
    else:
        pre = Preprocessing.from_timm_config(dict(getattr(body.body, "pretrained_cfg", {}) or {}))
    return tuple(pre.mean), tuple(pre.std)  # type: ignore[return-value]


def _spec(
    name: str,
    opts: _Options,
    body: TimmFeatures,
    frozen_bn: bool,
    trainable: int,
    out_indices: tuple[int, ...],
    fpn_channels: int,
) -> DetectorSpec:
    mean, std = _mean_std(body, opts.weights)
    return DetectorSpec(
        name=name,
        backbone=opts.backbone,
        num_classes=opts.num_classes,
        img_size=opts.img_size,
        min_size=opts.min_size,
        max_size=opts.max_size,
        mean=mean,
        std=std,
        score_thresh=opts.score_thresh,
        nms_thresh=opts.nms_thresh,
        detections_per_img=opts.detections_per_img,
        trainable_layers=trainable,
        frozen_bn=frozen_bn,
        out_indices=out_indices,
        strides=tuple(body.strides),
        fpn_channels=fpn_channels,
        weights=None if opts.weights is None else opts.weights.provenance(),
    )


def _validate(opts: _Options) -> None:
    if opts.num_classes < 1:
        raise ConfigError(
            f"num_classes must be >= 1 (without the background), got {opts.num_classes}"
        )
    for key in ("img_size", "min_size", "max_size"):
        if getattr(opts, key) < 32:
            raise ConfigError(f"{key} must be >= 32 pixels, got {getattr(opts, key)}")
    if opts.min_size > opts.max_size:
        raise ConfigError(f"min_size ({opts.min_size}) must not exceed max_size ({opts.max_size})")
    for key in ("score_thresh", "nms_thresh"):
        value = getattr(opts, key)
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    if opts.detections_per_img < 1:
        raise ConfigError(f"detections_per_img must be >= 1, got {opts.detections_per_img}")
    if opts.trainable_layers is not None and opts.trainable_layers < 0:
        raise ConfigError(f"trainable_layers must be >= 0, got {opts.trainable_layers}")
    if opts.fpn_channels < 8:
        raise ConfigError(f"fpn_channels must be >= 8, got {opts.fpn_channels}")


def set_nms_threshold(model: nn.Module, value: float) -> None:
    """Change the per-class NMS IoU threshold of a built detector (it takes effect at once;
    :func:`detector_info` reports it, so exports and bundles carry it).

    Raises:
        ConfigError: ``value`` is outside ``(0, 1]``.
    """
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"nms_thresh must be in (0, 1], got {value}")
    holder = getattr(model, "roi_heads", None) or model  # Faster R-CNN keeps it in roi_heads
    holder.nms_thresh = float(value)


def _live_thresholds(model: nn.Module) -> dict[str, Any]:
    """score/NMS thresholds and detections per image as the model holds them now."""
    roi = getattr(model, "roi_heads", None)
    if roi is not None:  # Faster R-CNN
        return {
            "score_thresh": float(roi.score_thresh),
            "nms_thresh": float(roi.nms_thresh),
            "detections_per_img": int(roi.detections_per_img),
        }
    held: Any = model
    return {
        "score_thresh": float(held.score_thresh),
        "nms_thresh": float(held.nms_thresh),
        "detections_per_img": int(held.detections_per_img),
    }


def _no_background_logits(
    head_outputs: dict[str, list[torch.Tensor]],
) -> dict[str, list[torch.Tensor]]:
    """Copy of RetinaNet/FCOS head outputs with class 0 (background) made impossible.

    These models score every class with a sigmoid, including column 0 that only ever learns
    "no"; hiding it at decoding keeps labels in ``1..num_classes`` like the other detectors.
    """
    out = dict(head_outputs)
    out["cls_logits"] = [c.clone().index_fill_(-1, _ZERO, _NEG_INF) for c in out["cls_logits"]]
    return out


_ZERO = torch.tensor([0])


def _without_background(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (torchvision's RetinaNet or FCOS: both score class 0 with a sigmoid like any
    other) with detections that never carry the background label 0."""

    class _NoBackground(base):  # type: ignore[valid-type,misc]
        def postprocess_detections(
            self,
            head_outputs: dict[str, list[torch.Tensor]],
            anchors: list[list[torch.Tensor]],
            image_shapes: list[tuple[int, int]],
        ) -> list[dict[str, torch.Tensor]]:
            return super().postprocess_detections(
                _no_background_logits(head_outputs), anchors, image_shapes
            )

    _NoBackground.__name__ = _NoBackground.__qualname__ = base.__name__
    return _NoBackground


# ----------------------------------------------------------------------------- detectors


@register_detector(
    "fasterrcnn_fpn",
    default_img_size=512,
    description="Faster R-CNN with FPN (two-stage; most accurate, slowest)",
)
def _fasterrcnn_fpn(opts: _Options) -> tuple[nn.Module, DetectorSpec]:
    """Faster R-CNN on the four deepest levels (stride 4-32 on most CNNs) plus a max-pooled
    level of twice the deepest stride.

    RPN anchors are 4x the level's stride at two octave scales (x1, x1.41) and three aspect
    ratios: 16-23 px at stride 4 up to 256-362 px at stride 64, which covers objects in images
    of 320-640 px (torchvision's 32-512 px anchors are sized for 800-1333 px inputs).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    out_indices = (-4, -3, -2, -1)
    body, frozen, trainable = _timm_body(opts, out_indices)
    backbone = _FPNBackbone(body, opts.fpn_channels, LastLevelMaxPool())
    strides = [*body.strides, body.strides[-1] * 2]
    sizes = tuple((4 * s, round(4 * s * 2**0.5)) for s in strides)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    mean, std = _mean_std(body, opts.weights)
    model = FasterRCNN(
        backbone,
        num_classes=opts.num_classes + 1,
        min_size=opts.min_size,
        max_size=opts.max_size,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=anchors,
        box_score_thresh=opts.score_thresh,
        box_nms_thresh=opts.nms_thresh,
        box_detections_per_img=opts.detections_per_img,
    )
    return model, _spec(
        "fasterrcnn_fpn", opts, body, frozen, trainable, out_indices, opts.fpn_channels
    )


def _p3_p7(opts: _Options) -> tuple[_FPNBackbone, TimmFeatures, bool, int, tuple[int, ...]]:
    """The three deepest levels (strides 8-32 on most CNNs) and the P6/P7 convolutions
    (strides 64, 128) of RetinaNet/FCOS."""
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    out_indices = (-3, -2, -1)
    body, frozen, trainable = _timm_body(opts, out_indices)
    extra = LastLevelP6P7(opts.fpn_channels, opts.fpn_channels)
    return _FPNBackbone(body, opts.fpn_channels, extra), body, frozen, trainable, out_indices


@register_detector(
    "retinanet",
    default_img_size=512,
    description="RetinaNet with FPN P3-P7 (single-stage, focal loss, anchors)",
)
def _retinanet(opts: _Options) -> tuple[nn.Module, DetectorSpec]:
    """RetinaNet; anchors 4x the stride at three octave scales and three aspect ratios
    (torchvision's own: 32-512 px on strides 8-128)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

    backbone, body, frozen, trainable, out_indices = _p3_p7(opts)
    strides = [*body.strides, body.strides[-1] * 2, body.strides[-1] * 4]
    sizes = tuple(tuple(round(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(
        opts.fpn_channels, anchors.num_anchors_per_location()[0], opts.num_classes + 1
    )
    mean, std = _mean_std(body, opts.weights)
    model = _without_background(RetinaNet)(
        backbone,
        num_classes=opts.num_classes + 1,
        min_size=opts.min_size,
        max_size=opts.max_size,
        image_mean=list(mean),
        image_std=list(std),
        anchor_generator=anchors,
        head=head,
        score_thresh=opts.score_thresh,
        nms_thresh=opts.nms_thresh,
        detections_per_img=opts.detections_per_img,
    )
    return model, _spec("retinanet", opts, body, frozen, trainable, out_indices, opts.fpn_channels)


@register_detector(
    "fcos",
    default_img_size=512,
    description="FCOS with FPN P3-P7 (single-stage, anchor-free)",
)
def _fcos(opts: _Options) -> tuple[nn.Module, DetectorSpec]:
    """FCOS: one anchor point per location, its size the level's stride (torchvision's rule);
    the objects each level is responsible for follow from FCOS's own size ranges."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOS, FCOSHead

    backbone, body, frozen, trainable, out_indices = _p3_p7(opts)
    strides = [*body.strides, body.strides[-1] * 2, body.strides[-1] * 4]
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in strides), aspect_ratios=((1.0,),) * len(strides)
    )
    head = FCOSHead(opts.fpn_channels, 1, opts.num_classes + 1)
    _safe_group_norms(head)
    mean, std = _mean_std(body, opts.weights)
    model = _without_background(FCOS)(
        backbone,
        num_classes=opts.num_classes + 1,
        min_size=opts.min_size,
        max_size=opts.max_size,
        image_mean=list(mean),
        image_std=list(std),
        anchor_generator=anchors,
        head=head,
        score_thresh=opts.score_thresh,
        nms_thresh=opts.nms_thresh,
        detections_per_img=opts.detections_per_img,
    )
    return model, _spec("fcos", opts, body, frozen, trainable, out_indices, opts.fpn_channels)


#: Widths of SSDlite's four extra levels (torchvision's ssdlite320_mobilenet_v3_large).
_SSDLITE_EXTRA = (512, 256, 256, 128)


@register_detector(
    "ssdlite",
    default_img_size=320,
    description="SSDlite (light CPU/edge model: depthwise-separable head, square input)",
)
def _ssdlite(opts: _Options) -> tuple[nn.Module, DetectorSpec]:
    """SSDlite on the two deepest levels (strides 16, 32 on most CNNs) plus four extra
    stride-2 blocks.

    Default boxes follow torchvision's SSDlite320: scales from 0.2 to 0.95 of the image side
    across the six levels, aspect ratios 1, 2, 3 (and their inverses), square input of
    ``img_size``.
    """
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.ssdlite import SSDLiteHead

    out_indices = (-2, -1)
    body, frozen, trainable = _timm_body(opts, out_indices)
    backbone = _SSDLiteBackbone(body, _SSDLITE_EXTRA)
    levels = len(backbone.out_channels)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(levels)], min_ratio=0.2, max_ratio=0.95)
    norm = partial(_BatchNorm2d, eps=0.001, momentum=0.03)
    head = SSDLiteHead(
        backbone.out_channels,
        anchors.num_anchors_per_location(),
        opts.num_classes + 1,
        norm,
    )
    mean, std = _mean_std(body, opts.weights)
    model = SSD(
        backbone,
        anchors,
        (opts.img_size, opts.img_size),
        opts.num_classes + 1,
        image_mean=list(mean),
        image_std=list(std),
        head=head,
        score_thresh=opts.score_thresh,
        nms_thresh=opts.nms_thresh,
        detections_per_img=opts.detections_per_img,
        topk_candidates=300,
    )
    spec = _spec("ssdlite", opts, body, frozen, trainable, out_indices, 0)
    # SSD resizes both sides to img_size: report that, not the FPN detectors' min/max rule.
    spec = replace(spec, min_size=opts.img_size, max_size=opts.img_size)
    return model, spec
