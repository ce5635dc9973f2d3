"""``visionflow explain``: class-activation maps of a run's predictions (registered on the main
app by :func:`visionflow.cli._register_subcommands`; the work is :func:`visionflow.explain.cam.
explain`)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visionflow._cli_errors import err, handle_errors

__all__ = ["bundle_refusal", "explain"]

out = Console()


def bundle_refusal(path: Path) -> str:
    """Why a bundle cannot be explained, naming the run it was exported from when it says."""
    run_path = None
    try:
        if path.is_file():
            with zipfile.ZipFile(path) as zf:
                meta: Any = json.loads(zf.read("model.json"))
        else:
            meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
        run = meta.get("run") if isinstance(meta, dict) else None
        run_path = run.get("path") if isinstance(run, dict) else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        run_path = None
    where = f" ({run_path})" if isinstance(run_path, str) and run_path else ""
    return (
        f"{path} is a model bundle (ONNX): class-activation maps need the PyTorch model and its "
        f"gradients; give the run directory it was exported from{where} instead"
    )


@handle_errors
def explain(
    run: Annotated[Path, typer.Argument(help="A finished run directory (not a bundle).")],
    images: Annotated[list[Path], typer.Argument(help="Images or folders (searched recursively).")],
    method: Annotated[
        str,
        typer.Option(
            help="gradcam, gradcam++, xgradcam, hirescam, layercam or eigencam (no gradients)."
        ),
    ] = "gradcam",
    target: Annotated[
        str | None,
        typer.Option(help="Explain this class for every image (default: each prediction)."),
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the overlay PNGs.")
    ] = Path("explanations"),
    side_by_side: Annotated[
        bool,
        typer.Option("--side-by-side/--overlay-only", help="Show the original image too."),
    ] = True,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda...")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Show where a trained model looked: a heat map (Grad-CAM...) over each image, written as
    PNGs; the table lists the prediction and the overlay file."""
    from visionflow.api import ClassifierModel
    from visionflow.data.images import load_image
    from visionflow.errors import CheckpointError, ImageDecodeError
    from visionflow.explain.cam import resolve_method
    from visionflow.export.runtime import is_bundle
    from visionflow.prediction import expand_inputs

    resolve_method(method)  # a typo fails before the model is loaded
    if not run.exists():
        raise CheckpointError(f"{run} does not exist; give a run directory (runs/<name>)")
    if is_bundle(run):
        raise CheckpointError(bundle_refusal(run))
    model = ClassifierModel.from_run(run, device=device)
    paths = expand_inputs(images)
    if not paths:
        raise typer.BadParameter("no image files found in the given paths")
    decoded, sources, failures = [], [], []
    for path in paths:  # decode first, so one bad file fails alone (as `predict` does)
        try:
            decoded.append(load_image(path))
            sources.append(str(path))
        except ImageDecodeError as exc:
            failures.append({"source": str(path), "error": exc.reason})
    results = model.explain(
        decoded,
        method=method,
        target=target,
        out_dir=out_dir,
        sources=sources,
        side_by_side=side_by_side,
        batch_size=batch_size,
    )
    if json_out:
        payload = {"explanations": [r.to_json() for r in results], "errors": failures}
        out.print_json(json.dumps(payload))
    else:
        title = escape(f"{method} heat maps in {out_dir}")
        table = Table(title=title if results else None)
        columns = ["image", "predicted", "probability"]
        if target is not None:
            columns += ["explained", "its probability"]
        for col in [*columns, "overlay"]:
            table.add_column(col, overflow="fold")
        for r in results:
            row = [r.source, r.predicted, f"{r.probability:.3f}"]
            if target is not None:
                row += [r.target, f"{r.target_probability:.3f}"]
            table.add_row(*row, str(r.overlay))
        out.print(table)
    for f in failures:
        err.print(f"[red]skipped[/] {escape(f['source'])}: {escape(f['error'])}", highlight=False)
    if failures:
        raise typer.Exit(3)
