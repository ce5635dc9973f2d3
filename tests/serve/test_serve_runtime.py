"""Batching, back-pressure, timeouts, hooks, API keys and alias moves, with fake models."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_helpers import COLOURS, image_bytes, live

from visionflow.errors import ConfigError
from visionflow.serve import (
    ModelSource,
    PredictionHook,
    ServeSettings,
    StaticSource,
    VersionSelector,
    create_app,
)
from visionflow.serve.runtime import Batcher, ModelEntry, QueueFull, VersionInfo
from visionflow.serve.security import KeyStore, generate_key, hash_key

RED = base64.b64encode(image_bytes(COLOURS["red"])).decode()
BLUE = base64.b64encode(image_bytes(COLOURS["blue"])).decode()


class FakeModel:
    """Two classes, ``red`` when the red channel dominates; optionally slow."""

    graph = "fake.onnx"

    def __init__(self, delay: float = 0.0, tag: str = "fake") -> None:
        self.classes = ["blue", "red"]
        self.delay = delay
        self.meta = {"name": tag, "classes": self.classes}
        self.batches: list[int] = []
        self.gate: threading.Event | None = None

    def pixels(self, images):
        return np.stack([np.asarray(im.convert("RGB").resize((4, 4))) for im in images])

    def run(self, pixels):
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append(len(pixels))
        p = pixels.astype(np.float32)
        logits = np.stack([p[..., 2].mean((1, 2)), p[..., 0].mean((1, 2))], axis=1) / 20
        return logits, np.zeros((len(pixels), 2), np.float32)


def predict(client, name="fake", images=(RED,), headers=None, **kw):
    body = {"images": list(images), **kw}
    return client.post(f"/v1/models/{name}:predict", json=body, headers=headers)


# ------------------------------------------------------------------------------ batcher
def test_batcher_groups_concurrent_requests_and_keeps_them_whole():
    model = FakeModel()
    model.gate = threading.Event()  # hold the worker until everything is queued
    batcher = Batcher(model, max_batch=4, max_wait_s=0.05, capacity=100).start()
    try:
        pixels = np.zeros((1, 4, 4, 3), np.uint8)
        futures = [batcher.submit(pixels) for _ in range(3)]
        futures.append(batcher.submit(np.zeros((3, 4, 4, 3), np.uint8)))
        futures.append(batcher.submit(np.zeros((6, 4, 4, 3), np.uint8)))  # > max_batch: alone
        model.gate.set()
        shapes = [f.result(5).probabilities.shape for f in futures]
    finally:
        batcher.close(wait=True)
    assert shapes == [(1, 2)] * 3 + [(3, 2), (6, 2)]
    assert model.batches == [3, 3, 4, 2]  # 1+1+1, then 3, then 6 in chunks of 4


def test_batcher_refuses_beyond_capacity_and_skips_cancelled():
    model = FakeModel()
    model.gate = threading.Event()
    batcher = Batcher(model, max_batch=1, max_wait_s=0, capacity=2).start()
    try:
        one = np.zeros((1, 4, 4, 3), np.uint8)
        first = batcher.submit(one)
        time.sleep(0.1)  # the worker took it and waits at the gate
        queued = [batcher.submit(one), batcher.submit(one)]
        with pytest.raises(QueueFull):
            batcher.submit(one)
        queued[0].cancel()
        model.gate.set()
        first.result(5)
        queued[1].result(5)
    finally:
        batcher.close(wait=True)
    assert model.batches == [1, 1]


# ------------------------------------------------------------------------------ live server
def test_back_pressure_gives_503_with_retry_after():
    model = FakeModel(delay=0.15)
    settings = ServeSettings(queue=2, max_batch=1, max_wait_ms=0, warmup=False, threads=16)
    with live(create_app(settings, source=StaticSource({"fake": model}))) as srv:

        def call(_):
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                return predict(c)

        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(call, range(10)))
        busy = [r for r in responses if r.status_code == 503]
        assert busy and any(r.status_code == 200 for r in responses)
        assert all(r.headers["retry-after"] == "1" for r in busy)
        assert busy[0].json()["error"]["code"] == "queue_full"
        text = srv.client.get("/metrics").text
        assert 'visionflow_errors_total{code="queue_full"' in text


def test_timeout_gives_504_and_the_server_keeps_serving():
    model = FakeModel(delay=0.6)
    settings = ServeSettings(timeout_s=0.2, warmup=False)
    with live(create_app(settings, source=StaticSource({"fake": model}))) as srv:
        r = predict(srv.client)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        model.delay = 0.0
        time.sleep(0.6)
        assert predict(srv.client).status_code == 200


def test_selector_and_post_prediction_hooks():
    seen = []

    class Recorder(PredictionHook):
        def after_predict(self, event):
            seen.append((event.model, event.version, event.labels, event.probabilities.shape,
                         event.pixels.shape, event.request_id))  # fmt: skip

    class Broken(PredictionHook):
        def after_predict(self, event):
            raise RuntimeError("a hook failing must not hurt the client")

    class Pinned(VersionSelector):
        def select(self, ctx, entry):
            assert ctx.name == "fake" and ctx.endpoint == "v1.predict"
            return ctx.requested or 1

    app = create_app(ServeSettings(), source=StaticSource({"fake": FakeModel()}),
                     selector=Pinned(), hooks=[Broken(), Recorder()])  # fmt: skip
    with live(app) as srv:
        r = predict(srv.client, images=[RED, BLUE])
        assert r.status_code == 200 and [p["label"] for p in r.json()["predictions"]] == [
            "red", "blue"]  # fmt: skip
        srv.until(lambda: seen)
    assert seen == [("fake", 1, ["red", "blue"], (2, 2), (2, 4, 4, 3), r.json()["request_id"])]


def test_api_key_scopes(tmp_path):
    user, admin = generate_key(), generate_key()
    keys = tmp_path / "keys"
    keys.write_text(f"# who may call\npredict:{hash_key(user)}\nadmin:{hash_key(admin)}\n")
    settings = ServeSettings(api_keys=keys, cors=["https://app.example"])
    with live(create_app(settings, source=StaticSource({"fake": FakeModel()}))) as srv:
        c = srv.client
        r = predict(c)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert predict(c, headers={"x-api-key": "wrong"}).status_code == 401
        ok = predict(c, headers={"authorization": f"Bearer {user}"})
        assert ok.status_code == 200
        assert predict(c, headers={"x-api-key": admin}).status_code == 200  # admin implies
        assert c.get("/v1/models", headers={"x-api-key": user}).status_code == 200
        r = c.post("/v1/admin/refresh", headers={"x-api-key": user})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert c.post("/v1/admin/refresh", headers={"x-api-key": admin}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        r = c.options("/v1/models", headers={"origin": "https://app.example",
                                             "access-control-request-method": "GET"})  # fmt: skip
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_key_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "keys"
    bad.write_text(f"predict:{hash_key('a')}\nroot:{hash_key('b')}\n")
    with pytest.raises(ConfigError, match="line 2"):
        KeyStore.from_file(bad)
    bad.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no keys"):
        KeyStore.from_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        KeyStore.from_file(tmp_path / "missing")
    store = KeyStore.from_file(None)
    assert not store.enabled


# ------------------------------------------------------------------------------ alias moves
class MovingSource(ModelSource):
    """A registry stand-in: versions whose ``production`` alias tests move."""

    def __init__(self, models):
        super().__init__()
        self.models = models
        self.production = 1
        self.rev = 0

    def revision(self):
        return self.rev

    def scan(self):
        versions = {v: VersionInfo("m", v, ("production",) if v == self.production else ())
                    for v in self.models}  # fmt: skip
        return {"m": ModelEntry("m", versions, {"production": self.production})}

    def load(self, info):
        return self.models[info.version]


def test_alias_move_without_restart_and_without_failing_requests_in_flight():
    old, new = FakeModel(delay=0.0), FakeModel()
    source = MovingSource({1: old, 2: new})
    settings = ServeSettings(poll_s=0.05, warmup=False)
    with live(create_app(settings, source=source)) as srv:
        assert predict(srv.client, "m").json()["version"] == 1
        old.delay = 0.8
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=srv.url, timeout=30) as other:
            in_flight = pool.submit(predict, other, "m")
            time.sleep(0.2)
            source.production, source.rev = 2, 1
            srv.until(lambda: predict(srv.client, "m").json()["version"] == 2)
            answer = in_flight.result(10)
        assert answer.status_code == 200 and answer.json()["version"] == 1
        assert source.loaded("m", 1) is None  # retired once its last request finished
        # an explicit, un-aliased version is loaded on demand
        old.delay = 0.0
        r = predict(srv.client, "m", version=1)
        assert r.status_code == 200 and r.json()["version"] == 1
        listed = srv.client.get("/v1/models").json()["models"][0]
        assert listed["aliases"] == {"production": 2}


def test_open_server_on_a_public_interface_is_warned_about(caplog):
    settings = ServeSettings(host="0.0.0.0")
    with (
        caplog.at_level("WARNING", logger="visionflow.serve"),
        live(create_app(settings, source=StaticSource({"fake": FakeModel()}))),
    ):
        pass
    assert any("without API keys" in r.getMessage() for r in caplog.records)
