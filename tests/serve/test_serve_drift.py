"""Drift monitoring on a live server: a calm window stays quiet, a shifted one alerts; JSON,
HTML and Prometheus views of the same report."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from serve_helpers import COLOURS, live

from visionflow.export.runtime import load_bundle
from visionflow.serve import ServeSettings, StaticSource, create_app

SETTINGS = {"drift_window": 120, "drift_min_samples": 40, "drift_interval_s": 0.0,
            "max_images": 64, "threads": 4}  # fmt: skip


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def training_like(n: int, seed: int) -> list[bytes]:
    """Images drawn like the training set (tests/conftest.py: class colour + noise of +-40)."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS.values())
    out = []
    for i in range(n):
        noise = rng.integers(-40, 41, size=(32, 32, 3))
        pixels = np.clip(np.asarray(colours[i % 3])[None, None] + noise, 0, 255)
        out.append(png(pixels.astype(np.uint8)))
    return out


def shifted(n: int, seed: int) -> list[bytes]:
    """Inverted, darkened training-like images: what a broken camera might send."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 25, size=(32, 32, 3)).astype(np.uint8)
        out.append(png(pixels))
    return out


@pytest.fixture(scope="module")
def server(serve_bundle):
    source = StaticSource({"calm": load_bundle(serve_bundle), "shifted": load_bundle(serve_bundle)})
    with live(create_app(ServeSettings(**SETTINGS), source=source)) as srv:
        yield srv


def send(srv, name: str, images: list[bytes]) -> None:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = srv.client.post(f"/v1/models/{name}:predict", files=files)
    assert r.status_code == 200, r.text


def report(srv, name: str, samples: int) -> dict:
    """The report once the hook has seen ``samples`` images (hooks run after the answer)."""
    seen = {}

    def ready() -> bool:
        seen.update(srv.client.get(f"/v1/models/{name}/drift").json())
        return seen.get("samples", 0) >= samples

    srv.until(ready)
    return seen


def test_collecting_then_no_alert_on_training_like_images(server):
    send(server, "calm", training_like(10, seed=100))
    early = report(server, "calm", 10)
    assert early["status"] == "collecting" and early["alert"] is False
    send(server, "calm", training_like(50, seed=101))
    rep = report(server, "calm", 60)
    assert rep["model"] == "calm" and rep["version"] == 1 and rep["window"] == 120
    assert rep["status"] == "ok" and rep["alert"] is False, rep["tests"]
    names = {t["test"] for t in rep["tests"]}
    assert {"embedding_pc0", "predicted_classes", "confidence"} <= names
    assert all(0.0 <= t["p_adjusted"] <= 1.0 for t in rep["tests"])
    assert set(rep["classes"]) == {"blue", "green", "red"}
    assert abs(sum(c["live"] for c in rep["classes"].values()) - 1.0) < 1e-6


def test_alert_on_shifted_images_after_min_samples(server):
    send(server, "shifted", shifted(20, seed=5))
    rep = report(server, "shifted", 20)
    assert rep["status"] == "collecting" and rep["alert"] is False  # below min_samples
    send(server, "shifted", shifted(40, seed=6))
    rep = report(server, "shifted", 60)
    assert rep["status"] == "drift" and rep["alert"] is True
    assert rep["min_p_adjusted"] < rep["alpha"]
    assert rep["drift_score"] > 0.5
    assert rep["image"]["brightness"]["live_median"] < 0.1
    # the window is bounded: old images leave it
    send(server, "shifted", shifted(64, seed=7))
    send(server, "shifted", shifted(64, seed=8))
    assert report(server, "shifted", 120)["samples"] == 120


def test_gauges_html_and_errors(server):
    send(server, "calm", training_like(3, seed=102))
    report(server, "calm", 3)
    text = server.client.get("/metrics").text
    assert 'visionflow_drift_alert{model="shifted",version="1"} 1.0' in text
    assert 'visionflow_drift_alert{model="calm",version="1"} 0.0' in text
    assert 'visionflow_drift_score{model="calm",version="1"}' in text
    assert 'visionflow_drift_p_value{model="shifted",test="embedding_pc0",version="1"}' in text
    assert 'visionflow_drift_window_samples{model="shifted",version="1"} 120.0' in text
    r = server.client.get("/v1/models/shifted/drift.html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "ALERT" in r.text and "data:image/png;base64," in r.text
    r = server.client.get("/v1/models/nope/drift")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
    r = server.client.get("/v1/models/calm/drift", params={"version": "7"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_version"


def test_drift_can_be_switched_off(serve_bundle):
    source = StaticSource({"m": load_bundle(serve_bundle)})
    app = create_app(ServeSettings(drift=False), source=source)
    with live(app) as srv:
        r = srv.client.get("/v1/models/m/drift")
        assert r.status_code == 404 and r.json()["error"]["code"] == "drift_disabled"
        assert "visionflow_drift" not in srv.client.get("/metrics").text
