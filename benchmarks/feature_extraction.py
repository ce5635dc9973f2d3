"""Frozen-feature throughput: PyTorch eager (NCHW and channels_last) against ONNX Runtime.

The linear probe needs every image's features from the frozen pretrained backbone once; this
measures how fast each runtime computes them on this machine, with the same weights and the
parity check the recipe uses.

    .venv/bin/python benchmarks/feature_extraction.py [--size 224] [--batch-size 32] [--repeats 3]

Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from visionflow.models import create_backbone, resolve_weights
from visionflow.models.onnx_features import onnx_feature_extractor
from visionflow.train.device import configure_threads


def _best_rate(fn, batch: torch.Tensor, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn(batch)  # warm-up: allocations, graph optimisation, oneDNN kernels
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - t0)
    return len(batch) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = configure_threads()
    weights = resolve_weights(args.backbone)
    model = create_backbone(args.backbone, weights=weights).eval()
    batch = torch.randn(args.batch_size, 3, args.size, args.size)
    rows = []
    with torch.inference_mode():
        rows.append(("PyTorch eager, NCHW", _best_rate(model, batch, args.repeats)))
        cl = create_backbone(args.backbone, weights=weights).eval()
        cl = cl.to(memory_format=torch.channels_last)
        rows.append(
            (
                "PyTorch eager, channels_last",
                _best_rate(
                    lambda x: cl(x.contiguous(memory_format=torch.channels_last)),
                    batch,
                    args.repeats,
                ),
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        onnx = onnx_feature_extractor(model, args.size, Path(tmp) / "f.onnx", threads=threads)
        if onnx is not None:
            rows.append(
                ("ONNX Runtime (as the recipe runs it)", _best_rate(onnx, batch, args.repeats))
            )
            diff = onnx.max_abs_diff
    print(f"{platform.machine()}, {threads} threads, torch {torch.__version__}, "
          f"{args.backbone} {args.size}px batch {args.batch_size}")  # fmt: skip
    print()
    print("| runtime | images/s | vs NCHW |")
    print("|---|---:|---:|")
    base = rows[0][1]
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    if onnx is not None:
        print(f"\nONNX Runtime vs PyTorch: largest feature difference {diff:.2g}")


if __name__ == "__main__":
    main()
