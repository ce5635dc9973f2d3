"""``visionflow rollout``: change a running server's rollouts over its admin API.

Registered in the main CLI with ``app.add_typer(rollout_app, name="rollout")``. Every command
takes ``--url`` (default ``$VISIONFLOW_URL``, else ``http://127.0.0.1:8080``) and ``--api-key``
(default ``$VISIONFLOW_API_KEY``; an ``admin`` key) and prints the server's answer (``--json``:
as JSON). A policy the server refuses exits 2 with its message; any other refusal, or a server
that cannot be reached, exits 10. Standard library HTTP only: the client needs no extra.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from visionflow._cli_errors import handle_errors as _handle_errors
from visionflow.errors import ConfigError, VisionflowError

__all__ = ["RolloutClientError", "rollout_app"]

rollout_app = typer.Typer(
    help="Rollouts on a running server: A/B splits, canaries, shadow traffic, promote, rollback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console()


class RolloutClientError(VisionflowError):
    """The server refused a rollout request, or could not be reached."""

    exit_code = 10


Url = Annotated[
    str,
    typer.Option("--url", envvar="VISIONFLOW_URL", help="The server.", show_default=True),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="VISIONFLOW_API_KEY", help="An admin API key."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the server's JSON answer.")]
Name = Annotated[str, typer.Argument(help="The model.")]
_DEFAULT_URL = "http://127.0.0.1:8080"


def _call(url: str, key: str | None, method: str, path: str, body: Any = None) -> Any:
    target = url.rstrip("/") + path
    if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
        raise ConfigError(f"--url: expected http:// or https://, got {url!r}")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(target, data=data, method=method)
    request.add_header("accept", "application/json")
    if data is not None:
        request.add_header("content-type", "application/json")
    if key:
        request.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # http(s) only: checked above
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            message = f"{exc.code} {error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"{exc.code} {exc.reason}"
        if exc.code == 422:
            raise ConfigError(message) from None
        raise RolloutClientError(message) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RolloutClientError(f"cannot reach {url} ({reason})") from None


def _rollout_path(name: str) -> str:
    return f"/v1/admin/models/{urllib.parse.quote(name, safe='')}"


def _show(answer: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _out.print_json(json.dumps(answer))
        return
    if "policy" not in answer:  # promote / rollback
        _out.print(
            f"{answer['model']}: {answer['alias']} -> v{answer['version']} "
            f"(was v{answer['previous']})",
            highlight=False,
        )
        answer = {"model": answer["model"], **answer["rollout"]}
    policy = answer["policy"]
    mode = policy["mode"]
    line = f"{answer['model']}: {mode} ({answer['status']})"
    if mode == "split":
        shares = ", ".join(f"{ref}={p:g}%" for ref, p in policy["split"].items())
        line += f" {shares}, sticky by {policy['sticky_header']}"
    elif mode in ("canary", "shadow"):
        section = policy[mode]
        line += f" candidate {section['candidate']} vs {section['production']}"
        if mode == "canary":
            line += f", {section['percent']:g}% of traffic"
    if answer.get("reason"):
        line += f": {answer['reason']}"
    _out.print(escape(line), highlight=False)


def _put(url: str, key: str | None, name: str, policy: dict[str, Any], as_json: bool) -> None:
    _show(_call(url, key, "PUT", _rollout_path(name) + "/rollout", policy), as_json)


@rollout_app.command()
@_handle_errors
def show(
    name: Name, url: Url = _DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """A model's rollout policy and state; with --json also its status (traffic, errors,
    latency per version, shadow agreement, canary verdict)."""
    answer = _call(url, api_key, "GET", _rollout_path(name) + "/rollout")
    if as_json:
        answer["live"] = _call(url, api_key, "GET", _rollout_path(name) + "/rollout/status")
    _show(answer, as_json)


@rollout_app.command()
@_handle_errors
def split(
    name: Name,
    shares: Annotated[list[str], typer.Argument(help="VERSION=PERCENT pairs summing to 100.")],
    sticky_header: Annotated[
        str, typer.Option(help="Header keeping a client on one version.")
    ] = "x-client-id",
    url: Url = _DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Share traffic between versions by percent (A/B), sticky per client key header."""
    table: dict[str, float] = {}
    for pair in shares:
        ref, sep, percent = pair.partition("=")
        try:
            if not sep or not ref:
                raise ValueError
            table[ref] = float(percent)
        except ValueError:
            raise ConfigError(f"split: expected VERSION=PERCENT, got {pair!r}") from None
    policy = {"mode": "split", "split": table, "sticky_header": sticky_header}
    _put(url, api_key, name, policy, as_json)


@rollout_app.command()
@_handle_errors
def canary(
    name: Name,
    candidate: Annotated[str, typer.Option(help="Version number or alias on trial.")],
    percent: Annotated[float, typer.Option(help="Share of traffic, in %.")] = 5.0,
    max_error_rate: Annotated[float, typer.Option(help="Roll back above this 5xx rate.")] = 0.05,
    max_p95_ms: Annotated[
        float | None, typer.Option(help="Roll back above this p95 latency (ms).")
    ] = None,
    min_requests: Annotated[int, typer.Option(help="Candidate requests before judging.")] = 20,
    window_s: Annotated[float, typer.Option(help="Judged period, seconds.")] = 300.0,
    production: Annotated[str, typer.Option(help="What the rest gets.")] = "production",
    url: Url = _DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Send a share of traffic to a candidate; roll back by itself when it errs or is slow."""
    section = {
        "candidate": candidate, "production": production, "percent": percent,
        "max_error_rate": max_error_rate, "max_p95_ms": max_p95_ms,
        "min_requests": min_requests, "window_s": window_s,
    }  # fmt: skip
    _put(url, api_key, name, {"mode": "canary", "canary": section}, as_json)


@rollout_app.command()
@_handle_errors
def shadow(
    name: Name,
    candidate: Annotated[str, typer.Option(help="Version number or alias shadowing.")],
    production: Annotated[str, typer.Option(help="What answers the clients.")] = "production",
    url: Url = _DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Copy traffic to a candidate (answers discarded) and measure its agreement."""
    section = {"candidate": candidate, "production": production}
    _put(url, api_key, name, {"mode": "shadow", "shadow": section}, as_json)


@rollout_app.command()
@_handle_errors
def off(
    name: Name, url: Url = _DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """End the model's rollout: production answers every request."""
    _put(url, api_key, name, {"mode": "none"}, as_json)


@rollout_app.command()
@_handle_errors
def promote(
    name: Name,
    version: Annotated[str, typer.Argument(help="Version number (or alias) to promote.")],
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "production",
    url: Url = _DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Point production (or --alias) at VERSION in the server's registry, at once."""
    body = {"version": version, "alias": alias}
    _show(_call(url, api_key, "POST", _rollout_path(name) + ":promote", body), as_json)


@rollout_app.command()
@_handle_errors
def rollback(
    name: Name,
    alias: Annotated[str, typer.Option(help="The alias to move back.")] = "production",
    url: Url = _DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Move production (or --alias) back to the version that held it before."""
    body = {"alias": alias}
    _show(_call(url, api_key, "POST", _rollout_path(name) + ":rollback", body), as_json)
