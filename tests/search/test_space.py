"""The search space: stable names, overrides, files, JSON and the map onto TrainConfig."""

from __future__ import annotations

import json
import math

import optuna
import pytest

from visionflow.config import TrainConfig
from visionflow.errors import ConfigError
from visionflow.search import (
    PARAM_NAMES,
    Categorical,
    Fixed,
    FloatRange,
    IntRange,
    SearchSpace,
    load_space,
)
from visionflow.search.space import FINETUNE_ONLY


def test_default_names_are_the_stable_ones():
    # Stored in studies: changing this tuple breaks resuming old studies.
    assert PARAM_NAMES == (
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
    cpu = SearchSpace.default()
    gpu = SearchSpace.default(device_type="cuda")
    assert tuple(cpu) == PARAM_NAMES == tuple(gpu)
    assert isinstance(cpu["backbone"], Categorical) and isinstance(gpu["backbone"], Categorical)
    assert set(cpu["backbone"].choices) < set(gpu["backbone"].choices)
    assert "resnet50" not in cpu["backbone"].choices
    assert cpu["lr"] == FloatRange(1e-5, 3e-3, log=True)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Categorical(()), "empty"),
        (lambda: Categorical((1, 1)), "duplicates"),
        (lambda: Categorical(([1],)), "not a string"),
        (lambda: FloatRange(1.0, 1.0), "low < high"),
        (lambda: FloatRange(0.0, 1.0, log=True), "low > 0"),
        (lambda: FloatRange("a", 1.0), "numbers"),
        (lambda: IntRange(3, 1), "low < high"),
        (lambda: IntRange(1, 5, step=0), "step"),
        (lambda: IntRange(1.5, 5), "int"),
        (lambda: Fixed([1, 2]), "pinned"),
    ],
)
def test_dimensions_validate_themselves(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_overrides_pin_and_narrow():
    base = SearchSpace.default()
    space = SearchSpace.from_overrides(
        base,
        {
            "backbone": "convnext_nano",  # outside the default choices: any timm name
            "batch_size": [16, 32],
            "lr": {"low": 1e-4, "high": 1e-3},
            "epochs": {"low": 5, "high": 50},  # beyond the base range: allowed
            "mixup": 0.1,  # a float pin for float choices
        },
    )
    assert space["backbone"] == Fixed("convnext_nano")
    assert space["batch_size"] == Categorical((16, 32))
    assert space["lr"] == FloatRange(1e-4, 1e-3, log=True)  # log kept from the base
    assert space["epochs"] == IntRange(5, 50)
    assert space["mixup"] == Fixed(0.1)
    assert list(space) == list(base)  # order kept
    assert base["batch_size"] == Categorical((16, 32, 64))  # the base is unchanged
    assert space.fixed() == {"backbone": "convnext_nano", "mixup": 0.1}
    assert base.pin("strategy", "probe")["strategy"] == Fixed("probe")
    assert base.narrow("backbone", ["resnet18", "vit_tiny_patch16_224"])["backbone"] == (
        Categorical(("resnet18", "vit_tiny_patch16_224"))
    )


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown search parameter 'batchsize'.*'batch_size'"):
        SearchSpace.from_overrides(SearchSpace.default(), {"batchsize": 32})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"lr": {"low": 1e-3, "high": 1e-4}}, "'lr'.*low < high"),
        ({"lr": {"low": 1e-3}}, "'lr'.*'low' and 'high'"),
        ({"lr": {"low": 1e-4, "hihg": 1e-3}}, "'hihg'.*'high'"),
        ({"epochs": {"low": 2.5, "high": 9}}, "'epochs'.*int"),
        ({"batch_size": ["big"]}, "'batch_size'.*expected int"),
        ({"batch_size": 32.5}, "'batch_size'.*expected int"),
        ({"strategy": 3}, "'strategy'.*expected str"),
        ({"lr": "fast"}, "'lr'.*number"),
        ({"augment": {"low": 1, "high": 2}}, "'augment'.*not a range"),
        ({"epochs": True}, "'epochs'.*integer"),
    ],
)
def test_bad_overrides_name_the_parameter(overrides, match):
    with pytest.raises(ConfigError, match=match):
        SearchSpace.from_overrides(SearchSpace.default(), overrides)


def test_load_space_from_yaml(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("backbone: resnet18\nimg_size: [128, 160]\n", encoding="utf-8")
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "search:\n  lr: {low: 1.0e-4, high: 1.0e-3, log: false}\n  epochs: 5\n", encoding="utf-8"
    )
    a = load_space(plain)
    assert a["backbone"] == Fixed("resnet18")
    assert a["img_size"] == Categorical((128, 160))
    b = load_space(nested, device_type="cuda")
    assert b["lr"] == FloatRange(1e-4, 1e-3, log=False)
    assert b["epochs"] == Fixed(5)
    assert "resnet50" in b["backbone"].choices

    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'lerning_rate'"):
        load_space(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_json_roundtrip():
    space = SearchSpace.from_overrides(
        SearchSpace.default(), {"backbone": "resnet18", "epochs": {"low": 2, "high": 8, "step": 2}}
    )
    data = space.to_json()
    text = json.dumps(data)
    assert SearchSpace.from_json(json.loads(text)) == space
    assert SearchSpace.from_json(text) == space
    assert list(SearchSpace.from_json(text)) == list(space)
    with pytest.raises(ConfigError, match=r"'lr'.*unknown type"):
        SearchSpace.from_json({"params": [{"name": "lr", "type": "beta"}]})


def _check_bounds(space: SearchSpace, params: dict) -> None:
    assert list(params) == list(space)
    for name, dim in space.items():
        value = params[name]
        if isinstance(dim, Categorical):
            assert value in dim.choices
        elif isinstance(dim, FloatRange):
            assert dim.low <= value <= dim.high
        elif isinstance(dim, IntRange):
            assert isinstance(value, int) and dim.low <= value <= dim.high
            assert (value - dim.low) % dim.step == 0
        else:
            assert value == dim.value


def test_sampling_with_optuna_stays_in_bounds():
    space = SearchSpace.from_overrides(
        SearchSpace.default(), {"strategy": "lpft", "epochs": {"low": 2, "high": 10, "step": 2}}
    )
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen_lr = []
    for _ in range(20):
        trial = study.ask()
        params = space.sample(trial)
        _check_bounds(space, params)
        assert "strategy" not in trial.params  # pinned: not suggested
        seen_lr.append(params["lr"])
        study.tell(trial, -math.log(params["lr"]))
    assert len(set(seen_lr)) == 20

    fixed = optuna.trial.FixedTrial(
        {
            "backbone": "resnet18",
            "lr": 1e-4,
            "weight_decay": 0.01,
            "batch_size": 32,
            "img_size": 160,
            "augment": "light",
            "label_smoothing": 0.1,
            "mixup": 0.2,
            "cutmix": 0.0,
            "freeze_epochs": 1,
            "epochs": 4,
        }
    )
    params = space.sample(fixed)
    _check_bounds(space, params)
    assert params["strategy"] == "lpft"


def test_to_train_overrides_builds_a_valid_train_config():
    space = SearchSpace.default(device_type="cuda")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        params = space.sample(study.ask())
        overrides = space.to_train_overrides(params)
        assert "lr" not in overrides
        if params["strategy"] == "probe":  # conditional: a probe samples no fine-tune setting
            assert not FINETUNE_ONLY & set(params)
        else:
            assert overrides["backbone_lr"] == params["lr"]
        cfg = TrainConfig(**overrides)
        assert cfg.backbone == params["backbone"]
        assert cfg.strategy == params["strategy"]
        assert cfg.img_size == params["img_size"]
    with pytest.raises(ConfigError, match="'colour_jitter'"):
        SearchSpace.to_train_overrides({"colour_jitter": 0.2})
