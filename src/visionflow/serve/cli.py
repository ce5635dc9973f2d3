"""``visionflow serve`` (registered by :func:`visionflow.cli._register_subcommands`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from visionflow._cli_errors import err, handle_errors

__all__ = ["serve"]


@handle_errors
def serve(
    bundle: Annotated[
        Path | None, typer.Argument(help="A model bundle (.vfb or directory) to serve.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Model name in URLs (default: the bundle's own name).")
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(help="Serve every model of this registry (its production alias)."),
    ] = None,
    db: Annotated[str | None, typer.Option(help="Database URL of the registry.")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for state kept across restarts (rollout policies) [the registry's]."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    threads: Annotated[
        int | None,
        typer.Option(
            "--workers-threads",
            "--threads",
            help="Request threads (decode + preprocess) [2 per CPU, at least 4].",
        ),
    ] = None,
    ort_threads: Annotated[
        int | None, typer.Option(help="ONNX Runtime threads per model version [CPUs / 2].")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most images per ONNX Runtime call.")] = 16,
    max_wait_ms: Annotated[
        float, typer.Option(help="Longest wait for a batch to fill, in ms.")
    ] = 5.0,
    queue: Annotated[
        int, typer.Option(help="Images that may wait per model version (503 beyond).")
    ] = 256,
    max_images: Annotated[int, typer.Option(help="Most images per request (413 beyond).")] = 64,
    api_keys: Annotated[
        Path | None,
        typer.Option(
            envvar="VISIONFLOW_API_KEYS",
            help="File of 'scope:sha256:HEX' lines (see --hash-key); none = open.",
        ),
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (413).")] = 32.0,
    max_pixels: Annotated[
        int, typer.Option(help="Largest width*height decoded per image (413).")
    ] = 40_000_000,
    timeout_s: Annotated[float, typer.Option(help="Per-request deadline (504).")] = 30.0,
    cors: Annotated[
        list[str] | None,
        typer.Option(help="Allowed CORS origin (repeat for several); off by default."),
    ] = None,
    poll_s: Annotated[
        float, typer.Option(help="Seconds between registry checks for new versions.")
    ] = 3.0,
    feedback: Annotated[
        Path | None,
        typer.Option(help="Feedback store folder: enables POST /v1/feedback (off by default)."),
    ] = None,
    feedback_new_labels: Annotated[
        bool, typer.Option(help="Accept feedback labels that are not classes of the model.")
    ] = False,
    drift: Annotated[
        bool, typer.Option("--drift/--no-drift", help="Watch live traffic for drift.")
    ] = True,
    drift_window: Annotated[int, typer.Option(help="Recent images per drift window.")] = 500,
    drift_min_samples: Annotated[
        int, typer.Option(help="Images a drift window needs before it may alert.")
    ] = 100,
    drift_alpha: Annotated[float, typer.Option(help="Drift alert significance level.")] = 0.01,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    hash_key: Annotated[
        str | None,
        typer.Option(
            "--hash-key",
            metavar="SCOPE",
            help="Print a new API key and its key-file line for SCOPE (predict or "
            "admin), then exit.",
        ),
    ] = None,
) -> None:
    """Serve a bundle, or every model of a registry, over HTTP (REST v1 + KServe v2)."""
    from pydantic import ValidationError

    from visionflow.errors import ConfigError

    if hash_key is not None:
        from visionflow.serve.security import SCOPES, generate_key
        from visionflow.serve.security import hash_key as make_hash

        if hash_key not in SCOPES:
            raise ConfigError(f"--hash-key: scope must be one of {list(SCOPES)}")
        key = generate_key()
        typer.echo(f"key (give it to the client; it is not stored): {key}")
        typer.echo(f"key-file line: {hash_key}:{make_hash(key)}")
        return
    if (bundle is None) == (registry is None):
        raise typer.BadParameter("give a BUNDLE or --registry PATH (one of them)")

    from visionflow.serve.settings import ServeSettings

    values = {
        "host": host, "port": port, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
        "queue": queue, "max_images": max_images, "api_keys": api_keys,
        "max_body_mb": max_body_mb, "max_pixels": max_pixels, "timeout_s": timeout_s,
        "cors": cors or [], "poll_s": poll_s, "bundle": bundle, "name": name,
        "registry": registry, "db": db, "threads": threads, "ort_threads": ort_threads,
        "state_dir": state_dir,
        "feedback": feedback, "feedback_new_labels": feedback_new_labels, "drift": drift,
        "drift_window": drift_window, "drift_min_samples": drift_min_samples,
        "drift_alpha": drift_alpha,
    }  # fmt: skip
    try:
        settings = ServeSettings.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(problems) from None

    import uvicorn

    from visionflow.serve.app import create_app, source_from_settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    source = source_from_settings(settings)
    found = source.scan()  # fail fast (exit code) on a broken bundle or registry
    app = create_app(settings, source=source)
    err.print(
        f"serving {', '.join(sorted(found)) or 'no models yet'} on "
        f"http://{settings.host}:{settings.port} (docs: /docs)",
        highlight=False,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level.lower(),
                server_header=False)  # fmt: skip
