"""``/v1/admin/models/{name}/rollout``, ``:promote``, ``:rollback`` (``admin`` scope).

Every change takes effect on the next request, without a restart: see
:mod:`visionflow.serve.rollout` for why requests in flight never fail because of one.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from visionflow.errors import RegistryError
from visionflow.serve._errors import ServeError
from visionflow.serve.deps import get_source, require_admin
from visionflow.serve.rollout import RolloutManager, RolloutPolicy
from visionflow.serve.runtime import DEFAULT_ALIAS, ModelSource, RegistrySource

router = APIRouter(prefix="/v1/admin", tags=["rollout"], dependencies=[Depends(require_admin)])


def get_rollout(request: Request) -> RolloutManager:
    manager: RolloutManager = request.app.state.rollout
    return manager


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    version: str = Field(min_length=1, description="Version number (or alias) to promote")
    alias: str = Field(default=DEFAULT_ALIAS, min_length=1, description="The alias to move")


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(default=DEFAULT_ALIAS, min_length=1, description="The alias to move back")


def _view(manager: RolloutManager, name: str) -> dict[str, Any]:
    state = manager.state(name)
    return {"model": name, **state.model_dump(mode="json")}


def _registry(source: ModelSource, action: str) -> Any:
    if not isinstance(source, RegistrySource):
        raise ServeError(
            409,
            "no_registry",
            f"cannot {action}: this server serves a single bundle, not a registry (serve with "
            "--registry to promote and roll back; a rollout policy still shares traffic)",
        )
    return source.registry()


@router.get("/models/{name}/rollout", summary="A model's rollout policy and its state")
def get_policy(
    name: str,
    source: ModelSource = Depends(get_source),
    manager: RolloutManager = Depends(get_rollout),
) -> dict[str, Any]:
    source.entry(name)
    return _view(manager, name)


@router.put(
    "/models/{name}/rollout",
    summary="Set a model's rollout policy (split, canary, shadow or none)",
    description="Takes effect on the next request; requests in flight keep their version. "
    "Unknown versions or aliases answer 422 naming the field.",
)
async def put_policy(
    name: str,
    policy: RolloutPolicy,
    source: ModelSource = Depends(get_source),
    manager: RolloutManager = Depends(get_rollout),
) -> dict[str, Any]:
    entry = source.entry(name)
    resolved = manager.check(name, policy, entry)
    for version in sorted(set(resolved.values())):  # warm before the first request needs it
        await run_in_threadpool(source.ensure_loaded, name, version)
    _same_task(source, name, resolved)
    await run_in_threadpool(manager.set_policy, name, policy)
    return _view(manager, name)


def _same_task(source: ModelSource, name: str, resolved: dict[str, int]) -> None:
    """422 when a policy would mix a classifier and a detector: its clients would get
    answers of two shapes from one URL (and a shadow could not compare them)."""
    tasks: dict[str, list[str]] = {}
    for where, version in sorted(resolved.items()):
        lm = source.loaded(name, version)
        if lm is not None:
            tasks.setdefault(lm.task, []).append(f"{where} (version {version})")
    if len(tasks) > 1:
        kinds = "; ".join(f"{task}: {', '.join(where)}" for task, where in sorted(tasks.items()))
        raise ServeError(
            422,
            "invalid_policy",
            f"the policy mixes classifiers and detectors ({kinds}); share traffic only "
            "between versions of one task",
        )


@router.get(
    "/models/{name}/rollout/status",
    summary="Traffic, errors and latency per version; shadow agreement; canary verdict",
)
def rollout_status(
    name: str,
    source: ModelSource = Depends(get_source),
    manager: RolloutManager = Depends(get_rollout),
) -> dict[str, Any]:
    return manager.status(name, source.entry(name))


async def _move(source: ModelSource, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        moved = await run_in_threadpool(call, *args, **kwargs)
    except RegistryError as exc:
        raise ServeError(409, "registry_refused", str(exc)) from None
    await run_in_threadpool(source.refresh)  # now, not at the next poll
    return moved


@router.post(
    "/models/{name}:promote",
    summary="Point an alias (production) at a version in the registry",
    description="A canary or shadow policy whose candidate is the promoted version has done "
    "its job: it ends (status promoted).",
)
async def promote(
    name: str,
    body: PromoteBody,
    source: ModelSource = Depends(get_source),
    manager: RolloutManager = Depends(get_rollout),
) -> dict[str, Any]:
    registry = _registry(source, "promote")
    source.entry(name)
    before = source.entry(name).aliases.get(body.alias)
    moved = await _move(source, registry.promote, name, body.version, alias=body.alias)
    version = int(moved.version)
    state = manager.state(name)
    policy = state.policy
    section = {"canary": policy.canary, "shadow": policy.shadow}.get(policy.mode)
    if state.applies and section is not None and body.alias == DEFAULT_ALIAS:
        candidate = source.entry(name).versions.get(version)
        if candidate is not None and str(section.candidate) in (
            str(version),
            *candidate.aliases,
        ):
            manager.end(name, "promoted", f"version {version} was promoted to {body.alias}")
            await run_in_threadpool(manager.save)
    return {
        "model": name,
        "alias": body.alias,
        "version": version,
        "previous": before,
        "rollout": _view(manager, name),
    }


@router.post("/models/{name}:rollback", summary="Move an alias back to its previous version")
async def rollback(
    name: str,
    body: RollbackBody | None = Body(default=None),
    source: ModelSource = Depends(get_source),
    manager: RolloutManager = Depends(get_rollout),
) -> dict[str, Any]:
    registry = _registry(source, "roll back")
    alias = body.alias if body is not None else DEFAULT_ALIAS
    before = source.entry(name).aliases.get(alias)
    moved = await _move(source, registry.rollback, name, alias=alias)
    return {
        "model": name,
        "alias": alias,
        "version": int(moved.version),
        "previous": before,
        "rollout": _view(manager, name),
    }
