"""The AutoML run: space building, cheap-first queue, search + refit, resume, local workers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import visionflow
from visionflow.cli import _parse_params
from visionflow.config import SearchConfig, TrainConfig, load_search_config
from visionflow.errors import ConfigError, WeightsError
from visionflow.search import Fixed, SearchSpace, Study
from visionflow.search.runner import (
    _RUN_ATTR,
    _expected_seconds,
    _Objective,
    _queued_trials,
    _refit_choice,
    _refit_epoch_seconds,
    _trial_config,
    _warm_start,
    _work,
    build_space,
    run_worker,
    search_classifier,
)
from visionflow.train.recipe import prepare_data

TINY = TrainConfig(
    backbone="test_efficientnet",
    weights="none",
    img_size=32,
    batch_size=8,
    budget=None,
    num_workers=0,
    patience=None,
)
EXPLICIT = {"backbone", "weights", "img_size"}
#: Short fine-tunes so a trial takes a second or two.
SPACE = {"epochs": {"low": 1, "high": 3}, "batch_size": [4, 8], "freeze_epochs": 0}


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "leaderboard.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_build_space_pins_explicit_settings_and_drops_backbones_without_weights(monkeypatch):
    monkeypatch.setenv("VISIONFLOW_OFFLINE", "1")
    config = TrainConfig(img_size=64)
    space, dropped = build_space(config, explicit={"img_size"})
    assert space["img_size"] == Fixed(64)
    # offline, only backbones with packaged weights stay candidates; the rest say why
    assert dropped.get("resnet18")
    backbone = space["backbone"]
    kept = backbone.choices if hasattr(backbone, "choices") else (backbone.value,)
    assert "resnet18" not in kept and "tf_efficientnet_lite0" in kept


def test_build_space_refuses_a_pinned_backbone_without_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("VISIONFLOW_OFFLINE", "1")
    config = TrainConfig(backbone="resnet18", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError):
        build_space(config, explicit={"backbone", "weights"})


def test_queue_is_the_default_recipe_then_probes_largest_size_first():
    space = SearchSpace.from_overrides(
        SearchSpace.default(), {"backbone": ["a_net", "b_net"], "img_size": [96, 128, 160]}
    )
    queue = _queued_trials(space, TrainConfig())
    default = queue[0]
    assert default["strategy"] == "lpft" and default["batch_size"] == 32
    assert default["backbone"] == "a_net" and default["img_size"] == 160
    assert set(default) <= set(space)
    assert [(q["backbone"], q["img_size"]) for q in queue[1:]] == [
        ("a_net", 160),
        ("b_net", 160),
        ("a_net", 96),
        ("b_net", 96),
    ]
    assert all(q["strategy"] == "probe" for q in queue[1:])
    # a space without fine-tuning strategies queues the probes alone
    probes_only = SearchSpace.from_overrides(space, {"strategy": "probe"})
    assert [q.get("strategy", "probe") for q in _queued_trials(probes_only, TrainConfig())] == [
        "probe"
    ] * 4


def test_search_config_from_file_and_unknown_keys(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("budget: 5m\nsearch:\n  workers: 2\n  space:\n    lr: 1.0e-4\n")
    cfg = load_search_config(file=file)
    assert cfg.workers == 2 and cfg.space == {"lr": 1e-4}
    file.write_text("search:\n  worker: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'workers'"):
        load_search_config(file=file)


def test_cli_param_parsing():
    assert _parse_params(["lr=1e-4", "batch_size=[16, 32]", "strategy=probe"]) == {
        "lr": 1e-4,
        "batch_size": [16, 32],
        "strategy": "probe",
    }
    assert _parse_params(["lr={low: 1e-5, high: 1e-3}"])["lr"] == {"low": 1e-5, "high": 1e-3}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        _parse_params(["lr"])


def test_search_without_budget_needs_a_trial_limit(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="trial limit"):
        search_classifier(
            image_folder, TINY, SearchConfig(), run_dir=tmp_path / "r", explicit=EXPLICIT
        )


def test_search_then_refit(image_folder, tmp_path):
    run_dir = tmp_path / "runs" / "s"
    result = search_classifier(
        image_folder,
        TINY,
        SearchConfig(trials=5, space=SPACE),
        run_dir=run_dir,
        explicit=EXPLICIT,
    )
    counts = result.counts
    assert counts["complete"] + counts["pruned"] == 5
    rows = _rows(run_dir)
    assert len(rows) == 5 + counts["failed"]
    by_number = {int(r["number"]): r for r in rows}
    assert by_number[0]["strategy"] == "lpft", "the default recipe runs first"
    assert by_number[1]["strategy"] == "probe"
    assert result.best is not None and result.best["state"] == "complete"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["search"]["best"]["number"] == result.best["number"]
    assert isinstance(metrics["search"]["refit_trial"], int) and metrics["search"]["refit_reason"]
    # the refit reuses the chosen trial's probe C instead of cross-validating again
    assert metrics["search"]["refit_settings"]["probe_c"] > 0
    assert (
        next(p for p in metrics["phases"] if p["name"] == "linear probe")["C_selected_by"]
        == "given"
    )
    assert set(metrics["splits"]) == {"train", "val", "test"}
    report = (run_dir / "report.html").read_text()
    assert "leaderboard" in report.lower()
    for png in ("search_history.png", "search_importance.png", "search_curves.png"):
        assert (run_dir / png).stat().st_size > 0
    # what only the search needed is gone once the run is done (trials never evaluate on
    # the test split: tests/train/test_trial.py)
    assert not (run_dir / "trials").exists() and not (run_dir / "features").exists()
    model = visionflow.load(run_dir)
    assert model.classes == ["blue", "green", "red"]
    state = json.loads((run_dir / "search.json").read_text())
    assert state["stage"] == "done"
    with pytest.raises(Exception, match="already finished"):
        search_classifier(
            image_folder, TINY, SearchConfig(trials=5), run_dir=run_dir, explicit=EXPLICIT
        )


def test_two_local_workers_share_one_journal_study(image_folder, tmp_path):
    run_dir = tmp_path / "runs" / "w"
    result = search_classifier(
        image_folder,
        TINY,
        SearchConfig(trials=6, workers=2, space=SPACE),
        run_dir=run_dir,
        explicit=EXPLICIT,
    )
    assert result.counts["complete"] + result.counts["pruned"] == 6
    assert result.counts["running"] == 0
    study = Study.load("w", storage=str(run_dir / "study.journal"))
    board = study.leaderboard()
    numbers = [r["number"] for r in board]
    assert len(numbers) == len(set(numbers))
    pids = {r["info"]["worker"]["pid"] for r in board if "worker" in r["info"]}
    assert len(pids) == 2 and os.getpid() not in pids, "both worker processes took trials"


def test_worker_refuses_a_missing_study(tmp_path):
    with pytest.raises(ConfigError, match="no study"):
        run_worker("nope", f"sqlite:///{tmp_path / 'x.db'}", wait=0)
    with pytest.raises(ConfigError, match="--storage"):
        run_worker("nope", None, wait=0)


@pytest.mark.slow
def test_interrupted_train_resumes_the_study(image_folder, tmp_path):
    """kill -9 of `visionflow train` mid-search; the same command again finishes the study."""
    space = tmp_path / "space.yaml"
    space.write_text("epochs: {low: 3, high: 6}\nstrategy: lpft\nbatch_size: 4\n")
    args = [sys.executable, "-m", "visionflow.cli", "train", str(image_folder),
            "--backbone", "test_efficientnet", "--weights", "none", "--img-size", "32",
            "--budget", "none", "--trials", "6", "--pruner", "none", "--space", str(space),
            "--out", str(tmp_path / "runs"), "--name", "again"]  # fmt: skip
    run_dir = tmp_path / "runs" / "again"
    env = {**os.environ, "VISIONFLOW_OFFLINE": "1"}
    log = tmp_path / "first.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "leaderboard.csv").is_file() and len(_rows(run_dir)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished_before = len(_rows(run_dir))
    assert json.loads((run_dir / "search.json").read_text())["stage"] == "searching"

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    state = json.loads((run_dir / "search.json").read_text())
    assert state["stage"] == "done"
    counts = state["counts"]
    assert counts["complete"] == 6, counts  # the limit counts finished trials once
    assert counts["running"] == 0
    rows = _rows(run_dir)
    numbers = [int(r["number"]) for r in rows]
    assert len(numbers) == len(set(numbers))
    assert len(rows) >= finished_before + 1, "the study went on, it did not start over"
    assert counts["failed"] <= 1  # the trial the kill interrupted, if any, is failed once


def _row(number, strategy, seconds, state="complete", **params):
    return {
        "number": number,
        "state": state,
        "value": 0.5,
        "params": {"strategy": strategy, **params},
        "duration_s": seconds,
        "info": {},
    }


def test_expected_trial_seconds_come_from_finished_trials_of_the_same_kind():
    rows = [
        _row(0, "probe", 40.0, backbone="a", img_size=224),  # paid for its features
        _row(1, "probe", 20.0, backbone="a", img_size=128),
        _row(2, "probe", 3.0, backbone="a", img_size=224),  # cached features
        _row(3, "lpft", 50.0, backbone="a", img_size=224),
        _row(4, "lpft", 10.0, state="pruned", backbone="a", img_size=224),
        _row(5, "lpft", 90.0, backbone="a", img_size=224),
        _row(6, "finetune", 500.0, state="failed", backbone="a", img_size=224),
    ]
    probe = {"strategy": "probe", "backbone": "a"}
    assert _expected_seconds(rows, {**probe, "img_size": 224}) == 3.0  # features cached
    assert _expected_seconds(rows, {**probe, "img_size": 160}) == 30.0  # median of 40 and 20
    assert _expected_seconds(rows, {"strategy": "lpft", "backbone": "b"}) == 50.0
    assert _expected_seconds(rows, {"strategy": "finetune"}) is None  # only a failed one


def test_warm_start_from_a_fine_tune_that_kept_its_weights(tmp_path):
    weights = tmp_path / "trials" / "0007" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"x")
    info = {"weights": str(weights), "finetune_val": 0.9, "finetune_loss": 0.3, "epochs": 4}
    best = {"number": 7, "value": 0.9, "info": info, "params": {"strategy": "lpft"}}
    warm = _warm_start(best, tmp_path)
    assert warm is not None
    assert (warm.path, warm.val_accuracy, warm.val_loss, warm.epochs, warm.trial) == (
        weights, 0.9, 0.3, 4, 7
    )  # fmt: skip
    # the probe scored higher: the refit still continues the fine-tune (and keeps the better
    # of its probe and the continued fine-tune), measured against the fine-tune's own score
    warm = _warm_start({**best, "value": 0.95}, tmp_path)
    assert warm is not None and warm.val_accuracy == 0.9
    assert _warm_start({**best, "info": {**info, "finetune_val": None}}, tmp_path) is None
    assert _warm_start({**best, "info": {**info, "weights": None}}, tmp_path) is None
    assert _warm_start({**best, "number": 8}, tmp_path) is None  # no file
    assert _warm_start(None, tmp_path) is None


def _trial_row(number, value, *, strategy, backbone="lite0", size=224, seconds=None, **info):
    return {
        "number": number,
        "state": "complete",
        "value": value,
        "params": {"strategy": strategy, "backbone": backbone, "img_size": size},
        "duration_s": seconds,
        "info": {"strategy": strategy, **info},
    }


def _kept_finetune(tmp_path, number, value, *, probe_val, epochs=3, seconds=60.0, **kw):
    weights = tmp_path / "trials" / f"{number:04d}" / "model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"x")
    return _trial_row(
        number, value, strategy="lpft", seconds=seconds, probe_val=probe_val,
        finetune_val=value, epochs=epochs, weights=str(weights), **kw,
    )  # fmt: skip


def test_refit_continues_the_fine_tune_unless_features_are_clearly_better(tmp_path):
    """Issue 3's measured failure: a probe of a slower backbone (90.0%) led a 2-epoch LP-FT
    (86.7%) on validation, and the refit traded the long fine-tune for a short one."""
    inc = _kept_finetune(tmp_path, 0, 52 / 60, probe_val=53 / 60, epochs=2, seconds=46.0,
                         feature_ips=40.0)  # fmt: skip
    # one validation image (of 60) better features: not enough
    probe = _trial_row(1, 54 / 60, strategy="probe", backbone="lite2", size=260, seconds=30.0,
                 probe_val=54 / 60, feature_ips=15.0)  # fmt: skip
    chosen, why = _refit_choice([probe, inc], tmp_path, n_val=60, refit_seconds=120.0)
    assert chosen is inc and "not ahead" in why
    # clearly better features, but the refit fits few epochs of the slower backbone
    probe = {**probe, "value": 0.95, "info": {**probe["info"], "probe_val": 0.95}}
    assert _refit_epoch_seconds([probe, inc], probe["params"]) == pytest.approx(23.0 * 40 / 15)
    chosen, why = _refit_choice([probe, inc], tmp_path, n_val=60, refit_seconds=120.0)
    assert chosen is inc and "fine-tune epochs" in why
    # with time enough for it, the better backbone is refitted
    chosen, why = _refit_choice([probe, inc], tmp_path, n_val=60, refit_seconds=900.0)
    assert chosen is probe and "better features" in why
    # the same when nothing tells its cost
    bare = {**probe, "info": {k: v for k, v in probe["info"].items() if k != "feature_ips"}}
    assert _refit_choice([bare, inc], tmp_path, n_val=60, refit_seconds=120.0)[0] is bare


def test_refit_takes_the_best_trial_when_it_is_the_incumbent_or_there_is_none(tmp_path):
    inc = _kept_finetune(tmp_path, 0, 0.95, probe_val=0.9)
    probe = _trial_row(1, 0.92, strategy="probe", probe_val=0.92)
    assert _refit_choice([inc, probe], tmp_path, n_val=60, refit_seconds=60.0)[0] is inc
    assert _refit_choice([probe], tmp_path, n_val=60, refit_seconds=60.0)[0] is probe
    assert _refit_choice([], tmp_path, n_val=60, refit_seconds=60.0) == (None, "no trial completed")
    failed = {**probe, "state": "failed", "value": None}
    assert _refit_choice([failed], tmp_path, n_val=60, refit_seconds=60.0)[0] is None


def test_a_probe_beats_a_finished_fine_tune_only_by_more_than_one_image(tmp_path):
    """Once the incumbent's fine-tune settled, or not one more epoch of it fits, its score is
    final: a probe is compared with it as it is, not by features and refit epochs."""
    inc = _kept_finetune(tmp_path, 0, 54 / 60, probe_val=50 / 60, epochs=12, seconds=240.0,
                         settled=True)  # fmt: skip
    close = _trial_row(1, 55 / 60, strategy="probe", backbone="lite2", probe_val=55 / 60)
    chosen, why = _refit_choice([close, inc], tmp_path, n_val=60, refit_seconds=600.0)
    assert chosen is inc and "finished fine-tune" in why
    ahead = _trial_row(1, 57 / 60, strategy="probe", backbone="lite2", probe_val=57 / 60)
    chosen, why = _refit_choice([ahead, inc], tmp_path, n_val=60, refit_seconds=600.0)
    assert chosen is ahead and "leads trial 0's finished fine-tune by 5.0 points" in why
    # not settled, but the refit's 10 s fit no epoch of its 20 s: final too
    running = {**inc, "info": {**inc["info"], "settled": False}}
    assert _refit_choice([ahead, running], tmp_path, n_val=60, refit_seconds=10.0)[0] is ahead
    assert "finished" not in _refit_choice([ahead, running], tmp_path, n_val=60,
                                           refit_seconds=600.0)[1]  # fmt: skip


def test_the_default_trial_decides_its_augmentation_as_the_single_run_does(tmp_path):
    """The single run's augment="auto" is light below 20 planned epochs and medium from 20; the
    default trial must do the same, not take the policy the space recorded for it (at 10
    minutes the single run planned 30 epochs with medium, the trial ran light)."""
    base = TINY.model_copy(update={"augment": "auto"})
    params = {"augment": "light"}
    assert _trial_config(base, params, tmp_path, default=True).augment == "auto"
    assert _trial_config(base, params, tmp_path).augment == "light"
    pinned = TINY.model_copy(update={"augment": "heavy"})
    assert _trial_config(pinned, params, tmp_path, default=True).augment == "light"


def test_the_other_trials_get_the_time_the_default_trial_leaves(tmp_path, image_folder):
    study, objective = _study_with_run(tmp_path, image_folder, time.time() + 10)
    now = time.time()
    run = {**study.attrs[_RUN_ATTR], "budget_end": now + 110, "refit_fraction": 0.4}
    study.set_attr(_RUN_ATTR, run)
    objective.after_default(reserved=10.0)
    # 100 s left after the refit's 10: 60 % of them for trials
    assert study.attrs[_RUN_ATTR]["search_end"] == pytest.approx(now + 60, abs=2)
    study.set_attr(_RUN_ATTR, {**run, "search_end": now + 100})
    objective.after_default(reserved=10.0)
    assert study.attrs[_RUN_ATTR]["search_end"] == now + 100, "never shortened"


def test_with_a_budget_the_default_trial_is_planned_like_the_single_run(image_folder, tmp_path):
    run_dir = tmp_path / "runs" / "b"
    config = TINY.model_copy(update={"budget": "40s", "epochs": 3})
    search_classifier(image_folder, config, SearchConfig(space=SPACE), run_dir=run_dir,
                      explicit=EXPLICIT)  # fmt: skip
    rows = _rows(run_dir)
    default = json.loads(next(r for r in rows if r["number"] == "0")["info"])
    assert default["reserved_seconds"] >= 8.0, "it left the refit time to finish it"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["search"]["total_seconds"] <= 40 * 1.1
    # it ran its 3 epochs (settled) and led: the refit finished it without training it again
    assert default["settled"] and metrics["search"]["refit_trial"] == 0
    ft = next(p for p in metrics["phases"] if p["name"] == "fine-tune")
    assert ft["epochs"] == 0 and "settled" in ft["not_continued"]


def _study_with_run(tmp_path, image_folder, search_end):
    run_dir = tmp_path / "run"
    prepare_data(image_folder, TINY, run_dir=run_dir)
    space = SearchSpace.from_overrides(SearchSpace.default(), {"backbone": "test_efficientnet"})
    study = Study.open("s", run_dir=run_dir, space=space, pruner="none")
    study.set_attr(_RUN_ATTR, {"search_end": search_end, "trial_seconds": None, "max_trials": 3})
    return study, _Objective(study, run_dir, TINY)


def test_search_with_a_deadline_stops_at_full_validation_accuracy(tmp_path, image_folder):
    study, objective = _study_with_run(tmp_path, image_folder, time.time() + 3600)
    handle = study.ask()
    study.tell(handle, 1.0)
    assert _work(study, objective) == 0, "nothing is left to find: the refit gets the time"
    assert study.counts()["complete"] == 1


def test_a_trial_that_would_overrun_the_search_is_not_started(tmp_path, image_folder, monkeypatch):
    import visionflow.search.runner as runner

    study, objective = _study_with_run(tmp_path, image_folder, time.time() + 3600)
    monkeypatch.setattr(runner, "_expected_seconds", lambda rows, params: 10_000.0)
    assert _work(study, objective) == 1
    assert objective.out_of_time
    (row,) = study.leaderboard()
    assert row["state"] == "failed"
    assert row["info"]["note"].startswith("not started")
    assert "not started" in row["info"]["error"]


def test_a_fine_tune_trial_too_short_to_say_much_is_not_started():
    from visionflow.search.runner import _not_started_reason

    lpft = _row(3, "lpft", 54.0, backbone="a", img_size=224)
    lpft["info"] = {"epochs": 4}  # 13.5 s an epoch, its probe included
    rows = [_row(0, "probe", 8.0, backbone="a", img_size=224), lpft]
    params = {"strategy": "finetune", "backbone": "a", "img_size": 224}
    why = _not_started_reason(rows, params, left=200.0, cap=54.0)
    assert why is not None and "fewer than 5" in why
    assert _not_started_reason(rows, params, left=200.0, cap=80.0) is None  # 5.9 epochs fit
    assert _not_started_reason(rows, params, left=60.0, cap=None) is not None
    probe = {"strategy": "probe", "backbone": "a", "img_size": 224}
    assert _not_started_reason(rows, probe, left=10.0, cap=54.0) is None  # cached: ~8 s
    assert "takes about 8 s" in str(_not_started_reason(rows, probe, left=5.0, cap=54.0))
