"""``visionflow registry``: versions of named models and their aliases.

Registered in the main CLI with ``app.add_typer(registry_app, name="registry")``. Every command
takes ``--registry`` (default ``$VISIONFLOW_REGISTRY``, else ``./registry``), ``--db`` (default
``$VISIONFLOW_REGISTRY_DB``, else SQLite inside the registry folder) and ``--json``. Errors are
reported by the handler every command shares (:mod:`visionflow._cli_errors`); a refused
registry operation exits 9, a bundle that does not verify exits 7.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visionflow._cli_errors import handle_errors as _handle_errors
from visionflow.registry.store import DEFAULT_ALIAS, ModelVersion, Registry

__all__ = ["registry_app"]

registry_app = typer.Typer(
    help="Model registry: numbered versions of named models, aliases, promote and rollback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console()

RegistryPath = Annotated[
    Path,
    typer.Option(
        "--registry",
        envvar="VISIONFLOW_REGISTRY",
        help="The registry folder (database and artifacts).",
        show_default=True,
    ),
]
DbUrl = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="VISIONFLOW_REGISTRY_DB",
        help="Database URL: postgresql://... to share the registry between servers "
        "(default: SQLite in the registry folder).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
AliasOpt = Annotated[str, typer.Option("--alias", help="The alias to move.")]


def _open(registry: Path, db: str | None) -> Registry:
    return Registry.open(registry, url=db or None)


def _emit(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _say(text: str) -> None:
    _out.print(text, highlight=False, soft_wrap=True)


def _accuracy(meta: dict[str, Any]) -> str:
    metrics = meta.get("metrics") or {}
    for split in ("test", "val"):
        value = (metrics.get(split) or {}).get("accuracy")
        if isinstance(value, int | float):
            return f"{value:.1%} {split}"
    return "-"


def _versions_table(name: str, versions: list[ModelVersion]) -> Table:
    table = Table(title=name, title_justify="left")
    for column in ("version", "created", "aliases", "backbone", "accuracy", "description"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            f"v{v.version}",
            v.created_at,
            escape(", ".join(v.aliases)),
            escape(str(v.meta.get("backbone") or "-")),
            _accuracy(v.meta),
            escape(v.meta.get("description") or ""),
        )
    return table


def _show_version(v: ModelVersion) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    meta = v.meta
    classes = meta.get("classes") or []
    rows = [
        ("model", f"{v.name} v{v.version}"),
        ("aliases", ", ".join(v.aliases) or "-"),
        ("created", v.created_at),
        ("path", str(v.path)),
        ("sha256", v.sha256),
        ("task", str(meta.get("task") or "-")),
        ("backbone", str(meta.get("backbone") or "-")),
        ("classes", f"{len(classes)}: {', '.join(map(str, classes[:20]))}"),
        ("graph", str(meta.get("default_graph") or "-")),
        ("accuracy", _accuracy(meta)),
        ("description", meta.get("description") or "-"),
        ("source", str(meta.get("source") or "-")),
    ]
    for key, value in rows:
        table.add_row(key, escape(value))
    _out.print(table)


@registry_app.command()
@_handle_errors
def add(
    bundle: Annotated[Path, typer.Argument(help="A bundle: a .vfb archive or a directory.")],
    name: Annotated[str, typer.Option("--name", "-n", help="The model it is a version of.")],
    alias: Annotated[
        list[str] | None,
        typer.Option("--alias", "-a", help="Point this alias at the new version (repeatable)."),
    ] = None,
    description: Annotated[str | None, typer.Option(help="A note shown by list/show.")] = None,
    registry: RegistryPath = Path("registry"),
    db: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Verify a bundle and add it as the next version of NAME."""
    version = _open(registry, db).add(
        bundle, name=name, aliases=alias or (), description=description
    )
    if as_json:
        _emit(version.to_json())
        return
    extra = f" (aliases: {', '.join(version.aliases)})" if version.aliases else ""
    _say(f"added {escape(version.name)} v{version.version}{escape(extra)}")


@registry_app.command("list")
@_handle_errors
def list_(
    name: Annotated[str | None, typer.Argument(help="A model: list its versions.")] = None,
    registry: RegistryPath = Path("registry"),
    db: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """List the models, or the versions of one model."""
    reg = _open(registry, db)
    if name is not None:
        versions = reg.versions(name)
        if as_json:
            _emit([v.to_json() for v in versions])
        else:
            _out.print(_versions_table(name, versions))
        return
    rows: list[dict[str, Any]] = []
    for model in reg.models():
        versions = reg.versions(model)
        aliases = {a: v.version for v in versions for a in v.aliases}
        rows.append(
            {
                "name": model,
                "versions": len(versions),
                "latest": versions[-1].version if versions else None,
                "aliases": dict(sorted(aliases.items())),
            }
        )
    if as_json:
        _emit(rows)
        return
    if not rows:
        _say(f"the registry at {escape(str(registry))} is empty")
        return
    table = Table()
    for column in ("model", "versions", "latest", "aliases"):
        table.add_column(column)
    for row in rows:
        aliases_text = ", ".join(f"{a} -> v{v}" for a, v in row["aliases"].items())
        table.add_row(
            escape(row["name"]), str(row["versions"]), f"v{row['latest']}", escape(aliases_text)
        )
    _out.print(table)


@registry_app.command()
@_handle_errors
def show(
    name: Annotated[str, typer.Argument(help="The model.")],
    ref: Annotated[
        str | None,
        typer.Argument(
            help="A version (3, v3, latest) or an alias (default: production if set, else latest)."
        ),
    ] = None,
    registry: RegistryPath = Path("registry"),
    db: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Show one version: aliases, checksum, classes, metrics."""
    reg = _open(registry, db)
    if ref is None:
        versions = reg.versions(name)
        has_default = any(DEFAULT_ALIAS in v.aliases for v in versions)
        ref = DEFAULT_ALIAS if has_default else "latest"
    version = reg.get(name, ref)
    if as_json:
        _emit(version.to_json())
    else:
        _show_version(version)


def _moved(version: ModelVersion, alias: str, as_json: bool) -> None:
    if as_json:
        _emit(version.to_json())
    else:
        _say(f"{escape(alias)} -> {escape(version.name)} v{version.version}")


@registry_app.command()
@_handle_errors
def promote(
    name: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="The version (3, v3, latest or an alias).")],
    alias: AliasOpt = DEFAULT_ALIAS,
    registry: RegistryPath = Path("registry"),
    db: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Point an alias (production by default) at VERSION; rollback returns to the previous."""
    _moved(_open(registry, db).promote(name, version, alias=alias), alias, as_json)


@registry_app.command()
@_handle_errors
def rollback(
    name: Annotated[str, typer.Argument(help="The model.")],
    alias: AliasOpt = DEFAULT_ALIAS,
    registry: RegistryPath = Path("registry"),
    db: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Point an alias back at the version that held it before (repeat to go further back)."""
    _moved(_open(registry, db).rollback(name, alias=alias), alias, as_json)


@registry_app.command("alias")
@_handle_errors
def alias_(
    name: Annotated[str, typer.Argument(help="The model.")],
    alias: Annotated[str, typer.Argument(help="The alias (any valid name).")],
    version: Annotated[str, typer.Argument(help="The version (3, v3, latest or an alias).")],
    registry: RegistryPath = Path("registry"),
    db: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Point ALIAS at VERSION (created or moved atomically)."""
    _moved(_open(registry, db).set_alias(name, alias, version), alias, as_json)


@registry_app.command()
@_handle_errors
def unalias(
    name: Annotated[str, typer.Argument(help="The model.")],
    alias: Annotated[str, typer.Argument(help="The alias to remove.")],
    registry: RegistryPath = Path("registry"),
    db: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Remove ALIAS (the version stays)."""
    _open(registry, db).remove_alias(name, alias)
    if as_json:
        _emit({"name": name, "alias": alias, "removed": True})
    else:
        _say(f"removed {escape(alias)} from {escape(name)}")


@registry_app.command()
@_handle_errors
def delete(
    name: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="The version number (3 or v3).")],
    registry: RegistryPath = Path("registry"),
    db: DbUrl = None,
    as_json: AsJson = False,
) -> None:
    """Delete a version and its files; refused while an alias points at it."""
    _open(registry, db).delete(name, version)
    number = int(version.strip().lstrip("v"))  # delete accepts version numbers only
    if as_json:
        _emit({"name": name, "version": number, "deleted": True})
    else:
        _say(f"deleted {escape(name)} v{number}")
