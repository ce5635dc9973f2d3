"""The model registry on PostgreSQL: what several server replicas share.

Needs the server at 127.0.0.1:5432 (trust auth, database ``test``); skipped when unreachable.
Each test gets a schema of its own (through libpq's ``options=-csearch_path=...``), dropped
afterwards, so runs never see each other's tables.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from test_registry import fake_bundle, leftovers, race

from visionflow.errors import RegistryError
from visionflow.registry import Registry

pytestmark = pytest.mark.postgres

URL = os.environ.get("VISIONFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    try:
        import psycopg2
    except ImportError:  # pragma: no cover
        pytest.skip("psycopg2 is not installed")
    try:
        admin = psycopg2.connect(URL, connect_timeout=2)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {URL}: {str(exc).strip().splitlines()[0]}")
    schema = f"vf_registry_{uuid.uuid4().hex[:12]}"
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in URL else "?"
    try:
        yield f"{URL}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def test_postgres_registry_round_trip(pg_url: str, tmp_path: Path) -> None:
    root = tmp_path / "shared-volume"
    reg = Registry.open(root, url=pg_url)
    assert not (root / "registry.db").exists()
    bundle = fake_bundle(tmp_path)
    archive = fake_bundle(tmp_path, "b", archive=True)
    assert reg.add(bundle, name="animals", aliases=["candidate"]).version == 1
    assert reg.add(archive, name="animals").version == 2
    reg.promote("animals", 1)
    reg.promote("animals", 2)
    # A second replica (another instance, same database and volume) sees the same state.
    replica = Registry(root, url=pg_url)
    revision = replica.revision()
    assert replica.get("animals").version == 2
    assert reg.rollback("animals").version == 1
    assert replica.revision() > revision
    assert replica.get("animals").version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        replica.rollback("animals")
    with pytest.raises(RegistryError, match=r"still aliased \('candidate', 'production'\)"):
        replica.delete("animals", 1)
    replica.delete("animals", 2)
    assert [v.version for v in reg.versions("animals")] == [1]
    assert reg.add(bundle, name="animals").version == 3
    assert [(h["action"], h["version"]) for h in reg.history("animals")] == [
        ("promote", 1),
        ("promote", 2),
        ("rollback", 1),
    ]
    with pytest.raises(RegistryError, match="did you mean 'animals'"):
        reg.get("animal")
    reg.verify("animals", 3)
    assert leftovers(reg) == []
    reg.close()
    replica.close()


def test_postgres_concurrent_adds_get_distinct_versions(pg_url: str, tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path)
    root = tmp_path / "shared-volume"
    Registry.open(root, url=pg_url).close()
    assert race(root, pg_url, bundle) == list(range(1, 9))
    reg = Registry(root, url=pg_url)
    assert sorted(os.listdir(root / "artifacts" / "race")) == sorted(map(str, range(1, 9)))
    assert leftovers(reg) == []
    reg.close()


def test_postgres_tables_are_created_once_by_racing_replicas(pg_url: str, tmp_path: Path) -> None:
    """Two replicas starting on an empty database at once both succeed."""
    bundle = fake_bundle(tmp_path)
    assert race(tmp_path / "shared-volume", pg_url, bundle, count=1) == [1, 2]
