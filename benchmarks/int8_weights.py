"""INT8 weight ranges on a CPU without VNNI: accuracy and speed of each choice (issue 4).

ONNX Runtime multiplies ``uint8`` activations by ``int8`` weights with ``vpmaddubsw`` on AVX2
without VNNI; the 16-bit sum of two adjacent products saturates with full-range weights. This
script quantises one run's exported graph with each weight-range choice below (the same
calibration images, min-max activation ranges, QDQ, per-channel weights) and measures accuracy
on the run's validation + test images and speed:

* ``8-bit``: full-range weights everywhere (saturates without VNNI);
* ``7-bit``: ``reduce_range`` everywhere (ONNX Runtime's advice for such CPUs);
* ``depthwise 8-bit``: 7-bit but the depthwise convolutions 8-bit;
* ``+ 1x1 pair-bounded``: and 1x1 convolutions pair-bounded (:func:`weight_overrides`);
* ``visionflow``: and the first convolution in float (post-training, what ``visionflow export
  --int8 --no-qat`` does);
* ``visionflow after a quantisation-aware fine-tune``: the same quantiser on a copy fine-tuned
  with the INT8 rounding simulated (:mod:`visionflow.export.qat`, what ``--int8`` tries first).

    .venv/bin/python benchmarks/int8_weights.py --run RUN [--threads 2] [--qat-images 512] \\
        [--out int8.json]

Prints a Markdown table (progress on stderr) and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from visionflow._io import read_json
from visionflow.api import ClassifierModel
from visionflow.data.index import DatasetIndex, Split
from visionflow.export.bench import cpu_info
from visionflow.export.exporter import _run_graph, _split_images
from visionflow.export.onnx import export_classifier, make_session
from visionflow.export.qat import quantization_aware_finetune
from visionflow.export.quantize import (
    _Reader,
    float_prefix,
    quantize_int8,
    quantize_qdq,
    weight_overrides,
)

#: (label, reduce_range, which overrides of weight_overrides to keep, first conv in float)
VARIANTS: list[tuple[str, bool, str, bool]] = [
    ("8-bit everywhere", False, "none", False),
    ("7-bit everywhere (ONNX Runtime's advice)", True, "none", False),
    ("7-bit, depthwise 8-bit", True, "depthwise", False),
    ("7-bit, depthwise 8-bit, 1x1 pair-bounded", True, "all", False),
    ("visionflow: and the first convolution in float", True, "all", True),
]


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _quantize(
    fp32: Path, out: Path, calib: np.ndarray, reduce_range: bool, keep: str, stem_float: bool
) -> None:
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    model = onnx.load(str(prepared))
    excluded = float_prefix(model.graph)
    overrides, float_convs = weight_overrides(model)
    if keep == "none":
        overrides = {}
    elif keep == "depthwise":
        overrides = {k: v for k, v in overrides.items() if "rmax" not in v[0]}
    if stem_float:
        excluded += float_convs
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        quantize_qdq(
            prepared,
            out,
            _Reader(calib, 16),
            reduce_range=reduce_range,
            nodes_to_exclude=excluded,
            overrides=overrides,
        )
    finally:
        logging.root.setLevel(level)


def _measure(
    path: Path, pixels: np.ndarray, threads: int | None, repeats: int
) -> tuple[np.ndarray, float, float]:
    session = make_session(path, threads=threads)
    logits, _ = _run_graph(session, pixels)
    one, batch = pixels[:1], pixels[:32]
    for _ in range(5):
        session.run(["logits"], {"images": one})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["logits"], {"images": one})
        times.append(time.perf_counter() - start)
    session.run(["logits"], {"images": batch})
    start, calls = time.perf_counter(), max(3, repeats // 10)
    for _ in range(calls):
        session.run(["logits"], {"images": batch})
    throughput = calls * len(batch) / (time.perf_counter() - start)
    return logits, 1000 * float(np.median(times)), throughput


def _row(
    label: str,
    logits: np.ndarray,
    reference: np.ndarray,
    targets: np.ndarray,
    ms: float,
    ips: float,
) -> dict[str, Any]:
    return {
        "graph": label,
        "accuracy": float((logits.argmax(1) == targets).mean()),
        "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "batch1_ms": ms,
        "batch32_ips": ips,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished classification run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=100, help="batch-1 calls timed")
    parser.add_argument("--calibration", type=int, default=256, help="training images")
    parser.add_argument(
        "--qat-images", type=int, default=512, help="training images (0: no QAT row)"
    )
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    clf = ClassifierModel.from_run(args.run, device="cpu")
    pre = clf.preprocessing
    index = DatasetIndex.from_json(read_json(args.run / "index.json"))
    split = Split.from_json(read_json(args.run / "split.json"))
    pixels, targets, _ = _split_images(index, [*split.val, *split.test], pre, 10**9, seed=0)
    calib, _, _ = _split_images(index, split.train, pre, args.calibration, seed=1)
    _log(f"{len(pixels)} validation + test images, {len(calib)} calibration images")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vf-int8-weights-") as tmp:
        work = Path(tmp)
        fp32 = export_classifier(clf.model, pre, work / "fp32.onnx")
        reference, ms, ips = _measure(fp32, pixels, args.threads, args.repeats)
        rows.append(_row("FP32", reference, reference, targets, ms, ips))
        for i, (label, reduce_range, keep, stem_float) in enumerate(VARIANTS):
            _log(f"quantising: {label}")
            out = work / f"v{i}.onnx"
            if label.startswith("visionflow"):  # the library's own path, not a rebuild of it
                quantize_int8(fp32, out, calib)
            else:
                _quantize(fp32, out, calib, reduce_range, keep, stem_float)
            logits, ms, ips = _measure(out, pixels, args.threads, args.repeats)
            rows.append(_row(label, logits, reference, targets, ms, ips))
        if args.qat_images:
            # what `visionflow export --int8` tries first: the same quantiser on a copy
            # fine-tuned with the INT8 graph's rounding simulated
            train_px, train_y, _ = _split_images(index, split.train, pre, args.qat_images, seed=2)
            _log(f"quantisation-aware fine-tune on {len(train_px)} training images")
            tuned = quantization_aware_finetune(
                clf.model, pre, train_px, train_y, calib, epochs=args.qat_epochs, progress=_log
            )
            source = export_classifier(tuned.model, pre, work / "qat.onnx")
            quantize_int8(source, work / "qat.int8.onnx", calib)
            logits, ms, ips = _measure(work / "qat.int8.onnx", pixels, args.threads, args.repeats)
            label = (
                f"visionflow after a quantisation-aware fine-tune "
                f"({tuned.images} images, {tuned.epochs} epochs, {tuned.seconds:.0f} s)"
            )
            rows.append(_row(label, logits, reference, targets, ms, ips))
    cpu = cpu_info()
    print(f"Machine: {cpu['cpu']}, flags {', '.join(cpu['flags'])}; {len(pixels)} images\n")
    print("| graph | accuracy | agrees with FP32 | batch 1 p50 (ms) | batch 32 (images/s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['graph']} | {100 * r['accuracy']:.1f} % | {100 * r['agreement']:.1f} % | "
            f"{r['batch1_ms']:.1f} | {r['batch32_ips']:.0f} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": cpu, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
