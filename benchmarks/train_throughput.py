"""Training throughput: visionflow's loop against a plain hand-written timm loop.

Same model (timm ``tf_efficientnet_lite0``), same images (the digits demo dataset), same
augmentation (RandomResizedCrop + flip at 224 px), same batch size and optimiser. The plain loop
is what a user would write from the timm README: NCHW tensors, PyTorch's default threads, a
torchvision ImageFolder with a worker. visionflow's Engine adds channels_last, thread settings and
its decoded-image cache.

    .venv/bin/python benchmarks/train_throughput.py [--steps 12] [--batch-size 32]

Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from visionflow.data.loading import DecodedImageCache, ImageDataset, make_loader
from visionflow.data.preprocess import Preprocessing
from visionflow.data.readers import read_dataset
from visionflow.data.transforms import train_transform
from visionflow.demo import write_digits
from visionflow.models.heads import TaskModel
from visionflow.models.tasks import ClassificationTask
from visionflow.train.callbacks import Callback
from visionflow.train.device import configure_threads
from visionflow.train.engine import Engine, FitConfig


def plain_loop(root: Path, steps: int, batch_size: int, warmup: int) -> float:
    """The peer: a straightforward timm + torchvision training loop."""
    tf = v2.Compose([
        v2.ToImage(), v2.RandomResizedCrop(224, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5] * 3, [0.5] * 3),
    ])  # fmt: skip
    ds = datasets.ImageFolder(str(root), transform=tf)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=1, drop_last=True)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=len(ds.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    seen, t0 = 0, 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            t0, seen = time.perf_counter(), 0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
        if i + 1 >= warmup + steps:
            break
    return seen / (time.perf_counter() - t0)


def visionflow_loop(root: Path, steps: int, batch_size: int, warmup: int) -> float:
    """visionflow's Engine on the same data, one epoch of ``warmup + steps`` batches."""
    configure_threads()
    index = read_dataset(root)
    n = (warmup + steps) * batch_size
    pre = Preprocessing(input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    ds = ImageDataset(index.samples[:n], index.class_to_idx, train_transform(pre, "light"),
                      cache=DecodedImageCache())  # fmt: skip
    loader = make_loader(ds, batch_size=batch_size, shuffle=True, drop_last=True)
    backbone = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    task = ClassificationTask(index.classes)
    model = TaskModel(backbone, task.build_head(backbone.num_features))
    times: list[float] = []

    class Timer(Callback):
        def on_batch_end(self, engine: Engine, step: int, loss: float) -> None:
            times.append(time.perf_counter())

    cfg = FitConfig(epochs=1, lr=1e-4, backbone_lr=1e-4, patience=None, grad_clip=None)
    Engine(model, task, cfg, callbacks=[Timer()]).fit(loader)
    return steps * batch_size / (times[-1] - times[warmup - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(Path(tmp) / "digits")
        default_threads = torch.get_num_threads()
        plain = plain_loop(root, args.steps, args.batch_size, args.warmup)
        ours = visionflow_loop(root, args.steps, args.batch_size, args.warmup)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"default threads {default_threads}")  # fmt: skip
    print()
    print("| loop | images/s | speed-up |")
    print("|---|---:|---:|")
    print(f"| plain timm loop (NCHW, defaults) | {plain:.1f} | 1.00x |")
    print(f"| visionflow Engine | {ours:.1f} | {ours / plain:.2f}x |")


if __name__ == "__main__":
    main()
