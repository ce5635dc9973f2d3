"""``visionflow select``: which images of a folder to label next (active learning).

A thin layer over :func:`visionflow.explain.active.select_for_labelling` and
:func:`~visionflow.explain.active.write_selection_csv`; registered in the main CLI.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import TaskID
from rich.table import Table

from visionflow._cli_errors import err
from visionflow._cli_errors import handle_errors as _handle_errors
from visionflow._progress import transient_bar

__all__ = ["select"]

_out = Console()
#: Picks shown in the terminal table (the CSV has them all).
_SHOWN = 20


@contextmanager
def _bar(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    if not enabled:
        yield None
        return
    with transient_bar(err) as bar:
        tasks: dict[str, TaskID] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


@_handle_errors
def select(
    run: Annotated[Path, typer.Argument(help="A run directory or a model bundle (.vfb).")],
    pool: Annotated[Path, typer.Argument(help="Folder of unlabelled images (recursive).")],
    n: Annotated[int, typer.Option("--n", help="How many images to pick.")] = 50,
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy",
            "-s",
            help="hybrid (default), margin, entropy, least-confidence, diversity, coreset or "
            "random (the README's active learning section says when to use which).",
        ),
    ] = "hybrid",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The CSV to fill in (path, label, ...).")
    ] = Path("to_label.csv"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of tie-breaks and sampling.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    labelled_limit: Annotated[
        int,
        typer.Option(help="Most training images embedded so diverse picks avoid them."),
    ] = 1000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda... (run directories).")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the selection as JSON.")] = False,
) -> None:
    """Pick the images of POOL most worth labelling next and write them to a CSV: fill in
    its label column, then `visionflow train DATA --labels to_label.csv`. Images already in
    the training data are skipped, unreadable files are named and skipped."""
    from visionflow.errors import ConfigError
    from visionflow.explain.active import get_strategy, select_for_labelling, write_selection_csv

    get_strategy(strategy)  # an unknown name fails before any image is read
    if out.exists() and not overwrite:  # and so does a CSV that may hold typed-in labels
        raise ConfigError(
            f"{out} already exists (it may hold labels already filled in); pass --overwrite "
            "or choose another --out"
        )
    with _bar(not json_out and err.is_terminal) as progress:
        result = select_for_labelling(
            run, pool, n=n, strategy=strategy, seed=seed, batch_size=batch_size,
            labelled_limit=labelled_limit, device=device, progress=progress,
        )  # fmt: skip
    path = write_selection_csv(result, out, overwrite=overwrite)
    if json_out:
        _out.print_json(json.dumps({**result.to_json(), "csv": str(path)}))
        return
    table = Table(title=f"{len(result.rows)} of {result.scored} image(s), strategy {strategy}")
    for col in ("rank", "image", "suggested", "confidence", "score"):
        table.add_column(col, justify="right" if col in ("rank", "confidence", "score") else "left")
    for row in result.rows[:_SHOWN]:
        table.add_row(
            str(row.rank),
            escape(str(row.path)),
            escape(row.suggested_label),
            f"{row.confidence:.2f}",
            f"{row.score:.3g}",
        )
    _out.print(table)
    if len(result.rows) > _SHOWN:
        _out.print(f"... and {len(result.rows) - _SHOWN} more in the CSV")
    skipped = []
    if result.in_training:
        skipped.append(f"{len(result.in_training)} already in the training data")
    if result.duplicates:
        skipped.append(f"{len(result.duplicates)} duplicate(s) within the pool")
    if result.unreadable:
        skipped.append(f"{len(result.unreadable)} unreadable")
    if result.outside:
        skipped.append(f"{len(result.outside)} symlink(s) leading out of the pool")
    if skipped:
        err.print("skipped: " + ", ".join(skipped), highlight=False)
    for name, reason in result.unreadable:
        err.print(f"[red]unreadable[/] {escape(name)}: {escape(reason)}", highlight=False)
    if not result.training_found:
        err.print(
            f"[yellow]training data not available[/] ({escape(result.training_data)}): images "
            "already labelled could not be skipped",
            highlight=False,
        )
    _out.print(
        f"wrote [bold]{escape(str(path))}[/]: fill in the label column (classes: "
        f"{escape(', '.join(result.classes))}), then run "
        f"`visionflow train DATA --labels {escape(str(path))}`",
        highlight=False,
    )
