"""Changes to what is served (``admin`` scope). Rollouts will live here; for now a refresh."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from visionflow.serve.deps import get_source, require_admin
from visionflow.serve.runtime import ModelSource

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/refresh", summary="Rescan the model source now (instead of waiting for the poll)")
async def refresh(source: ModelSource = Depends(get_source)) -> dict[str, Any]:
    changed = await run_in_threadpool(source.refresh)
    return {"changed": changed, "models": source.describe()}
