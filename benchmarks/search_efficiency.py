"""Search efficiency (issue 3): the time-budgeted search against the single run, and pruning.

**A. Search vs single run at the same budget.** On scikit-learn's digits, or on the
folder-per-class dataset of ``--data`` (such as ``emoji_data.py``'s), with the split of
``small_data.py``: ``--per-class`` images per class to train on, 24/6 train/validation at 30,
and ``--test-per-class`` other images per class written to a separate test folder), with the
same budget and seed:

* **single run**: ``train_classifier`` (``visionflow train --no-search``): the default recipe;
* **search**: ``search_classifier`` (``visionflow train``): trials, then a refit of the best.

Both are scored on the held-out test folder with ``visionflow.load(run).evaluate(test)``; wall
time (which should be within 10% of the budget) and the search's trial counts are reported.

**B. Pruning.** The same search with each pruner of ``--pruners`` (default: ``asha``, the
default pruner, and ``none``), no budget and a fixed number of trials, a small image size and a
narrowed space so that fine-tune trials dominate (LP-FT only, ``tf_efficientnet_lite0``,
8-16 epochs, 64 px unless ``--prune-img-size``). Compute is the sum over trials of the images
through the fine-tune's training steps (counted from the split, batch size and epochs; the
trials' recorded ``train_images`` is shown beside it) and of the trials' seconds; the refit
after the search is timed separately and not counted as search compute. "To the common
best" is the compute an arm had spent when its best score first reached the best that every
arm reached (issue 3: "2x less compute for the same best score"); "train images" is all of its
trials' compute.
Wall and CPU seconds and the load average before/after each run go to the JSON: on a shared
machine the image counts are the measure of compute that does not move with the load.

    .venv/bin/python benchmarks/search_efficiency.py [--budget 5m] [--seeds 0] [--per-class 30]
        [--trials 12] [--only single-vs-search|pruning] [--out search_efficiency.json]
    .venv/bin/python benchmarks/search_efficiency.py --tables search_efficiency.json  # reprint

Prints Markdown tables for BENCHMARKS.md (progress goes to stderr) and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import torch
from small_data import _subset  # the same train/test images as the small-data benchmark

import visionflow
from visionflow.config import SearchConfig, TrainConfig, load_train_config
from visionflow.data.readers import read_dataset
from visionflow.demo import write_digits
from visionflow.search.runner import search_classifier
from visionflow.train.budget import parse_budget
from visionflow.train.device import configure_threads
from visionflow.train.recipe import train_classifier

#: Part B's space: fine-tune trials only, small images, few epochs, one backbone.
PRUNING_SPACE: dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "strategy": "lpft",
    "img_size": 64,
    "epochs": {"low": 4, "high": 8},
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_split(
    root: Path, per_class: int, test_per_class: int, seed: int, data: Path | None = None
) -> tuple[Path, Path]:
    """``root/train/<class>/`` (``per_class`` images) and ``root/test/<class>/``, the images of
    ``small_data.py``'s split for ``seed`` (its train + val rows, and its test rows), drawn from
    the digits or from ``data`` (a folder-per-class dataset, copied first: the split's CSV is
    written beside the images)."""
    if data is None:
        write_digits(root / "all")
    elif not (root / "all").is_dir():
        shutil.copytree(data, root / "all")
    full = read_dataset(root / "all")
    short = [c for c, n in full.counts().items() if n < per_class + test_per_class]
    if short:
        raise SystemExit(
            f"{data}: classes {short} have fewer than --per-class + --test-per-class "
            f"= {per_class + test_per_class} images"
        )
    index = read_dataset(_subset(full, per_class, test_per_class, seed))
    train_dir, test_dir = root / f"seed{seed}" / "train", root / f"seed{seed}" / "test"
    for folder in (train_dir, test_dir):
        shutil.rmtree(folder, ignore_errors=True)
    for sample in index.samples:
        dest = (test_dir if sample.split == "test" else train_dir) / str(sample.label)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, dest / sample.path.name)
    return train_dir, test_dir


def _config(seed: int, budget: str | None) -> TrainConfig:
    """Default settings; the held-out test folder is the test, so no test split is carved from
    the training folder, and 20% validation gives small_data.py's 24/6 split at 30 per class."""
    cfg = load_train_config(overrides={"seed": seed, "val_fraction": 0.2, "test_fraction": 0.0})
    cfg.budget = budget
    return cfg


def _test_accuracy(run_dir: Path, test_dir: Path) -> float:
    return float(visionflow.load(run_dir, device="cpu").evaluate(test_dir)["accuracy"])


def _trials(run_dir: Path) -> list[dict[str, Any]]:
    """The search's trials from ``leaderboard.csv`` (state, value, duration, info)."""
    rows = []
    with open(run_dir / "leaderboard.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.append(
                {
                    "number": int(row["number"]),
                    "state": row["state"],
                    "value": float(row["value"]) if row["value"] else None,
                    "duration_s": float(row["duration_s"]) if row["duration_s"] else None,
                    "strategy": row.get("strategy") or None,
                    "batch_size": int(row["batch_size"]) if row.get("batch_size") else None,
                    "info": json.loads(row["info"]) if row["info"] else {},
                }
            )
    return sorted(rows, key=lambda r: r["number"])


def _trial_images(run_dir: Path, trials: list[dict[str, Any]]) -> list[int]:
    """Images through each trial's fine-tune training steps, counted from the split and the
    trial's batch size and epochs (the training loader drops the last partial batch when the
    training set is larger than a batch). The trials' own ``train_images`` is rate x epoch
    seconds, and an epoch's seconds include its validation pass, so it reads a little high."""
    n = len(json.loads((run_dir / "split.json").read_text())["train"])
    out = []
    for t in trials:
        bs = t["batch_size"] or n
        per_epoch = (n // bs) * bs if n > bs else n
        out.append(per_epoch * int(t["info"].get("epochs", 0)))
    return out


def _best_so_far(trials: list[dict[str, Any]], images: list[int]) -> list[list[float]]:
    """``[cumulative images, best completed value]`` after each trial, in trial order (one
    worker: the order they ran). Only completed trials count, as in the study's best."""
    curve, total, best = [], 0, None
    for t, n in zip(trials, images, strict=True):
        total += n
        if t["state"] == "complete" and t["value"] is not None:
            best = t["value"] if best is None else max(best, t["value"])
        curve.append([float(total), best])
    return curve


def images_to_reach(curve: list[list[float]], target: float) -> float | None:
    """The images an arm had spent when its best completed score first reached ``target``."""
    for images, best in curve:
        if best is not None and best >= target - 1e-9:
            return images
    return None


def _machine_load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _search_summary(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = metrics["search"]
    best = summary.get("best") or {}
    return {
        "counts": {k: v for k, v in summary["counts"].items() if v},
        "best_value": best.get("value"),
        "best_params": best.get("params"),
        "best_number": best.get("number"),
        "search_seconds": summary["search_seconds"],
        "refit_seconds": summary["refit_seconds"],
        "total_seconds": summary["total_seconds"],
    }


# ---------------------------------------------------------------------------- A
def single_vs_search(
    train_dir: Path, test_dir: Path, work: Path, seed: int, budget: str
) -> dict[str, Any]:
    budget_s = parse_budget(budget) or 300.0
    out: dict[str, Any] = {"seed": seed, "budget": budget, "budget_seconds": budget_s}

    _log(f"A seed {seed}: single run, budget {budget}")
    run_dir = work / f"single-seed{seed}"
    load0, t0, c0 = _machine_load(), time.monotonic(), time.process_time()
    run = train_classifier(train_dir, _config(seed, budget), run_dir=run_dir)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    out["single"] = {
        "test_accuracy": _test_accuracy(run_dir, test_dir),
        "val_accuracy": run.metrics["val"]["accuracy"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_average": [load0, _machine_load()],
        "chosen": run.chosen,
        "phases": run.phases,
    }
    _log(f"A seed {seed}: single run done in {wall:.0f} s: {out['single']['test_accuracy']:.3f}")

    _log(f"A seed {seed}: search, budget {budget}")
    run_dir = work / f"search-seed{seed}"
    load0, t0, c0 = _machine_load(), time.monotonic(), time.process_time()
    result = search_classifier(train_dir, _config(seed, budget), SearchConfig(), run_dir=run_dir)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    trials = _trials(run_dir)
    out["search"] = {
        "test_accuracy": _test_accuracy(run_dir, test_dir),
        "val_accuracy": result.metrics["val"]["accuracy"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_average": [load0, _machine_load()],
        "chosen": result.refit.chosen,
        **_search_summary(run_dir),
        "by_strategy": _by_strategy(trials),
        "trials": trials,
    }
    _log(f"A seed {seed}: search done in {wall:.0f} s: {out['search']['test_accuracy']:.3f}")
    return out


def _by_strategy(trials: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in trials:
        strategy = t["info"].get("strategy") or t["strategy"] or "queued, never run"
        cell = out.setdefault(strategy, {})
        cell[t["state"]] = cell.get(t["state"], 0) + 1
    return out


# ---------------------------------------------------------------------------- B
def pruning(
    train_dir: Path,
    test_dir: Path,
    work: Path,
    seed: int,
    trials: int,
    epochs: tuple[int, int] = (8, 16),
    pruners: tuple[str, ...] = ("asha", "none"),
    img_size: int = 64,
) -> dict[str, Any]:
    space = {**PRUNING_SPACE, "img_size": img_size, "epochs": {"low": epochs[0], "high": epochs[1]}}
    out: dict[str, Any] = {"seed": seed, "trials": trials, "space": space, "pruners": pruners}
    for pruner in pruners:
        _log(f"B seed {seed}: {trials} trials, pruner {pruner}")
        run_dir = work / f"prune-{pruner}-seed{seed}"
        search = SearchConfig(pruner=pruner, trials=trials, space=dict(space))
        load0, t0, c0 = _machine_load(), time.monotonic(), time.process_time()
        search_classifier(train_dir, _config(seed, None), search, run_dir=run_dir)
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        rows = _trials(run_dir)
        done = [r for r in rows if r["state"] in ("complete", "pruned")]
        images = _trial_images(run_dir, done)
        out[pruner] = {
            **_search_summary(run_dir),
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "load_average": [load0, _machine_load()],
            "train_images": sum(images),
            "best_so_far": _best_so_far(done, images),
            "train_images_recorded": sum(int(r["info"].get("train_images", 0)) for r in done),
            "epochs": sum(int(r["info"].get("epochs", 0)) for r in done),
            "trial_seconds": sum(float(r["info"].get("seconds", 0.0)) for r in done),
            "test_accuracy": _test_accuracy(run_dir, test_dir),
            "trials": rows,
        }
        _log(
            f"B seed {seed}: {pruner} done in {wall:.0f} s; "
            f"{out[pruner]['train_images']} train images, best val {out[pruner]['best_value']}"
        )
    return out


# ---------------------------------------------------------------------------- output
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items()) or "-"


def table_a(results: list[dict[str, Any]]) -> str:
    """Test accuracy on the held-out folder, what was kept, wall time against the budget and
    the trials. (No validation column: a kept probe is refitted on train + val, so its
    validation accuracy is not held out.)"""
    lines = [
        "| seed | budget | run | test accuracy | kept | wall time | vs budget | trials |",
        "|---:|---|---|---:|---|---:|---:|---|",
    ]
    for r in results:
        for name in ("single", "search"):
            x = r[name]
            trials, kept = "-", x["chosen"]
            if name == "search":
                kinds = "; ".join(f"{k}: {_counts(v)}" for k, v in x["by_strategy"].items())
                trials = f"{_counts(x['counts'])} ({kinds})"
                params = x.get("best_params") or {}
                if params:
                    kept += f" (best trial: {params.get('strategy')}, {params.get('backbone')}"
                    kept += f", {params.get('img_size')} px, val {_pct(x['best_value'])})"
            label = "single run (`--no-search`)" if name == "single" else "search + refit"
            lines.append(
                f"| {r['seed']} | {r['budget']} | {label} | {_pct(x['test_accuracy'])} | "
                f"{kept} | {x['wall_seconds']:.0f} s | "
                f"{100 * x['wall_seconds'] / r['budget_seconds']:.0f}% | {trials} |"
            )
    return "\n".join(lines)


def _common_best(r: dict[str, Any], names: list[str]) -> float | None:
    """The best score every arm of a seed reached: the lowest of their bests."""
    bests = [r[n]["best_value"] for n in names]
    return None if None in bests else min(bests)


def table_b(results: list[dict[str, Any]]) -> str:
    """One row per arm and a ratio row per arm against ``none``. "To the common best": the
    images an arm had spent (trials in the order they ran) when its best completed score first
    reached the best that all arms of the seed reached, the "compute for the same best score"
    of issue 3; the train-images column is all the trials' images."""
    lines = [
        "| seed | pruner | trials | fine-tune epochs | train images (counted / recorded) | "
        "to the common best | trial seconds | search wall / CPU | best val | refit test |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a is not None and b else "-"

    for r in results:
        names = list(r.get("pruners") or ("hyperband", "none"))
        target = _common_best(r, names)
        reach: dict[str, float | None] = {}
        for name in names:
            x = r[name]
            curve = x.get("best_so_far")
            if curve is None or target is None:
                reach[name] = None
            else:
                reach[name] = images_to_reach(curve, target)
            lines.append(
                f"| {r['seed']} | {name} | {_counts(x['counts'])} | {x['epochs']} | "
                f"{x['train_images']:,} / {x['train_images_recorded']:,} | "
                + ("-" if reach[name] is None else f"{reach[name]:,.0f} ({_pct(target)})")
                + f" | {x['trial_seconds']:.0f} s | {x['search_seconds']:.0f} s / "
                f"{x['cpu_seconds']:.0f} s | {_pct(x['best_value'])} | "
                f"{_pct(x['test_accuracy'])} |"
            )
        if "none" not in r:
            continue
        none = r["none"]
        r["ratio"] = {}
        for name in names:
            if name == "none":
                continue
            arm = r[name]
            r["ratio"][name] = {
                k: arm[k] / none[k] if none[k] else None
                for k in ("epochs", "train_images", "trial_seconds", "search_seconds")
            }
            r["ratio"][name]["to_common_best"] = (
                reach[name] / reach["none"] if reach[name] and reach["none"] else None
            )
            delta_val = 100 * ((arm["best_value"] or 0) - (none["best_value"] or 0))
            lines.append(
                f"| {r['seed']} | **{name} / none** | | {ratio(arm['epochs'], none['epochs'])} | "
                f"{ratio(arm['train_images'], none['train_images'])} | "
                f"{ratio(reach[name], reach['none'])} | "
                f"{ratio(arm['trial_seconds'], none['trial_seconds'])} | "
                f"{ratio(arm['search_seconds'], none['search_seconds'])} wall | "
                f"{delta_val:+.1f} pt | "
                f"{100 * (arm['test_accuracy'] - none['test_accuracy']):+.1f} pt |"
            )
    return "\n".join(lines)


def _join_arms(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Part B's results per seed, with the arms of runs made apart (one pruner each) joined."""
    joined: dict[int, dict[str, Any]] = {}
    for r in results:
        seed = joined.setdefault(r["seed"], {**r, "pruners": []})
        for name in r["pruners"]:
            seed[name] = r[name]
            if name not in seed["pruners"]:
                seed["pruners"].append(name)
    for r in joined.values():  # "none" last, as in one run
        r["pruners"].sort(key=lambda name: name == "none")
    return [joined[s] for s in sorted(joined)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5m", help="part A's budget for both runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a folder-per-class dataset instead of the digits (e.g. benchmarks/emoji_data.py's)",
    )
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--trials", type=int, default=12, help="part B's trials per pruner")
    parser.add_argument(
        "--prune-epochs",
        type=int,
        nargs=2,
        default=[8, 16],
        metavar=("LOW", "HIGH"),
        help="part B's range of fine-tune epochs per trial",
    )
    parser.add_argument(
        "--prune-img-size", type=int, default=64, help="part B's image size (pinned)"
    )
    parser.add_argument(
        "--pruners",
        nargs="+",
        default=["asha", "none"],
        choices=typing.get_args(SearchConfig.model_fields["pruner"].annotation),
        help="part B's arms (each compared with none when none is one of them)",
    )
    parser.add_argument("--only", choices=["single-vs-search", "pruning"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")
    parser.add_argument(
        "--tables",
        type=Path,
        nargs="+",
        default=None,
        help="reprint the tables of JSONs (part B's arms of one seed, run apart, are joined)",
    )
    args = parser.parse_args()
    if args.tables is not None:
        saved = [json.loads(path.read_text()) for path in args.tables]
        runs = [r for x in saved for r in x["single_vs_search"]]
        if runs:
            print(table_a(runs) + "\n")
        arms = _join_arms([r for x in saved for r in x["pruning"]])
        if arms:
            print(table_b(arms))
        return
    threads = configure_threads()
    work = args.work or Path(tempfile.mkdtemp(prefix="vf-search-bench-"))
    # in the work folder: two runs side by side (one arm each) must not rewrite each other's
    # images mid-trial
    data_root = work / "data"
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "visionflow": visionflow.__version__,
            "processor": platform.processor() or platform.machine(),
            "threads": threads,
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "single_vs_search": [],
        "pruning": [],
    }
    for seed in args.seeds:
        train_dir, test_dir = write_split(
            data_root, args.per_class, args.test_per_class, seed, args.data
        )
        if args.only in (None, "single-vs-search"):
            results["single_vs_search"].append(
                single_vs_search(train_dir, test_dir, work, seed, args.budget)
            )
        if args.only in (None, "pruning"):
            results["pruning"].append(
                pruning(
                    train_dir,
                    test_dir,
                    work,
                    seed,
                    args.trials,
                    tuple(args.prune_epochs),
                    tuple(args.pruners),
                    args.prune_img_size,
                )
            )
        if args.out is not None:  # after every seed: a crash later keeps what was measured
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if results["single_vs_search"]:
        print("### A. Search vs single run at the same budget\n")
        print(table_a(results["single_vs_search"]) + "\n")
    if results["pruning"]:
        print("### B. Pruning: " + " vs ".join(args.pruners) + ", same trials\n")
        print(table_b(results["pruning"]) + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    _log(f"runs kept in {work}")


if __name__ == "__main__":
    main()
