"""The model registry on SQLite: versions, aliases, promote/rollback, delete, verification,
concurrent writers and the ``visionflow registry`` commands."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from visionflow.errors import BundleError, MissingDependencyError, RegistryError
from visionflow.export.bundle import pack, write_bundle
from visionflow.registry import ModelVersion, Registry

META: dict[str, Any] = {
    "name": "tiny",
    "task": "classify",
    "backbone": "resnet18",
    "classes": ["cat", "dog"],
    "default_graph": "model.onnx",
    "metrics": {"val": {"accuracy": 0.9}},
    "preprocessing": {"input_size": 32},
}


def fake_bundle(root: Path, tag: str = "a", *, archive: bool = False) -> Path:
    """A valid bundle with fake model files (enough for everything but running ONNX)."""
    folder = write_bundle(
        root / f"bundle-{tag}",
        {"model.onnx": f"onnx {tag}".encode() * 64, "extra/labels.txt": b"cat\ndog\n"},
        {**META, "name": f"tiny-{tag}"},
    )
    return pack(folder, root / f"bundle-{tag}.vfb") if archive else folder


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry.open(tmp_path / "registry")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return fake_bundle(tmp_path)


def leftovers(registry: Registry) -> list[str]:
    """Anything still in the staging and trash folders."""
    base = registry.root / "artifacts"
    folders = [base / ".staging", base / ".trash"]
    return [p.name for d in folders if d.is_dir() for p in d.iterdir()]


# ---------------------------------------------------------------------------- versions


def test_constructor_does_no_io(tmp_path: Path) -> None:
    Registry(tmp_path / "lazy", url="postgresql://nowhere.invalid/db")
    assert not (tmp_path / "lazy").exists()
    lazy = Registry(tmp_path / "lazy")
    assert lazy.models() == []  # the first operation creates it
    assert (tmp_path / "lazy" / "registry.db").is_file()


def test_versions_increment_and_artifacts_are_verified_copies(
    reg: Registry, tmp_path: Path
) -> None:
    directory = fake_bundle(tmp_path, "a")
    archive = fake_bundle(tmp_path, "b", archive=True)
    v1 = reg.add(directory, name="animals", description="first try")
    v2 = reg.add(archive, name="animals")
    other = reg.add(directory, name="birds")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.path == reg.root / "artifacts" / "animals" / "1"
    assert v2.path == reg.root / "artifacts" / "animals" / "2"
    for v in (v1, v2):
        digest = hashlib.sha256((v.path / "model.json").read_bytes()).hexdigest()
        assert v.sha256 == digest
        assert (v.path / "extra" / "labels.txt").read_bytes() == b"cat\ndog\n"
        assert reg.verify("animals", v.version) == v
    assert v1.meta["backbone"] == "resnet18"
    assert v1.meta["classes"] == ["cat", "dog"]
    assert v1.meta["metrics"] == {"val": {"accuracy": 0.9}}
    assert v1.meta["description"] == "first try"
    assert v2.meta["bundle"] == "tiny-b"
    assert reg.models() == ["animals", "birds"]
    assert [v.version for v in reg.versions("animals")] == [1, 2]
    for ref in (2, "2", "v2", "latest"):
        assert reg.get("animals", ref).version == 2
    assert leftovers(reg) == []
    # The source is untouched, and JSON is JSON.
    assert (directory / "model.json").is_file()
    data = json.loads(json.dumps(v1.to_json()))
    assert data["version"] == 1 and data["aliases"] == [] and data["path"] == str(v1.path)


def test_a_broken_bundle_is_refused_and_leaves_nothing(reg: Registry, tmp_path: Path) -> None:
    source = fake_bundle(tmp_path)
    (source / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"model\.onnx"):
        reg.add(source, name="animals")
    with pytest.raises(BundleError, match="no such bundle"):
        reg.add(tmp_path / "missing.vfb", name="animals")
    assert reg.models() == []
    assert leftovers(reg) == []
    assert reg.add(fake_bundle(tmp_path, "ok"), name="animals").version == 1


def test_revision_moves_on_every_change_only(reg: Registry, bundle: Path) -> None:
    start = reg.revision()
    reg.add(bundle, name="animals")
    after_add = reg.revision()
    assert after_add > start
    reg.get("animals", 1)
    reg.versions("animals")
    assert reg.revision() == after_add
    reg.promote("animals", 1)
    assert reg.revision() > after_add
    # Another process (another instance) sees the same counter.
    assert Registry(reg.root).revision() == reg.revision()


# ---------------------------------------------------------------------------- aliases


def test_aliases_move_and_are_ordinary_names(reg: Registry, bundle: Path) -> None:
    reg.add(bundle, name="animals", aliases=["candidate"])
    reg.add(bundle, name="animals")
    assert reg.get("animals", "candidate").version == 1
    moved = reg.set_alias("animals", "candidate", 2)
    assert moved.version == 2 and moved.aliases == ("candidate",)
    reg.set_alias("animals", "shadow-test.1", "v1")
    assert reg.get("animals", 1).aliases == ("shadow-test.1",)
    assert [h["version"] for h in reg.history("animals", "candidate")] == [1, 2]
    reg.remove_alias("animals", "candidate")
    with pytest.raises(RegistryError, match=r"no alias 'candidate'.*shadow-test.1 -> v1"):
        reg.get("animals", "candidate")
    with pytest.raises(RegistryError, match="no alias 'candidate'"):
        reg.remove_alias("animals", "candidate")
    with pytest.raises(RegistryError, match=r"no alias 'production'.*promote animals 2"):
        reg.get("animals")


def test_alias_readers_never_see_it_unset(reg: Registry, bundle: Path) -> None:
    """Threads reading ``production`` while another flips it always find a version."""
    reg.add(bundle, name="animals")
    reg.add(bundle, name="animals")
    reg.promote("animals", 1)
    seen: set[int] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                seen.add(reg.get("animals").version)
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(30):
        reg.promote("animals", 2 if i % 2 == 0 else 1)
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert seen <= {1, 2}


def test_promote_and_rollback_walk_back_through_history(reg: Registry, bundle: Path) -> None:
    for _ in range(3):
        reg.add(bundle, name="animals")
    with pytest.raises(RegistryError, match="'production' is not set"):
        reg.rollback("animals")
    for v in (1, 2, 3):
        assert reg.promote("animals", v).aliases == ("production",)
    revision = reg.revision()
    assert reg.promote("animals", 3).version == 3  # the current holder: nothing changes
    assert reg.revision() == revision
    assert reg.rollback("animals").version == 2
    assert reg.rollback("animals").version == 1
    with pytest.raises(RegistryError, match=r"no earlier version.*history: v1"):
        reg.rollback("animals")
    assert reg.get("animals").version == 1  # a refused rollback moves nothing
    # A promotion after rollbacks stacks on what is live now.
    reg.promote("animals", 3)
    assert reg.rollback("animals").version == 1
    history = reg.history("animals")
    assert [(h["action"], h["version"], h["previous"]) for h in history] == [
        ("promote", 1, None),
        ("promote", 2, 1),
        ("promote", 3, 2),
        ("rollback", 2, 3),
        ("rollback", 1, 2),
        ("promote", 3, 1),
        ("rollback", 1, 3),
    ]
    # Other aliases keep their own history.
    reg.promote("animals", 2, alias="candidate")
    reg.promote("animals", 3, alias="candidate")
    assert reg.rollback("animals", alias="candidate").version == 2
    assert reg.get("animals").version == 1


def test_rollback_skips_deleted_versions(reg: Registry, bundle: Path) -> None:
    for _ in range(3):
        reg.add(bundle, name="animals")
    for v in (1, 2, 3):
        reg.promote("animals", v)
    reg.delete("animals", 2)
    assert reg.rollback("animals").version == 1


def test_remove_alias_ends_its_rollback_history(reg: Registry, bundle: Path) -> None:
    reg.add(bundle, name="animals")
    reg.add(bundle, name="animals")
    reg.promote("animals", 1)
    reg.promote("animals", 2)
    reg.remove_alias("animals", "production")
    reg.promote("animals", 2)
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("animals")


# ---------------------------------------------------------------------------- delete


def test_delete_is_refused_while_aliased_and_numbers_are_never_reused(
    reg: Registry, bundle: Path
) -> None:
    reg.add(bundle, name="animals", aliases=["production", "candidate"])
    v2 = reg.add(bundle, name="animals")
    with pytest.raises(RegistryError, match=r"v1 is still aliased \('candidate', 'production'\)"):
        reg.delete("animals", 1)
    assert reg.get("animals", 1).path.is_dir()
    with pytest.raises(RegistryError, match="version number"):
        reg.delete("animals", "production")
    reg.delete("animals", 2)
    assert not v2.path.exists()
    assert leftovers(reg) == []
    with pytest.raises(RegistryError, match=r"no version 2; its versions: 1"):
        reg.get("animals", 2)
    assert reg.add(bundle, name="animals").version == 3
    reg.remove_alias("animals", "candidate")
    reg.promote("animals", 3)
    reg.delete("animals", "v1")
    assert [v.version for v in reg.versions("animals")] == [3]
    reg.remove_alias("animals", "production")
    reg.delete("animals", 3)
    assert reg.models() == [] and reg.versions("animals") == []
    with pytest.raises(RegistryError, match="no versions"):
        reg.get("animals", "latest")
    assert reg.add(bundle, name="animals").version == 4


# ---------------------------------------------------------------------------- verification


def test_tampered_artifacts_are_refused_on_load(reg: Registry, tmp_path: Path) -> None:
    v1 = reg.add(fake_bundle(tmp_path, "a"), name="animals", aliases=["production"])
    v2 = reg.add(fake_bundle(tmp_path, "b"), name="animals", aliases=["candidate"])
    (v1.path / "model.onnx").write_bytes(b"evil")
    with pytest.raises(BundleError, match=r"model\.onnx"):
        reg.load("animals")
    with pytest.raises(BundleError, match=r"model\.onnx"):
        reg.verify("animals")
    # A different, internally consistent bundle swapped in on the volume: refused by the
    # sha256 the database recorded.
    (v2.path / "model.json").unlink()
    (v2.path / "model.json").write_bytes((tmp_path / "bundle-a" / "model.json").read_bytes())
    (v2.path / "model.onnx").write_bytes((tmp_path / "bundle-a" / "model.onnx").read_bytes())
    with pytest.raises(BundleError, match="not the one registered"):
        reg.load("animals", "candidate")
    (v2.path / "model.json").unlink()
    with pytest.raises(BundleError, match="artifact of animals:v2 is missing"):
        reg.load("animals", 2)


def colour_graph() -> bytes:
    """A real ONNX classifier in four nodes: the mean colour of the image is both its
    features and (scaled) its logits, so a red image is 'red'. No torch, no training."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, 3), np.float32)
    weights[0, 2] = weights[1, 1] = weights[2, 0] = 0.05  # R -> red, G -> green, B -> blue
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels"], ["features"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["features", "w"], ["logits"]),
        ],
        "colours",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 32, 32, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3]),
        ],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_load_gives_a_working_model(reg: Registry, tmp_path: Path) -> None:
    from PIL import Image

    meta = {
        **META,
        "classes": ["blue", "green", "red"],
        "feature_dim": 3,
        "preprocessing": {"input_size": 32, "interpolation": "bilinear", "crop_pct": 1.0},
    }
    source = write_bundle(tmp_path / "colours", {"model.onnx": colour_graph()}, meta)
    reg.add(source, name="colours", aliases=["production"])
    model = reg.load("colours", threads=1)
    assert model.classes == ["blue", "green", "red"]
    red, blue = Image.new("RGB", (40, 40), (220, 40, 30)), Image.new("RGB", (40, 40), (9, 9, 200))
    assert [p.label for p in model.predict([red, blue], topk=1)] == ["red", "blue"]


# ---------------------------------------------------------------------------- names and errors


@pytest.mark.parametrize("name", ["Animals", "", "-x", ".x", "a/b", "../x", "a b", "é", "a" * 65])
def test_bad_model_names_are_refused(reg: Registry, bundle: Path, name: str) -> None:
    with pytest.raises(RegistryError, match=r"name .* is not valid: use 1 to 64 lowercase"):
        reg.add(bundle, name=name)
    assert not (reg.root / "artifacts" / name).exists() or name in ("", ".x")


@pytest.mark.parametrize("alias", ["Prod", "3", "v3", "latest", "", "a/b"])
def test_bad_aliases_are_refused(reg: Registry, bundle: Path, alias: str) -> None:
    reg.add(bundle, name="animals")
    with pytest.raises(RegistryError, match="alias"):
        reg.set_alias("animals", alias, 1)
    with pytest.raises(RegistryError, match="alias"):
        reg.add(bundle, name="animals", aliases=[alias])
    assert [v.version for v in reg.versions("animals")] == [1]


def test_unknown_things_say_what_exists(reg: Registry, bundle: Path) -> None:
    with pytest.raises(RegistryError, match="it is empty"):
        reg.get("animals")
    reg.add(bundle, name="animals")
    reg.add(bundle, name="birds")
    with pytest.raises(RegistryError, match="did you mean 'animals'"):
        reg.get("animal")
    with pytest.raises(RegistryError, match="it holds animals, birds"):
        reg.versions("zzz")
    with pytest.raises(RegistryError, match=r"no version 7; its versions: 1"):
        reg.promote("animals", 7)
    for ref in (0, -1, True, 1.5, "Prod!"):
        with pytest.raises(RegistryError):
            reg.get("animals", ref)  # type: ignore[arg-type]


def test_database_urls(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "elsewhere" / "reg.sqlite"
    reg = Registry.open(tmp_path / "root", url=f"sqlite:///{db}")
    reg.add(bundle, name="animals")
    assert db.is_file() and not (tmp_path / "root" / "registry.db").exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(RegistryError, match="unsupported database"):
        Registry.open(tmp_path / "x", url="mysql://u:secret@h/db")
    with pytest.raises(RegistryError) as info:
        Registry.open(tmp_path / "x", url="oracle://u:secret@h/db")
    assert "secret" not in str(info.value)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(MissingDependencyError, match=r"visionflow\[postgres\]"):
        Registry.open(tmp_path / "x", url="postgresql://u@127.0.0.1/db")


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("psycopg2")
    url = "postgresql://someone:hunter2@127.0.0.1:1/nowhere?connect_timeout=2"
    with pytest.raises(RegistryError, match="cannot connect to the registry database") as info:
        Registry.open(tmp_path, url=url)
    assert "hunter2" not in str(info.value)


def test_a_newer_schema_is_refused(reg: Registry) -> None:
    with sqlite3.connect(reg.root / "registry.db") as conn:
        conn.execute("UPDATE registry_state SET schema_version = 99")
    with pytest.raises(RegistryError, match="newer than this visionflow"):
        Registry.open(reg.root)


# ---------------------------------------------------------------------------- concurrency


def _add_many(root: str, url: str | None, bundle: str, count: int, barrier: Any, out: Any) -> None:
    registry = Registry(root, url=url)
    barrier.wait()
    out.put([registry.add(bundle, name="race").version for _ in range(count)])


def race(root: Path, url: str | None, bundle: Path, count: int = 4) -> list[int]:
    """Two processes adding ``count`` versions each at the same time; every number given."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_add_many, args=(str(root), url, str(bundle), count, barrier, out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return sorted(results[0] + results[1])


def test_concurrent_adds_from_two_processes_get_distinct_versions(
    reg: Registry, bundle: Path
) -> None:
    numbers = race(reg.root, None, bundle)
    assert numbers == list(range(1, 9))
    for v in reg.versions("race"):
        reg.verify("race", v.version)
    assert sorted(os.listdir(reg.root / "artifacts" / "race")) == sorted(map(str, numbers))
    assert leftovers(reg) == []


def test_threads_share_one_registry(reg: Registry, bundle: Path) -> None:
    got: list[int] = []

    def add() -> None:
        got.extend(reg.add(bundle, name="threads").version for _ in range(3))

    threads = [threading.Thread(target=add) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 10))


# ---------------------------------------------------------------------------- CLI


def cli(*args: str) -> Any:
    # Imported here: worker processes import this module, and the CLI takes seconds to import.
    from typer.testing import CliRunner

    from visionflow.cli import app

    return CliRunner().invoke(app, list(args))


def invoke(root: Path, *args: str, code: int = 0) -> Any:
    result = cli("registry", *args, "--registry", str(root))
    assert result.exit_code == code, result.output
    return result


def test_cli_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    a = fake_bundle(tmp_path, "a", archive=True)
    b = fake_bundle(tmp_path, "b")
    added = json.loads(invoke(root, "add", str(a), "--name", "animals", "--json").stdout)
    assert added["version"] == 1
    out = invoke(root, "add", str(b), "-n", "animals", "--alias", "candidate").stdout
    assert "added animals v2 (aliases: candidate)" in out
    assert json.loads(invoke(root, "promote", "animals", "1", "--json").stdout)["version"] == 1
    assert "production -> animals v2" in invoke(root, "promote", "animals", "v2").stdout
    listing = json.loads(invoke(root, "list", "--json").stdout)
    aliases = {"candidate": 2, "production": 2}
    assert listing == [{"name": "animals", "versions": 2, "latest": 2, "aliases": aliases}]
    assert "animals" in invoke(root, "list").stdout
    versions = json.loads(invoke(root, "list", "animals", "--json").stdout)
    assert [v["version"] for v in versions] == [1, 2]
    assert "90.0% val" in invoke(root, "list", "animals").stdout
    shown = json.loads(invoke(root, "show", "animals", "--json").stdout)
    assert shown["version"] == 2 and shown["aliases"] == ["candidate", "production"]
    assert "resnet18" in invoke(root, "show", "animals", "1").stdout
    assert json.loads(invoke(root, "rollback", "animals", "--json").stdout)["version"] == 1
    invoke(root, "alias", "animals", "shadow", "2")
    invoke(root, "unalias", "animals", "shadow", "--json")
    invoke(root, "unalias", "animals", "candidate")
    result = invoke(root, "delete", "animals", "1", code=9)
    assert "still aliased ('production')" in result.output
    assert json.loads(invoke(root, "delete", "animals", "v2", "--json").stdout) == {
        "name": "animals",
        "version": 2,
        "deleted": True,
    }
    # Errors: a bad bundle exits 7, a bad name 9; both one line, no traceback.
    result = invoke(root, "add", str(tmp_path / "nope.vfb"), "--name", "animals", code=7)
    assert "Traceback" not in result.output
    invoke(root, "add", str(b), "--name", "Animals", code=9)
    invoke(root, "show", "animal", code=9)
    invoke(root, "rollback", "animals", code=9)


def test_cli_reads_the_registry_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "from-env"
    monkeypatch.setenv("VISIONFLOW_REGISTRY", str(root))
    monkeypatch.setenv("VISIONFLOW_REGISTRY_DB", f"sqlite:///{tmp_path / 'env.db'}")
    result = cli("registry", "add", str(fake_bundle(tmp_path)), "-n", "x")
    assert result.exit_code == 0, result.output
    assert (root / "artifacts" / "x" / "1").is_dir() and (tmp_path / "env.db").is_file()
    same = Registry(root, url=f"sqlite:///{tmp_path / 'env.db'}")
    assert isinstance(same.get("x", 1), ModelVersion)
