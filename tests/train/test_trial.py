"""Search trials (run_trial) and the refit's warm start from a trial's weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from visionflow.config import load_train_config
from visionflow.errors import BudgetError
from visionflow.train.budget import Deadline
from visionflow.train.recipe import WarmStart, prepare_data, run_trial, train_classifier

TINY = {"backbone": "test_efficientnet", "weights": "none", "img_size": 32, "budget": None,
        "epochs": 3, "batch_size": 8, "patience": None, "num_workers": 0}  # fmt: skip


def _cfg(**kw):
    return load_train_config(overrides={**TINY, **kw})


def test_trial_reports_the_best_accuracy_so_far_and_keeps_weights_on_request(
    image_folder, tmp_path
):
    cfg = _cfg(strategy="finetune", epochs=4)
    prepared = prepare_data(image_folder, cfg, run_dir=tmp_path / "run")
    reported: list[tuple[int, float]] = []
    asked: list[float] = []

    def on_epoch(step: int, value: float) -> bool:
        reported.append((step, value))
        return False

    outcome = run_trial(
        prepared,
        cfg,
        trial_dir=tmp_path / "run" / "trials" / "0000",
        deadline=Deadline(None),
        on_epoch=on_epoch,
        keep_weights=lambda value: asked.append(value) or True,
    )
    curve = [acc for _, acc in outcome.curve]
    assert asked == [outcome.finetune_val]  # asked with the fine-tune's own score
    assert outcome.finetune_loss is not None
    assert outcome.info()["finetune_loss"] == outcome.finetune_loss
    assert [s for s, _ in reported] == [1, 2, 3, 4]
    # what the trial would score if stopped after each epoch: the best epoch so far
    assert [v for _, v in reported] == [max(curve[: i + 1]) for i in range(len(curve))]
    assert outcome.value == max(curve) and outcome.finetune_val == outcome.value
    assert outcome.val_loss is not None
    assert outcome.weights == tmp_path / "run" / "trials" / "0000" / "model.safetensors"
    assert outcome.weights.is_file()
    assert outcome.info()["weights"] == str(outcome.weights)
    assert not (tmp_path / "run" / "trials" / "0000" / "metrics.json").exists()

    declined = run_trial(
        prepared,
        cfg,
        trial_dir=tmp_path / "run" / "trials" / "0001",
        deadline=Deadline(None),
        keep_weights=lambda value: False,
    )
    assert declined.weights is None and "weights" not in declined.info()
    assert not (tmp_path / "run" / "trials" / "0001" / "model.safetensors").exists()


def test_a_probe_trial_keeps_no_weights(image_folder, tmp_path):
    cfg = _cfg(strategy="probe")
    prepared = prepare_data(image_folder, cfg, run_dir=tmp_path / "run")
    outcome = run_trial(
        prepared,
        cfg,
        trial_dir=tmp_path / "run" / "trials" / "0000",
        deadline=Deadline(None),
        keep_weights=lambda value: True,
    )
    assert outcome.value == outcome.probe_val and outcome.weights is None
    assert outcome.info()["probe_c"] == outcome.probe_c and outcome.probe_c > 0
    assert outcome.val_loss is not None


def test_a_trial_out_of_time_stops_its_feature_pass(image_folder, tmp_path):
    cfg = _cfg(strategy="probe", feature_cache=str(tmp_path / "cache"))
    prepared = prepare_data(image_folder, cfg, run_dir=tmp_path / "run")
    with pytest.raises(BudgetError, match="extracting features"):
        run_trial(
            prepared,
            cfg,
            trial_dir=tmp_path / "run" / "trials" / "0000",
            deadline=Deadline(10.0, spent=10.0),  # already spent
        )
    assert not list((tmp_path / "cache").glob("*.safetensors")), "no partial features cached"


def _trial_weights(image_folder, tmp_path, cfg):
    prepared = prepare_data(image_folder, cfg, run_dir=tmp_path / "run")
    outcome = run_trial(
        prepared,
        cfg,
        trial_dir=tmp_path / "run" / "trials" / "0003",
        deadline=Deadline(None),
        keep_weights=lambda value: True,
    )
    assert outcome.weights is not None
    return prepared, outcome


def test_refit_keeps_the_trial_weights_when_continuing_does_not_beat_them(image_folder, tmp_path):
    cfg = _cfg(strategy="finetune", epochs=2)
    prepared, outcome = _trial_weights(image_folder, tmp_path, cfg)
    # an accuracy no fine-tune can beat: the refit must end with the trial's weights
    warm = WarmStart(path=outcome.weights, val_accuracy=1.01, val_loss=0.0, epochs=2, trial=3)
    result = train_classifier(
        None, cfg, run_dir=tmp_path / "run", prepared=prepared, warm_start=warm
    )
    assert result.chosen == "finetune"
    summary = next(p for p in result.phases if p["name"] == "fine-tune")
    assert summary["warm_start"] == {
        "trial": 3, "epochs": 2, "val_accuracy": 1.01, "kept_as_is": True
    }  # fmt: skip
    assert summary["epochs"] == 2, "the refit still trained, then compared"
    kept = load_file(str(tmp_path / "run" / "model.safetensors"))
    trial = load_file(str(outcome.weights))
    assert kept.keys() == trial.keys()
    assert all(torch.equal(kept[k], trial[k]) for k in trial)


def test_refit_continues_from_the_trial_weights(image_folder, tmp_path):
    cfg = _cfg(strategy="finetune", epochs=2)
    prepared, outcome = _trial_weights(image_folder, tmp_path, cfg)
    warm = WarmStart(path=outcome.weights, val_accuracy=0.0, epochs=2, trial=3)
    result = train_classifier(
        None, cfg, run_dir=tmp_path / "run", prepared=prepared, warm_start=warm
    )
    summary = next(p for p in result.phases if p["name"] == "fine-tune")
    assert summary["warm_start"]["kept_as_is"] is False
    assert summary["val_accuracy"] == max(h["val_accuracy"] for h in result.history)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["chosen"] == "finetune"
