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


def test_a_settled_trial_is_finished_by_the_refit_not_trained_again(image_folder, tmp_path):
    cfg = _cfg(strategy="lpft", epochs=2, feature_cache=str(tmp_path / "cache"))
    prepared, outcome = _trial_weights(image_folder, tmp_path, cfg)
    # it ran its configured epochs: nothing more to give
    assert outcome.stopped == "epochs" and outcome.settled
    assert outcome.epoch_seconds and outcome.epoch_seconds > 0
    assert outcome.info()["settled"] is True and outcome.reserved_seconds == 0.0
    warm = WarmStart(path=outcome.weights, val_accuracy=0.5, epochs=2, trial=3, settled=True,
                     feature_ips=123.0)  # fmt: skip
    result = train_classifier(
        None, cfg, run_dir=tmp_path / "run", prepared=prepared, warm_start=warm
    )
    summary = next(p for p in result.phases if p["name"] == "fine-tune")
    assert summary["epochs"] == 0 and "settled" in summary["not_continued"]
    # the probe read the trial's features from the cache: their speed is the trial's
    probe = next(p for p in result.phases if p["name"] == "linear probe")
    assert probe["feature_cache_hits"] == 2 and probe["feature_images_per_second"] == 123.0
    assert summary["warm_start"]["kept_as_is"] is True
    assert result.history == []


def test_the_refit_keeps_a_trial_when_not_one_of_its_epochs_fits(image_folder, tmp_path):
    cfg = _cfg(strategy="finetune", epochs=2)
    prepared, outcome = _trial_weights(image_folder, tmp_path, cfg)
    warm = WarmStart(path=outcome.weights, val_accuracy=0.5, epochs=2, trial=3,
                     epoch_seconds=3600.0)  # fmt: skip
    result = train_classifier(
        None, cfg.model_copy(update={"budget": "120s"}), run_dir=tmp_path / "run",
        prepared=prepared, warm_start=warm,
    )  # fmt: skip
    summary = next(p for p in result.phases if p["name"] == "fine-tune")
    assert summary["epochs"] == 0 and "less than one of trial 3's" in summary["not_continued"]


def test_a_trial_planned_like_a_run_leaves_the_finishing_time(image_folder, tmp_path):
    """The search's default trial is the single run's fine-tune: it plans its epochs to end
    where the single run's would, before the final evaluation, and says what it held back."""
    cfg = _cfg(strategy="finetune", epochs=30)
    prepared = prepare_data(image_folder, cfg, run_dir=tmp_path / "run")

    def trial(number: int, plan_as_run: bool):
        return run_trial(
            prepared, cfg, trial_dir=tmp_path / "run" / "trials" / f"{number:04d}",
            deadline=Deadline(7.0), plan_as_run=plan_as_run,
        )  # fmt: skip

    # 7 s: a trial trains in them; a run's fine-tune keeps 8 s back for its evaluation
    assert trial(0, False).epochs > 0
    planned = trial(1, True)
    assert planned.epochs == 0 and planned.value is None
    assert planned.reserved_seconds >= 8.0  # the run's reserve, plus the evaluation's estimate
    assert planned.info()["reserved_seconds"] == round(planned.reserved_seconds, 3)
