"""Detectors on tf_efficientnet_lite0: parameters and CPU forward latency.

Every registered detector (``visionflow.models.detection``) is built on ``tf_efficientnet_lite0``
with its offline ImageNet weights (the pip package), ``num_classes`` object classes, and timed
in eval mode on one ``--size`` x ``--size`` image (batch 1, ``torch.inference_mode``,
``--threads`` intra-op threads): a few warm-up runs, then ``--runs`` timed forwards; the median
and the 90th percentile are reported, with the machine's load average before and after.
The forward includes the model's own resize and normalisation and the box decoding and NMS
(score threshold 0.05, so an untrained head still decodes its candidates).

    flock /tmp/visionflow-bench.lock .venv/bin/python benchmarks/detection_models.py \\
        [--size 320] [--threads 2] [--runs 30] [--classes 3]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from visionflow.models.detection import build_detector, detector_info, list_detectors
from visionflow.models.weights import resolve_weights


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = resolve_weights(args.backbone, "package")
    image = torch.rand(3, args.size, args.size)
    load_before = _load()
    rows = []
    for name in sorted(list_detectors()):
        model = build_detector(
            name,
            backbone=args.backbone,
            num_classes=args.classes,
            weights=weights,
            img_size=args.size,
        ).eval()
        info = detector_info(model)
        body = sum(p.numel() for p in model.backbone.body.parameters())
        times = []
        with torch.inference_mode():
            for _ in range(args.warmup):
                model([image])
            for _ in range(args.runs):
                start = time.perf_counter()
                model([image])
                times.append((time.perf_counter() - start) * 1000)
        times.sort()
        p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
        rows.append(
            f"| {name} | {info['parameters'] / 1e6:.2f} | {body / 1e6:.2f} | "
            f"{info['strides']} | {statistics.median(times):.1f} | {p90:.1f} |"
        )
    print(
        f"Detectors on {args.backbone} ({weights.source} weights), {args.size}x{args.size} input, "
        f"batch 1, {args.threads} threads, {args.runs} runs after {args.warmup} warm-up; "
        f"torch {torch.__version__}; load average before {load_before}, after {_load()}\n"
    )
    print("| detector | params (M) | backbone params (M) | backbone strides | median ms | p90 ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
