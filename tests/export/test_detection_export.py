"""Detection export end to end: run -> ONNX graph with post-processing -> verified bundle ->
ONNX Runtime detections that match PyTorch, and ``visionflow predict`` on detectors."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

import visionflow
from visionflow.cli import app
from visionflow.data.detection import DetectionIndex, DetectionSample
from visionflow.data.index import Split
from visionflow.errors import BundleError, CheckpointError, ExportError
from visionflow.export.detect_cli import drawing_paths
from visionflow.export.detect_runtime import DetectionBundleModel, run_detection_graph
from visionflow.export.detection import (
    _excused,
    _export_transform_class,
    check_detection_parity,
    export_detector,
    load_detector_run,
    torch_detect,
)
from visionflow.export.exporter import export_run
from visionflow.export.runtime import load_bundle, make_session
from visionflow.models.detection import build_detector, detector_info
from visionflow.train.checkpoint import save_weights

runner = CliRunner()
CLASSES = ["apple", "leaf", "sky"]
#: (width, height) of the run's images: split train 0-3, val 4-6, test 7.
SIZES = [(64, 48), (48, 64), (40, 40), (90, 30), (56, 56), (30, 70), (64, 64), (50, 40)]


@pytest.fixture(autouse=True)
def _seeded_single_thread() -> Iterator[None]:
    """Fixed, restored RNG and one intra-op thread (tiny models on a shared 2-core machine)."""
    state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.random.set_rng_state(state)


def _tiny(name: str, **kwargs: object) -> Any:
    """An untrained detector on timm's ``test_efficientnet`` (64 px): seconds to export."""
    torch.manual_seed(0)
    kwargs.setdefault("fpn_channels", 32)
    return build_detector(name, backbone="test_efficientnet", num_classes=3, img_size=64, **kwargs)  # type: ignore[arg-type]


def _pixels(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (220, 30, 30)
    return pixels


def _write_run(root: Path, model: torch.nn.Module, *, score_threshold: float) -> Path:
    """A finished detection run as the training loop writes it (the export contract)."""
    data = root / "data"
    data.mkdir(parents=True)
    samples = []
    for k, (w, h) in enumerate(SIZES):
        path = data / f"img{k}.png"
        Image.fromarray(_pixels(w, h, k)).save(path)
        box = (w // 4, h // 4, w // 2, h // 2)
        samples.append(
            DetectionSample(path=path, width=w, height=h, boxes=(box,), labels=("apple",))
        )
    index = DetectionIndex(root=data, samples=samples, classes=list(CLASSES))
    run = root / "run"
    run.mkdir()
    save_weights(run / "model.safetensors", model)
    meta = {
        "task": "detect",
        "classes": CLASSES,
        "detector": detector_info(model),
        "score_threshold": score_threshold,
    }
    (run / "model.json").write_text(json.dumps(meta))
    index.save(run / "index.json")
    split = Split(train=[0, 1, 2, 3], val=[4, 5, 6], test=[7])
    (run / "split.json").write_text(json.dumps(split.to_json()))
    metrics = {"val": {"map": 0.12, "map_50": 0.34, "images": 3}, "test": {"map_50": 0.5}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture(scope="module")
def ssd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # an untrained SSDlite scores every class about 1/4: 0.25 keeps some of its boxes
    return _write_run(tmp_path_factory.mktemp("ssd"), _tiny("ssdlite"), score_threshold=0.25)


@pytest.fixture(scope="module")
def ssd_bundle(ssd_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "det.vfb"
    export_run(ssd_run, out)
    return out


def _val_images(run: Path) -> list[Path]:
    return [run.parent / "data" / f"img{k}.png" for k in (4, 5, 6)]


def test_bundle_detects_like_the_run_it_came_from(ssd_bundle, ssd_run, tmp_path):
    moved = tmp_path / "elsewhere.vfb"  # no run directory next to it
    shutil.copyfile(ssd_bundle, moved)
    model = visionflow.load(moved)
    assert isinstance(model, DetectionBundleModel) and model.task == "detect"
    assert model.classes == CLASSES and model.score_threshold == 0.25
    torch_model, meta = load_detector_run(ssd_run)
    images = _val_images(ssd_run)
    ours = model.detect(images)
    theirs = torch_detect(torch_model, meta["classes"], images, score_threshold=0.25)
    assert sum(len(d) for d in ours) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert (a.source, a.width, a.height) == (b.source, b.width, b.height)
        assert a.labels == b.labels
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        assert (a.scores >= 0.25).all() and (np.diff(a.scores) <= 0).all()
    # every kind of input gives the same answer; a stricter threshold keeps fewer boxes
    with Image.open(images[0]) as opened:
        pil = opened.convert("RGB")
    same = model.detect([pil, np.asarray(pil), images[0].read_bytes()])
    assert all(np.array_equal(d.boxes, ours[0].boxes) for d in same)
    assert model.predict(images[0], score_threshold=1.0)[0].boxes.shape == (0, 4)
    assert model.version_info["detector"] == "ssdlite"


def test_bundle_evaluates_on_a_labelled_dataset(ssd_bundle, ssd_run, tmp_path):
    from visionflow.data.detection import write_detection

    index = DetectionIndex.load(ssd_run / "index.json")
    write_detection(index, tmp_path / "coco", format="coco", images="copy")
    metrics = visionflow.load(ssd_bundle).evaluate(tmp_path / "coco")
    assert metrics["images"] == len(SIZES) and metrics["gt_boxes"] == len(SIZES)
    assert 0.0 <= metrics["map_50"] <= 1.0 and metrics["skipped"] == []
    assert set(metrics["per_class"]) == set(CLASSES)


def test_manifest_records_parity_and_the_detection_contract(ssd_bundle, tmp_path):
    meta = load_bundle(ssd_bundle, cache_dir=tmp_path).meta
    assert meta["task"] == "detect" and meta["classes"] == CLASSES
    assert set(meta["files"]) == {"model.onnx", "weights.safetensors", "README.md"}
    assert meta["detector"]["name"] == "ssdlite" and meta["backbone"] == "test_efficientnet"
    assert meta["inputs"]["image"] == {"dtype": "uint8", "shape": ["height", "width", 3]}
    assert meta["outputs"]["labels"]["base"] == 0
    parity = meta["graphs"]["fp32"]["parity"]
    assert parity["images"] == 3 + 3 and parity["probes"] == 3  # 3 val images + 3 probes
    assert parity["detections"] > 0 and parity["matched"] == parity["detections"]
    assert parity["max_box_diff"] <= 1e-3 and parity["max_score_diff"] <= 1e-5
    assert parity["label_agreement"] == 1.0 and parity["count_agreement"] == 1.0
    assert meta["metrics"]["val"]["map_50"] == 0.34 and meta["score_threshold"] == 0.25
    card = (load_bundle(ssd_bundle, cache_dir=tmp_path).bundle.file("README.md")).read_text()
    assert "`ssdlite`" in card and "`apple`" in card and "34.0" in card and "uint8" in card


def test_int8_graph_is_calibrated_measured_and_loadable(ssd_run, tmp_path):
    result = export_run(ssd_run, tmp_path / "int8.vfb", int8=True, calibration_images=4)
    int8 = result.meta["graphs"]["int8"]
    assert int8["settings"]["calibration"] == {"method": "minmax", "images": 4}
    assert (
        int8["val_map_50"] is not None and result.meta["graphs"]["fp32"]["val_map_50"] is not None
    )
    assert int8["accepted"] == (int8["drop"] <= 0.01)
    assert result.default_graph == ("model.int8.onnx" if int8["accepted"] else "model.onnx")
    model = load_bundle(result.path, graph="int8", cache_dir=tmp_path / "cache")
    assert isinstance(model, DetectionBundleModel) and model.graph == "model.int8.onnx"
    found = model.detect(_val_images(ssd_run)[0], score_threshold=0.0)[0]
    assert len(found) > 0 and set(found.labels) <= set(CLASSES)
    with pytest.raises(BundleError, match="graph must be 'default' or one of"):
        load_bundle(result.path, graph="fp16", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["fcos", "retinanet", "fasterrcnn_fpn"])
def test_fpn_detectors_export_and_match_pytorch_at_any_image_size(name, tmp_path):
    model = _tiny(name, score_thresh=0.005).eval()
    head = getattr(model, "head", None)
    if head is not None:
        # untrained RetinaNet/FCOS heads score every anchor alike (the 0.01 prior): ties that
        # no export can order as PyTorch does; a trained head's scores differ
        with torch.no_grad():
            for conv in head.classification_head.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(conv.weight)
            head.classification_head.cls_logits.bias.fill_(-2.0)
    session = make_session(export_detector(model, tmp_path / "m.onnx"), threads=1)
    # long sides 41 and 49: a float32 resize (torchvision's traced one) makes them 63 and 64
    # px instead of eager PyTorch's 64 and 63; tall, wide, tiny and upscaled images
    sizes = [(64, 48), (41, 30), (20, 49), (90, 30), (12, 60), (8, 8), (200, 130)]
    images = [_pixels(w, h, k) for k, (w, h) in enumerate(sizes)]
    parity = check_detection_parity(model, session, images, score_threshold=0.005)
    # an untrained Faster R-CNN fills the 100-detection cap of some images: the 100th and
    # 101st can swap by float noise (1e-7 apart), which the check excuses (exempt, one on
    # each side) rather than calls a disagreement
    assert parity.detections > 0 and parity.detections - parity.matched <= parity.exempt <= 2
    assert parity.max_box_diff <= 1e-2 and parity.max_score_diff <= 1e-4


def test_export_transform_sizes_images_exactly_as_eager_pytorch():
    model = _tiny("fcos").eval()
    patched = _export_transform_class(type(model.transform))
    for w, h in [(41, 30), (20, 49), (100, 100), (77, 500), (3, 7)]:
        x = torch.rand(3, h, w)
        want, _ = model.transform.resize(x)
        model.transform.__class__ = patched
        try:
            got, _ = model.transform.resize(x)
        finally:
            model.transform.__class__ = patched.__mro__[1]
        assert got.shape == want.shape and torch.equal(got, want)


def test_no_detections_gives_empty_outputs_from_a_graph_traced_with_some(tmp_path):
    model = _tiny("ssdlite", score_thresh=0.0123).eval()  # the example image has detections
    path = export_detector(model, tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    patched = 0
    for init in graph.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype == np.float32 and value.size == 1 and np.isclose(value.item(), 0.0123):
            init.CopyFrom(numpy_helper.from_array(np.full_like(value, 0.999), init.name))
            patched += 1
    assert patched == 1  # the score threshold, now one nothing reaches
    onnx.save(graph, str(tmp_path / "none.onnx"))
    pixels = _pixels(50, 40, 0)
    before = run_detection_graph(make_session(path, threads=1), pixels)
    boxes, scores, labels = run_detection_graph(make_session(tmp_path / "none.onnx"), pixels)
    assert len(before[1]) > 0
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)
    assert labels.dtype == np.int64


def test_parity_check_fails_on_a_graph_of_other_weights(ssd_run, tmp_path):
    model: Any = load_detector_run(ssd_run)[0]
    session = make_session(export_detector(model, tmp_path / "m.onnx"), threads=1)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ExportError, match=r"disagrees with PyTorch.*no partner"):
        check_detection_parity(model, session, [_pixels(56, 56, 4)], score_threshold=0.25)


def test_only_float_rounding_excuses_a_missing_detection():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 15], [50, 50, 60, 60]], dtype=np.float32)
    own = (boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([1, 1, 2]))
    other = np.array([0.9, 0.4], np.float32)

    def excused(k: int, threshold: float = 0.3, full: int = 100) -> bool:
        return _excused(k, own, other, threshold, 1e-3, 2 / 3, full)  # IoU(0, 1) = 2/3

    assert excused(1)  # box 1 lost to NMS at an IoU equal to the NMS threshold
    assert not excused(2)  # a lone, confident box: a real disagreement
    assert excused(2, threshold=0.6995)  # at the display threshold
    assert excused(2, full=3)  # the weakest of a list cut at detections_per_img


def test_tampered_bundle_is_refused(ssd_bundle, tmp_path):
    folder = tmp_path / "bundle_dir"  # the directory form of the same bundle
    shutil.copytree(load_bundle(ssd_bundle, cache_dir=tmp_path / "cache").bundle.path, folder)
    graph = folder / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match its checksum"):
        visionflow.load(folder)


def test_refusals_name_the_problem(ssd_run, tmp_path):
    with pytest.raises(ExportError, match="--fp16 is not offered for detectors"):
        export_run(ssd_run, tmp_path / "x.vfb", fp16=True)
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_run(ssd_run, ssd_run / "model.json")
    broken = tmp_path / "broken"
    shutil.copytree(ssd_run, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors missing"):
        load_detector_run(broken)
    meta = json.loads((ssd_run / "model.json").read_text())
    shutil.copyfile(ssd_run / "model.safetensors", broken / "model.safetensors")
    (broken / "model.json").write_text(json.dumps(meta | {"classes": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="3 classes but 'classes' lists 2"):
        load_detector_run(broken)
    (broken / "model.json").write_text(json.dumps(meta | {"task": "classify"}))
    with pytest.raises(CheckpointError, match="not object detection"):
        load_detector_run(broken)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_predict_cli_prints_json_and_draws_copies(ssd_bundle, ssd_run, tmp_path):
    images = _val_images(ssd_run)
    before = {p: _digest(p) for p in images}
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    drawn = tmp_path / "drawn"
    args = ["predict", str(ssd_bundle), *map(str, images), str(bad), "--json"]
    result = runner.invoke(app, [*args, "--draw", str(drawn), "--threshold", "0.25"])
    assert result.exit_code == 3  # one input unreadable: the rest are still answered
    payload = json.loads(result.stdout)
    assert payload["score_threshold"] == 0.25
    assert [p["source"] for p in payload["predictions"]] == [str(p) for p in images]
    assert payload["errors"][0]["source"] == str(bad)
    found = payload["predictions"][0]
    assert found["detections"] and found["detections"][0]["label"] in CLASSES
    for row, source in zip(payload["predictions"], images, strict=True):
        assert Path(row["drawing"]).parent == drawn and row["drawing"].endswith(".boxes.png")
        with Image.open(row["drawing"]) as picture, Image.open(source) as original:
            assert picture.size == original.size
    assert {p: _digest(p) for p in images} == before  # inputs untouched
    # the run directory answers through PyTorch, the same boxes
    result = runner.invoke(app, ["predict", str(ssd_run), str(images[0]), "-f", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "source,label,score,x1,y1,x2,y2"
    assert len(lines) - 1 == len(found["detections"])
    first = lines[1].split(",")
    assert first[1] == found["detections"][0]["label"]
    assert [float(v) for v in first[3:]] == pytest.approx(found["detections"][0]["box"], abs=0.02)


def test_predict_cli_table_and_bad_threshold(ssd_bundle, ssd_run):
    image = str(_val_images(ssd_run)[0])
    result = runner.invoke(app, ["predict", str(ssd_bundle), image, "--threshold", "1"])
    assert result.exit_code == 0 and "(none)" in result.stdout
    result = runner.invoke(app, ["predict", str(ssd_bundle), image, "--threshold", "2"])
    assert result.exit_code == 2 and "--threshold must be in [0, 1]" in result.output


def test_drawings_never_overwrite_an_input(tmp_path):
    own = tmp_path / "a.boxes.png"  # an input already named like a drawing
    sources = [str(tmp_path / "x" / "a.png"), str(tmp_path / "y" / "a.jpg"), str(own)]
    paths = drawing_paths(sources, tmp_path)
    assert paths[0] == tmp_path / "a-2.boxes.png"  # a.boxes.png is an input
    assert paths[1] == tmp_path / "a-3.boxes.png"
    assert paths[2] == tmp_path / "a.boxes.boxes.png"
    assert len(set(paths)) == 3
