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
from visionflow.search.runner import _queued_trials, build_space, run_worker, search_classifier

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


def test_queue_is_cheap_first_then_the_default_recipe():
    space = SearchSpace.from_overrides(
        SearchSpace.default(), {"backbone": ["a_net", "b_net"], "img_size": [96, 128, 160]}
    )
    queue = _queued_trials(space, TrainConfig())
    probes = [q for q in queue if q["strategy"] == "probe"]
    assert [(q["backbone"], q["img_size"]) for q in probes] == [
        ("a_net", 160),
        ("a_net", 96),
        ("b_net", 160),
        ("b_net", 96),
    ]
    assert queue[: len(probes)] == probes, "probes come first"
    default = queue[-1]
    assert default["strategy"] == "lpft" and default["batch_size"] == 32
    assert set(default) <= set(space)


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
    assert by_number[0]["strategy"] == "probe", "the cheap probe trial runs first"
    assert result.best is not None and result.best["state"] == "complete"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["search"]["best"]["number"] == result.best["number"]
    assert set(metrics["splits"]) == {"train", "val", "test"}
    report = (run_dir / "report.html").read_text()
    assert "leaderboard" in report.lower()
    for png in ("search_history.png", "search_importance.png", "search_curves.png"):
        assert (run_dir / png).stat().st_size > 0
    # trials never evaluate on the test split: only the refit's metrics have one
    trial_files = {p.name for p in (run_dir / "trials").rglob("*.json")}
    assert "metrics.json" not in trial_files
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
