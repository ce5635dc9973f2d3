"""The bundle container: round trips, tamper detection, and archives that try to escape."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import stat
import struct
import tarfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest

import visionflow.export.bundle as bundle_mod
from visionflow.errors import BundleError
from visionflow.export.bundle import (
    ARCHIVE_SUFFIX,
    BUNDLE_FORMAT,
    MANIFEST,
    Bundle,
    Limits,
    open_bundle,
    pack,
    verify_bundle,
    write_bundle,
)

ONNX = b"\x08\x07\x12\x07pytorch" + bytes(range(256)) * 16
WEIGHTS = b"{}" + bytes(reversed(range(256))) * 8
CARD = "# cat-dog\n\nA tiny model card: é, 中文.\n"
META: dict[str, Any] = {
    "task": "classify",
    "backbone": "resnet18",
    "classes": ["cat", "dog"],
    "preprocessing": {"input_size": 224, "mean": [0.485, 0.456, 0.406]},
    "metrics": {"val": {"accuracy": 0.93}},
}


def tree(root: Path) -> set[str]:
    """Every path under ``root``, relative, so a test can see whatever was written."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def make_bundle(tmp_path: Path, name: str = "bundle") -> Path:
    src = tmp_path / "src_weights.safetensors"
    src.write_bytes(WEIGHTS)
    files = {
        "model.onnx": ONNX,
        "weights.safetensors": src,
        "README.md": CARD.encode(),
        "extra/labels.txt": b"cat\ndog\n",
    }
    return write_bundle(tmp_path / name, files, META)


def manifest_for(files: dict[str, bytes], fmt: str = BUNDLE_FORMAT) -> bytes:
    """A manifest built independently of the module, from the documented rules."""
    body: dict[str, Any] = {
        **META,
        "format": fmt,
        "files": {
            n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()
        },
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    body["checksum"] = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(body, indent=2, ensure_ascii=False).encode()


def hand_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    """A zip with exactly ``members``, duplicates and odd names included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def refuse_archive(tmp_path: Path, archive: Path, match: str, **kw: Any) -> None:
    """Opening ``archive`` fails with ``match`` and writes nothing anywhere under tmp_path."""
    cache = tmp_path / "cache"
    before = tree(tmp_path)
    with pytest.raises(BundleError, match=match):
        open_bundle(archive, cache_dir=cache, **kw)
    after = tree(tmp_path)
    assert after - before <= {"cache", "cache/bundles"}, after - before
    assert not list((cache / "bundles").iterdir()) if (cache / "bundles").exists() else True
    assert not (tmp_path.parent / "evil").exists()
    assert not Path("/tmp/visionflow-evil").exists()


# ---------------------------------------------------------------------------- round trips


def test_directory_round_trip(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path)
    meta = verify_bundle(folder)
    assert meta["format"] == BUNDLE_FORMAT
    assert meta["classes"] == ["cat", "dog"]
    assert meta["files"]["model.onnx"] == {
        "sha256": hashlib.sha256(ONNX).hexdigest(),
        "bytes": len(ONNX),
    }
    assert set(meta["files"]) == {
        "model.onnx",
        "weights.safetensors",
        "README.md",
        "extra/labels.txt",
    }
    on_disk = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    assert on_disk == meta

    b = open_bundle(folder)
    assert isinstance(b, Bundle)
    assert b.source == folder and b.path == folder
    assert b.file("model.onnx").read_bytes() == ONNX
    assert b.file("weights.safetensors").read_bytes() == WEIGHTS
    assert b.file("extra/labels.txt").read_bytes() == b"cat\ndog\n"
    assert b.has("README.md") and b.has(MANIFEST) and not b.has("model.int8.onnx")
    with pytest.raises(BundleError, match=r"no file 'model\.int8\.onnx'"):
        b.file("model.int8.onnx")
    # No temp siblings are left beside the bundle.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "src_weights.safetensors"]


def test_extra_files_in_a_directory_are_ignored_and_never_served(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path)
    (folder / "notes.txt").write_text("my notes")
    b = open_bundle(folder)
    assert not b.has("notes.txt")
    with pytest.raises(BundleError, match=r"notes\.txt"):
        b.file("notes.txt")


def test_archive_round_trip_is_deterministic_and_detected_by_content(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path)
    archive = pack(folder, tmp_path / f"m{ARCHIVE_SUFFIX}")
    again = pack(folder, tmp_path / "again.vfb")
    assert archive.read_bytes() == again.read_bytes()
    with zipfile.ZipFile(archive) as zf:
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
        assert zf.namelist()[0] == MANIFEST
    assert kinds["model.onnx"] == kinds["weights.safetensors"] == zipfile.ZIP_STORED
    assert kinds["README.md"] == kinds[MANIFEST] == zipfile.ZIP_DEFLATED

    renamed = tmp_path / "no_suffix"
    renamed.write_bytes(archive.read_bytes())
    cache = tmp_path / "cache"
    for path in (archive, renamed):
        b = open_bundle(path, cache_dir=cache)
        assert b.source == path
        assert b.path == cache / "bundles" / hashlib.sha256(archive.read_bytes()).hexdigest()
        assert b.meta == verify_bundle(folder)
        assert b.file("model.onnx").read_bytes() == ONNX
        assert b.file("README.md").read_text(encoding="utf-8") == CARD
        assert b.file("extra/labels.txt").read_bytes() == b"cat\ndog\n"


def test_default_cache_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    archive = pack(make_bundle(tmp_path), tmp_path / "m.vfb")
    monkeypatch.setenv("VISIONFLOW_CACHE", str(tmp_path / "envcache"))
    b = open_bundle(archive)
    assert b.path.parent == tmp_path / "envcache" / "bundles"


# ---------------------------------------------------------------------------- tampering


@pytest.mark.parametrize(
    "name", ["model.onnx", "weights.safetensors", "README.md", "extra/labels.txt"]
)
def test_a_flipped_byte_is_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    folder = make_bundle(tmp_path)
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{name} does not match its checksum \(tampered"):
        open_bundle(folder)
    with pytest.raises(BundleError, match="does not match its checksum"):
        pack(folder, tmp_path / "m.vfb")
    assert not (tmp_path / "m.vfb").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.vfb")]


def test_a_flipped_byte_anywhere_in_the_manifest_is_refused(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path)
    original = (folder / MANIFEST).read_bytes()
    # Every 7th byte, plus a value that stays valid JSON ("cat" -> "cbt").
    positions = [*range(0, len(original), 7), original.index(b'"cat"') + 2]
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 0x01
        (folder / MANIFEST).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=MANIFEST.replace(".", r"\.")) as info:
            verify_bundle(folder)
        msg = str(info.value)
        if pos == positions[-1]:
            assert "does not match its checksum" in msg


def test_truncated_missing_and_grown_files(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path)
    onnx = folder / "model.onnx"
    onnx.write_bytes(ONNX[:-10])
    with pytest.raises(BundleError, match=r"model\.onnx is truncated"):
        verify_bundle(folder)
    onnx.write_bytes(ONNX + b"x")
    with pytest.raises(BundleError, match=r"model\.onnx is larger than recorded"):
        verify_bundle(folder)
    onnx.unlink()
    with pytest.raises(BundleError, match=r"model\.onnx is missing"):
        verify_bundle(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"model\.json is missing"):
        open_bundle(folder)


def test_a_symlinked_file_in_a_directory_is_refused(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(ONNX)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match=r"model\.onnx is a symlink"):
        verify_bundle(folder)


def test_format_versions(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(ONNX)
    for fmt, match in [
        ("visionflow-bundle/2", r"newer than this visionflow.*upgrade"),
        ("visionflow-bundle/0", "unknown bundle format"),
        ("visionflow-bundle/x", "malformed format"),
        ("onnx-zoo/1", "not a visionflow bundle"),
    ]:
        (folder / MANIFEST).write_bytes(manifest_for({"model.onnx": ONNX}, fmt))
        with pytest.raises(BundleError, match=match):
            open_bundle(folder)
    # A later minor version only adds fields: accepted.
    (folder / MANIFEST).write_bytes(manifest_for({"model.onnx": ONNX}, "visionflow-bundle/1.3"))
    assert open_bundle(folder).meta["format"] == "visionflow-bundle/1.3"


def test_unknown_major_in_an_archive_is_refused_before_extracting(tmp_path: Path) -> None:
    files = {"model.onnx": ONNX}
    archive = hand_zip(
        tmp_path / "v2.vfb",
        [(MANIFEST, manifest_for(files, "visionflow-bundle/2")), ("model.onnx", ONNX)],
    )
    refuse_archive(tmp_path, archive, "newer than this visionflow")


def test_a_tampered_member_in_an_archive_is_refused(tmp_path: Path) -> None:
    bad = bytearray(ONNX)
    bad[100] ^= 0xFF
    archive = hand_zip(
        tmp_path / "t.vfb", [(MANIFEST, manifest_for({"model.onnx": ONNX})), ("model.onnx", bad)]
    )
    refuse_archive(tmp_path, archive, r"model\.onnx does not match its checksum")
    short = hand_zip(
        tmp_path / "s.vfb",
        [(MANIFEST, manifest_for({"model.onnx": ONNX})), ("model.onnx", ONNX[:50])],
    )
    refuse_archive(tmp_path, short, r"model\.onnx is truncated")
    long = hand_zip(
        tmp_path / "l.vfb",
        [(MANIFEST, manifest_for({"model.onnx": ONNX})), ("model.onnx", ONNX + b"xx")],
    )
    refuse_archive(tmp_path, long, r"model\.onnx.*more than the size model\.json records")


# ---------------------------------------------------------------------------- hostile archives


@pytest.mark.parametrize(
    ("member", "match"),
    [
        ("../evil", r"'\.\.' component"),
        ("a/../../evil", r"'\.\.' component"),
        ("/tmp/visionflow-evil", "absolute path"),
        ("..\\evil", "backslash"),
        ("C:evil", "drive letter"),
    ],
)
def test_escaping_names_are_refused(tmp_path: Path, member: str, match: str) -> None:
    files = {"model.onnx": ONNX, member: b"pwned"}
    archive = hand_zip(
        tmp_path / "x.vfb",
        [(MANIFEST, manifest_for(files)), ("model.onnx", ONNX), (member, b"pwned")],
    )
    refuse_archive(tmp_path, archive, match)


def test_symlink_and_device_members_are_refused(tmp_path: Path) -> None:
    for mode, match in [
        (stat.S_IFLNK | 0o777, "is a symlink"),
        (stat.S_IFCHR | 0o644, "not a regular"),
    ]:
        link = zipfile.ZipInfo("model.onnx")
        link.create_system = 3
        link.external_attr = mode << 16
        archive = hand_zip(
            tmp_path / "link.vfb",
            [(MANIFEST, manifest_for({"model.onnx": b"/etc/passwd"})), (link, b"/etc/passwd")],
        )
        refuse_archive(tmp_path, archive, match)


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    files = {"model.onnx": ONNX}
    for second in ("model.onnx", "MODEL.onnx"):
        archive = hand_zip(
            tmp_path / "dup.vfb",
            [(MANIFEST, manifest_for(files)), ("model.onnx", ONNX), (second, b"other")],
        )
        refuse_archive(tmp_path, archive, "appears more than once")
    twice = hand_zip(
        tmp_path / "dup2.vfb",
        [(MANIFEST, manifest_for(files)), (MANIFEST, manifest_for(files)), ("model.onnx", ONNX)],
    )
    refuse_archive(tmp_path, twice, "appears more than once")


def test_unlisted_members_and_folder_entries_are_refused(tmp_path: Path) -> None:
    files = {"model.onnx": ONNX}
    archive = hand_zip(
        tmp_path / "u.vfb",
        [(MANIFEST, manifest_for(files)), ("model.onnx", ONNX), ("run.sh", b"rm -rf ~")],
    )
    refuse_archive(tmp_path, archive, r"'run\.sh' is not listed in model\.json")
    folder = hand_zip(
        tmp_path / "f.vfb", [(MANIFEST, manifest_for(files)), ("sub/", b""), ("model.onnx", ONNX)]
    )
    refuse_archive(tmp_path, folder, "folder entry")
    missing = hand_zip(tmp_path / "m.vfb", [(MANIFEST, manifest_for(files))])
    refuse_archive(tmp_path, missing, r"model\.onnx is missing")
    bare = hand_zip(tmp_path / "n.vfb", [("model.onnx", ONNX)])
    refuse_archive(tmp_path, bare, r"no model\.json")


def test_too_many_members(tmp_path: Path) -> None:
    files = {f"f{i}.txt": b"x" for i in range(5)}
    archive = hand_zip(
        tmp_path / "many.vfb",
        [(MANIFEST, manifest_for(files)), *[(n, d) for n, d in files.items()]],
    )
    refuse_archive(
        tmp_path, archive, "6 members, more than the limit of 4", limits=Limits(max_files=4)
    )
    assert open_bundle(archive, cache_dir=tmp_path / "ok", limits=Limits(max_files=6)).has("f4.txt")


def test_zip_bombs_are_stopped(tmp_path: Path) -> None:
    zeros = bytes(4 << 20)  # deflates about 1000:1
    files = {"model.bin": zeros}
    members: list[tuple[str | zipfile.ZipInfo, bytes]] = [
        (MANIFEST, manifest_for(files)),
        ("model.bin", zeros),
    ]
    archive = hand_zip(tmp_path / "bomb.vfb", members)
    assert archive.stat().st_size < 64 << 10
    # Over the per-file or total limit by its header.
    refuse_archive(tmp_path, archive, "per-file limit", limits=Limits(max_file_bytes=1 << 20))
    refuse_archive(tmp_path, archive, "more than the limit", limits=Limits(max_total_bytes=2 << 20))
    # Within the size limits, but counted while streaming: the ratio gives it away.
    refuse_archive(tmp_path, archive, "compression bomb", limits=Limits(max_ratio=50))

    # Headers and manifest that both lie about the size (1000 bytes) are not believed either:
    # only 1000 bytes are ever decompressed, and they fail the member's CRC.
    lying = hand_zip(
        tmp_path / "lying.vfb",
        [(MANIFEST, manifest_for({"model.bin": zeros[:1000]})), ("model.bin", zeros)],
    )
    data = bytearray(lying.read_bytes())
    lying.unlink()
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("model.bin")
    struct.pack_into("<I", data, info.header_offset + 22, 1000)  # local header
    first = data.index(b"PK\x01\x02")
    central = data.index(b"PK\x01\x02", first + 1)  # the second central entry is model.bin
    struct.pack_into("<I", data, central + 24, 1000)
    liar = tmp_path / "liar.vfb"
    liar.write_bytes(bytes(data))
    with zipfile.ZipFile(liar) as zf:
        assert zf.getinfo("model.bin").file_size == 1000
    refuse_archive(
        tmp_path, liar, r"'model\.bin' is damaged", limits=Limits(max_file_bytes=1 << 20)
    )


def test_not_an_archive(tmp_path: Path) -> None:
    tar_path = tmp_path / "m.vfb"
    with tarfile.open(tar_path, "w") as tf:
        info = tarfile.TarInfo("../evil")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"pwned"))
    refuse_archive(tmp_path, tar_path, r"neither a bundle directory nor a \.vfb archive")
    broken = tmp_path / "broken.vfb"
    broken.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    refuse_archive(tmp_path, broken, "damaged")
    with pytest.raises(BundleError, match="no such bundle"):
        open_bundle(tmp_path / "nowhere.vfb")


# ---------------------------------------------------------------------------- cache


def test_the_cache_is_reused_and_repaired(tmp_path: Path) -> None:
    archive = pack(make_bundle(tmp_path), tmp_path / "m.vfb")
    cache = tmp_path / "cache"
    first = open_bundle(archive, cache_dir=cache)
    inode = first.file("model.onnx").stat().st_ino
    second = open_bundle(archive, cache_dir=cache)
    assert second.path == first.path
    assert second.file("model.onnx").stat().st_ino == inode  # not extracted again

    # A damaged cached copy is dropped and extracted afresh.
    first.file("model.onnx").write_bytes(b"garbage")
    third = open_bundle(archive, cache_dir=cache)
    assert third.path == first.path
    assert third.file("model.onnx").read_bytes() == ONNX
    assert [p.name for p in (cache / "bundles").iterdir()] == [first.path.name]


def test_losing_the_extraction_race_uses_the_winners_copy(tmp_path: Path, monkeypatch) -> None:
    archive = pack(make_bundle(tmp_path), tmp_path / "m.vfb")
    cache = tmp_path / "cache"
    real_reuse = bundle_mod._reuse

    def racing_reuse(dest: Path, manifest: Any) -> Any:
        found = real_reuse(dest, manifest)
        monkeypatch.setattr(bundle_mod, "_reuse", real_reuse)
        open_bundle(archive, cache_dir=cache)  # the other process finishes first
        return found

    monkeypatch.setattr(bundle_mod, "_reuse", racing_reuse)
    b = open_bundle(archive, cache_dir=cache)
    assert b.file("model.onnx").read_bytes() == ONNX
    assert [p.name for p in (cache / "bundles").iterdir()] == [b.path.name]


def test_concurrent_opens_agree(tmp_path: Path) -> None:
    archive = pack(make_bundle(tmp_path), tmp_path / "m.vfb")
    cache = tmp_path / "cache"
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(open_bundle(archive, cache_dir=cache).path)
        except Exception as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and isinstance(results[0], Path), results
    assert [p.name for p in (cache / "bundles").iterdir()] == [results[0].name]


# ---------------------------------------------------------------------------- writing


def test_overwrite_is_refused_unless_asked(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path)
    (folder / "old-notes.txt").write_text("old")
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        write_bundle(folder, {"model.onnx": b"new"}, META)
    assert verify_bundle(folder)["files"]["model.onnx"]["bytes"] == len(ONNX)
    write_bundle(folder, {"model.onnx": b"new"}, META, overwrite=True)
    assert open_bundle(folder).file("model.onnx").read_bytes() == b"new"
    assert not (folder / "old-notes.txt").exists()

    archive = pack(folder, tmp_path / "m.vfb")
    with pytest.raises(BundleError, match="already exists"):
        pack(folder, archive)
    pack(folder, archive, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bundle",
        "m.vfb",
        "src_weights.safetensors",
    ]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../x", r"'\.\.'"),
        ("/abs", "absolute"),
        ("a\\b", "backslash"),
        ("C:x", "drive letter"),
        (MANIFEST, "written by the bundle itself"),
        ("a//b", "empty"),
        ("", "non-empty"),
    ],
)
def test_write_refuses_bad_names(tmp_path: Path, name: str, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        write_bundle(tmp_path / "b", {name: b"x"}, META)
    assert tree(tmp_path) == set()


def test_write_refuses_clashes_missing_sources_and_bad_meta(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="clash"):
        write_bundle(tmp_path / "b", {"A.txt": b"1", "a.txt": b"2"}, META)
    with pytest.raises(BundleError, match="inside another listed file"):
        write_bundle(tmp_path / "b", {"a": b"1", "a/b": b"2"}, META)
    with pytest.raises(BundleError, match="does not exist"):
        write_bundle(tmp_path / "b", {"model.onnx": tmp_path / "nope.onnx"}, META)
    with pytest.raises(BundleError, match="cannot be written as JSON"):
        write_bundle(tmp_path / "b", {"model.onnx": b"x"}, {"bad": object()})
    with pytest.raises(BundleError, match="cannot be written as JSON"):
        write_bundle(tmp_path / "b", {"model.onnx": b"x"}, {"loss": float("nan")})
    assert tree(tmp_path) == set()


def test_the_writer_owns_format_files_and_checksum(tmp_path: Path) -> None:
    meta = {**META, "format": "mine/9", "files": "x", "checksum": "y", 3: (1, 2)}
    folder = write_bundle(tmp_path / "b", {"model.onnx": ONNX}, meta)
    got = verify_bundle(folder)
    assert got["format"] == BUNDLE_FORMAT
    assert list(got["files"]) == ["model.onnx"]
    assert got["3"] == [1, 2]


def test_no_pickle_and_no_torch_in_the_module() -> None:
    tree_ = ast.parse(Path(bundle_mod.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree_):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"pickle", "torch", "numpy", "dill", "joblib", "shelve", "marshal"}
    assert os.path.basename(bundle_mod.__file__) == "bundle.py"
