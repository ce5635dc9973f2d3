"""Detection under a budget (issue 7's acceptance check) on a held-out-style set.

The check: "on a held-out detection set not in this repo (a few hundred small images, three
classes, labels provided in all three formats), ``visionflow train --task detect --budget 15m``
on 2 CPU cores reaches mAP@.5 of at least 0.5, and reading the COCO, VOC and YOLO versions of
the same labels gives identical records".

1. **Data.** ``--images`` images from ``--seed`` are drawn by :mod:`_detection_data` (real
   photographs and handwriting composed into scenes; its docstring says what is real and what
   is synthetic) and written in COCO, VOC and YOLO by visionflow's writers, with a fixed
   70/15/15 train/val/test split. Or ``--data DIR`` uses an existing set (a folder holding
   ``coco/``, ``voc/`` and ``yolo/``, or a single dataset folder).
2. **Records.** The three formats are read back with ``read_detection`` and compared, image by
   image: COCO and VOC must be identical records (and equal to what was generated), YOLO equal
   within 0.001 px (its 6-decimal normalised numbers). Any difference: exit status 1.
3. **Training.** ``visionflow train DATA/<format> --task detect --budget B --out RUNS --name
   NAME --json`` runs as a subprocess with ``OMP_NUM_THREADS=--cpus`` and its CPU affinity
   limited to ``--cpus`` cores; arguments after ``--`` are passed on to it. Its JSON names the
   run; the run's ``metrics.json`` is the source of truth for the test metrics.
4. **Report.** Wall time of the whole command against the budget (overrun %), test mAP@.5
   and mAP@[.5:.95], per-class AP, printed as Markdown for BENCHMARKS.md (this script writes
   nothing there), and ``result.json`` in ``--out``.

    flock /tmp/visionflow-bench.lock .venv/bin/python benchmarks/detection_budget.py \\
        [--images 300] [--seed 7] [--budget 15m] [--detector auto] [--format coco|voc|yolo] \\
        [--cpus 2] [--data DIR] [--out DIR] [--keep] [--dry-run] [--preview DIR] [-- ARGS]
    .venv/bin/python benchmarks/detection_budget.py --dry-run --keep --out /tmp/detset \\
        --preview /tmp/detset_preview  # only generate and verify the data
    .venv/bin/python benchmarks/detection_budget.py --table /tmp/detset/result.json  # reprint

Without ``--keep`` the generated data and the runs are deleted at the end (``result.json``
stays when ``--out`` is given); ``--data`` folders are never deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _detection_data import (
    CLASSES,
    FORMATS,
    draw_preview,
    generate_detection_set,
    verify_detection_set,
)

import visionflow
from visionflow.data.detection import read_detection
from visionflow.errors import VisionflowError
from visionflow.train.budget import parse_budget

#: The acceptance threshold of issue 7.
TARGET_MAP_50 = 0.5


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------- data
def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """The dataset folder to train on and what is known about it (manifest, verification).

    Generates the set into ``work/data`` unless ``--data`` is given; a ``work/data`` left by an
    earlier run with the same seed and image count is reused (and verified again).
    """
    info: dict[str, Any] = {}
    if args.data is not None:
        root = args.data.expanduser().resolve()
        info["generated"] = False
    else:
        root = work / "data"
        manifest = root / "manifest.json"
        info["generated"] = True
        if manifest.is_file():
            old = json.loads(manifest.read_text(encoding="utf-8"))
            if (old.get("seed"), old.get("images")) != (args.seed, args.images):
                raise SystemExit(
                    f"{root} holds a set of seed {old.get('seed')} with {old.get('images')} "
                    f"images, not seed {args.seed} with {args.images}; remove it or give "
                    "another --out"
                )
            _log(f"reusing the set in {root}")
        else:
            _log(f"generating {args.images} images (seed {args.seed}) into {root}")
            generated = generate_detection_set(
                root, images=args.images, seed=args.seed, verify=True
            )
            info["generate_seconds"] = round(generated.seconds, 2)
    if all((root / fmt).is_dir() for fmt in FORMATS):
        start = time.monotonic()
        info["verify"] = verify_detection_set(root)  # raises DataError on any difference
        info["verify_seconds"] = round(time.monotonic() - start, 2)
        dataset = root / args.format
    else:
        _log(f"{root} is not a coco/voc/yolo set of folders: training on it as it is")
        info["verify"] = None
        dataset = root
    if (root / "manifest.json").is_file():
        info["manifest"] = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    else:
        index = read_detection(dataset)
        info["manifest"] = {
            "images": len(index),
            "boxes": index.num_boxes,
            "classes": list(index.classes),
            "boxes_per_class": index.counts(),
        }
    info["dataset"] = str(dataset)
    return dataset, info


def data_table(info: dict[str, Any]) -> str:
    m = info["manifest"]
    per_class = ", ".join(f"{k} {v}" for k, v in m.get("boxes_per_class", {}).items())
    sizes = ", ".join(f"{k} {v}" for k, v in m.get("boxes_per_size", {}).items()) or "-"
    splits = ", ".join(f"{k} {v}" for k, v in sorted(m.get("images_per_split", {}).items()))
    verify = info.get("verify")
    if verify:
        same = (
            f"COCO = VOC exactly, YOLO within "
            f"{verify['yolo']['max_box_difference_px']:.1e} px; 0 issues"
        )
    else:
        same = "not checked (not a coco/voc/yolo set)"
    lines = [
        "| seed | images | boxes (per class) | sizes (COCO) | negatives | splits | "
        "three formats read back | generate / verify |",
        "|---:|---:|---|---|---:|---|---|---:|",
        f"| {m.get('seed', '-')} | {m['images']} | {m['boxes']} ({per_class}) | {sizes} | "
        f"{m.get('negatives', '-')} | {splits or '-'} | {same} | "
        f"{info.get('generate_seconds', '-')} s / {info.get('verify_seconds', '-')} s |",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- training
def _visionflow_command() -> list[str]:
    script = Path(sys.executable).with_name("visionflow")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from visionflow.cli import main; main()"]


def _pinned(command: list[str], cpus: int) -> list[str]:
    """``command`` limited to ``cpus`` of the cores we may use (Linux): a small Python sets the
    affinity and ``exec``s it (the affinity survives the exec; no ``preexec_fn``, which is
    unsafe in threaded processes)."""
    if not hasattr(os, "sched_getaffinity"):
        return command
    cores = sorted(os.sched_getaffinity(0))[:cpus]
    code = (
        f"import os, sys; os.sched_setaffinity(0, {cores!r}); os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code, *command]


def _first_json(text: str) -> dict[str, Any]:
    """The first JSON object in ``text`` (the CLI's ``--json`` output)."""
    decoder = json.JSONDecoder()
    pos = text.find("{")
    while pos != -1:
        try:
            obj, _ = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            return obj
        pos = text.find("{", pos + 1)
    raise SystemExit(f"visionflow train printed no JSON object; its output was:\n{text[-2000:]}")


def train(args: argparse.Namespace, dataset: Path, work: Path) -> dict[str, Any]:
    """Run ``visionflow train --task detect`` and read its run's metrics."""
    name = f"det-{args.format}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [
        *_visionflow_command(),
        "train",
        str(dataset),
        "--task",
        "detect",
        "--budget",
        args.budget,
        "--out",
        str(work / "runs"),
        "--name",
        name,
        "--json",
    ]
    if args.detector != "auto":
        command += ["--detector", args.detector]
    command += args.train_args
    env = {**os.environ, "OMP_NUM_THREADS": str(args.cpus)}
    _log(f"running: {' '.join(command)}")
    load0 = _load()
    start = time.monotonic()
    proc = subprocess.run(
        _pinned(command, args.cpus), stdout=subprocess.PIPE, text=True, env=env, check=False
    )
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"visionflow train failed with exit status {proc.returncode}")
    printed = _first_json(proc.stdout)
    run_dir = Path(printed["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {
        "command": command,
        "run_dir": str(run_dir),
        "wall_seconds": wall,
        "cli_seconds": printed.get("seconds"),
        "load_average": [load0, _load()],
        "detector": printed.get("detector") or metrics.get("detector") or args.detector,
        "metrics": metrics,
    }


def _per_class_ap(test: dict[str, Any]) -> dict[str, float]:
    """AP@.5 per class when the metrics have it (else AP@[.5:.95]), by class name.

    Accepts ``per_class: {name: number}`` or ``{name: {"ap_50" | "map_50" | "ap50": ...}}``.
    """
    table = test.get("per_class") or test.get("ap_per_class") or {}
    out: dict[str, float] = {}
    if not isinstance(table, dict):
        return out
    for name, value in table.items():
        if isinstance(value, int | float):
            out[str(name)] = float(value)
        elif isinstance(value, dict):
            for key in ("ap_50", "map_50", "ap50", "ap", "map"):
                if isinstance(value.get(key), int | float):
                    out[str(name)] = float(value[key])
                    break
    return out


def result_table(result: dict[str, Any]) -> str:
    run = result["train"]
    test = run["metrics"].get("test", {})
    budget_s = result["budget_seconds"]
    overrun = 100 * (run["wall_seconds"] - budget_s) / budget_s
    per_class = _per_class_ap(test)
    classes = ", ".join(f"{k} {v:.3f}" for k, v in per_class.items()) or "-"
    map_50, map_all = test.get("map_50"), test.get("map")
    verdict = (
        "-"
        if map_50 is None
        else ("**pass**" if map_50 >= TARGET_MAP_50 else "fail") + f" (>= {TARGET_MAP_50})"
    )

    def num(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, int | float) else "-"

    lines = [
        "| data | detector | budget | wall time | overrun | test mAP@.5 | test mAP@[.5:.95] | "
        "per-class AP | mAP@.5 target | cores | load before / after |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---|",
        f"| {result['data_name']} | {run['detector']} | {result['budget']} | "
        f"{run['wall_seconds']:.0f} s | {overrun:+.1f}% | {num(map_50)} | {num(map_all)} | "
        f"{classes} | {verdict} | {result['cpus']} | "
        f"{' '.join(map(str, run['load_average'][0]))} / "
        f"{' '.join(map(str, run['load_average'][1]))} |",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main() -> None:
    argv = sys.argv[1:]
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images to generate")
    parser.add_argument("--seed", type=int, default=7, help="the generated set's seed")
    parser.add_argument("--budget", default="15m", help="visionflow train --budget")
    parser.add_argument(
        "--detector", default="auto", help="passed as --detector unless auto (the CLI default)"
    )
    parser.add_argument("--format", choices=FORMATS, default="coco", help="the copy to train on")
    parser.add_argument("--cpus", type=int, default=2, help="cores (and threads) for training")
    parser.add_argument("--data", type=Path, default=None, help="use this set; do not generate")
    parser.add_argument("--out", type=Path, default=None, help="data/, runs/, result.json here")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and runs")
    parser.add_argument("--dry-run", action="store_true", help="only generate and verify")
    parser.add_argument("--preview", type=Path, default=None, help="save 4 images with boxes")
    parser.add_argument("--table", type=Path, default=None, help="reprint a result.json")
    args = parser.parse_args(argv)
    args.train_args = train_args
    if args.table is not None:
        saved = json.loads(args.table.read_text(encoding="utf-8"))
        print(data_table(saved["data"]) + "\n")
        if saved.get("train"):
            print(result_table(saved) + "\n")
        return
    if args.images < 3 or args.cpus < 1:
        parser.error("--images must be at least 3 and --cpus at least 1")
    budget_s = parse_budget(args.budget)
    if budget_s is None:
        parser.error("--budget must be a duration (e.g. 15m): the check is about a budget")

    temporary = args.out is None
    work = (args.out or Path(tempfile.mkdtemp(prefix="vf-det-budget-"))).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "visionflow": visionflow.__version__,
            "processor": platform.processor() or platform.machine(),
            "usable_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "budget": args.budget,
        "budget_seconds": budget_s,
        "cpus": args.cpus,
        "classes": list(CLASSES),
    }
    try:
        try:
            dataset, result["data"] = prepare_data(args, work)
        except VisionflowError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        m = result["data"]["manifest"]
        result["data_name"] = (
            f"generated, seed {m['seed']}, {m['images']} images, {args.format}"
            if result["data"]["generated"]
            else f"{dataset}"
        )
        if args.preview is not None:
            index = read_detection(dataset)
            for path in draw_preview(index, args.preview):
                _log(f"preview: {path}")
        print("### Data\n")
        print(data_table(result["data"]) + "\n")
        if not args.dry_run:
            result["train"] = train(args, dataset, work)
            print("### Detection under a budget\n")
            print(result_table(result) + "\n")
            print(f"Command: `{' '.join(result['train']['command'])}`\n")
        if not temporary:
            (work / "result.json").write_text(
                json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8"
            )
    finally:
        if args.keep:
            _log(f"kept in {work}")
        elif temporary:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for sub in ("runs", *(["data"] if args.data is None else [])):
                shutil.rmtree(work / sub, ignore_errors=True)


if __name__ == "__main__":
    main()
