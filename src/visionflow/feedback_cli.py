"""``visionflow feedback export`` and ``visionflow retrain --from-feedback``: the feedback loop's
way back from a server's feedback store (``visionflow serve --feedback DIR``) to a new model.

:func:`retrain_from_feedback` is the library function behind ``retrain``: merge the run's data
with the feedback (:func:`visionflow.serve.feedback.merge_with_run`), train with the run's own
settings, export a bundle and register it as ``candidate`` (ready for a canary or shadow
rollout). Registered in the main CLI by :func:`register`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from visionflow._cli_errors import err
from visionflow._cli_errors import handle_errors as _handle_errors

__all__ = ["RetrainResult", "feedback_app", "register", "retrain", "retrain_from_feedback"]

feedback_app = typer.Typer(
    help="Feedback collected by a server (visionflow serve --feedback DIR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console()


@dataclass(frozen=True)
class RetrainResult:
    """What :func:`retrain_from_feedback` made."""

    run_dir: Path
    data_dir: Path
    bundle: Path
    merge: dict[str, Any]
    metrics: dict[str, Any]
    registered: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "data_dir": str(self.data_dir),
            "bundle": str(self.bundle),
            "merge": self.merge,
            "metrics": self.metrics,
            "registered": self.registered,
        }


def retrain_from_feedback(
    run_dir: str | Path,
    feedback: str | Path,
    *,
    out_dir: str | Path | None = None,
    name: str | None = None,
    model: str | None = None,
    registry: str | Path | None = None,
    registry_name: str | None = None,
    db: str | None = None,
    overrides: dict[str, Any] | None = None,
    search: bool = False,
    console: Console | None = None,
) -> RetrainResult:
    """Merge ``run_dir``'s data with the feedback store, train, export, register a candidate.

    Args:
        run_dir: The finished run the served model came from (its index, split and settings).
        feedback: The feedback store folder.
        out_dir: Parent of the new run and its merged data (default: the run's parent).
        name: The new run's name (default: ``<run>-feedback-<time>``).
        model: Only the feedback given for this served model name (default: all).
        registry: Register the bundle here with alias ``candidate`` (none: not registered).
        registry_name: The registry model name (default: ``model``, else the run's name).
        db: The registry's database URL (default: SQLite in the registry folder).
        overrides: Training settings over the run's own (``budget``, ``epochs``...).
        search: Search hyper-parameters (default: one recipe with the run's settings).
        console: Where progress goes (None: silent).
    """
    from visionflow._io import read_json
    from visionflow.config import TrainConfig, load_search_config
    from visionflow.errors import CheckpointError
    from visionflow.export.exporter import export_run
    from visionflow.serve.feedback import merge_with_run

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise CheckpointError(f"{run} is not a visionflow run (config.json missing)")
    parent = Path(out_dir) if out_dir is not None else run.parent
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    new_name = name or f"{run.name}-feedback-{stamp}"
    data_dir = parent / f"{new_name}-data"
    new_run = parent / new_name

    def say(line: str) -> None:
        if console is not None:
            console.print(line, highlight=False)

    merged = merge_with_run(run, feedback, data_dir, model=model)
    say(
        f"merged data in {data_dir}: {merged.original} original + {merged.added} feedback "
        f"image(s); {len(merged.relabelled)} relabelled by feedback"
    )
    for line in merged.relabelled[:20]:
        say(f"  relabelled {line}")
    for line in merged.conflicts[:20]:
        say(f"  [yellow]conflicting feedback[/] {line}")
    # the merged data already holds the run's split and its --labels rows (index.json)
    config = TrainConfig(**{**read_json(run / "config.json"), "split_file": None, "labels": []})
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(config, key, value)
    if search:
        from visionflow.search.runner import search_classifier

        result = search_classifier(
            data_dir, config, load_search_config(), run_dir=new_run, explicit=set(),
            console=console,
        )  # fmt: skip
        metrics = result.metrics
    else:
        from visionflow.train.recipe import train_classifier

        trained = train_classifier(data_dir, config, run_dir=new_run, console=console)
        metrics = trained.metrics
    say(f"trained {new_run}; exporting")
    bundle = export_run(new_run, new_run / "model.vfb", progress=say).path
    registered = None
    if registry is not None:
        from visionflow.registry.store import Registry

        target = registry_name or model or run.name
        with Registry.open(registry, url=db) as reg:
            version = reg.add(
                bundle,
                name=target,
                aliases=["candidate"],
                description=f"retrained from {run.name} with feedback "
                f"({merged.added} added, {len(merged.relabelled)} relabelled)",
            )
            registered = version.to_json()
        say(f"registered {target} version {version.version} as 'candidate'")
    headline = {
        split: {k: m.get(k) for k in ("n", "accuracy", "macro_f1") if k in m}
        for split, m in (metrics or {}).items()
        if isinstance(m, dict)
    }
    return RetrainResult(new_run, data_dir, bundle, merged.to_json(), headline, registered)


@feedback_app.command("export")
@_handle_errors
def export_feedback(
    store: Annotated[Path, typer.Option("--store", help="The feedback store folder.")],
    out: Annotated[Path, typer.Option("--out", help="New dataset folder (a folder per class).")],
    model: Annotated[
        str | None, typer.Option("--model", help="Only feedback for this served model.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Write the feedback images as a folder-per-class dataset (copies; the store is kept)."""
    from visionflow.serve.feedback import export_dataset

    summary = export_dataset(store, out, model=model)
    if json_out:
        _out.print_json(json.dumps(summary))
        return
    per_class = ", ".join(f"{k}: {v}" for k, v in summary["classes"].items())
    _out.print(f"{summary['images']} image(s) in {summary['out']} ({per_class})", highlight=False)
    for line in summary["conflicts"]:
        err.print(f"[yellow]conflicting labels[/] {line}", highlight=False)
    for path in summary["missing"]:
        err.print(f"[yellow]missing from the store[/] {path}", highlight=False)


@_handle_errors
def retrain(
    run: Annotated[Path, typer.Argument(help="The run the served model was trained in.")],
    from_feedback: Annotated[
        Path, typer.Option("--from-feedback", help="The feedback store folder.")
    ],
    registry: Annotated[
        Path | None,
        typer.Option(help="Register the new bundle here as 'candidate' (default: not at all)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Registry model name (default: --model or RUN).")
    ] = None,
    db: Annotated[str | None, typer.Option(help="Database URL of the registry.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Only feedback for this served model.")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Parent folder of the new run [RUN's parent].")
    ] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="New run's name.")] = None,
    budget: Annotated[str | None, typer.Option(help="Wall-clock budget (e.g. 10m).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Upper bound on fine-tune epochs.")] = None,
    search: Annotated[
        bool,
        typer.Option("--search/--no-search", help="Search again, or one recipe (default)."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Merge RUN's data with the feedback, train with RUN's settings, export a bundle and
    register it as 'candidate' (ready for a canary or shadow rollout)."""
    result = retrain_from_feedback(
        run, from_feedback, out_dir=out_dir, name=run_name, model=model, registry=registry,
        registry_name=name, db=db, overrides={"budget": budget, "epochs": epochs},
        search=search, console=None if json_out else err,
    )  # fmt: skip
    if json_out:
        _out.print_json(json.dumps(result.to_json(), default=str))
        return
    _out.print(f"bundle: {result.bundle}", highlight=False)
    if result.registered:
        reg = result.registered
        _out.print(
            f"registered {reg.get('name')} version {reg.get('version')} as 'candidate'",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    """Add ``feedback`` and ``retrain`` to the main CLI."""
    app.add_typer(feedback_app, name="feedback", help="Feedback collected by a server.")
    app.command("retrain")(retrain)
