"""``visionflow k8s``: write Kubernetes manifests for a distributed search or a model server.

Registered in the main CLI with ``app.add_typer(k8s_app, name="k8s")``. Errors are reported by
the handler every command shares (:mod:`visionflow._cli_errors`).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from visionflow._cli_errors import err as _err
from visionflow._cli_errors import handle_errors as _handle_errors
from visionflow.deploy.k8s import (
    DATA_MOUNT,
    DEFAULT_IMAGE,
    DEFAULT_SERVE_NAME,
    NOT_APPLIED,
    write_serve_manifests,
    write_tune_manifests,
)

__all__ = ["k8s_app"]

k8s_app = typer.Typer(
    help="Kubernetes manifests: a distributed hyper-parameter search, or a model server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console()


@k8s_app.command(context_settings={"allow_extra_args": True})
@_handle_errors
def tune(
    ctx: typer.Context,
    data: Annotated[
        str,
        typer.Argument(
            help=f"The dataset as the pods see it: {DATA_MOUNT} (the data volume) or a path "
            f"below it, e.g. {DATA_MOUNT}/flowers."
        ),
    ],
    name: Annotated[
        str,
        typer.Option(help="Study and run name; prefix of every object (lowercase, digits, '-')."),
    ],
    workers: Annotated[int, typer.Option(help="Worker pods joining the study.")] = 2,
    budget: Annotated[str, typer.Option(help="Wall-clock budget of the whole run.")] = "1h",
    image: Annotated[str, typer.Option(help="The visionflow image the pods run.")] = (
        DEFAULT_IMAGE
    ),
    namespace: Annotated[
        str | None, typer.Option(help="Namespace (default: kubectl's current one).")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="An existing PostgreSQL/MySQL study database; stored in a Secret. "
            "Default: deploy PostgreSQL."
        ),
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per coordinator and worker pod.")] = 0,
    cpu: Annotated[str, typer.Option(help="CPU request per pod (e.g. 2, 500m).")] = "2",
    memory: Annotated[str, typer.Option(help="Memory request and limit per pod.")] = "8Gi",
    data_claim: Annotated[
        str | None,
        typer.Option(help="Existing claim holding the data (default: create NAME-data)."),
    ] = None,
    runs_claim: Annotated[
        str | None,
        typer.Option(help="Existing ReadWriteMany claim for the runs (default: NAME-runs)."),
    ] = None,
    data_size: Annotated[str, typer.Option(help="Size of a created data claim.")] = "20Gi",
    runs_size: Annotated[str, typer.Option(help="Size of a created runs claim.")] = "20Gi",
    database_size: Annotated[str, typer.Option(help="Size of the database volume.")] = "5Gi",
    storage_class: Annotated[
        str | None,
        typer.Option(help="Storage class of created claims (must offer ReadWriteMany)."),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where to write (default: k8s/NAME).")
    ] = None,
) -> None:
    """Write the manifests of a distributed search: database, volumes, coordinator, workers.

    More `visionflow train` options go after `--`, e.g.
    `visionflow k8s tune /data/flowers --name flowers -- --backbone resnet50`.
    """
    target = out_dir if out_dir is not None else Path("k8s") / name
    written = write_tune_manifests(
        target,
        name=name,
        data_path=data,
        budget=budget,
        workers=workers,
        image=image,
        namespace=namespace,
        database_url=database_url,
        gpus=gpus,
        cpu=cpu,
        memory=memory,
        data_claim=data_claim,
        runs_claim=runs_claim,
        data_size=data_size,
        runs_size=runs_size,
        database_size=database_size,
        storage_class=storage_class,
        extra_args=list(ctx.args),
    )
    for path in written:
        note = "  (not applied: helper for kubectl cp)" if path.name in NOT_APPLIED else ""
        _out.print(f"wrote {escape(str(path))}{note}", highlight=False, soft_wrap=True)
    ns = f" -n {shlex.quote(namespace)}" if namespace else ""
    _next_steps(target, "Dockerfile", image, f"kubectl logs{ns} -f job/{name}-coordinator")
    if namespace:
        _err.print(
            f"[yellow]note:[/] the namespace {escape(namespace)!s} must exist "
            f"(kubectl create namespace {escape(namespace)})",
            highlight=False,
        )
    _err.print(
        f"[yellow]note:[/] {escape(str(target / 'secret.yaml'))} holds the database URL; "
        "keep it out of version control",
        highlight=False,
        soft_wrap=True,
    )


@k8s_app.command()
@_handle_errors
def serve(
    image: Annotated[str, typer.Option(help="The serving image (built from Dockerfile.serve).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the manifests into.")],
    name: Annotated[
        str, typer.Option(help="Name of every object (lowercase, digits, '-').")
    ] = DEFAULT_SERVE_NAME,
    namespace: Annotated[
        str | None, typer.Option(help="Namespace (default: kubectl's current one).")
    ] = None,
    replicas: Annotated[int, typer.Option(help="Initial replicas.")] = 2,
    min_replicas: Annotated[int, typer.Option(help="Autoscaler lower bound.")] = 2,
    max_replicas: Annotated[int, typer.Option(help="Autoscaler upper bound.")] = 10,
    target_cpu: Annotated[
        int, typer.Option(help="Autoscaler target: average CPU utilisation, % of the request.")
    ] = 70,
    registry_pvc: Annotated[
        str | None,
        typer.Option(help="Existing ReadWriteMany claim holding the registry (default: create)."),
    ] = None,
    registry_size: Annotated[str, typer.Option(help="Size of a created registry claim.")] = "10Gi",
    storage_class: Annotated[
        str | None, typer.Option(help="Storage class of a created claim (ReadWriteMany).")
    ] = None,
    db_secret: Annotated[
        str | None,
        typer.Option(help="Secret whose key 'url' is the registry's PostgreSQL URL."),
    ] = None,
    api_keys_secret: Annotated[
        str | None, typer.Option(help="Secret whose key 'keys' is the API key file.")
    ] = None,
    cpu: Annotated[str, typer.Option(help="CPU request per pod (e.g. 1, 500m).")] = "1",
    memory: Annotated[str, typer.Option(help="Memory request and limit per pod.")] = "2Gi",
    port: Annotated[int, typer.Option(help="Container port of the server.")] = 8080,
) -> None:
    """Write the manifests of a model server: Deployment, Service, autoscaler, registry volume."""
    written = write_serve_manifests(
        out_dir,
        image=image,
        name=name,
        namespace=namespace,
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_cpu=target_cpu,
        registry_claim=registry_pvc,
        registry_size=registry_size,
        storage_class=storage_class,
        db_secret=db_secret,
        api_keys_secret=api_keys_secret,
        cpu=cpu,
        memory=memory,
        port=port,
    )
    for path in written:
        _out.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)
    ns = f" -n {shlex.quote(namespace)}" if namespace else ""
    _next_steps(out_dir, "Dockerfile.serve", image, f"kubectl rollout status{ns} deployment/{name}")
    if db_secret is None and max_replicas > 1:
        _err.print(
            "[yellow]note:[/] several replicas share the registry volume; give --db-secret "
            "so that the registry database is PostgreSQL, not an SQLite file on it",
            highlight=False,
            soft_wrap=True,
        )


def _next_steps(directory: Path, dockerfile: str, image: str, watch: str) -> None:
    """Print what to run after writing manifests: build and push the image, apply, watch."""
    folder = shlex.quote(str(directory))
    _out.print("")
    _out.print("next:", highlight=False)
    _out.print(
        f"  docker build -f {folder}/{dockerfile} -t {shlex.quote(image)} . && "
        f"docker push {shlex.quote(image)}   # in the visionflow source tree",
        highlight=False,
        soft_wrap=True,
    )
    _out.print(f"  kubectl apply -k {folder}", highlight=False, soft_wrap=True)
    _out.print(f"  {watch}", highlight=False, soft_wrap=True)
