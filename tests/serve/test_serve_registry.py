"""A registry-backed server picks up a newly promoted version without a restart."""

from __future__ import annotations

import base64

import pytest
from serve_helpers import COLOURS, image_bytes, live

from visionflow.serve import RegistrySource, ServeSettings, create_app

registry_store = pytest.importorskip("visionflow.registry.store")


def test_registry_source_follows_promotions(serve_bundle, tmp_path):
    registry = registry_store.Registry.open(tmp_path / "registry")
    registry.add(serve_bundle, name="colours", aliases=["production"])
    registry.add(serve_bundle, name="shapes")  # no production alias yet
    settings = ServeSettings(poll_s=0.1)
    source = RegistrySource(tmp_path / "registry")
    image = {"images": [base64.b64encode(image_bytes(COLOURS["red"])).decode()]}
    with live(create_app(settings, source=source)) as srv:
        c = srv.client
        r = c.post("/v1/models/colours:predict", json=image)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert r.json()["predictions"][0]["label"] == "red"
        listed = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert listed["colours"]["classes"] == ["blue", "green", "red"]
        assert listed["shapes"]["aliases"] == {}
        r = c.post("/v1/models/shapes:predict", json=image)
        assert r.status_code == 404 and "explicitly" in r.json()["error"]["message"]
        assert c.post("/v1/models/shapes:predict?version=1", json=image).status_code == 200

        v2 = registry.add(serve_bundle, name="colours", aliases=["candidate"])
        registry.promote("colours", v2.version)
        srv.until(lambda: c.post("/v1/models/colours:predict", json=image).json()["version"] == 2)
        assert c.get("/v2/models/colours").json()["parameters"]["version"] == "2"
        assert c.post("/v1/models/colours:predict", json=image | {"version": "1"}).json()[
            "version"] == 1  # fmt: skip
        metrics = c.get("/metrics").text
        assert 'visionflow_model_loaded{model="colours",version="2"} 1.0' in metrics
