"""Study: resumable journal studies, pruning, failures, interrupts and SQL storage."""

from __future__ import annotations

import csv
import math

import pytest

from visionflow.errors import ConfigError
from visionflow.search import (
    SearchSpace,
    StorageError,
    Study,
    TrialHandle,
    TrialPruned,
    open_storage,
)


def small_space() -> SearchSpace:
    return SearchSpace.from_overrides(
        SearchSpace.default(),
        {"backbone": "resnet18", "strategy": "lpft", "epochs": {"low": 3, "high": 6}},
    )


def quadratic(trial: TrialHandle) -> float:
    """Best at lr = 3e-4 (in log space)."""
    return -((math.log10(trial.params["lr"]) + 3.5) ** 2)


def test_journal_study_runs_and_resumes(tmp_path):
    space = small_space()
    study = Study.open("demo", run_dir=tmp_path, space=space, pruner="none")
    assert study.optimize(quadratic, n_trials=4) == 4
    assert (tmp_path / "study.journal").is_file()
    assert study.counts()["complete"] == 4

    again = Study.open("demo", run_dir=tmp_path, space=space, pruner="none")
    assert again.counts()["complete"] == 4
    again.optimize(quadratic, n_trials=3)
    counts = again.counts()
    assert counts["complete"] == 7 and counts["failed"] == 0
    board = again.leaderboard()
    assert sorted(r["number"] for r in board) == list(range(7))
    values = [r["value"] for r in board]
    assert values == sorted(values, reverse=True)
    best = again.best()
    assert best is not None and best["value"] == max(values)
    assert best["params"]["backbone"] == "resnet18"  # pinned values are in the params
    assert list(best["params"]) == list(space)
    assert best["duration_s"] is not None and best["duration_s"] >= 0

    path = again.write_leaderboard_csv(tmp_path / "leaderboard.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7
    assert rows[0]["rank"] == "1" and int(rows[0]["number"]) == best["number"]
    assert float(rows[0]["lr"]) == pytest.approx(best["params"]["lr"])
    assert {"state", "value", "duration_s", "backbone", "info"} <= set(rows[0])


def test_max_trials_counts_the_whole_study(tmp_path):
    space = small_space()
    study = Study.open("capped", storage=tmp_path / "s.journal", space=space, pruner="none")
    assert study.optimize(quadratic, n_trials=3) == 3
    assert study.optimize(quadratic, max_trials=5) == 2
    assert study.optimize(quadratic, max_trials=5) == 0
    assert study.counts()["complete"] == 5


def test_ask_tell_and_info(tmp_path):
    study = Study.open("manual", run_dir=tmp_path, space=small_space(), pruner="none")
    handle = study.ask()
    assert handle.number == 0
    handle.set_info("val_acc", 0.5)
    with pytest.raises(ConfigError, match="JSON"):
        handle.set_info("bad", object())
    study.tell(handle, 0.5)
    nan = study.ask()
    study.tell(nan, float("nan"))
    board = study.leaderboard()
    assert [r["state"] for r in board] == ["complete", "failed"]
    assert board[0]["info"] == {"val_acc": 0.5}
    assert "nan" in board[1]["info"]["error"]
    with pytest.raises(ConfigError, match="state"):
        study.tell(study.ask(), 1.0, state="done")  # type: ignore[arg-type]


def test_median_pruner_prunes_bad_trials(tmp_path):
    study = Study.open("prune", run_dir=tmp_path, space=small_space(), pruner="median", seed=3)
    started = []

    def objective(trial: TrialHandle) -> float:
        # The first three trials are good; later ones alternate bad and good.
        good = trial.number < 3 or trial.number % 2 == 0
        started.append(trial.number)
        score = 0.0
        for step in range(1, 6):
            score = (0.8 if good else 0.1) + 0.01 * step
            trial.report(score, step)
            if trial.should_prune():
                raise TrialPruned()
        return score

    study.optimize(objective, n_trials=10)
    counts = study.counts()
    assert counts["pruned"] >= 3
    assert counts["complete"] + counts["pruned"] == 10
    board = study.leaderboard()
    assert all(r["state"] == "complete" for r in board[: counts["complete"]])
    pruned = [r for r in board if r["state"] == "pruned"]
    assert all(r["number"] % 2 == 1 and r["value"] is not None for r in pruned)


def test_hyperband_pruner_runs(tmp_path):
    study = Study.open("hb", run_dir=tmp_path, space=small_space(), pruner="hyperband")

    def objective(trial: TrialHandle) -> float:
        base = -abs(math.log10(trial.params["lr"]) + 3.5)
        for step in range(1, 10):
            trial.report(base + 0.01 * step, step)
            if trial.should_prune():
                raise TrialPruned()
        return base

    study.optimize(objective, n_trials=12)  # past TPE's 10 startup trials
    counts = study.counts()
    assert counts["complete"] + counts["pruned"] == 12


def test_successive_halving_prunes_trailing_trials_at_epoch_two(tmp_path):
    study = Study.open("asha", run_dir=tmp_path, space=small_space(), pruner="asha")
    stopped_at: dict[int, int] = {}

    def objective(trial: TrialHandle) -> float:
        value = 1.0 - 0.1 * trial.number  # each trial trails the ones before it
        for step in range(1, 10):
            trial.report(value, step)
            if trial.should_prune():
                stopped_at[trial.number] = step
                raise TrialPruned()
        return value

    study.optimize(objective, n_trials=4)
    assert 0 not in stopped_at, "the first trial has nobody to trail"
    assert stopped_at == {1: 2, 2: 2, 3: 2}, "the first rung is epoch 2, not epoch 1"


def test_caught_exception_fails_the_trial_and_goes_on(tmp_path):
    study = Study.open("fails", run_dir=tmp_path, space=small_space(), pruner="none")

    def objective(trial: TrialHandle) -> float:
        if trial.number == 1:
            raise RuntimeError("CUDA out of memory")
        return 1.0

    assert study.optimize(objective, n_trials=3, catch=(RuntimeError,)) == 3
    assert study.counts()["failed"] == 1 and study.counts()["complete"] == 2
    failed = [r for r in study.leaderboard() if r["state"] == "failed"]
    assert failed[0]["number"] == 1
    assert "CUDA out of memory" in failed[0]["info"]["error"]
    assert study.leaderboard()[-1]["state"] == "failed"  # failed trials come last

    def crash(trial: TrialHandle) -> float:
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        study.optimize(crash, n_trials=2, catch=(RuntimeError,))
    assert study.counts()["failed"] == 2 and study.counts()["running"] == 0


def test_keyboard_interrupt_fails_the_trial_and_propagates(tmp_path):
    study = Study.open("interrupt", run_dir=tmp_path, space=small_space(), pruner="none")

    def objective(trial: TrialHandle) -> float:
        if trial.number == 1:
            raise KeyboardInterrupt
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=5, catch=(Exception,))
    counts = study.counts()
    assert counts == {**counts, "complete": 1, "failed": 1, "running": 0}
    # Resuming continues the numbering after the failed trial.
    again = Study.open("interrupt", run_dir=tmp_path, space=small_space(), pruner="none")
    again.optimize(objective, n_trials=1)
    assert [r["number"] for r in again.leaderboard() if r["state"] == "complete"] == [0, 2]


def test_sqlite_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = Study.open("sql", storage=url, space=small_space(), pruner="none")
    study.optimize(quadratic, n_trials=3)
    again = Study.open("sql", storage=url, space=small_space(), pruner="none")
    again.optimize(quadratic, n_trials=2)
    assert again.counts()["complete"] == 5
    assert sorted(r["number"] for r in again.leaderboard()) == list(range(5))


def test_changed_space_on_reopen(tmp_path):
    Study.open("space", run_dir=tmp_path, space=small_space(), pruner="none").optimize(
        quadratic, n_trials=2
    )
    narrower = small_space().narrow("lr", {"low": 1e-4, "high": 1e-3})
    study = Study.open("space", run_dir=tmp_path, space=narrower, pruner="none")
    study.optimize(quadratic, n_trials=1)
    assert study._study.user_attrs["visionflow.space"] == narrower.to_json()
    changes = study._study.user_attrs["visionflow.space_changes"]
    assert len(changes) == 1 and changes[0]["from_trial"] == 2
    pinned = small_space().pin("batch_size", 32)
    Study.open("space", run_dir=tmp_path, space=pinned, pruner="none")  # pinning is fine
    with pytest.raises(ConfigError, match=r"'batch_size'.*new study name"):
        Study.open("space", run_dir=tmp_path, space=small_space().narrow("batch_size", [16, 32]))


@pytest.mark.parametrize(
    ("storage", "match"),
    [
        ("study.db", "neither"),
        ("redis://localhost/0", "unsupported"),
        ("mongodb://user:secret@host/db", r"unsupported.*user:\*\*\*@host"),
    ],
)
def test_bad_storage_is_a_config_error(tmp_path, storage, match):
    with pytest.raises(ConfigError, match=match) as info:
        open_storage(storage, run_dir=tmp_path)
    assert "secret" not in str(info.value)


def test_storage_needs_a_run_dir_or_url():
    with pytest.raises(ConfigError, match="run folder"):
        open_storage(None, run_dir=None)


def test_unreachable_database_masks_the_password():
    url = "postgresql://bob:hunter2@127.0.0.1:1/nowhere"
    with pytest.raises(StorageError, match=r"bob:\*\*\*@127\.0\.0\.1:1") as info:
        open_storage(url, run_dir=None)
    assert "hunter2" not in str(info.value)


def test_bad_pruner_and_direction(tmp_path):
    with pytest.raises(ConfigError, match="pruner"):
        Study.open("x", run_dir=tmp_path, space=small_space(), pruner="bohb")
    with pytest.raises(ConfigError, match="direction"):
        Study.open("x", run_dir=tmp_path, space=small_space(), direction="up")


def test_equal_values_are_ranked_by_the_recorded_validation_loss(tmp_path):
    study = Study.open("ties", run_dir=tmp_path, space=small_space(), pruner="none")
    for value, loss in ((0.9, 0.1), (1.0, 0.4), (1.0, None), (1.0, 0.2)):
        handle = study.ask()
        if loss is not None:
            handle.set_info("val_loss", loss)
        study.tell(handle, value)
    board = study.leaderboard()
    # 100% three times: the lowest loss first, a trial without a loss after those with one
    assert [r["number"] for r in board] == [3, 1, 2, 0]
    best = study.best()
    assert best is not None and best["number"] == 3
