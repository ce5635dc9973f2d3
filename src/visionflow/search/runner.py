"""The AutoML run behind ``visionflow train``: search, then refit the best, inside one budget.

Timeline of a run with budget ``B`` (``SearchConfig.refit_fraction`` = ``r``)::

    data checks + split (once) | search: trials until (1 - r) * B | refit of the best until B

* **Trials** share the checked dataset, its split and a frozen-feature cache in the run folder,
  so a ``probe`` trial (frozen features + logistic regression) of a backbone and image size
  already seen takes seconds. The first trial queued is the default recipe (what
  ``--no-search`` runs), then a probe per backbone at two image sizes; the TPE sampler takes
  over after them. The default trial is planned like the single run: it may use the whole
  budget, less what the refit needs to finish it, and stops where the single run would (early
  stopping, its epochs); the other trials get the time it leaves, split between trials and
  refit by ``refit_fraction`` (:meth:`_Objective.after_default`). So at a budget that only
  pays for the default recipe, the search is the single run; with more, it searches. Fine-tune
  trials report their validation accuracy every epoch and the pruner (successive halving by default)
  stops the hopeless ones. One trial may take at most ``trial_fraction`` of the search phase.
  A trial is scored on validation only; the test split is never looked at before the refit.
  The search phase ends early, its time going to the refit, at 100% validation accuracy or
  when the sampled trial would not end in time (:func:`_not_started_reason`).
* **Refit**: the chosen configuration runs through the full recipe (probe, LP-FT, weight
  ensemble, the better of probe and fine-tune kept) with the rest of the budget, writing the
  model, metrics and report into the run folder like a single run. The best fine-tune trial
  saved its weights and the refit continues from them, unless another trial has clearly better
  features at an affordable cost (:func:`_refit_choice`).
* **Clean-up**: once done, ``trials/`` and the run's own ``features/`` cache are deleted.
* **Storage**: an Optuna journal file in the run folder by default; a database URL lets workers
  on other machines (``visionflow worker``) join. Re-running the same command with the same run
  name continues the study and the budget where they were.
* **Workers**: ``workers=N`` runs N local processes on the study, each with a share of the CPU
  threads. A worker that dies leaves its running trial FAIL (database storage: its heartbeat
  stops; journal storage: the coordinator sees the process gone); failed trials are never
  retried, so nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from visionflow._io import atomic_write_json, read_json
from visionflow.config import SearchConfig, TrainConfig
from visionflow.errors import CheckpointError, ConfigError, VisionflowError, WeightsError
from visionflow.evaluate.report import ReportSection
from visionflow.search.space import (
    _FIELD_OF,
    FINETUNE_ONLY,
    Categorical,
    Dimension,
    Fixed,
    FloatRange,
    IntRange,
    SearchSpace,
)
from visionflow.search.study import Study, TrialHandle, TrialPruned, mask_url
from visionflow.train.budget import Deadline, format_seconds

if TYPE_CHECKING:
    from visionflow.train.recipe import WarmStart

__all__ = ["SearchResult", "build_space", "run_worker", "search_classifier"]

_STATE = "search.json"
_RUN_ATTR = "visionflow.run"
#: A trial is not started with less search time left than this (a cached probe takes ~3 s).
_MIN_TRIAL_SECONDS = 5.0
#: A fine-tune trial is not started when its time fits fewer epochs than this: a shorter one
#: says little about where the fine-tune ends (measured, BENCHMARKS.md: an LP-FT at 76.7% on
#: validation after 3 epochs, 93.3% at epoch 10), and its time is worth more to the refit.
_MIN_USEFUL_EPOCHS = 5
#: Fine-tune epochs after which more epochs rarely change the choice: the single runs of the
#: search benchmark stopped early at 12-14 epochs (BENCHMARKS.md).
_SETTLED_EPOCHS = 15
#: Environment variable read when no storage is given (keeps passwords off command lines).
STORAGE_ENV = "VISIONFLOW_STORAGE"


class _TrialFailed(VisionflowError):
    """A trial that produced no score (e.g. no fine-tune epoch fitted in its time)."""


class _TrialNotStarted(_TrialFailed):
    """The sampled trial would not end before the search deadline; the worker stops."""


@dataclass
class SearchResult:
    """What :func:`search_classifier` leaves behind (all of it is also in the run folder)."""

    run_dir: Path
    study: str
    best: dict[str, Any] | None
    counts: dict[str, int]
    refit: Any  # visionflow.train.recipe.RunResult
    seconds: float
    search_seconds: float

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return dict(self.refit.metrics)

    @property
    def report_path(self) -> Path:
        return Path(self.refit.report_path)


# ---------------------------------------------------------------------------- the space
def _inside(dim: Dimension, value: Any) -> bool:
    if isinstance(dim, Categorical):
        return value in dim.choices
    if isinstance(dim, FloatRange | IntRange):
        return isinstance(value, int | float) and dim.low <= value <= dim.high
    return False


def _available(backbone: str, weights: str | None) -> str | None:
    """``None`` when ``backbone`` has pretrained weights here, else why not."""
    from visionflow.models.weights import resolve_weights

    try:
        resolve_weights(backbone, weights)
    except (WeightsError, ConfigError) as exc:
        return str(exc).splitlines()[0]
    return None


def build_space(
    config: TrainConfig,
    *,
    explicit: set[str] | frozenset[str] = frozenset(),
    overrides: dict[str, Any] | None = None,
    device_type: str = "cpu",
    check_weights: bool = True,
) -> tuple[SearchSpace, dict[str, str]]:
    """The space of a run: the default for the device, minus backbones without weights here,
    with every parameter the user set explicitly (``explicit`` TrainConfig fields, e.g. from
    ``--backbone``) pinned to its value, then the user's ``overrides``.

    Returns the space and the backbones dropped, with the reason.
    """
    space = SearchSpace.default(device_type=device_type)
    pins: dict[str, Any] = {}
    for name in space:
        field = _FIELD_OF.get(name, name)
        value = getattr(config, field, None)
        if field in explicit and value is not None:
            pins[name] = value
    space = SearchSpace.from_overrides(space, pins)
    dropped: dict[str, str] = {}
    dim = space["backbone"]
    if check_weights and isinstance(dim, Fixed):  # the user's own choice: fail now, clearly
        from visionflow.models.weights import resolve_weights

        resolve_weights(str(dim.value), config.weights)
    user_backbones = "backbone" in (overrides or {})
    if check_weights and isinstance(dim, Categorical) and not user_backbones:
        keep: list[str] = []
        for choice in dim.choices:
            why = _available(str(choice), config.weights)
            if why is None:
                keep.append(str(choice))
            else:
                dropped[str(choice)] = why
        if not keep:
            raise WeightsError(
                "none of the candidate backbones has pretrained weights here: "
                + "; ".join(f"{k}: {v}" for k, v in dropped.items())
            )
        one = len(keep) == 1
        space = space.pin("backbone", keep[0]) if one else space.narrow("backbone", keep)
    if overrides:
        space = SearchSpace.from_overrides(space, overrides)
    return space, dropped


def _choices(space: SearchSpace, name: str) -> list[Any]:
    """The values a categorical or pinned parameter can take (``[]`` for a range)."""
    dim = space[name]
    if isinstance(dim, Categorical):
        return list(dim.choices)
    if isinstance(dim, Fixed):
        return [dim.value]
    return []


def _queued_trials(space: SearchSpace, config: TrainConfig) -> list[dict[str, Any]]:
    """The default recipe first (:func:`_default_params`: what ``--no-search`` runs), then a
    probe per backbone at the largest image size, then at the smallest.

    The default goes first because the refit continues it unless another trial shows clearly
    better features at an affordable cost (:func:`_refit_choice`): at a small budget the search
    then costs the single run only the other trials' time, instead of trading a long fine-tune
    of a good backbone for a short one of a slower backbone. Its probe computes the default
    backbone's features, so the probe trial of that backbone reads them from the cache.
    """
    searched = {n: d for n, d in space.items() if not isinstance(d, Fixed)}
    sizes = sorted({s for s in _choices(space, "img_size") if s is not None}, reverse=True)
    size_pair = [sizes[0], sizes[-1]] if len(sizes) > 1 else sizes[:1]
    queue = [_default_params(space, config)]
    if "probe" in _choices(space, "strategy"):
        for size in size_pair or [None]:
            for backbone in _choices(space, "backbone"):
                params = {"backbone": backbone, "strategy": "probe", "img_size": size}
                queue.append({k: v for k, v in params.items() if k in searched})
    unique: list[dict[str, Any]] = []
    for params in queue:
        if params and params not in unique:
            unique.append(params)
    return unique


def _default_params(space: SearchSpace, config: TrainConfig) -> dict[str, Any]:
    """The searched parameters of the default recipe: LP-FT with TrainConfig's defaults on the
    first backbone at the largest image size (``{}`` when no fine-tuning strategy is searched
    or pinned)."""
    strategies = _choices(space, "strategy")
    default = "lpft" if "lpft" in strategies else (strategies[0] if strategies else None)
    if default is None or default == "probe":
        return {}
    searched = {n: d for n, d in space.items() if not isinstance(d, Fixed)}
    sizes = [s for s in _choices(space, "img_size") if s is not None]
    values: dict[str, Any] = {
        "backbone": (_choices(space, "backbone") or [None])[0],
        "strategy": default,
        "img_size": max(sizes) if sizes else None,
        "lr": 2e-4 if default == "lpft" else 3e-4,
        "weight_decay": config.weight_decay,
        "batch_size": config.batch_size,
        "augment": "light" if config.augment == "auto" else config.augment,
        "label_smoothing": config.label_smoothing,
        "mixup": config.mixup,
        "cutmix": config.cutmix,
        "freeze_epochs": config.freeze_epochs,
        "epochs": config.epochs,
    }
    return {k: v for k, v in values.items() if k in searched and _inside(searched[k], v)}


def _is_default(params: dict[str, Any], default: dict[str, Any]) -> bool:
    """Whether a trial with ``params`` is the default recipe's (``default``: its searched
    parameters, :func:`_default_params`; empty when no fine-tune is searched)."""
    return bool(default) and all(params.get(k) == v for k, v in default.items())


# ---------------------------------------------------------------------------- run state
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_dead_local_trials(study: Study, only_pids: set[int] | None = None) -> int:
    """FAIL the running trials of this host whose worker process is gone (journal storage has
    no heartbeat). Returns how many were failed."""
    host, failed = socket.gethostname(), 0
    for number, info in study.running():
        worker = info.get("worker") or {}
        pid = worker.get("pid")
        if worker.get("host") != host or not isinstance(pid, int):
            continue
        if only_pids is not None and pid not in only_pids:
            continue
        if pid != os.getpid() and (only_pids is not None or not _pid_alive(pid)):
            study.fail_trial(number, f"worker process {pid} died during the trial")
            failed += 1
    return failed


def _trial_config(
    base: TrainConfig, params: dict[str, Any], run_dir: Path, *, default: bool = False
) -> TrainConfig:
    """The settings of a trial with ``params``; ``default``: the default recipe's trial, which
    keeps the run's ``augment="auto"`` (light below 20 planned epochs, medium from 20, as the
    single run decides) instead of the policy the space recorded for it."""
    update = SearchSpace.to_train_overrides(params)
    if default and base.augment == "auto":
        update.pop("augment", None)
    data = base.model_dump()
    data.update(update)
    if not base.feature_cache:
        data["feature_cache"] = str(run_dir / "features")
    try:
        return TrainConfig(**data)
    except Exception as exc:  # pydantic: a sampled value the settings refuse
        raise ConfigError(f"trial settings {update} are not valid: {exc}") from None


# ---------------------------------------------------------------------------- workers
def _expected_seconds(rows: list[dict[str, Any]], params: dict[str, Any]) -> float | None:
    """How long a trial with ``params`` should take, from the finished trials of its kind
    (``None``: nothing to go by yet).

    A probe of a backbone and image size already probed reads its features from the cache:
    it takes as long as the quickest such probe. Any other trial takes the median of the
    finished trials of its strategy (for probes: the first probe of each backbone and size,
    which paid for its features).
    """
    done = [r for r in rows if r["state"] in ("complete", "pruned") and r["duration_s"]]
    strategy = params.get("strategy")
    same = [r for r in done if r["params"].get("strategy") == strategy]
    if strategy == "probe":
        key = (params.get("backbone"), params.get("img_size"))
        seen = [
            r for r in same if (r["params"].get("backbone"), r["params"].get("img_size")) == key
        ]
        if seen:
            return float(min(r["duration_s"] for r in seen))
        first: dict[tuple[Any, Any], dict[str, Any]] = {}
        for r in sorted(same, key=lambda r: r["number"]):
            first.setdefault((r["params"].get("backbone"), r["params"].get("img_size")), r)
        same = list(first.values())
    if not same:
        return None
    return float(statistics.median(r["duration_s"] for r in same))


def _epoch_seconds(rows: list[dict[str, Any]], params: dict[str, Any]) -> float | None:
    """Seconds per fine-tune epoch of a trial with ``params``, its probe's share included,
    from the finished fine-tune trials (same backbone and image size when there are some)."""
    done = [
        r
        for r in rows
        if r["state"] in ("complete", "pruned")
        and r["params"].get("strategy") in ("lpft", "finetune")
        and r["duration_s"]
        and int(r["info"].get("epochs") or 0) > 0
    ]
    key = (params.get("backbone"), params.get("img_size"))
    same = [r for r in done if (r["params"].get("backbone"), r["params"].get("img_size")) == key]
    per_epoch = [r["duration_s"] / int(r["info"]["epochs"]) for r in same or done]
    if not per_epoch:
        return None
    return float(min(per_epoch) if same else statistics.median(per_epoch))


def _not_started_reason(
    rows: list[dict[str, Any]], params: dict[str, Any], left: float, cap: float | None
) -> str | None:
    """Why a trial with ``params`` should not start with ``left`` seconds of search time and
    a per-trial cap ``cap`` (``None``: start it)."""
    expected = _expected_seconds(rows, params)
    if expected is not None and cap is not None:
        expected = min(expected, cap)  # a trial is stopped at its cap anyway
    if expected is not None and expected > left:
        return (
            f"not started: a trial like this takes about {expected:.0f} s, "
            f"{max(0.0, left):.0f} s of search time were left"
        )
    if params.get("strategy") in ("lpft", "finetune"):
        epoch = _epoch_seconds(rows, params)
        room = min(left, cap if cap is not None else math.inf)
        if epoch is not None and room < _MIN_USEFUL_EPOCHS * epoch:
            return (
                f"not started: {room:.0f} s fit {room / epoch:.1f} fine-tune epochs of about "
                f"{epoch:.0f} s, fewer than {_MIN_USEFUL_EPOCHS}; the time goes to the refit"
            )
    return None


class _Objective:
    """Runs one trial from the study's recorded run description."""

    def __init__(self, study: Study, run_dir: Path, base: TrainConfig) -> None:
        from visionflow.train.recipe import Prepared

        self.study = study
        self.run_dir = run_dir
        self.base = base
        self.prepared = Prepared.from_run(run_dir)
        #: Set when a sampled trial did not fit in the search time left: the worker stops.
        self.out_of_time = False

    def __call__(self, handle: TrialHandle) -> float:
        from visionflow.train.recipe import run_trial

        handle.set_info("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        run = self.study.attrs.get(_RUN_ATTR, {})
        end = run.get("search_end")
        cap = run.get("trial_seconds")
        is_default = _is_default(handle.params, run.get("default_params") or {})
        if is_default and run.get("budget_end") is not None:
            # the single run's fine-tune: the refit finishes it (or continues it), so it may run
            # to the end of the budget, keeping back what the refit needs to finish
            end, cap = run["budget_end"], None
        left = math.inf if end is None else end - time.time()
        seconds = min(cap if cap is not None else math.inf, left)
        config = _trial_config(self.base, handle.params, self.run_dir, default=is_default)
        rows = self.study.leaderboard()
        why = None if is_default else _not_started_reason(rows, handle.params, left, cap)
        if why is not None:
            self.out_of_time = True
            handle.set_info("note", why)
            raise _TrialNotStarted(why)
        kept = [
            float(r["info"]["finetune_val"])
            for r in rows
            if r["state"] == "complete"
            and r["info"].get("weights")
            and r["info"].get("finetune_val") is not None
        ]

        def keep_weights(finetune_val: float) -> bool:
            # the best fine-tune so far (a tie too: the refit's choice may prefer it)
            return not kept or finetune_val >= max(kept)

        def on_epoch(step: int, value: float) -> bool:
            handle.report(value, step)
            return handle.should_prune()

        outcome = run_trial(
            self.prepared,
            config,
            trial_dir=self.run_dir / "trials" / f"{handle.number:04d}",
            deadline=Deadline(None if math.isinf(seconds) else max(1.0, seconds)),
            on_epoch=on_epoch,
            keep_weights=keep_weights,
            plan_as_run=is_default and run.get("budget_end") is not None,
        )
        for key, value in outcome.info().items():
            handle.set_info(key, value)
        if is_default:
            self.after_default(outcome.reserved_seconds)
        if outcome.pruned:
            raise TrialPruned()
        if outcome.value is None:
            raise _TrialFailed(outcome.note or "the trial produced no validation score")
        return float(outcome.value)

    def after_default(self, reserved: float) -> None:
        """Give the other trials their time once the default trial is done: the search phase
        ends when ``1 - refit_fraction`` of what is left (less what the refit needs to finish,
        ``reserved``) has passed, or where it was planned to end if that is later."""
        run = dict(self.study.attrs.get(_RUN_ATTR, {}))
        budget_end, end = run.get("budget_end"), run.get("search_end")
        if budget_end is None:
            return
        share = 1.0 - float(run.get("refit_fraction", SearchConfig().refit_fraction))
        now = time.time()
        others = now + share * max(0.0, budget_end - now - reserved)
        if end is None or others > end:
            run["search_end"] = others
            self.study.set_attr(_RUN_ATTR, run)


def _work(study: Study, objective: _Objective, *, stop: threading.Event | None = None) -> int:
    """Run trials until the search deadline, the trial limit or ``stop``; returns the count.

    With a deadline it also stops when a trial scored 100% on validation (nothing left to
    find there: the time left goes to the refit) and when the sampled trial would not end
    before the deadline (judged from the finished trials of its kind). Without one, the
    trial limit is the user's number and is run out.
    """
    done = 0
    while stop is None or not stop.is_set():
        run = study.attrs.get(_RUN_ATTR, {})
        end = run.get("search_end")
        if run.get("closed") or (end is not None and time.time() > end - _MIN_TRIAL_SECONDS):
            break
        if objective.out_of_time:
            break
        best = study.best() if end is not None else None
        if best is not None and best["value"] is not None and best["value"] >= 1.0:
            break
        ran = study.optimize(
            objective, n_trials=1, max_trials=run.get("max_trials"), catch=(Exception,)
        )
        if ran == 0:
            break
        done += ran
    return done


def _local_worker(name: str, storage: str, run_dir: str, seed: int, threads: int) -> None:
    """Entry point of a local worker process (spawned: nothing inherited but arguments)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from visionflow.train.device import configure_threads

    configure_threads(threads)
    study = Study.load(name, storage=storage, seed=seed)
    base = TrainConfig(**study.attrs[_RUN_ATTR]["config"])
    _work(study, _Objective(study, Path(run_dir), base))


def run_worker(
    study_name: str,
    storage: str | None = None,
    *,
    wait: float = 600.0,
    run_dir: str | Path | None = None,
    console: Console | None = None,
    seed: int | None = None,
) -> int:
    """Join the search ``study_name`` in ``storage`` from any machine; returns trials run.

    Waits up to ``wait`` seconds for the coordinator (``visionflow train``) to create the study.
    The dataset and the run folder are read at the paths the study records (mount them at the
    same paths), unless ``run_dir`` says where the run folder is here.
    """
    storage = storage or os.environ.get(STORAGE_ENV)
    if not storage:
        raise ConfigError(f"a worker needs --storage URL (or the {STORAGE_ENV} variable)")
    give_up = time.monotonic() + max(0.0, wait)
    while True:
        try:
            study = Study.load(study_name, storage=storage, seed=seed or os.getpid())
            if _RUN_ATTR in study.attrs:
                break
        except ConfigError:
            if time.monotonic() >= give_up:
                raise
        if time.monotonic() >= give_up:
            raise ConfigError(f"study {study_name!r} holds no visionflow run description yet")
        time.sleep(2.0)
    run = study.attrs[_RUN_ATTR]
    folder = Path(run_dir) if run_dir is not None else Path(run["run_dir"])
    if not (folder / "split.json").is_file():
        raise CheckpointError(
            f"the run folder {folder} of study {study_name!r} is not readable here; mount it "
            "at the same path as the coordinator, or pass --run-dir"
        )
    if console is not None:
        console.print(
            f"joined study [bold]{study_name}[/] in {mask_url(storage)}; run folder {folder}"
        )
    base = TrainConfig(**run["config"])
    ran = _work(study, _Objective(study, folder, base))
    if console is not None:
        console.print(f"worker done: {ran} trial(s) run here; study {study.counts()}")
    return ran


# ---------------------------------------------------------------------------- display
def _leaderboard_table(rows: list[dict[str, Any]], title: str, top: int = 10) -> Table:
    table = Table(title=title, show_lines=False)
    for col in ("#", "state", "val acc", "strategy", "backbone", "img", "lr", "epochs", "time"):
        table.add_column(
            col, justify="left" if col in ("state", "strategy", "backbone") else "right"
        )
    for row in rows[:top]:
        params, info = row["params"], row["info"]
        value = row["value"]
        lr = params.get("lr")
        table.add_row(
            str(row["number"]),
            row["state"],
            "" if value is None else f"{100 * value:.1f}%",
            str(params.get("strategy", "")),
            str(params.get("backbone", "")),
            str(params.get("img_size", "")),
            "" if lr is None else f"{lr:.1e}",
            str(info.get("epochs", "")),
            "" if row["duration_s"] is None else format_seconds(row["duration_s"]),
        )
    return table


class _Monitor:
    """Background thread of the coordinator: saves elapsed time, writes leaderboard.csv,
    shows the live leaderboard (a terminal) or one line per finished trial (a log)."""

    def __init__(
        self,
        study: Study,
        run_dir: Path,
        deadline: Deadline,
        save: Callable[[], None],
        console: Console | None,
    ) -> None:
        self.study = study
        self.run_dir = run_dir
        self.deadline = deadline
        self.save = save
        self.console = console
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[int] = set()
        self._table: Table | None = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            self.save()
            rows = self.study.leaderboard()
            finished = {r["number"] for r in rows if r["state"] not in ("running", "waiting")}
            new = sorted(finished - self._seen)
            if new:
                self.study.write_leaderboard_csv(self.run_dir / "leaderboard.csv")
            counts = self.study.counts()
            title = (
                f"search: {counts['complete']} complete, {counts['pruned']} pruned, "
                f"{counts['failed']} failed, {counts['running']} running "
                f"({format_seconds(self.deadline.elapsed())} elapsed)"
            )
            self._table = _leaderboard_table(rows, title)
            if self.console is not None and not self.console.is_terminal:
                by_number = {r["number"]: r for r in rows}
                for number in new:
                    row = by_number[number]
                    value = "" if row["value"] is None else f" val acc {100 * row['value']:.1f}%"
                    params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
                    self.console.print(
                        f"trial {number} {row['state']}{value} ({params})", highlight=False
                    )
            self._seen |= finished

    def renderable(self) -> Table:
        return self._table or Table(title="search starting")

    def _loop(self) -> None:
        while not self._stop.wait(2.0):
            with contextlib.suppress(Exception):  # a busy journal must not kill the display
                self.refresh()

    def __enter__(self) -> _Monitor:
        self._thread = threading.Thread(target=self._loop, name="visionflow-monitor", daemon=True)
        self._thread.start()
        self._live: Live | None = None
        if self.console is not None and self.console.is_terminal:
            self._live = Live(
                get_renderable=self.renderable, console=self.console, refresh_per_second=1
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):
            self.refresh()
        if self._live is not None:
            self._live.stop()


# ---------------------------------------------------------------------------- the run
def _key(params: dict[str, Any]) -> tuple[Any, Any]:
    return params.get("backbone"), params.get("img_size")


def _refit_epoch_seconds(rows: list[dict[str, Any]], params: dict[str, Any]) -> float | None:
    """Seconds a fine-tune epoch of ``params``' backbone and image size takes: measured by a
    fine-tune trial of that backbone and size, else another fine-tune trial's epoch scaled by
    the two backbones' feature-pass speeds (``feature_ips`` of their first probes)."""
    tuned = [
        r
        for r in rows
        if r["state"] in ("complete", "pruned")
        and r["params"].get("strategy") in ("lpft", "finetune")
        and r["duration_s"]
        and int(r["info"].get("epochs") or 0) > 0
    ]
    same = [r for r in tuned if _key(r["params"]) == _key(params)]
    if same:
        return float(min(r["duration_s"] / int(r["info"]["epochs"]) for r in same))
    speed: dict[tuple[Any, Any], float] = {}
    for r in rows:
        ips = r["info"].get("feature_ips")
        if isinstance(ips, int | float) and ips > 0:
            speed[_key(r["params"])] = max(float(ips), speed.get(_key(r["params"]), 0.0))
    target = speed.get(_key(params))
    for r in tuned:
        ref = speed.get(_key(r["params"]))
        if target and ref:
            return float(r["duration_s"] / int(r["info"]["epochs"]) * ref / target)
    return None


def _feature_score(row: dict[str, Any]) -> float | None:
    """Validation accuracy of the trial's linear probe: how good its frozen features are."""
    probe = row["info"].get("probe_val")
    if probe is None and row["params"].get("strategy") == "probe":
        probe = row["value"]
    return None if probe is None else float(probe)


def _refit_choice(
    rows: list[dict[str, Any]], run_dir: Path, *, n_val: int, refit_seconds: float
) -> tuple[dict[str, Any] | None, str]:
    """The trial whose configuration the refit takes, and why.

    The best trial by validation accuracy, except when a fine-tune whose weights were kept
    (the incumbent: the refit would continue it) trails it. Trials are then measured at
    different fidelities (a probe is finished; a fine-tune after a few epochs is not), so
    validation accuracy alone would trade a long fine-tune for a short one of another
    backbone: the measured failure of issue 3 (lite2's probe, 90.0%, beat lite0's 2-epoch
    LP-FT; the refit fine-tuned lite2 for 7 epochs and lost to the single run's 12 of
    lite0). The leader replaces the incumbent only when (a) its frozen features are better
    by more than one validation image (linear probes compared, the same fidelity for both)
    and (b) the refit can fine-tune it for at least :data:`_MIN_USEFUL_EPOCHS` epochs and
    half the epochs the incumbent would have in all (counted up to :data:`_SETTLED_EPOCHS`).

    When the incumbent's fine-tune is finished (it settled, or not one more epoch of it fits
    in the refit) and the leader is a probe, both are final: the probe wins when it leads on
    validation by more than one image (the refit then keeps it as a probe when fewer than
    :data:`_MIN_USEFUL_EPOCHS` fine-tune epochs of it fit).
    """
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if not complete:
        return None, "no trial completed"
    top = complete[0]
    incumbent = next((r for r in complete if _warm_start(r, run_dir) is not None), None)
    if incumbent is None or incumbent is top:
        return top, "best validation accuracy"
    n_top, n_inc = top["number"], incumbent["number"]
    margin = 1.0 / max(1, n_val)
    own = _refit_epoch_seconds(rows, incumbent["params"])
    final = incumbent["info"].get("settled") or (own is not None and refit_seconds < own)
    if final and top["params"].get("strategy") == "probe":
        # the incumbent's score will not move (its fine-tune settled, or no epoch of it fits):
        # the two are compared as they are
        lead = float(top["value"]) - float(incumbent["value"])
        if lead > margin + 1e-9:
            return top, (
                f"trial {n_top}'s probe leads trial {n_inc}'s finished fine-tune by "
                f"{100 * lead:.1f} points on validation, more than one of {n_val} images"
            )
        return incumbent, (
            f"trial {n_top}'s probe is not ahead of trial {n_inc}'s finished fine-tune by more "
            f"than one of {n_val} validation images; the refit finishes trial {n_inc}"
        )
    ahead, behind = _feature_score(top), _feature_score(incumbent)
    what = "linear probe"
    if ahead is None or behind is None:
        ahead, behind, what = float(top["value"]), float(incumbent["value"]), "validation"
    if ahead - behind <= margin + 1e-9:
        return incumbent, (
            f"trial {n_top} leads on validation, but its {what} accuracy ({100 * ahead:.1f}%) "
            f"is not ahead of trial {n_inc}'s ({100 * behind:.1f}%) by more than one of "
            f"{n_val} validation images; the refit continues trial {n_inc}'s fine-tune"
        )
    epoch = _refit_epoch_seconds(rows, top["params"])
    if epoch is not None and own is not None:
        top_epochs = refit_seconds / epoch
        inc_epochs = int(incumbent["info"].get("epochs") or 0) + refit_seconds / own
        if top_epochs < max(_MIN_USEFUL_EPOCHS, 0.5 * min(inc_epochs, _SETTLED_EPOCHS)):
            return incumbent, (
                f"trial {n_top} has better features, but the refit's {refit_seconds:.0f} s "
                f"fit {top_epochs:.1f} fine-tune epochs of it against {inc_epochs:.1f} in all "
                f"for trial {n_inc}; the refit continues trial {n_inc}'s fine-tune"
            )
    return top, f"better features than trial {n_inc}'s fine-tune, at an affordable cost"


def _warm_start(best: dict[str, Any] | None, run_dir: Path) -> WarmStart | None:
    """The trial's fine-tuned weights for the refit to continue from, when it kept them (also
    when its probe scored higher: the refit, like the single run, keeps the better of its probe
    and the continued fine-tune)."""
    from visionflow.train.recipe import WarmStart

    if best is None:
        return None
    info = best["info"]
    path = run_dir / "trials" / f"{best['number']:04d}" / "model.safetensors"
    if not info.get("weights") or not path.is_file() or info.get("finetune_val") is None:
        return None
    return WarmStart(
        path=path,
        val_accuracy=float(info["finetune_val"]),
        val_loss=info.get("finetune_loss"),
        epochs=int(info.get("epochs") or 0),
        trial=int(best["number"]),
        settled=bool(info.get("settled")),
        epoch_seconds=info.get("epoch_seconds"),
        feature_ips=info.get("feature_ips"),
    )


def _clean(run_dir: Path, config: TrainConfig) -> None:
    """Delete what only the search needed once the run is done: ``trials/`` (their
    records, the report's data included, are in the study) and the run's own feature cache
    ``features/`` (not a ``feature_cache`` folder the user shares between runs)."""
    shutil.rmtree(run_dir / "trials", ignore_errors=True)
    if not config.feature_cache:
        shutil.rmtree(run_dir / "features", ignore_errors=True)


def _run_local_workers(
    study: Study, storage: str, run_dir: Path, workers: int, seed: int, end: float | None
) -> None:
    """Start ``workers`` processes on the study and wait; a crashed one has its trial failed."""
    from visionflow.train.device import cpu_count

    threads = max(1, cpu_count() // workers)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_local_worker,
            args=(study.name, storage, str(run_dir), seed * 1000 + i + 1, threads),
            name=f"visionflow-worker-{i}",
        )
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    reported: set[int] = set()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            dead = {
                p.pid for p in procs if not p.is_alive() and p.exitcode and p.pid not in reported
            }
            dead.discard(None)
            if dead:
                _fail_dead_local_trials(study, {int(pid) for pid in dead if pid is not None})
                reported |= {int(pid) for pid in dead if pid is not None}
            if end is not None and time.time() > end + 120:  # a stuck worker: stop it
                for proc in procs:
                    if proc.is_alive():
                        proc.terminate()
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        pids = {int(p.pid) for p in procs if p.pid is not None}
        _fail_dead_local_trials(study, pids)


def _storage_arg(search: SearchConfig, run_dir: Path) -> str:
    storage = search.storage or os.environ.get(STORAGE_ENV)
    return storage if storage else str(run_dir / "study.journal")


def search_classifier(
    data: str | Path,
    config: TrainConfig,
    search: SearchConfig,
    *,
    run_dir: str | Path,
    explicit: set[str] | frozenset[str] = frozenset(),
    console: Console | None = None,
    progress: bool | None = None,
) -> SearchResult:
    """Search, then refit the best configuration, all within ``config.budget``.

    Re-running with the same ``run_dir`` continues: the study goes on where it stopped, the
    time already spent counts against the budget, and a refit that was under way resumes.
    """
    from visionflow.search.plots import (
        param_importances,
        plot_optimization_history,
        plot_param_importance,
        plot_trial_curves,
        search_report_section,
    )
    from visionflow.train.device import select_device
    from visionflow.train.recipe import prepare_data, train_classifier

    started = time.monotonic()
    run_dir = Path(run_dir)
    state_path = run_dir / _STATE
    state: dict[str, Any] = dict(read_json(state_path)) if state_path.is_file() else {}
    if not state and (run_dir / "state.json").is_file():
        raise CheckpointError(
            f"{run_dir} holds a single run, not a search; continue it with --resume or use "
            "another --name"
        )
    if state.get("stage") == "done":
        raise CheckpointError(f"{run_dir} has already finished; use another --name")
    resumed = bool(state)
    if resumed:
        config = TrainConfig(**state["config"])
    budget = config.budget_seconds()
    max_trials = search.trials
    if budget is None and max_trials is None:
        raise ConfigError("a search without a budget needs a trial limit (--trials N)")
    deadline = Deadline(budget, spent=float(state.get("elapsed", 0.0)))
    run_dir.mkdir(parents=True, exist_ok=True)
    name = run_dir.name
    storage = _storage_arg(search, run_dir)
    if not resumed:
        state = {
            "stage": "searching",
            "study": name,
            "storage": mask_url(storage),
            "data": str(Path(data).resolve()),
            "config": config.model_dump(mode="json"),
            "search": search.model_dump(mode="json"),
            "created_at": _now(),
            "elapsed": 0.0,
        }
        atomic_write_json(state_path, state)

    def save(**values: Any) -> None:
        state.update(values, elapsed=deadline.elapsed())
        atomic_write_json(state_path, state)

    if progress is None:
        progress = bool(console is not None and console.is_terminal)
    prepared = prepare_data(
        state["data"], config, run_dir=run_dir, console=console, progress=progress
    )
    save()
    device = select_device(config.device)
    space, dropped = build_space(
        config, explicit=explicit, overrides=search.space, device_type=device.type
    )
    for backbone, why in dropped.items():
        if console is not None:
            console.print(f"[yellow]not searched[/]: {backbone} ({why})", highlight=False)
    study = Study.open(name, storage=storage, space=space, seed=config.seed, pruner=search.pruner)
    if budget is not None:
        search_total = budget * (1 - search.refit_fraction)
        search_end: float | None = time.time() + max(0.0, search_total - deadline.elapsed())
        trial_seconds: float | None = search.trial_fraction * search_total
    else:
        search_total, search_end, trial_seconds = math.inf, None, None
    if not resumed:
        for params in _queued_trials(space, config):
            study.enqueue(params)
    budget_end = None if budget is None else time.time() + deadline.remaining()
    _fail_dead_local_trials(study)
    study.set_attr(
        _RUN_ATTR,
        {
            "data": state["data"],
            "run_dir": str(run_dir.resolve()),
            "config": config.model_dump(mode="json"),
            "search_end": search_end,
            "trial_seconds": trial_seconds,
            "default_params": _default_params(space, config),
            "budget_end": budget_end,
            "refit_fraction": search.refit_fraction,
            "max_trials": max_trials,
            "dropped_backbones": dropped,
        },
    )
    t_search = time.monotonic()
    if state.get("stage") == "searching":
        if console is not None:
            left = (
                "no time limit" if search_end is None else format_seconds(search_end - time.time())
            )
            console.print(
                f"[bold]search[/] study {name} ({mask_url(storage)}): {len(space)} parameters, "
                f"{search.workers} local worker(s), {left} for trials"
                + (f", at most {max_trials} trials" if max_trials else "")
            )
        monitor = _Monitor(study, run_dir, deadline, save, console)
        try:
            with monitor:
                if search.workers == 1:
                    _work(study, _Objective(study, run_dir, config))
                else:
                    _run_local_workers(
                        study, storage, run_dir, search.workers, config.seed, budget_end
                    )
        except KeyboardInterrupt:
            _fail_dead_local_trials(study)
            save()
            raise
        study.set_attr(_RUN_ATTR, {**study.attrs[_RUN_ATTR], "closed": True})
        save(stage="refitting", search_seconds=time.monotonic() - t_search)
    search_seconds = float(state.get("search_seconds", time.monotonic() - t_search))
    study.write_leaderboard_csv(run_dir / "leaderboard.csv")
    best = study.best()
    counts = study.counts()
    rows = study.leaderboard()

    # ------------------------------------------------------------------------- refit
    remaining = deadline.remaining()
    chosen, why = _refit_choice(
        rows, run_dir, n_val=len(prepared.split.val), refit_seconds=max(0.0, remaining)
    )
    params = dict(chosen["params"]) if chosen is not None else {}
    is_default = _is_default(params, _default_params(space, config))
    refit_config = _trial_config(config, params, run_dir, default=is_default)
    best_strategy = params.get("strategy")
    refit_config.strategy = "finetune" if best_strategy == "finetune" else "auto"
    if best_strategy == "probe" and "strategy" not in explicit:
        epoch = _refit_epoch_seconds(rows, params)
        if epoch is not None and remaining < _MIN_USEFUL_EPOCHS * epoch:
            # a fine-tune of a few epochs says little and is chosen over the probe only by
            # validation noise: the probe is the refit
            refit_config.strategy = "probe"
    if chosen is not None and chosen["info"].get("probe_c") and "probe_c" not in explicit:
        # the same probe on the same features: its C is known, the cross-validation is not
        # paid twice (20 s of a 2-minute refit under load)
        refit_config.probe_c = float(chosen["info"]["probe_c"])
    refit_config.budget = None if math.isinf(remaining) else f"{max(1.0, remaining):.1f}s"
    if console is not None:
        if chosen is None:
            console.print("[yellow]no trial completed[/]; refitting the default settings")
        else:
            console.print(
                f"[bold]refit[/] of trial {chosen['number']} (val accuracy "
                f"{100 * chosen['value']:.1f}%; {why}): "
                + ", ".join(f"{k}={v}" for k, v in params.items()),
                highlight=False,
            )

    def sections() -> list[ReportSection]:
        images = {
            "Optimisation history": plot_optimization_history(rows, run_dir / "search_history.png"),
            "Parameter importance": plot_param_importance(
                param_importances(rows), run_dir / "search_importance.png"
            ),
            "Learning curves of the best trials": plot_trial_curves(
                rows, run_dir / "search_curves.png"
            ),
        }
        note = (
            f"search {format_seconds(search_seconds)}, then the refit"
            + ("" if chosen is None else f" of trial {chosen['number']} ({why})")
            + f"; budget {config.budget or 'none'}"
        )
        return [search_report_section(rows, images, best=best, counts=counts, budget_note=note)]

    warm = _warm_start(chosen, run_dir) if best_strategy in ("lpft", "finetune") else None
    if warm is not None and console is not None:
        console.print(
            f"the refit continues trial {warm.trial}'s fine-tune ({warm.epochs} epochs, "
            f"val accuracy {100 * warm.val_accuracy:.1f}%)",
            highlight=False,
        )
    refit_resume = (run_dir / "state.json").is_file()
    result = train_classifier(
        state["data"],
        refit_config,
        run_dir=run_dir,
        resume=refit_resume,
        console=console,
        progress=progress,
        prepared=prepared,
        report_sections=sections,
        warm_start=warm,
    )
    summary = {
        "study": name,
        "storage": mask_url(storage),
        "counts": counts,
        "best": best,
        "refit_trial": None if chosen is None else chosen["number"],
        "refit_reason": why,
        "search_seconds": search_seconds,
        "refit_seconds": result.seconds,
        "total_seconds": deadline.elapsed(),
        "budget_seconds": budget,
        "dropped_backbones": dropped,
        "space": space.to_json(),
        "refit_settings": {k: v for k, v in refit_config.model_dump(mode="json").items()},
        "warm_start": None if warm is None else {"trial": warm.trial, "epochs": warm.epochs},
    }
    metrics_path = run_dir / "metrics.json"
    metrics = dict(read_json(metrics_path))
    metrics["search"] = summary
    atomic_write_json(metrics_path, metrics)
    save(stage="done", best=best, counts=counts)
    _clean(run_dir, config)
    return SearchResult(
        run_dir=run_dir,
        study=name,
        best=best,
        counts=counts,
        refit=result,
        seconds=time.monotonic() - started,
        search_seconds=search_seconds,
    )


#: Parameters a probe trial does not use (re-exported for the CLI's help text).
PROBE_IGNORES = FINETUNE_ONLY
