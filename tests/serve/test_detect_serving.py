"""Serving detectors with fake models: v1 and v2 answers, thresholds, back-pressure, metrics,
drift and feedback refusals, hooks, and shadow/canary rollouts between detection versions."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import COLOURS, image_bytes, live

from visionflow.prediction import Detections, as_list, to_image
from visionflow.serve import (
    ModelSource,
    PredictionHook,
    ServeSettings,
    StaticSource,
    create_app,
)
from visionflow.serve._detect import agreement, check_threshold, strongest_labels
from visionflow.serve._errors import ServeError
from visionflow.serve.runtime import DetectionRunner, ModelEntry, QueueFull, VersionInfo
from visionflow.serve.security import ApiKey, KeyStore

#: What the fake detector finds in any image: (label, score, box as fractions of the image).
OBJECTS = [
    ("cat", 0.9, (0.1, 0.1, 0.5, 0.5)),
    ("dog", 0.5, (0.5, 0.5, 0.9, 0.9)),
    ("cat", 0.2, (0.0, 0.0, 1.0, 1.0)),
]


class FakeDetector:
    """The contract of ``visionflow.export.detect_runtime.DetectionBundleModel``: finds
    ``OBJECTS`` (less the ``missing`` labels) scaled to each image's own size."""

    task = "detect"

    def __init__(self, *, missing=(), delay=0.0, gate=None, threshold=0.3, broken=False):
        self.classes = ["cat", "dog"]
        self.meta = {"task": "detect", "classes": self.classes, "name": "boxes"}
        self.version_info = {"name": "boxes", "backbone": "fake", "created_at": None}
        self.score_threshold = threshold
        self.missing, self.delay, self.gate, self.broken = set(missing), delay, gate, broken
        self.seen: list[tuple[tuple[int, int], float | None]] = []  # (size, threshold) per image

    def detect(self, inputs, *, score_threshold=None, max_pixels=40_000_000):
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        if self.broken:
            raise RuntimeError("the detector is broken")
        t = self.score_threshold if score_threshold is None else score_threshold
        out = []
        for item in as_list(inputs):
            image, source = to_image(item, max_pixels)
            w, h = image.size
            self.seen.append(((w, h), score_threshold))
            kept = [o for o in OBJECTS if o[1] >= t and o[0] not in self.missing]
            boxes = np.array([[x1 * w, y1 * h, x2 * w, y2 * h] for _, _, (x1, y1, x2, y2) in kept])
            out.append(
                Detections(
                    source=source,
                    width=w,
                    height=h,
                    boxes=boxes.reshape(-1, 4).astype(np.float32),
                    scores=np.array([o[1] for o in kept], np.float32),
                    labels=[o[0] for o in kept],
                )
            )
        return out


class FakeClassifier:
    """A classifier beside the detector (``red`` when the red channel dominates)."""

    def __init__(self) -> None:
        self.classes = ["blue", "red"]
        self.meta = {"classes": self.classes}

    def pixels(self, images):
        return np.stack([np.asarray(im.convert("RGB").resize((4, 4))) for im in images])

    def run(self, pixels):
        p = pixels.astype(np.float32)
        logits = np.stack([p[..., 2].mean((1, 2)), p[..., 0].mean((1, 2))], axis=1) / 20
        return logits, np.zeros((len(pixels), 2), np.float32)


class Versions(ModelSource):
    """Model ``m`` in several versions, ``production`` on version 1."""

    def __init__(self, models) -> None:
        super().__init__()
        self.models = dict(models)

    def scan(self):
        infos = {v: VersionInfo("m", v, ("production",) if v == 1 else ()) for v in self.models}
        return {"m": ModelEntry("m", infos, {"production": 1})}

    def load(self, info):
        return self.models[info.version]


class Recorder(PredictionHook):
    def __init__(self) -> None:
        self.events = []

    def after_predict(self, event):
        self.events.append(event)


def picture(width: int, height: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def expected(width: int, height: int, threshold: float) -> list[dict]:
    return [
        {"label": label, "score": score, "box": [x1 * width, y1 * height, x2 * width, y2 * height]}
        for label, score, (x1, y1, x2, y2) in OBJECTS
        if score >= threshold
    ]


def same(found: list[dict], want: list[dict]) -> bool:
    return [d["label"] for d in found] == [d["label"] for d in want] and all(
        np.allclose(d["box"], w["box"], atol=0.01) and abs(d["score"] - w["score"]) < 1e-6
        for d, w in zip(found, want, strict=True)
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    recorder = Recorder()
    detector = FakeDetector()
    source = StaticSource({"boxes": detector, "colours": FakeClassifier()})
    settings = ServeSettings(
        threads=4, max_pixels=200_000, feedback=tmp_path_factory.mktemp("feedback")
    )
    with live(create_app(settings, source=source, hooks=[recorder])) as srv:
        srv.detector, srv.recorder = detector, recorder
        yield srv


# ------------------------------------------------------------------------------ v1
def test_v1_answers_boxes_in_each_images_own_pixels(server):
    c = server.client
    files = [
        ("files", ("a.png", picture(64, 48), "image/png")),
        ("files", ("b.jpg", picture(100, 80, "JPEG"), "image/jpeg")),
    ]
    r = c.post("/v1/models/boxes:predict", files=files, headers={"x-request-id": "det-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "version", "request_id", "task", "threshold", "predictions"}
    assert (body["model"], body["version"], body["task"]) == ("boxes", 1, "detect")
    assert body["request_id"] == "det-1" == r.headers["x-request-id"]
    assert r.headers["x-model-version"] == "1"
    assert body["threshold"] == 0.3  # the model's own
    (a, b) = body["predictions"]
    assert (a["width"], a["height"], b["width"], b["height"]) == (64, 48, 100, 80)
    assert same(a["detections"], expected(64, 48, 0.3))
    assert same(b["detections"], expected(100, 80, 0.3))

    # the threshold: JSON field, query parameter, form field; the body's wins over the query
    r = c.post(
        "/v1/models/boxes:predict", json={"images": [b64(picture(50, 40))], "threshold": 0.6}
    )
    assert r.json()["threshold"] == 0.6
    assert same(r.json()["predictions"][0]["detections"], expected(50, 40, 0.6))
    r = c.post("/v1/models/boxes:predict", params={"threshold": 0.1},
               json={"images": [b64(picture(50, 40))]})  # fmt: skip
    assert len(r.json()["predictions"][0]["detections"]) == 3
    r = c.post("/v1/models/boxes:predict", params={"threshold": 0.1},
               files=[("files", ("a.png", picture(30, 30), "image/png"))],
               data={"threshold": "0.95"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["threshold"] == 0.95 and r.json()["predictions"][0]["detections"] == []
    assert server.detector.seen[-1] == ((30, 30), 0.95)

    listing = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert listing["boxes"]["task"] == "detect" and listing["boxes"]["classes"] == ["cat", "dog"]
    assert listing["colours"]["task"] == "classify"


def test_v1_thresholds_are_validated_and_options_must_fit_the_task(server):
    c = server.client
    one = {"images": [b64(picture(20, 20))]}
    for bad in ("1.5", "-0.1", "nan", "high"):
        msg = error(c.post("/v1/models/boxes:predict", params={"threshold": bad}, json=one),
                    422, "invalid_request")  # fmt: skip
        assert "threshold" in msg
    for bad in (1.5, -1, "high", True, [0.5]):
        msg = error(c.post("/v1/models/boxes:predict", json={**one, "threshold": bad}),
                    422, "invalid_field")  # fmt: skip
        assert "threshold" in msg and "between 0 and 1" in msg
    form = c.post("/v1/models/boxes:predict", data={"threshold": "2"},
                  files=[("files", ("a.png", picture(20, 20), "image/png"))])  # fmt: skip
    assert "threshold" in error(form, 422, "invalid_field")
    msg = error(c.post("/v1/models/boxes:predict", json={**one, "topk": 2}), 422, "invalid_field")
    assert "detector" in msg and "threshold" in msg
    msg = error(c.post("/v1/models/colours:predict", json={**one, "threshold": 0.5}),
                422, "invalid_field")  # fmt: skip
    assert "classifier" in msg and "topk" in msg
    # the classifier beside it answers as before
    r = c.post("/v1/models/colours:predict", json={"images": [b64(image_bytes(COLOURS["red"]))]})
    assert r.status_code == 200 and set(r.json()) == {"model", "version", "request_id",
                                                      "predictions"}  # fmt: skip
    assert r.json()["predictions"][0]["label"] == "red"
    # unreadable and oversized images: the classifier's answers
    error(c.post("/v1/models/boxes:predict", json={"images": [b64(b"not an image")]}),
          422, "not_an_image")  # fmt: skip
    error(c.post("/v1/models/boxes:predict", json={"images": [b64(picture(20, 20)[:60])]}),
          422, "corrupt_image")  # fmt: skip
    error(c.post("/v1/models/boxes:predict", json={"images": [b64(picture(600, 400))]}),
          413, "image_too_large")  # fmt: skip


def test_openapi_documents_both_answers(server):
    spec = server.client.get("/openapi.json").json()
    predict = spec["paths"]["/v1/models/{name}:predict"]["post"]
    schema = predict["responses"]["200"]["content"]["application/json"]["schema"]
    refs = {item["$ref"].rsplit("/", 1)[-1] for item in schema["anyOf"]}
    assert refs == {"ClassifyResponse", "DetectResponse"}
    detect = spec["components"]["schemas"]["DetectResponse"]["properties"]
    assert {"task", "threshold", "predictions"} <= set(detect)
    params = {p["name"]: p for p in predict["parameters"]}
    assert params["threshold"]["schema"]["anyOf"][0]["maximum"] == 1


# ------------------------------------------------------------------------------ v2
def test_v2_metadata_and_infer_for_a_detector(server):
    c = server.client
    meta = c.get("/v2/models/boxes").json()
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [1]}]
    assert meta["outputs"] == [
        {"name": "boxes", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "scores", "datatype": "FP32", "shape": [-1]},
        {"name": "labels", "datatype": "BYTES", "shape": [-1]},
    ]
    assert meta["parameters"]["task"] == "detect" and meta["parameters"]["score_threshold"] == 0.3
    assert [o["name"] for o in c.get("/v2/models/colours").json()["outputs"]] == [
        "label", "probability", "probabilities"]  # fmt: skip

    tensor = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(picture(80, 60))]}
    r = c.post("/v2/models/boxes/infer", json={"id": "q7", "inputs": [tensor]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("boxes", "1", "q7")
    assert body["parameters"] == {"width": 80, "height": 60, "threshold": 0.3}
    out = {o["name"]: o for o in body["outputs"]}
    want = expected(80, 60, 0.3)
    assert out["boxes"]["shape"] == [2, 4] and out["boxes"]["datatype"] == "FP32"
    assert np.allclose(np.reshape(out["boxes"]["data"], (2, 4)), [w["box"] for w in want])
    assert np.allclose(out["scores"]["data"], [0.9, 0.5]) and out["scores"]["shape"] == [2]
    assert out["labels"] == {"name": "labels", "datatype": "BYTES", "shape": [2],
                             "data": ["cat", "dog"]}  # fmt: skip

    request = {"inputs": [tensor], "outputs": [{"name": "labels"}],
               "parameters": {"threshold": 0.7}}  # fmt: skip
    r = c.post("/v2/models/boxes/versions/1/infer", json=request)
    assert r.json()["outputs"] == [{"name": "labels", "datatype": "BYTES", "shape": [1],
                                    "data": ["cat"]}]  # fmt: skip

    two = {**tensor, "shape": [2], "data": tensor["data"] * 2}
    msg = error(c.post("/v2/models/boxes/infer", json={"inputs": [two]}), 422, "invalid_field")
    assert "one image per v2 request" in msg
    msg = error(c.post("/v2/models/boxes/infer",
                       json={"inputs": [tensor], "outputs": [{"name": "probabilities"}]}),
                422, "invalid_field")  # fmt: skip
    assert "detector" in msg and "boxes" in msg
    msg = error(c.post("/v2/models/colours/infer",
                       json={"inputs": [tensor], "outputs": [{"name": "boxes"}]}),
                422, "invalid_field")  # fmt: skip
    assert "classifier" in msg
    for bad in ({"threshold": 3}, {"threshold": "x"}, "0.5"):
        r = c.post("/v2/models/boxes/infer", json={"inputs": [tensor], "parameters": bad})
        assert "parameters" in error(r, 422, "invalid_field")
    bad_image = {**tensor, "data": [b64(b"garbage")]}
    error(c.post("/v2/models/boxes/infer", json={"inputs": [bad_image]}), 422, "not_an_image")


# ------------------------------------------------------------------------------ monitoring
def test_metrics_hooks_drift_and_feedback_for_a_detector(server):
    c = server.client
    before = len(server.recorder.events)
    r = c.post("/v1/models/boxes:predict", json={"images": [b64(picture(40, 30))] * 2})
    assert r.status_code == 200, r.text
    server.until(lambda: len(server.recorder.events) > before)
    event = server.recorder.events[-1]
    assert event.task == "detect" and event.threshold == 0.3 and event.labels == ["cat", "cat"]
    assert [d.labels for d in event.detections] == [["cat", "dog"]] * 2
    assert [im.size for im in event.images] == [(40, 30)] * 2
    assert event.probabilities.shape == (2, 0) and event.pixels.shape[0] == 2

    metrics = c.get("/metrics").text
    assert 'visionflow_detections_total{label="dog",model="boxes",version="1"}' in metrics
    per_image = 'visionflow_detections_per_image_bucket{le="2.0",model="boxes",version="1"}'
    assert per_image in metrics
    assert 'visionflow_detection_score_count{model="boxes",version="1"}' in metrics
    assert 'visionflow_predictions_total{label="cat"' not in metrics  # not a classifier's
    assert 'visionflow_batch_size_count{model="boxes",version="1"}' in metrics

    drift = c.get("/v1/models/boxes/drift").json()
    assert drift["status"] == "unsupported" and not drift["alert"]
    assert "visionflow_detection_score" in drift["message"]
    assert c.get("/v1/models/boxes/drift.html").status_code == 200

    msg = error(c.post("/v1/feedback", json={"label": "cat", "request_id": r.json()["request_id"]}),
                422, "unsupported_task")  # fmt: skip
    assert "detector" in msg and "boxes" in msg
    upload = {"label": "cat", "model": "boxes", "image": b64(picture(10, 10))}
    error(c.post("/v1/feedback", json=upload), 422, "unsupported_task")
    red = {"label": "red", "model": "colours", "image": b64(image_bytes(COLOURS["red"]))}
    assert c.post("/v1/feedback", json=red).status_code == 201  # classifiers: as before


def test_detection_queue_refuses_beyond_capacity_and_skips_cancelled():
    gate = threading.Event()
    detector = FakeDetector(gate=gate)
    runner = DetectionRunner(detector, capacity=2, name="boxes-v1").start()
    small, large = Image.new("RGB", (8, 6)), Image.new("RGB", (12, 10))
    try:
        first = runner.submit([small], threshold=0.6)
        time.sleep(0.1)  # the worker took it and waits at the gate
        queued = [runner.submit([large]), runner.submit([small])]
        with pytest.raises(QueueFull):
            runner.submit([small])
        queued[0].cancel()
        gate.set()
        assert [d.labels for d in first.result(5)] == [["cat"]]
        (found,) = queued[1].result(5)
    finally:
        runner.close(wait=True)
    assert (found.width, found.height, found.labels) == (8, 6, ["cat", "dog"])
    assert [size for size, _ in detector.seen] == [(8, 6), (8, 6)]  # the cancelled one never ran
    with pytest.raises(ServeError, match="shutting down"):
        runner.submit([small])


def test_back_pressure_and_failures_answer_like_the_classifier():
    detector = FakeDetector(delay=0.15)
    settings = ServeSettings(queue=1, warmup=False, threads=16)
    source = StaticSource({"boxes": detector, "broken": FakeDetector(broken=True)})
    with live(create_app(settings, source=source)) as srv:

        def call(_):
            with httpx.Client(base_url=srv.url, timeout=30) as client:
                return client.post("/v1/models/boxes:predict",
                                   json={"images": [b64(picture(16, 16))]})  # fmt: skip

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(call, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.json()["error"]["code"] == "queue_full" and busy.headers["retry-after"] == "1"
        r = srv.client.post("/v1/models/broken:predict", json={"images": [b64(picture(8, 8))]})
        assert "request id" in error(r, 500, "internal_error")
        assert "Traceback" not in r.text


# ------------------------------------------------------------------------------ rollouts
ADMIN, USER = "vf_admin_key_for_detect_tests", "vf_predict_key_for_detect_tests"
KEYS = KeyStore(
    [
        ApiKey("admin", hashlib.sha256(ADMIN.encode()).digest()),
        ApiKey("predict", hashlib.sha256(USER.encode()).digest()),
    ]
)
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}
AS_USER = {"authorization": f"Bearer {USER}"}


def test_shadow_and_canary_between_two_detection_versions():
    gate = threading.Event()
    candidate = FakeDetector(missing={"dog"}, gate=gate)  # finds half of production's objects
    source = Versions({1: FakeDetector(), 2: candidate, 3: FakeClassifier()})
    app = create_app(ServeSettings(threads=8, warmup=False), source=source, keys=KEYS)
    one = {"images": [b64(picture(32, 24))]}
    with live(app) as srv:
        c = srv.client

        def put(policy):
            return c.put("/v1/admin/models/m/rollout", json=policy, headers=AS_ADMIN)

        def status():
            return c.get("/v1/admin/models/m/rollout/status", headers=AS_ADMIN).json()

        assert put({"mode": "shadow", "shadow": {"candidate": "2"}}).status_code == 200
        answers = [c.post("/v1/models/m:predict", json=one, headers=AS_USER) for _ in range(6)]
        assert {(r.status_code, r.json()["version"]) for r in answers} == {(200, 1)}
        assert all(len(r.json()["predictions"][0]["detections"]) == 2 for r in answers)
        gate.set()
        srv.until(lambda: (status()["shadow"] or {}).get("compared_images") == 6)
        shadow = status()["shadow"]
        assert shadow["agreement"] == 0.5 and shadow["failed"] == 0 and shadow["dropped"] == 0
        assert 'visionflow_shadow_agreement{model="m",version="2"} 0.5' in c.get("/metrics").text
        assert [t for _, t in candidate.seen[-6:]] == [0.3] * 6  # production's threshold

        canary = {"candidate": "2", "percent": 50, "min_requests": 1000}
        assert put({"mode": "canary", "canary": canary}).status_code == 200
        served = {}
        for i in range(24):
            r = c.post(
                "/v1/models/m:predict", json=one, headers={**AS_USER, "x-client-id": f"c{i}"}
            )
            assert r.status_code == 200 and r.json()["task"] == "detect", r.text
            served[i] = (r.json()["version"], len(r.json()["predictions"][0]["detections"]))
        assert {v for v, _ in served.values()} == {1, 2}
        assert all(n == (2 if v == 1 else 1) for v, n in served.values())
        assert status()["canary"]["verdict"] == "pending"

        r = put({"mode": "split", "split": {"1": 50, "3": 50}})
        msg = error(r, 422, "invalid_policy")
        assert "classif" in msg and "detect" in msg and "version 3" in msg


# ------------------------------------------------------------------------------ helpers
def _found(boxes, labels, scores=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.linspace(0.9, 0.5, len(labels)) if scores is None else np.asarray(scores)
    return Detections("<x>", 100, 100, boxes, np.asarray(scores, np.float32), list(labels))


def test_agreement_threshold_and_strongest_label():
    a = _found([[0, 0, 10, 10], [20, 20, 40, 40]], ["cat", "dog"])
    assert agreement(a, a) == 1.0
    assert agreement(_found([], []), _found([], [])) == 1.0
    assert agreement(a, _found([], [])) == 0.0
    assert agreement(a, _found([[1, 1, 10, 10]], ["cat"])) == 0.5  # IoU 0.81, dog missing
    assert agreement(a, _found([[0, 0, 10, 10], [20, 20, 40, 40]], ["dog", "cat"])) == 0.0
    assert agreement(a, _found([[5, 5, 15, 15], [20, 20, 40, 40]], ["cat", "dog"])) == 0.5
    # one-to-one: two predictions on one object match once
    twice = _found([[0, 0, 10, 10], [0, 0, 10, 10]], ["cat", "cat"])
    assert agreement(twice, _found([[0, 0, 10, 10]], ["cat"])) == 0.5
    weak_first = _found([[0, 0, 1, 1]] * 2, ["x", "y"], [0.1, 0.7])
    assert strongest_labels([a, _found([], []), weak_first]) == ["cat", "", "y"]
    assert check_threshold("0.25") == 0.25 and check_threshold(1) == 1.0
    for bad in ("inf", float("nan"), None, 2):
        with pytest.raises(ServeError, match="threshold"):
            check_threshold(bad)
