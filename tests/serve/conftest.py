"""Fixtures of the serving tests (helpers live in serve_helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def serve_bundle(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny trained run exported once as ``m.vfb`` (extracted into a private cache)."""
    from visionflow.export.exporter import export_run

    root = tmp_path_factory.mktemp("serve")
    before = os.environ.get("VISIONFLOW_CACHE")
    os.environ["VISIONFLOW_CACHE"] = str(root / "cache")
    try:
        yield export_run(trained_run, root / "m.vfb").path
    finally:
        if before is None:
            os.environ.pop("VISIONFLOW_CACHE", None)
        else:
            os.environ["VISIONFLOW_CACHE"] = before
