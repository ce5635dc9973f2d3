"""Feedback on a live server (by request id, by upload; durable, idempotent, checked), the
export to a dataset folder, and ``visionflow retrain --from-feedback`` to a candidate."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import COLOURS, image_bytes, live

from visionflow.serve import BundleSource, ServeSettings, create_app
from visionflow.serve.feedback import FeedbackStore, RequestCache, export_dataset


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback") / "store"


@pytest.fixture(scope="module")
def server(serve_bundle, store_dir):
    settings = ServeSettings(feedback=store_dir, threads=4, drift=False)
    app = create_app(settings, source=BundleSource(serve_bundle, name="colours"))
    with live(app) as srv:
        yield srv


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.json()
    return response.json()["error"]["message"]


def rows(store_dir) -> list[tuple]:
    with sqlite3.connect(store_dir / "feedback.db") as conn:
        return conn.execute(
            "SELECT id, image_sha256, label, model, version, request_id, predicted FROM feedback"
            " ORDER BY id"
        ).fetchall()


def test_feedback_by_request_id_is_durable_and_idempotent(server, store_dir):
    c = server.client
    red, blue = image_bytes(COLOURS["red"], seed=1), image_bytes(COLOURS["blue"], seed=2)
    files = [("files", ("a.png", red, "image/png")), ("files", ("b.png", blue, "image/png"))]
    r = c.post("/v1/models/colours:predict", files=files, headers={"x-request-id": "req-1"})
    assert r.status_code == 200 and r.json()["request_id"] == "req-1"
    r = c.post("/v1/feedback", json={"request_id": "req-1", "index": 1, "label": "green"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["label"] == "green" and body["model"] == "colours" and body["version"] == 1
    assert body["predicted"] == "blue" and body["duplicate"] is False
    sha = hashlib.sha256(blue).hexdigest()
    assert body["image_sha256"] == sha
    stored = store_dir / "images" / sha[:2] / f"{sha}.png"
    assert stored.read_bytes() == blue  # the image as uploaded, saved once by content
    assert rows(store_dir)[-1] == (body["id"], sha, "green", "colours", 1, "req-1", "blue")
    # the same image and label again (by id or by upload): the first entry, nothing new
    again = c.post("/v1/feedback", json={"request_id": "req-1", "index": 1, "label": "green"})
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert again.json()["duplicate"] is True
    up = c.post("/v1/feedback", json={"image": b64(blue), "model": "colours", "label": "green"})
    assert up.status_code == 200 and up.json()["id"] == body["id"]
    assert len(rows(store_dir)) == 1
    assert len(list((store_dir / "images").rglob("*.png"))) == 1
    # JSON predict requests are kept too (base64 images)
    r = c.post("/v1/models/colours:predict", json={"images": [b64(red)]})
    rid = r.json()["request_id"]
    r = c.post("/v1/feedback", json={"request_id": rid, "label": "red"})
    assert r.status_code == 201 and r.json()["predicted"] == "red"


def test_feedback_by_upload(server, store_dir):
    c = server.client
    green = image_bytes(COLOURS["green"], "JPEG", seed=3)
    r = c.post(
        "/v1/feedback",
        files={"file": ("g.jpg", green, "image/jpeg")},
        data={"label": "green", "model": "colours"},
    )
    assert r.status_code == 201, r.text
    sha = r.json()["image_sha256"]
    assert (store_dir / "images" / sha[:2] / f"{sha}.jpg").is_file()
    assert r.json()["request_id"] is None and r.json()["predicted"] is None
    r = c.post("/v1/feedback", json={"image": b64(green), "model": "colours", "label": "red",
                                     "version": "production"})  # fmt: skip
    assert r.status_code == 201  # another label for the same image: a new entry, same file
    assert len(list((store_dir / "images").rglob(f"{sha}.*"))) == 1


def test_bad_feedback_is_refused(server, store_dir):
    c = server.client
    before = len(rows(store_dir))
    png = image_bytes(COLOURS["red"], seed=9)
    error(c.post("/v1/feedback", json={"request_id": "never-seen", "label": "red"}), 404,
          "unknown_request")  # fmt: skip
    message = error(
        c.post("/v1/feedback", json={"image": b64(png), "model": "colours", "label": "redd"}),
        422, "unknown_label",
    )  # fmt: skip
    assert message.startswith("label:") and "did you mean 'red'" in message
    error(c.post("/v1/feedback", json={"image": b64(b"not an image at all"), "model": "colours",
                                       "label": "red"}), 422, "not_an_image")  # fmt: skip
    error(c.post("/v1/feedback", json={"image": b64(png), "label": "red"}), 422, "missing_field")
    error(c.post("/v1/feedback", json={"image": b64(png), "model": "colours"}), 422,
          "missing_field")  # fmt: skip
    error(c.post("/v1/feedback", json={"image": b64(png), "model": "nope", "label": "red"}),
          404, "unknown_model")  # fmt: skip
    error(c.post("/v1/feedback", json={"image": b64(png), "model": "colours", "label": "../x"}),
          422, "invalid_field")  # fmt: skip
    error(c.post("/v1/feedback", json={"image": "%%%", "model": "colours", "label": "red"}),
          422, "bad_base64")  # fmt: skip
    error(c.post("/v1/feedback", json={"label": "red", "extra": 1}), 422, "invalid_field")
    error(c.post("/v1/feedback", content=b"label=red"), 415, "unsupported_media_type")
    r = c.post("/v1/models/colours:predict", json={"images": [b64(png)]})
    error(c.post("/v1/feedback", json={"request_id": r.json()["request_id"], "index": 3,
                                       "label": "red"}), 422, "invalid_field")  # fmt: skip
    assert len(rows(store_dir)) == before


def test_export_writes_a_folder_per_class(server, store_dir, tmp_path):
    summary = export_dataset(store_dir, tmp_path / "ds")
    ds = tmp_path / "ds"
    files = sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*.*"))
    assert summary["images"] == len(files) == 3  # blue->green, red, the JPEG (newest: red)
    assert {f.split("/")[0] for f in files} == {"green", "red"}
    assert summary["conflicts"] and "kept the newest, 'red'" in summary["conflicts"][0]
    assert list((store_dir / "images").rglob("*.*"))  # copies: the store keeps its images
    with pytest.raises(Exception, match="not an empty folder"):
        export_dataset(store_dir, tmp_path / "ds")


def test_feedback_off_and_request_cache_bounds(serve_bundle, tmp_path):
    app = create_app(ServeSettings(drift=False), source=BundleSource(serve_bundle, name="m"))
    with live(app) as srv:
        r = srv.client.post("/v1/feedback", json={"request_id": "x", "label": "red"})
        error(r, 404, "feedback_disabled")
    cache = RequestCache(max_requests=2, max_bytes=10, max_age_s=60)
    from visionflow.serve.feedback import CachedRequest

    for i in range(3):
        cache.put(str(i), CachedRequest("m", 1, "", b"abcd", [], 1e12))
    assert cache.get("0") is None and cache.get("2") is not None and len(cache) == 2
    cache.put("big", CachedRequest("m", 1, "", b"x" * 11, [], 1e12))  # larger than the cache
    assert cache.get("big") is None
    store = FeedbackStore(tmp_path / "s", create=False)
    with pytest.raises(Exception, match="not a feedback store"):
        store.entries()


def test_retrain_from_feedback_registers_a_candidate(trained_run, tmp_path):
    from typer.testing import CliRunner

    from visionflow._io import read_json
    from visionflow.cli import app
    from visionflow.registry.store import Registry

    index = read_json(trained_run / "index.json")
    first = index["samples"][0]
    original = Path(index["root"]) / first["path"]
    wrong = next(c for c in index["classes"] if c != first["label"])
    store = FeedbackStore(tmp_path / "store")
    with Image.open(original) as im:
        fmt = im.format
    store.add(original.read_bytes(), label=wrong, model="colours", image_format=fmt)
    store.add(image_bytes(COLOURS["green"], seed=40), label="green", model="colours",
              image_format="PNG")  # fmt: skip
    store.add(image_bytes(COLOURS["red"], seed=41), label="red", model="other",
              image_format="PNG")  # another model's feedback: left out  # fmt: skip
    result = CliRunner().invoke(app, [
        "retrain", str(trained_run), "--from-feedback", str(tmp_path / "store"),
        "--model", "colours", "--registry", str(tmp_path / "registry"),
        "--out", str(tmp_path / "runs"), "--run-name", "again", "--epochs", "2", "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    merge = out["merge"]
    assert merge["added"] == 1 and merge["original"] == len(index["samples"])
    assert len(merge["relabelled"]) == 1 and f"-> {wrong!r}" in merge["relabelled"][0]
    data = tmp_path / "runs" / "again-data"
    assert {p.name for p in data.iterdir()} <= {"train", "val", "test"}
    assert sum(1 for p in data.rglob("*") if p.is_file()) == len(index["samples"]) + 1
    assert original.is_file()  # the original data is never moved
    registry = Registry.open(tmp_path / "registry")
    version = registry.get("colours", "candidate")
    assert version.version == 1 and out["registered"]["version"] == 1
    assert (tmp_path / "runs" / "again" / "model.vfb").is_file()
