"""Typed configuration of a run, with one documented precedence.

``defaults < preset < YAML/JSON file < command-line flags``. Unknown keys are rejected with a
"did you mean" so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from visionflow.errors import ConfigError
from visionflow.train.budget import parse_budget

__all__ = [
    "PRESETS",
    "DetectConfig",
    "SearchConfig",
    "TrainConfig",
    "load_detect_config",
    "load_search_config",
    "load_train_config",
]

#: Named bundles of settings; a preset only sets what it names.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"budget": "5m"},
    "medium": {"budget": "30m"},
    "best": {"budget": "2h", "img_size": None},
}


class TrainConfig(BaseModel):
    """Everything that decides what ``visionflow train`` does (stored in ``config.json``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    task: Literal["classify"] = "classify"
    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = Field(
        default=None, description="auto (None), 'none', 'package', 'hub', or a file/directory"
    )
    img_size: int | None = Field(default=None, ge=32, le=1024)
    budget: str | None = Field(default="10m", description="wall-clock budget, e.g. '10m'")
    strategy: Literal["auto", "lpft", "finetune", "probe"] = "auto"
    epochs: int = Field(default=30, ge=1, description="upper bound; the budget may stop earlier")
    batch_size: int = Field(default=32, ge=1)
    lr: float | None = Field(default=None, gt=0, description="head learning rate")
    backbone_lr: float | None = Field(default=None, gt=0)
    layer_decay: float = Field(default=0.8, gt=0, le=1)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    augment: Literal["auto", "none", "light", "medium", "heavy"] = Field(
        default="auto",
        description="auto: light for short fine-tunes (< 20 epochs), medium for longer ones",
    )
    hflip: bool = True
    mixup: float = Field(default=0.0, ge=0)
    cutmix: float = Field(default=0.0, ge=0)
    balance: Literal["auto", "weights", "sampler", "none"] = "auto"
    freeze_epochs: int = Field(default=0, ge=0)
    feature_cache: str | None = Field(
        default=None,
        description="folder shared by runs for frozen features, keyed by backbone, weights, "
        "preprocessing and the files' size and mtime (default: inside the run)",
    )
    onnx_features: bool = Field(
        default=True,
        description="compute the probe's frozen features with ONNX Runtime on CPU (checked "
        "against PyTorch; falls back to it)",
    )
    freeze_bn: bool | None = Field(
        default=None,
        description=(
            "keep BatchNorm statistics fixed while fine-tuning (default: when the head starts "
            "from the probe, whose features they define; measured on the digits benchmark, "
            "val accuracy 0.83 frozen vs 0.70 trainable)"
        ),
    )
    probe_c: float | None = Field(
        default=None,
        gt=0,
        description="the linear probe's inverse L2 strength (default: chosen by cross-validation; "
        "a search's refit passes the value its trial chose)",
    )
    patience: int | None = Field(default=5, ge=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    val_fraction: float = Field(default=0.15, ge=0, lt=1)
    test_fraction: float = Field(default=0.15, ge=0, lt=1)
    split_file: str | None = None
    labels: list[str] = Field(
        default_factory=list,
        description="label files (path,label CSVs, e.g. filled in from `visionflow select`) "
        "merged into the dataset; rows with an empty label are skipped",
    )
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    num_workers: int | None = Field(default=None, ge=0)
    cache_mb: int = Field(default=1024, ge=0)
    max_pixels: int = Field(default=64_000_000, ge=1024)
    min_per_class: int = Field(default=3, ge=2)

    @field_validator("budget", mode="before")
    @classmethod
    def _check_budget(cls, value: Any) -> Any:
        if value is None:
            return None
        parse_budget(value)  # raises BudgetError with a clear message
        return str(value)

    @field_validator("labels")
    @classmethod
    def _absolute_labels(cls, value: list[str]) -> list[str]:
        # stored in the run's config.json: a resume from another folder must find them
        return [str(Path(v).expanduser().resolve()) for v in value]

    def budget_seconds(self) -> float | None:
        return parse_budget(self.budget)


class DetectConfig(BaseModel):
    """What ``visionflow train --task detect`` does (stored in the run's ``config.json``).

    The defaults are the CPU-friendly recipe measured in BENCHMARKS.md ("Object detection"):
    an anchor-free FCOS on ``tf_efficientnet_lite0`` with a narrow (128-channel) feature pyramid,
    AdamW, a cosine schedule stretched to what the budget can pay for, and the best epoch by
    validation mAP kept.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    task: Literal["detect"] = "detect"
    detector: str = Field(
        default="auto",
        description="fcos, retinanet, fasterrcnn_fpn, ssdlite, or auto (fcos; see the README)",
    )
    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = Field(
        default=None, description="auto (None), 'none', 'package', 'hub', or a file/directory"
    )
    format: Literal["auto", "coco", "voc", "yolo"] = "auto"
    img_size: int | None = Field(
        default=None,
        ge=64,
        le=1536,
        description="longer side the detector works at (default: from the images' sizes, "
        "256..512 in steps of 32; 320 for ssdlite)",
    )
    budget: str | None = Field(default="10m", description="wall-clock budget, e.g. '15m'")
    epochs: int = Field(default=300, ge=1, description="upper bound; the budget stops earlier")
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0, description="learning rate of the heads and pyramid")
    backbone_lr: float | None = Field(
        default=None, gt=0, description="learning rate of the backbone (default: lr / 10)"
    )
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    trainable_layers: int | None = Field(
        default=None, ge=0, description="backbone stages trained, from the deepest (default 3)"
    )
    augment: Literal["none", "light", "medium", "heavy"] = Field(
        default="medium",
        description="light: flips, colour, scale jitter; medium: + zoom-out and IoU crops; "
        "heavy: more of both",
    )
    hflip: bool = True
    score_thresh: float = Field(
        default=0.05, ge=0, le=1, description="lowest score kept (evaluation wants recall)"
    )
    nms_thresh: float = Field(default=0.5, gt=0, le=1)
    detections_per_img: int = Field(default=100, ge=1)
    patience: int | None = Field(default=None, ge=1, description="early stopping (epochs)")
    grad_clip: float | None = Field(default=10.0, gt=0)
    val_fraction: float = Field(default=0.15, ge=0, lt=1)
    test_fraction: float = Field(default=0.15, ge=0, lt=1)
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    num_workers: int | None = Field(default=None, ge=0)
    max_pixels: int = Field(default=64_000_000, ge=1024)

    @field_validator("budget", mode="before")
    @classmethod
    def _check_budget(cls, value: Any) -> Any:
        if value is None:
            return None
        parse_budget(value)
        return str(value)

    def budget_seconds(self) -> float | None:
        return parse_budget(self.budget)


class SearchConfig(BaseModel):
    """How ``visionflow train`` searches (the ``search:`` mapping of a settings file).

    The search phase gets ``1 - refit_fraction`` of the budget (less the data checks); the refit
    of the best configuration gets the rest. One trial may use at most ``trial_fraction`` of the
    search phase, so a few slow fine-tunes cannot eat it all.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    workers: int = Field(default=1, ge=1, le=256, description="local worker processes")
    storage: str | None = Field(
        default=None,
        description="study storage: None (a journal file in the run), a .journal path, "
        "sqlite:///file.db or postgresql://user@host/db",
    )
    #: ``asha`` by default: measured (BENCHMARKS.md, issue 3) it found the same best score as no
    #: pruning with 0.51-0.54x the training images; Hyperband 0.64-0.76x, and lost the best once
    pruner: Literal["hyperband", "asha", "median", "none"] = "asha"
    trials: int | None = Field(
        default=None,
        ge=1,
        description="most trials in the study (all workers); needed without a budget",
    )
    refit_fraction: float = Field(default=0.4, gt=0, lt=1)
    trial_fraction: float = Field(default=0.3, gt=0, le=1)
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the search space: a scalar pins, a list narrows the "
        "choices, {low, high} narrows a range",
    )


_Config = TypeVar("_Config", bound=BaseModel)


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The YAML/JSON document of a settings file (``{}`` when empty); a missing or malformed
    file is a :class:`ConfigError` naming it."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON ({exc})") from None


def _did_you_mean(key: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _validate(
    data: dict[str, Any],
    where: str,
    model: type[_Config] = TrainConfig,  # type: ignore[assignment]
) -> _Config:
    known = list(model.model_fields)
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r}{_did_you_mean(key, known)}")
    try:
        return model(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}: {problems}") from None


def load_train_config(
    *,
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Merge defaults < preset < file < overrides (``None`` overrides are ignored)."""
    return _load(TrainConfig, preset, file, overrides)


def load_detect_config(
    *,
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> DetectConfig:
    """:func:`load_train_config` for object detection (same precedence; presets set the
    budget only)."""
    return _load(DetectConfig, preset, file, overrides)


def _load(
    model: type[_Config],
    preset: str | None,
    file: str | Path | None,
    overrides: dict[str, Any] | None,
) -> _Config:
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"unknown preset {preset!r}{_did_you_mean(preset, list(PRESETS))}; "
                f"choose from {sorted(PRESETS)}"
            )
        data.update({k: v for k, v in PRESETS[preset].items() if k in model.model_fields})
    if file is not None:
        path = Path(file)
        loaded = read_yaml(path)
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of settings, got {type(loaded).__name__}"
            )
        loaded = {k: v for k, v in loaded.items() if k != "search"}
        _validate({**data, **loaded}, str(path), model)
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return _validate(data, "settings", model)


def load_search_config(
    *, file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> SearchConfig:
    """The ``search:`` mapping of a settings file, then ``overrides`` (``None`` ignored)."""
    data: dict[str, Any] = {}
    where = "search settings"
    if file is not None:
        path = Path(file)
        where = f"{path}: search"
        loaded = read_yaml(path)
        section = loaded.get("search", {}) if isinstance(loaded, dict) else {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: 'search' must be a mapping of search settings")
        data.update(section)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    known = list(SearchConfig.model_fields)
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r}{_did_you_mean(key, known)}")
    try:
        return SearchConfig(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}: {problems}") from None
