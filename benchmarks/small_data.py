"""Small-data accuracy: visionflow's default recipe against two hand-written peers.

The situation of issue 2's acceptance test: ~10 classes, 30 training images per class, small
images, a 5-minute budget on 2 CPU cores, the same split and the same pretrained backbone
(tf_efficientnet_lite0 from the offline package) for everyone.

* **plain fine-tune**: random linear head, AdamW lr 3e-4, RandomResizedCrop, cross-entropy,
  epochs until the budget runs out (the usual hand-written timm loop);
* **linear probe**: frozen features (eval transform) + scikit-learn LogisticRegression (defaults);
* **visionflow**: ``visionflow train --budget`` with default settings.

    .venv/bin/python benchmarks/small_data.py [--per-class 30] [--budget 5m] [--seeds 0]

The built-in dataset is scikit-learn's digits (grayscale, 8x8); pass ``--data DIR`` for another
folder-per-class dataset. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

from visionflow.config import load_train_config
from visionflow.data.index import DatasetIndex
from visionflow.data.loading import ImageDataset
from visionflow.data.readers import read_dataset
from visionflow.data.transforms import eval_transform, train_transform
from visionflow.demo import write_digits
from visionflow.models.backbones import create_backbone
from visionflow.models.weights import resolve_weights
from visionflow.train.budget import parse_budget
from visionflow.train.device import configure_threads
from visionflow.train.recipe import train_classifier


def _subset(index: DatasetIndex, per_class: int, test_per_class: int, seed: int) -> Path:
    """Write a CSV dataset: ``per_class`` train+val images and ``test_per_class`` test images."""
    rng = np.random.default_rng(seed)
    rows = ["path,label,split"]
    for label in index.classes:
        items = [s for s in index.samples if s.label == label]
        order = rng.permutation(len(items))
        n_val = max(1, round(per_class * 0.2))
        for rank, i in enumerate(order[: per_class + test_per_class]):
            split = "test" if rank >= per_class else ("val" if rank < n_val else "train")
            rows.append(f"{items[i].path.relative_to(index.root).as_posix()},{label},{split}")
    out = index.root / f"bench-seed{seed}.csv"  # paths must stay inside the CSV's folder
    out.write_text("\n".join(rows) + "\n")
    return out


def _split_samples(index: DatasetIndex, name: str) -> list:
    return [s for s in index.samples if s.split == name]


def plain_finetune(index: DatasetIndex, budget: float) -> float:
    weights = resolve_weights("tf_efficientnet_lite0")
    pre = weights.preprocessing
    model = create_backbone("tf_efficientnet_lite0", weights=weights)
    head = torch.nn.Linear(model.num_features, len(index.classes))
    net = torch.nn.Sequential(model, head)
    train = ImageDataset(_split_samples(index, "train") + _split_samples(index, "val"),
                         index.class_to_idx, train_transform(pre, "light"))  # fmt: skip
    test = ImageDataset(_split_samples(index, "test"), index.class_to_idx, eval_transform(pre))
    loader = DataLoader(train, batch_size=32, shuffle=True)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
    start = time.monotonic()
    epoch_time = 0.0
    while time.monotonic() - start + epoch_time < budget - 15:
        t0 = time.monotonic()
        net.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_time = time.monotonic() - t0
    return _accuracy(net, test)


@torch.inference_mode()
def _accuracy(net: torch.nn.Module, ds: ImageDataset) -> float:
    net.eval()
    correct = total = 0
    for x, y in DataLoader(ds, batch_size=64):
        correct += int((net(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


@torch.inference_mode()
def linear_probe(index: DatasetIndex) -> float:
    weights = resolve_weights("tf_efficientnet_lite0")
    model = create_backbone("tf_efficientnet_lite0", weights=weights).eval()
    tf = eval_transform(weights.preprocessing)

    def feats(samples: list) -> tuple[np.ndarray, np.ndarray]:
        ds = ImageDataset(samples, index.class_to_idx, tf)
        xs, ys = [], []
        for x, y in DataLoader(ds, batch_size=64):
            xs.append(model(x).numpy())
            ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = feats(_split_samples(index, "train") + _split_samples(index, "val"))
    xte, yte = feats(_split_samples(index, "test"))
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", choices=["visionflow", "plain", "probe"], default=None)
    args = parser.parse_args()
    configure_threads()
    budget = parse_budget(args.budget) or 300.0
    root = args.data or write_digits(Path(tempfile.gettempdir()) / "vf-bench-digits")
    full = read_dataset(root)
    print("| seed | visionflow | plain fine-tune | linear probe |")
    print("|---:|---:|---:|---:|")
    for seed in args.seeds:
        csv_path = _subset(full, args.per_class, args.test_per_class, seed)
        index = read_dataset(csv_path)
        results = {}
        if args.only in (None, "visionflow"):
            cfg = load_train_config(overrides={"budget": args.budget, "seed": seed})
            with tempfile.TemporaryDirectory() as tmp:
                run = train_classifier(csv_path, cfg, run_dir=Path(tmp) / "run")
            results["visionflow"] = run.metrics["test"]["accuracy"]
            print(f"<!-- seed {seed}: kept {run.chosen}; phases {run.phases} -->", file=sys.stderr)
        if args.only in (None, "plain"):
            torch.manual_seed(seed)
            results["plain"] = plain_finetune(index, budget)
        if args.only in (None, "probe"):
            results["probe"] = linear_probe(index)
        cells = [f"{100 * results[k]:.1f}%" if k in results else "-"
                 for k in ("visionflow", "plain", "probe")]  # fmt: skip
        print(f"| {seed} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
