import pytest

from visionflow.config import load_train_config
from visionflow.errors import BudgetError, ConfigError


def test_precedence_defaults_preset_file_flags(tmp_path):
    assert load_train_config().budget == "10m"
    assert load_train_config(preset="fast").budget == "5m"
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text("budget: 7m\nbackbone: resnet18\nlr: 0.01\n")
    cfg = load_train_config(preset="fast", file=cfg_file)
    assert (cfg.budget, cfg.backbone) == ("7m", "resnet18")
    cfg = load_train_config(preset="fast", file=cfg_file, overrides={"budget": "3m", "lr": None})
    assert cfg.budget == "3m" and cfg.lr == 0.01  # None flags do not override


def test_unknown_key_did_you_mean(tmp_path):
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text("bakbone: resnet18\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: unknown setting 'bakbone'.*'backbone'"):
        load_train_config(file=cfg_file)
    with pytest.raises(ConfigError, match="did you mean 'fast'"):
        load_train_config(preset="fats")


def test_invalid_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        load_train_config(overrides={"batch_size": 0})
    with pytest.raises(ConfigError, match="augment"):
        load_train_config(overrides={"augment": "extreme"})
    with pytest.raises(BudgetError, match="not a duration"):
        load_train_config(overrides={"budget": "soon"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(file=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(file=tmp_path / "missing.yaml")
