"""``visionflow clean``: find label errors, duplicates, leakage and outliers, review, apply.

Registered on the main app by :func:`visionflow.cli._register_subcommands`; the work is done by
:mod:`visionflow.explain.clean`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visionflow._cli_errors import err, handle_errors

if TYPE_CHECKING:
    from visionflow.explain.clean import CleanResult

__all__ = ["clean"]

out = Console()


def _default_out(data: Path) -> Path:
    name = (data.parent.name if data.is_file() else data.resolve().name) or "data"
    return Path(f"{name}-clean")


@handle_errors
def clean(
    data: Annotated[Path, typer.Argument(help="Dataset: a folder per class, or a CSV/TSV.")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder, outside DATA [./<data name>-clean]."),
    ] = None,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="Write OUT/cleaned (labels.csv + linked images) honouring the review's actions.",
        ),
    ] = False,
    review: Annotated[
        Path | None,
        typer.Option("--review", help="The edited review CSV to apply [OUT/review.csv]."),
    ] = None,
    backbone: Annotated[str, typer.Option(help="timm backbone for the embeddings.")] = (
        "tf_efficientnet_lite0"
    ),
    weights: Annotated[
        str | None, typer.Option(help="Its weights: auto, package, hub, none, or a file.")
    ] = None,
    img_size: Annotated[
        int | None, typer.Option(help="Backbone input size (default: the weights' own).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda...")] = "auto",
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy images into OUT/cleaned instead of hard links.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Find label errors, near-duplicates, leakage across splits and outliers; write a review
    CSV and a thumbnail page. Edit the CSV's action column (keep, drop, relabel), then run again
    with --apply to write a cleaned dataset into OUT/cleaned. DATA is never modified.
    """
    from visionflow.data.readers import read_dataset
    from visionflow.explain.clean import (
        apply_review,
        check_out_dir,
        read_review_csv,
        run_clean,
    )

    index = read_dataset(data)
    target = check_out_dir(index, out_dir or _default_out(data))
    payload: dict[str, object] = {}
    review_path = review or target / "review.csv"
    if not apply or (review is None and not review_path.is_file()):
        result = run_clean(
            index,
            target,
            backbone=backbone,
            weights=weights,
            img_size=img_size,
            device=device,
            progress=None if not json_out else False,
        )
        payload["review"] = result.to_json()
        if not json_out:
            _print_review(result)
    if apply:
        rows = read_review_csv(review_path, index)
        applied = apply_review(index, rows, target, copy=copy)
        payload["apply"] = applied.to_json()
        if not json_out:
            how = f"{applied.linked} hard-linked, {applied.copied} copied"
            out.print(
                f"cleaned dataset: [bold]{escape(str(applied.out_dir))}[/] ({applied.kept} "
                f"images kept, {applied.dropped} dropped, {applied.relabelled} relabelled; "
                f"{how}); train on it with: visionflow train {escape(str(applied.out_dir))}",
                highlight=False,
            )
    if json_out:
        out.print_json(json.dumps(payload))


def _print_review(result: CleanResult) -> None:
    from visionflow.explain.clean import ACTIONS, ISSUES

    q = result.quality
    table = Table(
        title=f"{q.root}: {q.num_analysed} of {q.num_images} images analysed",
        title_justify="left",
    )
    table.add_column("finding")
    for col in ("rows", "keep", "drop", "relabel"):
        table.add_column(col, justify="right")
    for issue in ISSUES:
        counts = result.by_issue.get(issue)
        if counts:
            cells = [str(counts.get(a, 0) or "") for a in ACTIONS]
            table.add_row(issue, str(sum(counts.values())), *cells)
    if not result.by_issue:
        table.add_row("(nothing found)", "0", "", "", "")
    out.print(table)
    out.print("[dim]keep / drop / relabel: the default actions in the review file[/]")
    for w in q.warnings:
        style = "bold yellow" if w.startswith("leakage") else "yellow"
        err.print(f"[{style}]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    for note in q.notes:
        err.print(f"[dim]note: {escape(note)}[/]", highlight=False, soft_wrap=True)
    out.print(
        f"review: [bold]{escape(str(result.review_csv))}[/] (edit the action column) and "
        f"[bold]{escape(str(result.review_html))}[/]; then run again with --apply",
        highlight=False,
        soft_wrap=True,
    )
