"""Inference speed of an exported bundle: PyTorch eager vs ONNX Runtime FP32 and INT8 (issue 4).

1. Train ``tf_efficientnet_lite0`` (packaged offline ImageNet weights, 224 px) on the built-in
   digits dataset with a short budget (``--budget``), or take ``--run DIR``.
2. ``visionflow export --int8``: FP32 graph checked against PyTorch, INT8 calibrated on training
   images and accepted as the default only within 1 accuracy point.
3. Time each engine (batch-1 p50/p99 over ``--repeats`` calls, batch-32 throughput) with
   ``--threads`` threads, measure accuracy on the run's test images through the full prediction
   path (decode, resize, crop, graph), and profile where the time of the default graph goes.

    .venv/bin/python benchmarks/inference.py [--budget 3m] [--run DIR] [--repeats 200]
        [--threads 2] [--out inference.json] [--keep DIR]

Prints Markdown for BENCHMARKS.md (progress on stderr) and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from visionflow._io import read_json
from visionflow.config import load_train_config
from visionflow.data.index import DatasetIndex, Split
from visionflow.demo import write_digits
from visionflow.export.bench import benchmark_bundle, cpu_info, markdown_table, op_profile
from visionflow.export.exporter import export_run
from visionflow.train.recipe import train_classifier


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _test_folder(run: Path, dest: Path) -> Path:
    """The run's test images (its own split), copied into ``dest/<class>/``."""
    index = DatasetIndex.from_json(read_json(run / "index.json"))
    split = Split.from_json(read_json(run / "split.json"))
    for pos in split.test:
        sample = index.samples[pos]
        folder = dest / str(sample.label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, folder / sample.path.name)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="an existing run (default: train one)")
    parser.add_argument("--budget", default="3m", help="training budget when no --run")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("inference.json"))
    parser.add_argument("--keep", type=Path, help="keep the run and bundle in this folder")
    args = parser.parse_args()

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="vf-inference-"))
    try:
        run = args.run
        if run is None:
            data = write_digits(work / "digits")
            run = work / "runs" / "digits"
            _log(f"training tf_efficientnet_lite0 on digits for {args.budget}")
            config = load_train_config(
                overrides={
                    "backbone": "tf_efficientnet_lite0",
                    "img_size": 224,
                    "budget": args.budget,
                }
            )
            train_classifier(data, config, run_dir=run)
        _log("exporting with --int8")
        started = time.perf_counter()
        result = export_run(run, work / "model.vfb", int8=True, progress=_log, overwrite=True)
        export_seconds = time.perf_counter() - started
        shutil.rmtree(work / "test", ignore_errors=True)
        test = _test_folder(run, work / "test")
        _log("timing")
        rows = benchmark_bundle(
            result.path, repeats=args.repeats, threads=args.threads, data=test, torch_eager=True
        )
        _log("profiling the default graph")
        profile = op_profile(result.path, graph="default")
        fp32_profile = op_profile(result.path, graph="fp32")
        cpu = cpu_info()
        load = os.getloadavg()
        meta = result.meta
        report = {
            "machine": cpu,
            "load_average": load,
            "threads": args.threads or cpu["cores"],
            "export_seconds": export_seconds,
            "backbone": meta["backbone"],
            "input_size": meta["preprocessing"]["input_size"],
            "default_graph": meta["default_graph"],
            "graphs": {
                k: {kk: vv for kk, vv in v.items() if kk != "settings"}
                for k, v in meta["graphs"].items()
            },
            "rows": [r.to_json() for r in rows],
            "profile_default": profile,
            "profile_fp32": fp32_profile,
        }
        args.out.write_text(json.dumps(report, indent=2))
        print(
            f"Machine: {cpu['cpu']}, {report['threads']} threads, flags "
            f"{', '.join(cpu['flags'])}; load average before/after "
            f"{load[0]:.2f}"
        )
        print(
            f"Model: {meta['backbone']} at {report['input_size']} px, "
            f"{len(meta['classes'])} classes; accuracy on the run's "
            f"test split ({sum(1 for _ in test.rglob('*.png'))} images)\n"
        )
        print(markdown_table(rows))
        for title, prof in (("default graph", profile), ("FP32 graph", fp32_profile)):
            total = sum(ms for _, ms, _ in prof) or 1.0
            print(f"\nWhere the time goes ({title}, batch 32, ms per batch):\n")
            print("| op | ms | share | nodes |\n|---|---:|---:|---:|")
            for op, ms, n in prof[:8]:
                print(f"| {op} | {ms:.1f} | {100 * ms / total:.0f} % | {n} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
