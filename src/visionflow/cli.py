"""The ``visionflow`` command line: each command is a few lines over the library.

Exit codes: 0 success, 1 unexpected error, 2 bad settings, 3 data problem, 4 weights problem,
5 run/checkpoint problem, 6 missing optional dependency, 7 bad bundle, 8 export failed,
9 registry refused, 10 server unreachable or refused (``rollout``), 130 interrupted (resume with
``--resume``). ``predict`` exits 3 when some inputs could not be read (the rest are printed).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from visionflow import __version__
from visionflow._cli_errors import err
from visionflow._cli_errors import handle_errors as _handle_errors
from visionflow._io import run_task

app = typer.Typer(
    name="visionflow",
    help="Offline-first AutoML for computer vision: from labelled images to an evaluated model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def _version(value: bool) -> None:
    if value:
        out.print(f"visionflow {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """visionflow: offline-first AutoML for computer vision."""


@app.command()
@_handle_errors
def train(
    data: Annotated[
        Path | None, typer.Argument(help="Dataset: a folder per class, or a CSV/TSV of path,label.")
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help="Wall-clock budget, e.g. 90s, 10m, 1h30m (default 10m).")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="fast, medium or best.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML/JSON settings file.")
    ] = None,
    backbone: Annotated[str | None, typer.Option(help="timm model name.")] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Pretrained weights: auto, package, hub, none, or a file/directory."),
    ] = None,
    img_size: Annotated[
        int | None, typer.Option(help="Input size in pixels (default: the weights' own).")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="auto (probe, then fine-tune), lpft, finetune or probe.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Upper bound on fine-tune epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Head learning rate.")] = None,
    augment: Annotated[
        str | None, typer.Option(help="Augmentation policy: none, light, medium, heavy.")
    ] = None,
    hflip: Annotated[
        bool | None, typer.Option("--hflip/--no-hflip", help="Random horizontal flips.")
    ] = None,
    mixup: Annotated[float | None, typer.Option(help="MixUp alpha (0 = off).")] = None,
    cutmix: Annotated[float | None, typer.Option(help="CutMix alpha (0 = off).")] = None,
    balance: Annotated[
        str | None, typer.Option(help="Imbalance handling: auto, weights, sampler, none.")
    ] = None,
    split: Annotated[
        Path | None, typer.Option("--split", help="An existing split (JSON or CSV path,split).")
    ] = None,
    labels: Annotated[
        list[Path] | None,
        typer.Option(
            "--labels",
            help="A filled-in label CSV (path,label; from `visionflow select`) merged into the "
            "data; empty labels are skipped (repeatable).",
        ),
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Validation share.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Test share.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Parent folder of runs.")] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Run name (default: data name + time).")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue a killed run (its run directory).")
    ] = None,
    search: Annotated[
        bool | None,
        typer.Option(
            "--search/--no-search",
            help="Search hyper-parameters and refit the best (default for classification; "
            "detection searches only with --search), or one recipe run.",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Local worker processes for the search (default 1).")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Study storage: a .journal file or sqlite:///f.db / postgresql://user@host/db "
            "(default: a journal in the run; or $VISIONFLOW_STORAGE).",
        ),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(help="Most trials in the study (needed with --budget none).")
    ] = None,
    pruner: Annotated[
        str | None,
        typer.Option(help="asha (successive halving, default), hyperband, median or none."),
    ] = None,
    space: Annotated[
        Path | None, typer.Option(help="YAML/JSON file of search-space overrides.")
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Pin or narrow a search parameter: lr=1e-4, 'batch_size=[16,32]', "
            "'lr={low: 1e-5, high: 1e-3}' (repeatable).",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="classify (a folder per class or a CSV) or detect (COCO, Pascal VOC or YOLO); "
            "default: detect when DATA is a COCO, VOC or YOLO dataset, else classify."
        ),
    ] = None,
    detector: Annotated[
        str | None,
        typer.Option(help="--task detect: fcos (auto), retinanet, fasterrcnn_fpn or ssdlite."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check the data, search and train a classifier (or train a detector with --task detect)
    within the budget, evaluate it and write a report. Re-running the same command with the
    same --name continues an interrupted search.
    """
    from visionflow.api import default_run_name
    from visionflow.config import load_search_config, load_train_config
    from visionflow.train.recipe import train_classifier

    console = None if json_out else err
    if data is not None and not data.exists():
        from visionflow.errors import DataError

        # before anything is written: a typo must not leave an empty run directory behind
        raise DataError(f"dataset {data} does not exist")
    if task is None:
        task = _default_task(data, console)
    if task not in ("classify", "detect"):
        raise typer.BadParameter(f"--task is classify or detect, not {task!r}")
    if task == "detect" or (resume is not None and run_task(resume) == "detect"):
        classify_only = {
            "--strategy": strategy, "--mixup": mixup, "--cutmix": cutmix, "--balance": balance,
            "--split": split, "--labels": labels,
        }  # fmt: skip
        given = [flag for flag, value in classify_only.items() if value]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} only apply to --task classify")
        search_options = {
            "--workers": workers, "--storage": storage, "--trials": trials, "--pruner": pruner,
            "--space": space, "--param": param,
        }  # fmt: skip
        given = [flag for flag, value in search_options.items() if value]
        if given and not search:
            raise typer.BadParameter(
                f"{', '.join(given)} configure a search: add --search (detection trains the "
                "one default recipe unless asked to search)"
            )
        det_overrides: dict[str, Any] = {
            "budget": budget, "detector": detector, "backbone": backbone, "weights": weights,
            "img_size": img_size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "augment": augment, "hflip": hflip, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "seed": seed, "device": device,
        }  # fmt: skip
        scfg = None
        if search:
            scfg = _search_config(config, True, workers, storage, trials, pruner, space, param)
        _train_detector(
            data, resume, out_dir, name, preset, config, json_out, console, det_overrides, scfg
        )
        return
    if detector is not None:
        raise typer.BadParameter("--detector only applies to --task detect")
    if resume is not None and (resume / "search.json").is_file():
        from visionflow.search.runner import search_classifier

        state = json.loads((resume / "search.json").read_text(encoding="utf-8"))
        scfg = load_search_config(overrides=state.get("search", {}))
        if storage is not None:
            scfg.storage = storage
        result = _run_search(search_classifier, state["data"], None, scfg, resume, set(), console)
        _finish_train(result, json_out)
        return
    if resume is not None:
        run_dir = resume
        cfg = None
    else:
        if data is None:
            raise typer.BadParameter("give a DATA path, or --resume RUN")
        overrides = {
            "budget": budget, "backbone": backbone, "weights": weights, "img_size": img_size,
            "strategy": strategy, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "augment": augment, "hflip": hflip, "mixup": mixup, "cutmix": cutmix,
            "balance": balance, "split_file": str(split) if split else None,
            "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
            "device": device,
            "labels": [str(p.resolve()) for p in labels] if labels else None,
        }  # fmt: skip
        cfg = load_train_config(preset=preset, file=config, overrides=overrides)
        run_dir = out_dir / (name or default_run_name(data))
        scfg = _search_config(config, search, workers, storage, trials, pruner, space, param)
        if scfg.enabled:
            from visionflow.search.runner import search_classifier

            explicit = {k for k, v in overrides.items() if v is not None}
            explicit |= _file_keys(config)
            result = _run_search(search_classifier, data, cfg, scfg, run_dir, explicit, console)
            _finish_train(result, json_out)
            return
    from visionflow.config import TrainConfig

    try:
        result = train_classifier(
            data, cfg or TrainConfig(), run_dir=run_dir, resume=resume is not None, console=console
        )
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]; continue with: visionflow train --resume {run_dir}")
        raise typer.Exit(130) from None
    if json_out:
        payload = {
            "run_dir": str(result.run_dir),
            "chosen": result.chosen,
            "seconds": result.seconds,
            "report": str(result.report_path),
            "metrics": {k: _headline(v) for k, v in result.metrics.items()},
        }
        out.print_json(json.dumps(payload))
        return
    _print_summary(result.metrics, result.run_dir, result.report_path, result.seconds)


def _search_config(
    config: Path | None,
    enabled: bool | None,
    workers: int | None,
    storage: str | None,
    trials: int | None,
    pruner: str | None,
    space: Path | None,
    param: list[str] | None,
) -> Any:
    """The search settings: the settings file's ``search:`` mapping, then the flags; the
    space overrides of the file, then ``--space``, then ``--param``."""
    from visionflow.config import load_search_config

    scfg = load_search_config(
        file=config,
        overrides={
            "enabled": enabled, "workers": workers, "storage": storage, "trials": trials,
            "pruner": pruner,
        },
    )  # fmt: skip
    space_overrides = dict(scfg.space)
    if space is not None:
        space_overrides.update(_read_space_file(space))
    space_overrides.update(_parse_params(param or []))
    scfg.space = space_overrides
    return scfg


def _default_task(data: Path | None, console: Console | None) -> str:
    """``detect`` for a COCO, VOC or YOLO dataset (said on the console), else ``classify``."""
    if data is None:
        return "classify"
    from visionflow.data.detection.readers import find_detection_dataset

    found = find_detection_dataset(data)
    if found is None:
        return "classify"
    if console is not None:
        console.print(
            f"{data} holds a detection dataset ({found}): training a detector "
            "(--task classify to treat it otherwise)"
        )
    return "detect"


def _train_detector(
    data: Path | None,
    resume: Path | None,
    out_dir: Path,
    name: str | None,
    preset: str | None,
    config: Path | None,
    json_out: bool,
    console: Console | None,
    overrides: dict[str, Any],
    search: Any = None,
) -> None:
    from visionflow.api import default_run_name
    from visionflow.config import load_detect_config
    from visionflow.train.detection import train_detector

    if resume is None and data is None:
        raise typer.BadParameter("give a DATA path, or --resume RUN")
    cfg = None
    if resume is None:
        assert data is not None
        cfg = load_detect_config(preset=preset, file=config, overrides=overrides)
        run_dir = out_dir / (name or default_run_name(data))
    else:
        run_dir = resume
    searched = None
    try:
        if search is not None and cfg is not None and data is not None:
            from visionflow.search.detection import search_detector

            explicit = {k for k, v in overrides.items() if v is not None} | _file_keys(config)
            searched = search_detector(
                data, cfg, search, run_dir=run_dir, explicit=explicit, console=console
            )
            result = searched.refit
        else:
            result = train_detector(
                data or run_dir, cfg, run_dir=run_dir, resume=resume is not None, console=console
            )
    except KeyboardInterrupt:
        hint = (
            "run the same command again (same --name) to continue the search"
            if search is not None
            else f"continue with: visionflow train --resume {run_dir}"
        )
        err.print(f"[yellow]interrupted[/]; {hint}")
        raise typer.Exit(130) from None
    headline = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
    payload = {
        "run_dir": str(result.run_dir),
        "task": "detect",
        "detector": result.detector,
        "seconds": round(result.seconds, 1),
        "score_threshold": result.score_threshold,
        "report": str(result.report_path) if result.report_path else None,
        "metrics": {k: {m: v.get(m) for m in headline} for k, v in result.metrics.items()},
    }
    if searched is not None:
        payload["search"] = {"best": searched.best, "counts": searched.counts}
    if json_out:
        out.print_json(json.dumps(payload))
        return
    main = result.metrics.get("test") or result.metrics.get("val") or {}
    split = "test" if "test" in result.metrics else "val"
    out.print(
        f"[bold]{result.detector}[/]: {split} mAP@.5 {_num(main.get('map_50'))}, "
        f"mAP@[.5:.95] {_num(main.get('map'))} in {result.seconds:.0f} s\n"
        f"run: {result.run_dir}\nreport: {result.report_path}"
    )


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _run_search(
    search_classifier: Callable[..., Any],
    data: Any,
    cfg: Any,
    scfg: Any,
    run_dir: Path,
    explicit: set[str],
    console: Console | None,
) -> Any:
    from visionflow.config import TrainConfig

    try:
        return search_classifier(
            data, cfg or TrainConfig(), scfg, run_dir=run_dir, explicit=explicit, console=console
        )
    except KeyboardInterrupt:
        err.print(
            f"[yellow]interrupted[/]; run the same command again (same --name) or "
            f"`visionflow train --resume {run_dir}` to continue the search"
        )
        raise typer.Exit(130) from None


def _finish_train(result: Any, json_out: bool) -> None:
    if json_out:
        payload = {
            "run_dir": str(result.run_dir),
            "chosen": result.refit.chosen,
            "seconds": result.seconds,
            "report": str(result.report_path),
            "metrics": {k: _headline(v) for k, v in result.metrics.items()},
            "search": {"study": result.study, "counts": result.counts, "best": result.best},
        }
        out.print_json(json.dumps(payload))
        return
    if result.best is not None:
        out.print(
            f"best of {result.counts.get('complete', 0)} complete trial(s): trial "
            f"{result.best['number']}, val accuracy {_pct(result.best['value'])}; "
            f"leaderboard: {result.run_dir / 'leaderboard.csv'}"
        )
    _print_summary(result.metrics, result.run_dir, result.report_path, result.seconds)


def _read_space_file(path: Path) -> dict[str, Any]:
    from visionflow.config import read_yaml
    from visionflow.errors import ConfigError

    data = read_yaml(path, "search space file")
    if isinstance(data, dict) and isinstance(data.get("search"), dict):
        data = data["search"].get("space", data["search"])
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of search parameters")
    return {k: _numbers(v) for k, v in data.items()}


def _parse_params(items: list[str]) -> dict[str, Any]:
    import yaml

    from visionflow.errors import ConfigError

    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE, e.g. lr=1e-4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--param {item!r}: value is not valid YAML ({exc})") from None
        parsed[key.strip()] = _numbers(value)
    return parsed


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: such strings become numbers, nested too."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
        return value
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _file_keys(config: Path | None) -> set[str]:
    if config is None or not config.is_file():
        return set()
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return set()
    return {k for k in data if k != "search"} if isinstance(data, dict) else set()


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece")
    return {k: m.get(k) for k in keys} | {"top_k": m.get("top_k", {})}


def _print_summary(
    metrics: dict[str, dict[str, Any]], run_dir: Path, report: Path, seconds: float
) -> None:
    from visionflow.train.budget import format_seconds

    table = Table(title="Results", show_lines=False)
    for col in ("split", "images", "accuracy", "balanced acc.", "macro-F1", "ECE"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, m in metrics.items():
        table.add_row(
            split,
            str(m.get("n")),
            _pct(m.get("accuracy")),
            _pct(m.get("balanced_accuracy")),
            _pct(m.get("macro_f1")),
            f"{m.get('ece', 0):.3f}" if m.get("ece") is not None else "n/a",
        )
    out.print(table)
    out.print(f"run: [bold]{run_dir}[/]  ({format_seconds(seconds)})")
    out.print(f"report: [bold]{report}[/]")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


@app.command()
@_handle_errors
def predict(
    run: Annotated[Path, typer.Argument(help="A run directory or a model bundle (.vfb).")],
    images: Annotated[list[Path], typer.Argument(help="Images or folders (searched recursively).")],
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = (
        OutputFormat.table
    ),
    topk: Annotated[int, typer.Option(help="Alternatives per image.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda...")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (--format json).")] = False,
    threshold: Annotated[
        float | None,
        typer.Option(help="Detectors: show boxes scoring at least this [the model's own]."),
    ] = None,
    draw: Annotated[
        Path | None,
        typer.Option(
            "--draw",
            help="Detectors: write a copy of each image with its boxes drawn into this folder "
            "(<name>.boxes.png; inputs are never overwritten).",
        ),
    ] = None,
) -> None:
    """Classify images, or detect objects in them, with a trained run or an exported bundle
    (ONNX Runtime)."""
    from visionflow import load
    from visionflow.errors import ImageDecodeError
    from visionflow.prediction import expand_inputs

    model = load(run, device=device)
    detector = getattr(model, "task", "classify") == "detect"
    if not detector and (draw is not None or threshold is not None):
        raise typer.BadParameter("--draw and --threshold apply to detectors only")
    fmt = OutputFormat.json if json_out else fmt
    paths = expand_inputs(images)
    if not paths:
        raise typer.BadParameter("no image files found in the given paths")
    from visionflow.data.images import load_image

    decoded, sources, failures = [], [], []
    for path in paths:  # decode first, so one bad file fails alone and the rest are batched
        try:
            decoded.append(load_image(path))
            sources.append(str(path))
        except ImageDecodeError as exc:
            failures.append({"source": str(path), "error": exc.reason})
    if detector:
        from visionflow.export.detect_cli import report_detections

        report_detections(
            model,
            decoded,
            sources,
            fmt=fmt.value,
            threshold=threshold,
            draw=draw,
            errors=failures,
            console=out,
        )
    else:
        classifier: Any = model
        results = [
            replace(r, source=src)
            for r, src in zip(
                classifier.predict(decoded, topk=topk, batch_size=batch_size), sources, strict=True
            )
        ]
        rows = [r.to_json() for r in results]
        if fmt is OutputFormat.json:
            out.print_json(json.dumps({"predictions": rows, "errors": failures}))
        elif fmt is OutputFormat.csv:
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["source", "label", "probability", "topk"])
            for r in rows:
                alts = ";".join(f"{t['label']}:{t['probability']:.4f}" for t in r["topk"])
                writer.writerow([r["source"], r["label"], f"{r['probability']:.6f}", alts])
            sys.stdout.write(buf.getvalue())
        else:
            table = Table()
            for col in ("image", "label", "probability", f"top-{topk}"):
                table.add_column(col)
            for r in rows:
                alts = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in r["topk"])
                table.add_row(r["source"], r["label"], f"{r['probability']:.3f}", alts)
            out.print(table)
    for f in failures:
        err.print(f"[red]skipped[/] {f['source']}: {f['error']}", highlight=False)
    if failures:
        raise typer.Exit(3)


@app.command()
@_handle_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory or a model bundle (.vfb).")],
    data: Annotated[Path, typer.Argument(help="A labelled dataset with the model's classes.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print all metrics as JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda...")] = "auto",
) -> None:
    """Evaluate a trained run or a bundle on another labelled dataset."""
    from visionflow import load

    model = load(run, device=device)
    metrics = model.evaluate(data)
    if json_out:
        out.print_json(json.dumps(metrics))
        return
    if getattr(model, "task", "classify") == "detect":
        _print_detection_metrics(metrics, str(data))
        return
    table = Table(title=f"{data}")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for name, m in metrics["per_class"].items():
        table.add_row(
            name, _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"]), str(m["support"])
        )
    out.print(table)
    out.print(
        f"accuracy {_pct(metrics['accuracy'])}  balanced {_pct(metrics['balanced_accuracy'])}  "
        f"macro-F1 {_pct(metrics['macro_f1'])}  ECE {metrics['ece']:.3f}  (n={metrics['n']})"
    )
    for bad in metrics.get("skipped", []):
        err.print(f"[red]skipped[/] {bad['path']}: {bad['reason']}", highlight=False)


def _print_detection_metrics(metrics: dict[str, Any], title: str) -> None:
    """COCO metrics of a detector on a dataset: the per-class table, then the headline."""
    table = Table(title=title)
    for col in ("class", "AP@[.5:.95]", "AP@.5", "AP@.75", "boxes", "detections"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for name, m in metrics["per_class"].items():
        table.add_row(
            name, _num(m.get("ap")), _num(m.get("ap_50")), _num(m.get("ap_75")),
            str(m.get("gt", "")), str(m.get("predictions", "")),
        )  # fmt: skip
    out.print(table)
    out.print(
        f"mAP@[.5:.95] {_num(metrics.get('map'))}  mAP@.5 {_num(metrics.get('map_50'))}  "
        f"mAP@.75 {_num(metrics.get('map_75'))}  AR@100 {_num(metrics.get('mar_100'))}  "
        f"(images {metrics.get('images')}, boxes {metrics.get('gt_boxes')})"
    )
    for bad in metrics.get("skipped", []):
        err.print(f"[red]skipped[/] {bad.get('source')}: {bad.get('message')}", highlight=False)


@app.command()
@_handle_errors
def inspect(
    data: Annotated[Path, typer.Argument(help="Dataset: a folder per class, or a CSV/TSV.")],
    report: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write the JSON report.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
    min_side: Annotated[int, typer.Option(help="Images smaller than this are flagged.")] = 16,
    min_per_class: Annotated[int, typer.Option(help="Fewest usable images per class.")] = 3,
    task: Annotated[
        str, typer.Option(help="classify, or detect for boxes (COCO, VOC, YOLO).")
    ] = "classify",
) -> None:
    """Check a dataset: counts, imbalance, unreadable files, duplicates, label conflicts."""
    from visionflow.data.checks import check_dataset
    from visionflow.data.readers import read_dataset

    if task == "detect":  # boxes clipped/dropped, duplicates, unknown classes, size buckets
        from visionflow.data.detection.cli import inspect_detection

        return inspect_detection(data, report=report, json_out=json_out, console=out)
    if task != "classify":
        raise typer.BadParameter(f"--task is classify or detect, not {task!r}")
    index = read_dataset(data)
    result, _ = check_dataset(
        index, min_side=min_side, min_per_class=min_per_class, progress=not json_out
    )
    target = report or Path("data_report.json")
    result.save(target)
    if json_out:
        out.print_json(json.dumps(result.to_json()))
    else:
        result.render(out)
        out.print(f"report written to [bold]{target}[/]")
    result.raise_for_problems(min_per_class=min_per_class)


@app.command()
@_handle_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the dataset and run go.")] = Path(
        "demo_data"
    ),
    budget: Annotated[str, typer.Option(help="Training budget.")] = "4m",
    img_size: Annotated[int, typer.Option(help="Input size (digits are 8x8 px).")] = 128,
) -> None:
    """Train on scikit-learn's handwritten digits, written as a real image folder."""
    from visionflow.config import load_train_config
    from visionflow.demo import write_digits
    from visionflow.train.recipe import train_classifier

    data = write_digits(out_dir / "digits")
    err.print(f"wrote the digits dataset to [bold]{data}[/] (a folder per class, PNG files)")
    cfg = load_train_config(overrides={"budget": budget, "img_size": img_size, "hflip": False})
    from visionflow.api import default_run_name

    run_dir = out_dir / "runs" / default_run_name(data)
    result = train_classifier(data, cfg, run_dir=run_dir, console=err)
    _print_summary(result.metrics, result.run_dir, result.report_path, result.seconds)


@app.command()
@_handle_errors
def worker(
    study: Annotated[str, typer.Option(help="Study name (the coordinator's run name).")],
    storage: Annotated[
        str | None,
        typer.Option(help="Database URL of the study (default: $VISIONFLOW_STORAGE)."),
    ] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the coordinator to create the study.")
    ] = 600.0,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="The run folder here, if not at the coordinator's path."),
    ] = None,
) -> None:
    """Join a running search from this machine or pod; runs trials until its deadline."""
    from visionflow.search.runner import run_worker

    try:
        run_worker(study, storage, wait=wait, run_dir=run_dir, console=err)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]; the trial under way is marked failed")
        raise typer.Exit(130) from None


def _register_subcommands() -> None:
    from visionflow.deploy.cli import k8s_app

    app.add_typer(k8s_app, name="k8s", help="Kubernetes manifests for a distributed search.")
    from visionflow.registry.cli import registry_app

    app.add_typer(registry_app, name="registry", help="Model registry: versions and aliases.")
    from visionflow.export.cli import benchmark, distill, export

    app.command()(export)
    app.command()(benchmark)
    app.command()(distill)
    from visionflow.serve.cli import serve

    app.command()(serve)
    from visionflow.feedback_cli import register as register_feedback

    register_feedback(app)  # visionflow feedback export, visionflow retrain --from-feedback
    from visionflow.serve.rollout_cli import rollout_app

    app.add_typer(rollout_app, name="rollout", help="Rollouts on a running server (admin API).")
    from visionflow.explain.active_cli import select

    app.command()(select)
    from visionflow.explain.cam_cli import explain

    app.command()(explain)
    from visionflow.data.detection.cli import convert

    app.command()(convert)
    from visionflow.explain.clean_cli import clean

    app.command()(clean)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
