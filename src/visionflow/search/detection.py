"""Searching a detector: ``visionflow train --task detect --search``.

Timeline of a run with budget ``B`` (``SearchConfig.refit_fraction`` = ``r``)::

    data checks + split (once) | trials until (1 - r) * B | the best configuration, trained until B

* **Space** (:func:`detection_space`): the detector (``fcos`` and ``fasterrcnn_fpn`` are
  anchor-free/two-stage, ``retinanet`` and ``ssdlite`` anchor-based), the input size, the
  learning rate and the augmentation strength. Users pin or narrow any of it with ``--param``
  (``detector=retinanet``, ``'img_size=[320,384]'``) or a space file, as for classification.
  The score and NMS thresholds are not sampled: they need no training, so every run chooses
  them on validation after training (the NMS IoU threshold with the best validation mAP, the
  display threshold with the best F1), which is exact where a sampled value would be noisy.
* **Trials** share the checked data and split, train with a share of the search phase
  (``trial_fraction``), report the validation mAP@[.5:.95] every epoch and are pruned by the
  pruner (successive halving by default). The first trial is the default recipe (``--no-search``'s).
  Trials are scored on validation only; the test split is first looked at by the refit.
* **Refit**: the best trial's configuration is trained from the ImageNet backbone with the rest
  of the budget by :func:`~visionflow.train.detection.train_detector`, which writes the model,
  metrics and report into the run folder. ``leaderboard.csv`` and ``search.json`` go next to
  them; ``trials/`` is deleted at the end.
* **Storage and resume**: the Optuna study is a journal file in the run folder (or
  ``--storage``); running the same command with the same ``--name`` continues it.

On 2 CPU cores at 15 minutes the search ran 3 trials and its refit matched the single recipe
(test mAP@.5 0.708 vs 0.713, BENCHMARKS.md "Object detection"): trials that short cannot show
what the slower detectors are worth, so it is off unless asked for (``--search``).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from visionflow._io import atomic_write_json, read_json
from visionflow.config import DetectConfig, SearchConfig
from visionflow.errors import ConfigError, VisionflowError
from visionflow.search.space import Categorical, FloatRange, SearchSpace
from visionflow.search.study import Study, TrialHandle, TrialPruned
from visionflow.train.budget import Deadline, format_seconds
from visionflow.train.detection import (
    AUTO_DETECTOR,
    DetectionRunResult,
    Trial,
    _prepare_data,
    auto_img_size,
    train_detector,
)

__all__ = ["DetectionSearchResult", "detection_space", "search_detector"]

#: Sampled parameters and the :class:`~visionflow.config.DetectConfig` fields they set.
_FIELDS = ("detector", "img_size", "lr", "augment")
#: A trial is not started with less than this left of the search phase (seconds), nor with
#: less than :data:`_MIN_EPOCHS` of the slowest epoch measured so far.
_MIN_TRIAL_SECONDS = 60.0
_MIN_EPOCHS = 3
#: The search ends after this many failed trials in a row.
_MAX_FAILURES = 3


def detection_space() -> SearchSpace:
    """The default detection search space (names are stable: they are stored in studies)."""
    return SearchSpace(
        {
            "detector": Categorical(("fcos", "retinanet", "fasterrcnn_fpn", "ssdlite")),
            "img_size": Categorical((256, 320, 384, 448, 512)),
            "lr": FloatRange(3e-4, 3e-3, log=True),
            "augment": Categorical(("light", "medium", "heavy")),
        }
    )


@dataclass
class DetectionSearchResult:
    """What :func:`search_detector` returns: the refit run and the study's summary."""

    refit: DetectionRunResult
    best: dict[str, Any] | None
    counts: dict[str, int]
    study: str

    @property
    def run_dir(self) -> Path:
        return self.refit.run_dir


def search_detector(
    data: str | Path,
    config: DetectConfig,
    search: SearchConfig,
    *,
    run_dir: str | Path,
    explicit: set[str] | None = None,
    console: Console | None = None,
) -> DetectionSearchResult:
    """Search detector configurations within the budget, then train the best one.

    Args:
        data: A COCO, Pascal VOC or YOLO dataset.
        config: Settings; ``budget`` is the whole run's, search and refit.
        search: Trials, pruner, storage, refit/trial fractions and ``space`` overrides.
        run_dir: The run folder (a second call with the same folder continues the study).
        explicit: Settings the user gave (``detector``, ``img_size``, ``lr``, ``augment``
            among them are pinned in the space).
        console: Where progress is printed.

    Raises:
        ConfigError: ``workers`` above 1 (detection trials run one at a time), no budget and
            no ``trials``, or a space override that names no parameter.
    """
    if search.workers != 1:
        raise ConfigError(
            "a detection search runs its trials one after the other in this process; "
            "--workers applies to classification only"
        )
    budget = config.budget_seconds()
    if budget is None and search.trials is None:
        raise ConfigError("a search without a budget needs --trials")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(budget)
    say = (lambda line: console.print(line)) if console is not None else (lambda line: None)
    prepared = _prepare_data(Path(data), config, run, say)
    space = _space(config, search, explicit or set())
    study = Study.open(
        f"detect-{run.name}",
        storage=search.storage,
        run_dir=run,
        space=space,
        seed=config.seed,
        pruner=search.pruner,
    )
    if sum(study.counts().values()) == 0:
        study.enqueue(_default_params(config, prepared, space))
    search_seconds = None if budget is None else budget * (1 - search.refit_fraction)
    min_trial = [_MIN_TRIAL_SECONDS]  # raised once trials have measured epoch times
    trial_cap = None if search_seconds is None else search.trial_fraction * search_seconds

    def objective(handle: TrialHandle) -> float:
        left = math.inf if search_seconds is None else search_seconds - deadline.elapsed()
        seconds = min(left, trial_cap if trial_cap is not None else math.inf)
        params = handle.params
        say(f"trial {handle.number}: {_describe(params)} for up to {_fmt(seconds)}")
        settings = config.model_copy(
            update={
                **{k: params[k] for k in _FIELDS if k in params},
                "budget": None if math.isinf(seconds) else f"{max(1.0, seconds):.0f}s",
            }
        )

        def report(epoch: int, value: float) -> bool:
            handle.report(value, epoch)
            return handle.should_prune()

        trial = Trial(prepared, report)
        result = train_detector(
            data, settings, run_dir=run / "trials" / f"{handle.number:03d}", trial=trial
        )
        # a trial is worth starting only with time for a few epochs of the slowest seen
        epochs = [float(r["seconds"]) for r in _history(result.run_dir)]
        if epochs:
            min_trial[0] = max(min_trial[0], _MIN_EPOCHS * max(epochs))
        value = result.metrics.get("val", {}).get("map")
        handle.set_info("val_map_50", result.metrics.get("val", {}).get("map_50"))
        if trial.stopped:
            raise TrialPruned
        if value is None:
            raise ConfigError("the trial has no validation score (no validation split)")
        return float(value)

    failures = 0
    while search_seconds is None or search_seconds - deadline.elapsed() >= min_trial[0]:
        before = study.counts()["failed"]
        ran = study.optimize(
            objective, n_trials=1, catch=(VisionflowError,), max_trials=search.trials
        )
        if ran == 0:
            break
        # a configuration that cannot train (too slow for its share, out of memory...) fails;
        # a run of them means the rest of the space cannot either: the refit gets the time
        failures = failures + 1 if study.counts()["failed"] > before else 0
        if failures >= _MAX_FAILURES:
            say(f"{failures} trials in a row failed; ending the search")
            break
    study.write_leaderboard_csv(run / "leaderboard.csv")
    best = study.best()
    chosen = dict(best["params"]) if best is not None else {}
    remaining = None if budget is None else max(1.0, budget - deadline.elapsed())
    say(
        f"search done: {study.counts()}; refit of {_describe(chosen) or 'the default recipe'}"
        + ("" if remaining is None else f" with {format_seconds(remaining)} left")
    )
    settings = config.model_copy(
        update={
            **{k: chosen[k] for k in _FIELDS if k in chosen},
            "budget": None if remaining is None else f"{remaining:.0f}s",
        }
    )
    refit = train_detector(data, settings, run_dir=run, console=console)
    summary = {
        "study": study.name,
        "space": space.to_json(),
        "best": best,
        "counts": study.counts(),
        "refit": {k: chosen.get(k) for k in _FIELDS},
        "seconds": round(deadline.elapsed(), 1),
    }
    atomic_write_json(run / "search.json", summary)
    shutil.rmtree(run / "trials", ignore_errors=True)
    return DetectionSearchResult(refit=refit, best=best, counts=study.counts(), study=study.name)


def _history(run: Path) -> list[dict[str, Any]]:
    path = run / "history.json"
    if not path.is_file():
        return []
    found = read_json(path)
    return [r for r in found if isinstance(r, dict) and "seconds" in r]


def _space(config: DetectConfig, search: SearchConfig, explicit: set[str]) -> SearchSpace:
    """The default space, with the user's explicit settings pinned, then their overrides."""
    space = detection_space()
    pins: dict[str, Any] = {}
    if "detector" in explicit and config.detector != "auto":
        pins["detector"] = config.detector
    for name in ("img_size", "lr", "augment"):
        if name in explicit and getattr(config, name) is not None:
            pins[name] = getattr(config, name)
    space = SearchSpace.from_overrides(space, pins)
    return SearchSpace.from_overrides(space, search.space)


def _default_params(config: DetectConfig, prepared: Any, space: SearchSpace) -> dict[str, Any]:
    """The default recipe as a trial (what ``--no-search`` trains), within the space."""
    index, split = prepared
    detector = AUTO_DETECTOR if config.detector == "auto" else config.detector
    size = config.img_size or auto_img_size([index.samples[i] for i in split.train], detector)
    wanted: dict[str, Any] = {
        "detector": detector, "img_size": size, "lr": config.lr, "augment": config.augment,
    }  # fmt: skip
    out = {}
    for name, value in wanted.items():
        dim = space[name]
        if isinstance(dim, Categorical) and value not in dim.choices:
            continue  # narrowed away by the user: let the sampler choose
        if isinstance(dim, FloatRange) and not dim.low <= float(value) <= dim.high:
            continue
        out[name] = value
    return out


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _fmt(seconds: float) -> str:
    return "no limit" if math.isinf(seconds) else format_seconds(seconds)
