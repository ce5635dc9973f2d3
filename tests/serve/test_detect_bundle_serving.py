"""A real exported detector bundle served end to end: BundleSource -> DetectionBundleModel on
ONNX Runtime -> v1 and v2 answers that match the bundle's own ``detect``."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import live

from visionflow.serve import BundleSource, ServeSettings, create_app

CLASSES = ["apple", "leaf"]
SIZES = [(64, 48), (48, 64), (40, 40), (56, 56), (50, 40)]  # train 0-2, val 3, test 4
THRESHOLD = 0.2  # an untrained SSDlite scores each of 2 classes + background about 1/3


def _pixels(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (220, 30, 30)
    return pixels


@pytest.fixture(scope="module")
def detect_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny SSDlite (timm ``test_efficientnet``, 64 px) written as a finished
    detection run (the training loop's contract) and exported with parity checks."""
    import torch

    from visionflow.data.detection import DetectionIndex, DetectionSample
    from visionflow.data.index import Split
    from visionflow.export.exporter import export_run
    from visionflow.models.detection import build_detector, detector_info
    from visionflow.train.checkpoint import save_weights

    root = tmp_path_factory.mktemp("detect")
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    try:
        model = build_detector(
            "ssdlite", backbone="test_efficientnet", num_classes=len(CLASSES), img_size=64
        )
        samples = []
        for k, (w, h) in enumerate(SIZES):
            path = root / "data" / f"img{k}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(_pixels(w, h, k)).save(path)
            box = (w // 4, h // 4, w // 2, h // 2)
            samples.append(
                DetectionSample(path=path, width=w, height=h, boxes=(box,), labels=("apple",))
            )
        run = root / "run"
        run.mkdir()
        save_weights(run / "model.safetensors", model)
        meta = {
            "task": "detect",
            "classes": CLASSES,
            "detector": detector_info(model),
            "score_threshold": THRESHOLD,
        }
        (run / "model.json").write_text(json.dumps(meta))
        DetectionIndex(root=root / "data", samples=samples, classes=CLASSES).save(
            run / "index.json"
        )
        split = Split(train=[0, 1, 2], val=[3], test=[4])
        (run / "split.json").write_text(json.dumps(split.to_json()))
        (run / "metrics.json").write_text(json.dumps({"val": {"map_50": 0.1}, "test": {}}))
        return export_run(run, root / "det.vfb").path
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(state)


def test_a_real_detection_bundle_is_served_like_its_own_detect(detect_bundle):
    from visionflow.export.runtime import load_bundle

    images = [
        Image.fromarray(_pixels(w, h, 10 + k)) for k, (w, h) in enumerate([(72, 54), (40, 60)])
    ]
    encoded = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    local = load_bundle(detect_bundle, threads=1)
    want = local.detect(images)
    assert sum(len(d) for d in want) > 0  # something to compare

    settings = ServeSettings(threads=4, ort_threads=1)
    app = create_app(settings, source=BundleSource(detect_bundle, name="fruit"))
    with live(app) as srv:
        c = srv.client
        (model,) = c.get("/v1/models").json()["models"]
        assert (model["name"], model["task"], model["classes"]) == ("fruit", "detect", CLASSES)

        r = c.post("/v1/models/fruit:predict", json={"images": encoded})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "detect" and body["threshold"] == THRESHOLD
        for got, expected in zip(body["predictions"], want, strict=True):
            assert (got["width"], got["height"]) == (expected.width, expected.height)
            assert [d["label"] for d in got["detections"]] == expected.labels
            boxes = np.array([d["box"] for d in got["detections"]]).reshape(-1, 4)
            np.testing.assert_allclose(boxes, expected.boxes, atol=0.01)
            assert all(d["score"] >= THRESHOLD for d in got["detections"])

        strict = c.post("/v1/models/fruit:predict", json={"images": encoded, "threshold": 0.99})
        assert all(p["detections"] == [] for p in strict.json()["predictions"])

        meta = c.get("/v2/models/fruit").json()
        assert meta["parameters"]["score_threshold"] == THRESHOLD
        tensor = {"name": "images", "shape": [1], "datatype": "BYTES", "data": encoded[:1]}
        r = c.post("/v2/models/fruit/infer", json={"inputs": [tensor]})
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["labels"]["data"] == want[0].labels
        np.testing.assert_allclose(out["scores"]["data"], want[0].scores, atol=1e-5)
        assert out["boxes"]["shape"] == [len(want[0]), 4]
        metrics = c.get("/metrics").text
        assert 'visionflow_detections_per_image_count{model="fruit",version="1"} 5.0' in metrics
