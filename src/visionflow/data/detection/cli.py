"""``visionflow convert`` (registered on the main app by
:func:`visionflow.cli._register_subcommands`) and the detection branch of ``visionflow inspect
--task detect`` (:func:`inspect_detection`); the work is in
:func:`visionflow.data.detection.convert.convert` and
:func:`visionflow.data.detection.checks.check_detection`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from visionflow._cli_errors import err, handle_errors

__all__ = ["convert", "inspect_detection"]

out = Console()

#: How many of the reader's issues ``convert`` prints before "and N more".
_SHOW = 10


@handle_errors
def convert(
    src: Annotated[Path, typer.Argument(help="A COCO, Pascal VOC or YOLO dataset (or its file).")],
    dst: Annotated[Path, typer.Argument(help="A new folder, outside the source dataset.")],
    to: Annotated[str, typer.Option("--to", help="Format to write: coco, voc or yolo.")],
    from_format: Annotated[
        str, typer.Option("--from", help="Source format: auto (detect), coco, voc or yolo.")
    ] = "auto",
    copy: Annotated[
        bool,
        typer.Option(
            "--copy/--link",
            help="Copy the images instead of hard-linking them (links fall back to copies).",
        ),
    ] = False,
    precision: Annotated[int, typer.Option(help="Decimals of YOLO's normalised coordinates.")] = 6,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Convert a detection dataset between COCO, Pascal VOC and YOLO. The source is never
    written to; labels the source could not use (unknown class ids, annotations without an
    image) are listed and left out."""
    from visionflow.data.detection.convert import convert as run_convert

    result = run_convert(
        src,
        dst,
        to=to,
        from_format=from_format,
        images="copy" if copy else "link",
        precision=precision,
    )
    if json_out:
        out.print_json(json.dumps(result.to_json()))
        return
    w = result.written
    how = f"{w.linked} linked, {w.copied} copied" if w.linked else f"{w.copied} copied"
    out.print(
        f"{result.source_format} -> {w.format}: {w.num_images} images ({how}), {w.num_boxes} "
        f"boxes written to [bold]{escape(str(w.dst))}[/]",
        highlight=False,
    )
    for note in w.notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if result.issues:
        err.print(f"[yellow]{len(result.issues)} annotation problem(s) in the source, left out:[/]")
        for issue in result.issues[:_SHOW]:
            err.print(f"  {issue.source}: {issue.message}", markup=False, highlight=False)
        if len(result.issues) > _SHOW:
            err.print(f"  ... and {len(result.issues) - _SHOW} more (see --json)")


def inspect_detection(
    data: Path,
    *,
    report: Path | None,
    json_out: bool,
    console: Console,
) -> None:
    """Read and check a detection dataset, write the JSON report and print it (``visionflow
    inspect --task detect``).

    Raises:
        DataError: The dataset cannot be read, or leaves no usable image or box.
    """
    from visionflow.data.detection.checks import check_detection
    from visionflow.data.detection.readers import read_detection

    index = read_detection(data)
    result, _ = check_detection(index, progress=not json_out)
    target = report or Path("data_report.json")
    result.save(target)
    if json_out:
        console.print_json(json.dumps(result.to_json()))
    else:
        result.render(console)
        console.print(f"report written to [bold]{escape(str(target))}[/]", highlight=False)
    result.raise_for_problems()
