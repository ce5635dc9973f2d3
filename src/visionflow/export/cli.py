"""``visionflow export`` and ``visionflow benchmark``: registered on the main app by
:func:`visionflow.cli._register_subcommands`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from visionflow._cli_errors import err, handle_errors

__all__ = ["benchmark", "distill", "export"]

out = Console()


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


@handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="A finished run directory.")],
    out_path: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="model.vfb (one file) or a directory [RUN/model.vfb]."),
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Add a calibrated INT8 graph.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Add an FP16 graph (GPU serving).")] = False,
    max_int8_drop: Annotated[
        float,
        typer.Option(
            help="Accuracy (classifiers) or mAP@.5 (detectors) points INT8 may lose and still "
            "be the default."
        ),
    ] = 1.0,
    calibration_images: Annotated[int, typer.Option(help="Training images for INT8.")] = 256,
    qat: Annotated[
        bool,
        typer.Option(
            help="Classifiers: fine-tune a copy with INT8 rounding simulated before quantising "
            "(minutes on a CPU; --no-qat: post-training quantisation only)."
        ),
    ] = True,
    qat_images: Annotated[
        int, typer.Option(min=1, help="Training images for the quantisation-aware fine-tune.")
    ] = 512,
    qat_epochs: Annotated[int, typer.Option(min=1, help="Its passes over them.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Export a trained run as a verified model bundle (ONNX, optional INT8/FP16)."""
    from visionflow.export.exporter import export_run

    result = export_run(
        run,
        out_path,
        int8=int8,
        fp16=fp16,
        max_int8_drop=max_int8_drop / 100.0,
        calibration_images=calibration_images,
        qat=qat,
        qat_images=qat_images,
        qat_epochs=qat_epochs,
        overwrite=overwrite,
        progress=None if json_out else lambda line: err.print(line, highlight=False),
    )
    meta = result.meta
    if json_out:
        summary = {k: v for k, v in meta.items() if k != "reference"}
        out.print_json(json.dumps({"bundle": str(result.path), "manifest": summary}))
        return
    detector = meta.get("task") == "detect"
    quality, key = (
        ("validation mAP@.5", "val_map_50") if detector else ("validation accuracy", "val_accuracy")
    )
    table = Table(title=str(result.path))
    for col in ("graph", "file", quality, "note"):
        table.add_column(col)
    for kind, g in meta["graphs"].items():
        note = "default" if g["file"] == meta["default_graph"] else g.get("note", "")
        table.add_row(kind, g["file"], _pct(g.get(key)), note)
    out.print(table)
    if detector:
        p = meta["graphs"]["fp32"]["parity"]
        out.print(
            f"parity with PyTorch on {p['images']} images: {p['matched']}/{p['detections']} "
            f"detections >= {p['score_threshold']:g} found, max box diff {p['max_box_diff']:.2g} "
            f"px, max score diff {p['max_score_diff']:.2g}",
            highlight=False,
        )
    out.print(f"bundle written: [bold]{result.path}[/]", highlight=False)


@handle_errors
def benchmark(
    bundle: Annotated[Path, typer.Argument(help="A model bundle (.vfb or directory).")],
    data: Annotated[
        Path | None, typer.Option(help="Labelled folder to measure accuracy on.")
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size of the throughput figure.")] = 32,
    repeats: Annotated[int, typer.Option(help="Batch-1 calls timed.")] = 100,
    threads: Annotated[int | None, typer.Option(help="Threads (default: all CPUs).")] = None,
    torch_eager: Annotated[
        bool, typer.Option("--torch/--no-torch", help="Also time PyTorch eager.")
    ] = True,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Latency (batch 1 p50/p99) and throughput of a bundle's graphs on this machine."""
    from visionflow.export.bench import benchmark_bundle, cpu_info, markdown_table

    rows = benchmark_bundle(
        bundle,
        graphs=("fp32", "int8"),
        torch_eager=torch_eager,
        batch=batch,
        repeats=repeats,
        threads=threads,
        data=data,
    )
    cpu = cpu_info()
    if json_out:
        out.print_json(json.dumps({"machine": cpu, "rows": [r.to_json() for r in rows]}))
        return
    if markdown:
        typer.echo(markdown_table(rows))
        return
    table = Table(
        title=f"{bundle} on {cpu['cpu']} ({cpu['cores']} cores, {', '.join(cpu['flags'])})"
    )
    for col in ("engine", "size MB", "p50 ms", "p99 ms", f"batch {batch} img/s", "accuracy"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        table.add_row(
            r.engine,
            f"{r.size_mb:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.throughput:.0f}",
            _pct(r.accuracy),
        )
    out.print(table)


@handle_errors
def distill(
    run: Annotated[Path, typer.Argument(help="The teacher: a finished run directory.")],
    student: Annotated[
        str,
        typer.Option(
            "--student",
            "-s",
            help="timm backbone of the student (mobilenetv3_small_100, tf_efficientnet_lite0...).",
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The student's run directory [RUN-student-NAME]."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Student weights: auto, package, hub, none, or a file/directory."),
    ] = None,
    img_size: Annotated[
        int | None, typer.Option(help="Student input size in pixels [the teacher's].")
    ] = None,
    budget: Annotated[str, typer.Option(help="Training budget, e.g. 90s, 5m, 1h.")] = "5m",
    epochs: Annotated[int, typer.Option(help="Upper bound on epochs.")] = 30,
    temperature: Annotated[
        float, typer.Option(help="Softmax temperature of the soft labels.")
    ] = 4.0,
    alpha: Annotated[
        float, typer.Option(help="Soft-label share of the loss, 0-1 (1: teacher only).")
    ] = 0.7,
    lr: Annotated[float, typer.Option(help="Head learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    augment: Annotated[str, typer.Option(help="Augmentation: none, light, medium.")] = "light",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda...")] = "auto",
    export: Annotated[
        bool, typer.Option("--export/--no-export", help="Export the student as a bundle.")
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing student run.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Distil a trained run into a smaller student; compare accuracy, size and latency."""
    from visionflow.export.distill import distill_run

    result = distill_run(
        run,
        student,
        out_dir=out_dir,
        weights=weights,
        img_size=img_size,
        budget=budget,
        epochs=epochs,
        temperature=temperature,
        alpha=alpha,
        lr=lr,
        batch_size=batch_size,
        augment=augment,
        seed=seed,
        device=device,
        export=export,
        overwrite=overwrite,
        progress=None if json_out else lambda line: err.print(line, highlight=False),
    )
    comparison = result.comparison
    if json_out:
        out.print_json(json.dumps({"run": str(result.run_dir), **comparison}))
        return
    latency = comparison["latency"]
    table = Table(title=f"teacher vs student ({latency['engine']} latency, batch 1)")
    cols = ("model", "backbone", "val acc", "test acc", "params", "weights MB", "ONNX MB", "p50 ms")
    for col in cols:
        table.add_column(col, justify="left" if col in {"model", "backbone"} else "right")
    for role in ("teacher", "student"):
        r = comparison[role]
        table.add_row(
            role,
            r["backbone"],
            _pct(r["val_accuracy"]) + (" *" if "val" in r["trained_on"] else ""),
            _pct(r["test_accuracy"]),
            f"{r['parameters'] / 1e6:.2f} M",
            f"{r['weights_mb']:.1f}",
            "n/a" if r["onnx_mb"] is None else f"{r['onnx_mb']:.1f}",
            "n/a" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}",
        )
    out.print(table)
    agree = comparison["agreement"]
    out.print(
        f"agreement with the teacher: test {_pct(agree.get('test'))}, "
        f"val {_pct(agree.get('val'))}  (* seen in training)",
        highlight=False,
    )
    out.print(f"student run: [bold]{result.run_dir}[/]", highlight=False)
    if result.bundle is not None:
        out.print(f"bundle: [bold]{result.bundle}[/]", highlight=False)
