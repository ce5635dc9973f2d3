"""Active learning: accuracy against the number of labels, every strategy against random.

The setting of issue 6's acceptance test. scikit-learn's digits (1,797 images, 10 classes,
written as PNG files by ``visionflow.demo.write_digits``) are split per seed into a held-out
test set (30 %, stratified) and an unlabelled pool. Every image is embedded once by the frozen
``tf_efficientnet_lite0`` with its offline ImageNet weights, through the recipe's own feature
pass (``_Pipeline.features``: ONNX Runtime on CPU, cached). Then, per seed and strategy:

1. start from ``--start`` labels (the same random ones, ``start / classes`` per class, for
   every strategy of a seed);
2. fit a logistic regression on the labelled images' features (fast; C fixed, features scaled
   to unit mean norm) and measure test accuracy;
3. ask the strategy (the functions of ``visionflow.explain.active``, through ``select``, with
   the model's probabilities on the pool, the pool's embeddings and the labelled embeddings)
   for the next ``--step`` images, reveal their labels, repeat up to ``--max`` labels.

Reported: mean +- std test accuracy per budget, the area under the learning curve (mean
accuracy over the budgets), and the labels needed to reach 90 % / 95 % of the accuracy of the
same model trained on the whole pool (per seed; the median over seeds).

    .venv/bin/python benchmarks/active_learning.py [--seeds 0 1 2 3 4] [--plot curves.png]

Prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from visionflow.config import load_train_config
from visionflow.data.index import Split
from visionflow.data.readers import read_dataset
from visionflow.demo import write_digits
from visionflow.explain.active import available_strategies, select
from visionflow.train.budget import Deadline
from visionflow.train.recipe import Prepared, _Pipeline, _Run


def embed_digits(root: Path, cache: Path, img_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Frozen tf_efficientnet_lite0 features of every digit, through the recipe's feature pass
    (cached in ``cache``, so a second run skips the network)."""
    index = read_dataset(root)
    split = Split(train=list(range(len(index))), val=[], test=[])
    overrides = {"backbone": "tf_efficientnet_lite0", "img_size": img_size, "budget": None,
                 "device": "cpu", "feature_cache": str(cache)}  # fmt: skip
    cfg = load_train_config(overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _Pipeline(cfg, _Run(Path(tmp)), Deadline(None), None, False)
        pipe.load_data(root, False, Prepared(index, split, {}))
        pipe.build_model()
        feats, targets = pipe.features("train")
    return feats.numpy().astype(np.float64), targets.numpy()


def split_pool(y: np.ndarray, test_fraction: float, start: int, seed: int):
    """Held-out test positions, pool positions, and the starting labels (per class)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    test, pool, first = [], [], []
    for c in classes:
        members = rng.permutation(np.flatnonzero(y == c))
        k = round(test_fraction * len(members))
        test += members[:k].tolist()
        pool += members[k:].tolist()
        first += members[k : k + max(1, start // len(classes))].tolist()
    return np.asarray(test), np.asarray(pool), np.asarray(first)


def fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def curve(
    strategy: str,
    x: np.ndarray,
    y: np.ndarray,
    test: np.ndarray,
    pool: np.ndarray,
    first: np.ndarray,
    budgets: list[int],
    c: float,
    seed: int,
) -> tuple[list[float], float]:
    """Test accuracy at every budget and the mean seconds a selection took."""
    labelled = list(first)
    accs: list[float] = []
    seconds: list[float] = []
    for b, budget in enumerate(budgets):
        idx = np.asarray(labelled)
        model = fit(x[idx], y[idx], c)
        accs.append(float((model.predict(x[test]) == y[test]).mean()))
        if b + 1 == len(budgets):
            break
        rest = np.setdiff1d(pool, idx)
        t0 = time.perf_counter()
        picked = select(
            model.predict_proba(x[rest]),
            budgets[b + 1] - budget,
            strategy=strategy,
            embeddings=x[rest],
            labelled=x[idx],
            seed=seed * 1000 + b,
        )
        seconds.append(time.perf_counter() - t0)
        labelled += rest[picked.indices].tolist()
    return accs, float(np.mean(seconds)) if seconds else 0.0


def labels_to_reach(accs: np.ndarray, target: float, budgets: list[int]) -> float:
    hits = np.flatnonzero(accs >= target)
    return float(budgets[hits[0]]) if len(hits) else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", nargs="+", default=available_strategies())
    parser.add_argument("--start", type=int, default=20)
    parser.add_argument("--step", type=int, default=20)
    parser.add_argument("--max", type=int, default=300)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--C", type=float, default=100.0, help="logistic regression C")
    parser.add_argument("--img-size", type=int, default=None, help="default: the weights' own")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vf-al-digits")
    parser.add_argument("--plot", type=Path, default=None, help="learning curves PNG")
    args = parser.parse_args()
    load_before = os.getloadavg()
    t_start = time.monotonic()
    root = write_digits(args.data / "digits")
    t0 = time.monotonic()
    x, y = embed_digits(root, args.data / "features", args.img_size)
    embed_s = time.monotonic() - t0
    x = x / np.sqrt((x**2).sum(axis=1).mean())  # one global scale: unit mean norm
    budgets = list(range(args.start, args.max + 1, args.step))
    results: dict[str, np.ndarray] = {}
    select_s: dict[str, float] = {}
    full: list[float] = []
    with threadpool_limits(1):  # one thread per fit: faster than two fighting on 2 cores
        splits = [split_pool(y, args.test_fraction, args.start, s) for s in args.seeds]
        for test, pool, _ in splits:
            model = fit(x[pool], y[pool], args.C)
            full.append(float((model.predict(x[test]) == y[test]).mean()))
        for strategy in args.strategies:
            runs, times = [], []
            for (test, pool, first), seed in zip(splits, args.seeds, strict=True):
                accs, secs = curve(strategy, x, y, test, pool, first, budgets, args.C, seed)
                runs.append(accs)
                times.append(secs)
            results[strategy] = np.asarray(runs)
            select_s[strategy] = float(np.mean(times))
    full_acc = np.asarray(full)
    load_after = os.getloadavg()

    print(f"<!-- {len(y)} digits, pool {len(splits[0][1])} / test {len(splits[0][0])} per seed, "
          f"seeds {args.seeds}, C={args.C}, features {x.shape[1]}-d in {embed_s:.0f} s, "
          f"total {time.monotonic() - t_start:.0f} s -->")  # fmt: skip
    print(f"Load average (1/5/15 min): before {load_before[0]:.2f}/{load_before[1]:.2f}/"
          f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/"
          f"{load_after[2]:.2f} (2 cores, shared).\n")  # fmt: skip
    print(f"Accuracy with the whole pool labelled ({len(splits[0][1])} images): "
          f"{100 * full_acc.mean():.1f} +- {100 * full_acc.std():.1f} %.\n")  # fmt: skip
    shown = [b for b in budgets if b in {20, 40, 60, 80, 100, 140, 200, 300} or b == budgets[-1]]
    print("| labels | " + " | ".join(args.strategies) + " |")
    print("|---:|" + "---:|" * len(args.strategies))
    for b in shown:
        i = budgets.index(b)
        cells = [
            f"{100 * results[s][:, i].mean():.1f} +- {100 * results[s][:, i].std():.1f}"
            for s in args.strategies
        ]
        print(f"| {b} | " + " | ".join(cells) + " |")
    print()
    print(
        "| strategy | area under the curve | vs random | labels to 90 % of full "
        "| labels to 95 % of full | seconds per selection |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    base = results.get("random")
    for s in args.strategies:
        aulc = results[s].mean(axis=1)
        delta = "" if base is None or s == "random" else (
            f"{100 * (aulc - base.mean(axis=1)).mean():+.1f} pts "
            f"(better in {int((aulc > base.mean(axis=1)).sum())}/{len(aulc)} seeds)"
        )  # fmt: skip
        reach = []
        for frac in (0.90, 0.95):
            need = [labels_to_reach(results[s][k], frac * full_acc[k], budgets)
                    for k in range(len(args.seeds))]  # fmt: skip
            missed = sum(np.isinf(need))
            med = float(np.median(need))
            text = f">{budgets[-1]}" if np.isinf(med) else f"{med:.0f}"
            reach.append(text + (f" ({missed} seed(s) never)" if missed else ""))
        print(f"| {s} | {100 * aulc.mean():.1f} +- {100 * aulc.std():.1f} | {delta} | "
              f"{reach[0]} | {reach[1]} | {select_s[s]:.3f} |")  # fmt: skip
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in args.strategies:
            m, sd = results[s].mean(axis=0), results[s].std(axis=0)
            ax.plot(budgets, m, label=s, lw=2 if s in ("hybrid", "random") else 1)
            ax.fill_between(budgets, m - sd, m + sd, alpha=0.1)
        ax.axhline(full_acc.mean(), color="grey", ls="--", lw=1, label="whole pool")
        ax.set_xlabel("labelled images")
        ax.set_ylabel("test accuracy")
        ax.set_title("digits, frozen tf_efficientnet_lite0 + logistic regression")
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\nlearning curves: {args.plot}")


if __name__ == "__main__":
    main()
