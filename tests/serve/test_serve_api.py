"""The server on a real bundle, over TCP: every endpoint, both input forms, every bad input."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from serve_helpers import COLOURS, image_bytes, live

from visionflow.serve import BundleSource, ServeSettings, create_app

SETTINGS = {"max_body_mb": 0.25, "max_pixels": 250_000, "max_images": 8, "threads": 4}


@pytest.fixture(scope="module")
def server(serve_bundle):
    app = create_app(ServeSettings(**SETTINGS), source=BundleSource(serve_bundle, name="colours"))
    with live(app) as srv:
        yield srv


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body["error"]["message"]


# ------------------------------------------------------------------------------ happy paths
def test_health_readiness_and_model_listing(server):
    c = server.client
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 200
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").status_code == 200
    assert c.get("/v2").json()["name"] == "visionflow"
    (model,) = c.get("/v1/models").json()["models"]
    assert model["name"] == "colours" and model["classes"] == ["blue", "green", "red"]
    assert model["aliases"] == {"production": 1} and model["versions"][0]["loaded"] is True
    assert c.get("/v1/models/colours").json()["default_version"] == 1
    assert c.get("/docs").status_code == 200
    assert "/v1/models/{name}:predict" in c.get("/openapi.json").json()["paths"]


def test_multipart_with_several_images(server):
    files = [
        ("files", (f"{name}.png", image_bytes(rgb, seed=i), "image/png"))
        for i, (name, rgb) in enumerate(COLOURS.items())
    ]
    files.append(("files", ("red.jpg", image_bytes(COLOURS["red"], "JPEG"), "image/jpeg")))
    r = server.client.post("/v1/models/colours:predict", files=files, params={"topk": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "colours" and body["version"] == 1
    assert r.headers["x-model-version"] == "1"
    assert r.headers["x-request-id"] == body["request_id"]
    labels = [p["label"] for p in body["predictions"]]
    assert labels == ["blue", "green", "red", "red"]
    for p in body["predictions"]:
        assert len(p["topk"]) == 2 and p["topk"][0]["label"] == p["label"]
        assert p["probability"] == p["topk"][0]["probability"] > 0.5


def test_json_base64_with_topk_version_and_request_id(server):
    payload = {
        "images": [
            b64(image_bytes(COLOURS["green"])),
            "data:image/png;base64," + b64(image_bytes(COLOURS["blue"])),
        ],
        "topk": 1,
        "version": "production",
    }
    r = server.client.post(
        "/v1/models/colours:predict", json=payload, headers={"x-request-id": "abc-123"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == ["green", "blue"]
    assert all(len(p["topk"]) == 1 for p in preds)
    r = server.client.post(
        "/v1/models/colours:predict", params={"version": "1"},
        json={"images": [b64(image_bytes(COLOURS["red"]))]},
    )  # fmt: skip
    assert r.json()["version"] == 1 and r.json()["predictions"][0]["label"] == "red"


def test_kserve_v2_metadata_ready_and_infer(server):
    c = server.client
    meta = c.get("/v2/models/colours").json()
    assert meta["platform"] == "onnxruntime" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "label": "BYTES", "probability": "FP32", "probabilities": "FP32"}  # fmt: skip
    assert c.get("/v2/models/colours/versions/1").json()["versions"] == ["1"]
    assert c.get("/v2/models/colours/ready").json()["ready"] is True
    assert c.get("/v2/models/colours/versions/1/ready").status_code == 200
    data = [b64(image_bytes(COLOURS[n])) for n in ("red", "blue")]
    request = {"id": "q1", "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                       "data": data}]}  # fmt: skip
    r = c.post("/v2/models/colours/infer", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "colours" and body["model_version"] == "1" and body["id"] == "q1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"]["data"] == ["red", "blue"] and out["label"]["datatype"] == "BYTES"
    probs = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(probs.max(axis=1), out["probability"]["data"])
    request["outputs"] = [{"name": "label"}]
    r = c.post("/v2/models/colours/versions/1/infer", json=request)
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]


def test_metrics_count_requests_predictions_and_batches(server):
    server.client.post("/v1/models/colours:predict",
                       json={"images": [b64(image_bytes(COLOURS["red"]))]})  # fmt: skip
    text = server.client.get("/metrics").text
    assert 'visionflow_requests_total{endpoint="/v1/models/{name}:predict",method="POST",' \
           'model="colours",status="200",version="1"}' in text  # fmt: skip
    assert 'visionflow_predictions_total{label="red",model="colours",version="1"}' in text
    assert 'visionflow_batch_size_count{model="colours",version="1"}' in text
    assert 'visionflow_confidence_bucket{le="1.0",model="colours",version="1"}' in text
    assert 'visionflow_queue_depth{model="colours",version="1"} 0.0' in text
    assert "visionflow_request_duration_seconds_bucket" in text


# ------------------------------------------------------------------------------ bad inputs
def _post(server, **kw):
    return server.client.post("/v1/models/colours:predict", **kw)


def test_every_bad_input_gets_a_clear_json_error(server):
    png = image_bytes(COLOURS["red"])
    assert error(_post(server, files=[("files", ("a.txt", b"hello world", "text/plain"))]),
                 422, "not_an_image")  # fmt: skip
    error(_post(server, files=[("files", ("a.png", png[: len(png) // 2], "image/png"))]),
          422, "corrupt_image")  # fmt: skip
    big = io.BytesIO()
    Image.new("RGB", (600, 600)).save(big, "PNG")  # 360k pixels > 250k, tiny file
    assert "limit" in error(_post(server, files=[("files", ("big.png", big.getvalue()))]),
                            413, "image_too_large")  # fmt: skip
    error(_post(server, content=b"x" * 300_000, headers={"content-type": "application/json"}),
          413, "body_too_large")  # fmt: skip
    assert "'files'" in error(_post(server, files=[("image", ("a.png", png))]),
                              422, "missing_field")  # fmt: skip
    error(_post(server, data={"files": "not a file"}, files=[("other", ("a.png", png))]),
          422, "invalid_field")  # fmt: skip
    error(_post(server, json={"imgs": [b64(png)]}), 422, "invalid_field")
    error(_post(server, json={"topk": 2}), 422, "missing_field")
    error(_post(server, json={"images": [b64(png)], "topk": "many"}), 422, "invalid_field")
    error(_post(server, params={"topk": 0}, json={"images": [b64(png)]}), 422, "invalid_request")
    error(_post(server, files=[("files", ("a.png", b"", "image/png"))]), 422, "empty_upload")
    error(_post(server, json={"images": []}), 422, "empty_upload")
    error(_post(server, json={"images": ["***not base64***"]}), 422, "bad_base64")
    error(_post(server, json={"images": [b64(png)] * 9}), 413, "too_many_images")
    error(_post(server, content=b"{not json", headers={"content-type": "application/json"}),
          422, "invalid_json")  # fmt: skip
    error(_post(server, content=png, headers={"content-type": "image/png"}),
          415, "unsupported_media_type")  # fmt: skip
    error(_post(server, content=b"images=1"), 415, "unsupported_media_type")


def test_unknown_model_version_and_route(server):
    c = server.client
    msg = error(c.post("/v1/models/colour:predict", json={"images": ["AA=="]}),
                404, "unknown_model")  # fmt: skip
    assert "did you mean 'colours'" in msg
    error(c.get("/v1/models/nope"), 404, "unknown_model")
    png = b64(image_bytes(COLOURS["red"]))
    msg = error(_post(server, params={"version": "7"}, json={"images": [png]}),
                404, "unknown_version")  # fmt: skip
    assert "production" in msg
    error(_post(server, json={"images": [png], "version": "staging"}), 404, "unknown_version")
    error(c.get("/v2/models/colours/versions/3"), 404, "unknown_version")
    error(c.get("/v2/models/other/ready"), 404, "unknown_model")
    error(c.get("/v1/nothing-here"), 404, "not_found")
    error(c.delete("/v1/models/colours"), 405, "method_not_allowed")


def test_v2_bad_requests(server):
    c = server.client
    png = b64(image_bytes(COLOURS["red"]))
    url = "/v2/models/colours/infer"

    def tensor(**kw):
        return {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [png]}
                           | kw]}  # fmt: skip

    error(c.post(url, json={"inputs": []}), 422, "missing_field")
    error(c.post(url, json=tensor(datatype="FP32")), 422, "invalid_field")
    error(c.post(url, json=tensor(name="pixels")), 422, "invalid_field")
    error(c.post(url, json=tensor(shape=[2])), 422, "invalid_field")
    error(c.post(url, json=tensor(data=["%%%"])), 422, "bad_base64")
    error(c.post(url, json=tensor() | {"outputs": [{"name": "logits"}]}), 422, "invalid_field")
    error(c.post(url, content=b"x", headers={"content-type": "text/plain"}),
          415, "unsupported_media_type")  # fmt: skip
    error(c.post("/v2/models/colours/versions/9/infer", json=tensor()), 404, "unknown_version")


def test_cors_is_off_by_default(server):
    r = server.client.options(
        "/v1/models", headers={"origin": "https://example.com",
                               "access-control-request-method": "GET"})  # fmt: skip
    assert "access-control-allow-origin" not in r.headers
