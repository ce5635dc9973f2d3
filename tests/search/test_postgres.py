"""Parallel workers on one PostgreSQL study: shared trial counts and crashed workers.

Needs the server at 127.0.0.1:5432 (trust auth, database ``test``); skipped when unreachable.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import time
import uuid
import warnings
from collections.abc import Iterator

import pytest

from visionflow.search import SearchSpace, Study, TrialHandle, open_storage

pytestmark = pytest.mark.postgres

URL = os.environ.get("VISIONFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
TOTAL = 8


def space() -> SearchSpace:
    return SearchSpace.from_overrides(
        SearchSpace.default(), {"backbone": "resnet18", "strategy": "lpft"}
    )


def objective_factory(sleep: float):
    def objective(trial: TrialHandle) -> float:
        trial.set_info("pid", os.getpid())
        time.sleep(sleep)
        return -((math.log10(trial.params["lr"]) + 3.5) ** 2)

    return objective


def worker(url: str, name: str, seed: int, max_trials: int, sleep: float, hb: int) -> None:
    """One worker process: run trials until the study holds ``max_trials`` of them."""
    study = Study.open(
        name,
        storage=url,
        space=space(),
        seed=seed,
        pruner="none",
        heartbeat_interval=hb,
        grace_period=hb * 2,
    )
    study.optimize(objective_factory(sleep), max_trials=max_trials)


@pytest.fixture
def pg_url() -> str:
    try:
        import psycopg2
    except ImportError:  # pragma: no cover
        pytest.skip("psycopg2 is not installed")
    try:
        psycopg2.connect(URL, connect_timeout=2).close()
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {URL}: {str(exc).strip().splitlines()[0]}")
    return URL


@pytest.fixture
def study_name(pg_url: str) -> Iterator[str]:
    import optuna

    name = f"vf-test-{uuid.uuid4().hex[:12]}"
    yield name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=open_storage(pg_url, run_dir=None))


def _spawn(*args) -> multiprocessing.process.BaseProcess:
    proc = multiprocessing.get_context("spawn").Process(target=worker, args=args, daemon=True)
    proc.start()
    return proc


def test_two_workers_share_the_trial_budget(pg_url, study_name):
    # Create the study (and tables) once, so the workers only load it.
    Study.open(
        study_name,
        storage=pg_url,
        space=space(),
        pruner="none",
        heartbeat_interval=1,
        grace_period=2,
    )
    procs = [_spawn(pg_url, study_name, seed, TOTAL, 0.3, 1) for seed in (1, 2)]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0, f"worker exit code {proc.exitcode}"

    study = Study.open(study_name, storage=pg_url, space=space(), pruner="none")
    counts = study.counts()
    assert counts["complete"] == TOTAL
    assert counts["failed"] == counts["running"] == counts["pruned"] == 0
    board = study.leaderboard()
    numbers = [r["number"] for r in board]
    assert len(numbers) == len(set(numbers)) == TOTAL
    assert len({r["info"]["pid"] for r in board}) == 2  # both workers took part


def test_killed_worker_trial_is_failed_and_the_study_completes(pg_url, study_name):
    opts = {"storage": pg_url, "space": space(), "pruner": "none"}
    Study.open(study_name, heartbeat_interval=1, grace_period=2, **opts)
    victim = _spawn(pg_url, study_name, 1, TOTAL, 60.0, 1)  # its first trial sleeps a minute

    study = Study.open(study_name, heartbeat_interval=1, grace_period=2, **opts)
    deadline = time.monotonic() + 30
    while study.counts()["running"] == 0:
        assert time.monotonic() < deadline, "the worker never started a trial"
        assert victim.is_alive()
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=10)
    assert victim.exitcode == -signal.SIGKILL

    time.sleep(3.5)  # past the grace period: the heartbeat is stale
    done = study.optimize(objective_factory(0.0), max_trials=TOTAL)
    assert done == TOTAL
    counts = study.counts()
    assert counts["failed"] == 1 and counts["running"] == 0
    assert counts["complete"] == TOTAL
    failed = [r for r in study.leaderboard() if r["state"] == "failed"]
    assert failed[0]["number"] == 0
    numbers = [r["number"] for r in study.leaderboard()]
    assert sorted(numbers) == list(range(TOTAL + 1))


def test_search_with_two_local_workers_on_postgres(pg_url, study_name, image_folder, tmp_path):
    """The whole AutoML run (`--storage postgresql://... --workers 2`) on the real server."""
    from visionflow.config import SearchConfig, TrainConfig
    from visionflow.search.runner import search_classifier

    config = TrainConfig(
        backbone="test_efficientnet", weights="none", img_size=32, batch_size=8, budget=None,
        num_workers=0, patience=None,
    )  # fmt: skip
    search = SearchConfig(
        trials=4, workers=2, storage=pg_url, space={"epochs": {"low": 1, "high": 2}}
    )
    result = search_classifier(
        image_folder,
        config,
        search,
        run_dir=tmp_path / study_name,
        explicit={"backbone", "weights", "img_size"},
    )
    assert result.counts["complete"] + result.counts["pruned"] == 4
    assert result.counts["running"] == 0
    study = Study.load(study_name, storage=pg_url)
    numbers = [r["number"] for r in study.leaderboard()]
    assert len(numbers) == len(set(numbers))
    assert (tmp_path / study_name / "model.safetensors").is_file()
