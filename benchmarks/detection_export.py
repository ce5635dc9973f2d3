"""Detection export: time to export, parity with PyTorch, ONNX Runtime vs PyTorch eager latency.

Each detector is either a trained run (``--run DIR``, as ``visionflow train --task detect``
writes it) or, without one, built on ``--backbone`` with its packaged ImageNet weights and an
untrained head (whose scores are all alike: every candidate survives to NMS, the slow case).
The graph is exported (:func:`visionflow.export.detection.export_detector`), checked against
PyTorch on the run's validation images (or on ``--images`` random noise images of varied sizes)
and both engines are timed on one ``--width`` x ``--height`` image, batch 1, ``--threads``
threads (ONNX Runtime and torch alike; ``--int8`` adds the Conv-only INT8 graph calibrated on
16 of the images): a few warm-up calls, then ``--runs`` timed calls,
median and 90th percentile, with the machine's load average before and after. The timed call
is the whole detection: resize, normalisation, network, box decoding and NMS.

    flock /tmp/visionflow-bench.lock .venv/bin/python benchmarks/detection_export.py \\
        [--run runs/x | --detector ssdlite --backbone tf_efficientnet_lite0 --size 320] \\
        [--width 640 --height 480] [--threads 2] [--runs 30]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _times(call: Callable[[], object], warmup: int, runs: int) -> tuple[float, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--detector", default="ssdlite")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--int8", action="store_true", help="Also time the INT8 graph.")
    args = parser.parse_args()

    from visionflow.export.detect_runtime import run_detection_graph
    from visionflow.export.detection import (
        _held_out_images,
        _torch_run,
        check_detection_parity,
        export_detector,
        load_detector_run,
        quantize_detector_int8,
        shape_probes,
    )
    from visionflow.export.runtime import make_session
    from visionflow.models.detection import build_detector, detector_info

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    threshold = 0.3
    if args.run is not None:
        from visionflow._io import read_json
        from visionflow.data.detection import DetectionIndex
        from visionflow.data.index import Split

        model, meta = load_detector_run(args.run)
        threshold = float(meta.get("score_threshold", threshold))
        index = DetectionIndex.from_json(read_json(args.run / "index.json"))
        split = Split.from_json(read_json(args.run / "split.json"))
        images = [px for _, px in _held_out_images(index, split.val or split.test, 50, 0)]
        source = f"run {args.run.name}"
    else:
        from visionflow.models.weights import resolve_weights

        torch.manual_seed(0)
        weights = resolve_weights(args.backbone, "package")
        model = build_detector(
            args.detector,
            backbone=args.backbone,
            num_classes=3,
            weights=weights,
            img_size=args.size,
        ).eval()
        sizes = [(int(rng.integers(200, 700)), int(rng.integers(200, 700))) for _ in range(8)]
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
        source = f"untrained head, {weights.source} backbone weights"
    info = detector_info(model)
    images += shape_probes(images[0])
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_detector(model, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - start
        session = make_session(path, threads=args.threads)
        size_mb = path.stat().st_size / 2**20
        parity = check_detection_parity(model, session, images, probes=3, score_threshold=threshold)
        image = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
        ort_p50, ort_p90 = _times(
            lambda: run_detection_graph(session, image), args.warmup, args.runs
        )
        eager_p50, eager_p90 = _times(lambda: _torch_run(model, image), args.warmup, args.runs)
        int8 = "-"
        if args.int8:
            quantize_detector_int8(path, Path(tmp) / "int8.onnx", images[:16])
            q_session = make_session(Path(tmp) / "int8.onnx", threads=args.threads)
            q50, q90 = _times(lambda: run_detection_graph(q_session, image), args.warmup, args.runs)
            int8 = f"{q50:.1f} / {q90:.1f}"
    print(
        f"{info['name']} on {info['backbone']} ({source}), img_size {info['img_size']}, "
        f"timed on one {args.width}x{args.height} image, {args.threads} threads, {args.runs} runs "
        f"after {args.warmup} warm-up; torch {torch.__version__}; load average before "
        f"{load_before}, after {_load()}\n"
    )
    print(
        "| export s | ONNX MB | parity images | detections >= thr matched | max box diff px | "
        "max score diff | ORT median ms | ORT p90 ms | eager median ms | eager p90 ms | "
        "ORT INT8 median / p90 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {export_s:.1f} | {size_mb:.1f} | {parity.images} | {parity.matched}/"
        f"{parity.detections} (thr {threshold:g}) | {parity.max_box_diff:.2g} | "
        f"{parity.max_score_diff:.2g} | {ort_p50:.1f} | {ort_p90:.1f} | {eager_p50:.1f} | "
        f"{eager_p90:.1f} | {int8} |"
    )


if __name__ == "__main__":
    main()
