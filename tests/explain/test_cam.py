"""Class-activation maps: methods, target layers of several timm families, model state, overlays,
the CLI, the report gallery and a map that points at the right place."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from visionflow.api import AutoClassifier, ClassifierModel
from visionflow.cli import app
from visionflow.data.index import Sample, Split
from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ConfigError, ImageDecodeError
from visionflow.explain.cam import (
    CAM_METHODS,
    CamModel,
    TargetLayer,
    cam_gallery_section,
    explain,
    find_target_layer,
    register_cam_method,
    resolve_method,
    run_gallery_section,
)
from visionflow.models.backbones import create_backbone, feature_dim
from visionflow.models.heads import LinearHead, TaskModel

runner = CliRunner()


def _images(run: Path, label: str, n: int) -> list[Path]:
    return sorted((run.parent.parent / "data" / label).glob("*.png"))[:n]


@pytest.fixture(scope="module")
def clf(trained_run: Path) -> ClassifierModel:
    """The tiny run's model; tests that change it load their own."""
    return ClassifierModel.from_run(trained_run, device="cpu")


# ----------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_each_method_gives_an_input_sized_map_in_0_1_and_a_png(clf, trained_run, tmp_path, method):
    images = _images(trained_run, "blue", 1) + _images(trained_run, "red", 1)
    found = clf.explain(images, method=method, out_dir=tmp_path)
    probs = clf.predict_proba(images)
    assert [e.source for e in found] == [str(p) for p in images]
    for expl, row in zip(found, probs, strict=True):
        assert expl.method == method
        assert expl.cam.shape == (32, 32) and expl.cam.dtype == np.float32
        assert float(expl.cam.min()) >= 0.0 and float(expl.cam.max()) <= 1.0
        assert expl.predicted == clf.classes[int(np.argmax(row))] == expl.target
        assert expl.probability == pytest.approx(float(row.max()), abs=1e-4)
        assert expl.overlay is not None and expl.overlay.parent == tmp_path
        with Image.open(expl.overlay) as png:
            assert png.format == "PNG"
            assert png.height == 128 and png.width > 128  # 32 px x4, original on the left
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_target_class_is_respected(clf, trained_run, tmp_path):
    blue = _images(trained_run, "blue", 1)
    probs = clf.predict_proba(blue)[0]
    [for_red] = clf.explain(blue, target="red", out_dir=tmp_path)
    [for_blue] = clf.explain(blue, out_dir=tmp_path)
    red = clf.classes.index("red")
    assert for_red.predicted == "blue" and for_red.target == "red"
    assert for_red.target_probability == pytest.approx(float(probs[red]), abs=1e-4)
    assert for_red.overlay is not None and for_red.overlay.name.endswith(".gradcam.red.png")
    assert for_blue.target == "blue"
    assert json.loads(json.dumps(for_red.to_json()))["target"] == "red"


def test_unknown_method_and_class_are_errors_listing_the_choices(clf, trained_run):
    image = _images(trained_run, "blue", 1)
    with pytest.raises(ConfigError, match=r"did you mean 'gradcam'.*eigencam"):
        clf.explain(image, method="gradcm")
    with pytest.raises(ConfigError, match=r"'purple' is not a class.*'blue', 'green', 'red'"):
        clf.explain(image, target="purple")
    assert resolve_method("GradCAM++").name == "gradcam++"
    with pytest.raises(ConfigError, match="already registered"):
        register_cam_method("gradcam", "GradCAM", "again")
    with pytest.raises(ConfigError, match="not fitted"):
        AutoClassifier().explain(image)


def test_a_bad_image_names_the_file(clf, trained_run, tmp_path):
    good = _images(trained_run, "green", 1)
    missing = tmp_path / "nowhere.png"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    for bad in (missing, broken):
        with pytest.raises(ImageDecodeError) as info:
            clf.explain([*good, bad])
        assert str(bad) in str(info.value)


def test_overlay_names_never_replace_a_file(clf, trained_run, tmp_path):
    image = _images(trained_run, "red", 1)
    taken = tmp_path / f"{image[0].stem}.gradcam.png"
    taken.write_bytes(b"the user's own file")
    first = clf.explain(image, out_dir=tmp_path)[0].overlay
    second = clf.explain(image, out_dir=tmp_path, side_by_side=False)[0].overlay
    assert taken.read_bytes() == b"the user's own file"
    assert first is not None and second is not None
    assert (first.name, second.name) == (
        f"{image[0].stem}.gradcam-1.png",
        f"{image[0].stem}.gradcam-2.png",
    )
    with Image.open(second) as png:
        assert png.size == (128, 128)  # overlay only
    assert not list(tmp_path.glob(".*.tmp"))
    arrays = explain(clf, [np.full((40, 50, 3), 200, np.uint8)], out_dir=tmp_path)
    assert arrays[0].source == "<array>" and arrays[0].overlay.name == "image-0000.gradcam.png"


def test_the_model_is_left_as_it_was(trained_run, tmp_path):
    model = ClassifierModel.from_run(trained_run, device="cpu")
    net = model.model
    net.head.train()  # a mixed state must come back exactly
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    marker = torch.ones_like(net.head.fc.weight)
    net.head.fc.weight.grad = marker
    modes = {n: m.training for n, m in net.named_modules()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    strides = {n: p.stride() for n, p in net.named_parameters()}
    with torch.inference_mode():  # as predict runs: CAMs still get their gradients
        found = model.explain(_images(trained_run, "blue", 2), method="gradcam++")
    assert found[0].cam.max() > 0
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert net.head.fc.weight.grad is marker
    assert all(p.grad is None for p in net.backbone.parameters())
    assert {n: p.stride() for n, p in net.named_parameters()} == strides
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in net.modules())


# ----------------------------------------------------------------------------- layers
def _tiny(name: str) -> TaskModel:
    backbone = create_backbone(name)
    return TaskModel(backbone, LinearHead(feature_dim(backbone), 2))


@pytest.mark.parametrize(
    ("name", "size", "layer", "kind", "grid"),
    [
        ("test_efficientnet", 32, "backbone.blocks.3", "conv", (2, 2)),  # last map 1x1: stage 4
        ("test_resnet", 64, "backbone.layer4", "conv", (2, 2)),
        ("test_vit", 32, "backbone.blocks.5.norm1", "tokens", (2, 2)),  # class token dropped
        ("test_mambaout", 64, "backbone.stages", "nhwc", (2, 2)),  # channels-last stages
    ],
)
def test_target_layer_for_several_timm_families(name, size, layer, kind, grid):
    model = _tiny(name)
    found = find_target_layer(model, size)
    assert (found.name, found.kind, found.grid) == (layer, kind, grid)
    subject = CamModel(model, ["a", "b"], Preprocessing(input_size=size, crop_pct=1.0))
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    [expl] = explain(subject, [image], layer=found)
    assert expl.cam.shape == (size, size) and expl.layer == layer
    assert 0.0 <= float(expl.cam.min()) <= float(expl.cam.max()) <= 1.0


def test_a_backbone_without_a_spatial_layer_is_a_clear_error():
    mlp = TaskModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8)), LinearHead(8, 2))
    with pytest.raises(ConfigError, match="no layer with a spatial feature map"):
        find_target_layer(mlp, 16)


def test_a_layer_followed_by_an_in_place_op_still_works():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    subject = CamModel(TaskModel(net, LinearHead(4, 2)), ["a", "b"], Preprocessing(16))
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    layer = TargetLayer(conv, "backbone.0", "conv", (16, 16))
    for method in ("gradcam", "eigencam"):
        [expl] = explain(subject, [image], method=method, layer=layer)
        assert expl.cam.shape == (16, 16) and expl.layer == "backbone.0"


# ----------------------------------------------------------------------------- meaning
class _ColourDetector(nn.Module):
    """Channel 0 fires on red pixels, channel 1 on blue ones (stride 2, so the map is smaller
    than the image), then global average pooling: class "red" is the red evidence, "blue" the
    blue."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=3, stride=2, padding=1, bias=False)
        weight = torch.zeros(2, 3, 3, 3)
        weight[0, :, 1, 1] = torch.tensor([1.0, -0.5, -0.5])
        weight[1, :, 1, 1] = torch.tensor([-0.5, -0.5, 1.0])
        with torch.no_grad():
            self.conv.weight.copy_(weight)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.conv(x))).flatten(1)


def _top_quadrant(cam: np.ndarray) -> str:
    """The quadrant holding most of the map's mass."""
    h, w = cam.shape
    mass = {
        "top-left": float(cam[: h // 2, : w // 2].sum()),
        "top-right": float(cam[: h // 2, w // 2 :].sum()),
        "bottom-left": float(cam[h // 2 :, : w // 2].sum()),
        "bottom-right": float(cam[h // 2 :, w // 2 :].sum()),
    }
    return max(mass, key=mass.__getitem__)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"])
def test_the_map_is_highest_where_the_class_evidence_is(method, tmp_path):
    head = LinearHead(2, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(2))
        head.fc.bias.zero_()
    pre = Preprocessing(input_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    subject = CamModel(TaskModel(_ColourDetector(), head), ["red", "blue"], pre)
    pixels = np.full((64, 64, 3), 128, np.uint8)
    pixels[6:26, 38:58] = (255, 0, 0)  # red: top-right quadrant
    pixels[40:60, 8:28] = (0, 0, 255)  # blue: bottom-left (the transpose of top-right)
    [red] = explain(subject, [pixels], method=method, target="red")
    [blue] = explain(subject, [pixels], method=method, target="blue", out_dir=tmp_path)
    assert _top_quadrant(red.cam) == "top-right"
    assert _top_quadrant(blue.cam) == "bottom-left"
    assert red.cam[16, 48] > 0.9 and red.cam[50, 18] < 0.1


# ----------------------------------------------------------------------------- CLI
def test_cli_writes_overlays_and_json_and_skips_a_bad_file(trained_run, tmp_path):
    images = _images(trained_run, "green", 2)
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    for i, path in enumerate(_images(trained_run, "red", 2)):  # a folder is searched recursively
        (folder / "nested" / f"{i}.png").write_bytes(path.read_bytes())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    out = tmp_path / "maps"
    args = ["explain", str(trained_run), *map(str, images), str(bad), "--out", str(out), "--json"]
    result = runner.invoke(app, [*args, "--method", "eigencam"])
    assert result.exit_code == 3, result.output  # like predict: the readable ones are done
    payload = json.loads(result.stdout)
    assert [e["source"] for e in payload["explanations"]] == [str(p) for p in images]
    assert payload["errors"][0]["source"] == str(bad)
    assert all(Path(e["overlay"]).is_file() for e in payload["explanations"])
    assert payload["explanations"][0]["cam_size"] == [32, 32]

    result = runner.invoke(app, ["explain", str(trained_run), str(folder), "--out", str(out),
                                 "--target", "red"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "overlay" in result.stdout and "explained" in result.stdout
    assert sorted(p.name for p in out.glob("*.gradcam.red.png")) == [
        "0.gradcam.red.png",
        "1.gradcam.red.png",
    ]


def test_cli_refuses_a_bundle_and_points_to_the_run(trained_run, tmp_path):
    bundle = tmp_path / "model_bundle"
    bundle.mkdir()
    meta = {"format": "visionflow-bundle/1", "run": {"path": "/data/runs/flowers-1"}}
    (bundle / "model.json").write_text(json.dumps(meta))
    image = _images(trained_run, "blue", 1)[0]
    result = runner.invoke(app, ["explain", str(bundle), str(image)])
    assert result.exit_code == 5
    message = " ".join(result.stderr.split())
    assert "model bundle" in message and "/data/runs/flowers-1" in message
    result = runner.invoke(app, ["explain", str(trained_run), str(image), "--method", "nope"])
    assert result.exit_code == 2 and "unknown CAM method" in result.stderr


# ----------------------------------------------------------------------------- report
def _split_samples(run: Path, split: str) -> list[Sample]:
    from visionflow._io import read_json
    from visionflow.data.index import DatasetIndex

    index = DatasetIndex.from_json(read_json(run / "index.json"))
    return [index.samples[i] for i in Split.from_json(read_json(run / "split.json"))[split]]


def test_gallery_section_shows_right_and_wrong_images(clf, trained_run, tmp_path):
    samples = _split_samples(trained_run, "val")
    wrong = np.zeros((len(samples), 3), np.float32)
    for i, s in enumerate(samples):  # pretend every second image was misclassified
        right = clf.classes.index(str(s.label))
        wrong[i, right if i % 2 else (right + 1) % 3] = 1.0
    section = cam_gallery_section(
        clf, samples, tmp_path, correct=2, incorrect=3, probabilities=wrong, split="val"
    )
    assert section.html.count('<img src="data:image/png;base64,') == 5
    assert "Correctly classified (2 of" in section.html
    assert "Misclassified (3 of" in section.html and "of the val split" in section.html
    assert len(list(tmp_path.glob("*.png"))) == 5


def test_the_training_report_has_a_gallery(trained_run):
    html = (trained_run / "report.html").read_text(encoding="utf-8")
    assert "Grad-CAM gallery (gradcam)" in html and "Correctly classified" in html
    assert any((trained_run / "cam_gallery").glob("*.gradcam.png"))


def test_run_gallery_is_skipped_past_the_deadline_and_never_raises(
    clf, trained_run, tmp_path, caplog
):
    samples = _split_samples(trained_run, "val")
    args = (clf.model, clf.classes, clf.preprocessing, clf.device, samples, None, tmp_path)
    skipped = run_gallery_section(*args, expired=lambda: True)
    assert "Skipped: the run's time budget had run out" in skipped.html
    mlp = TaskModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8)), LinearHead(8, 3))
    with caplog.at_level(logging.WARNING, logger="visionflow.explain.cam"):
        failed = run_gallery_section(mlp, *args[1:], expired=lambda: False)
    assert "Not available" in failed.html and "no layer with a spatial" in failed.html
    assert "Grad-CAM gallery could not be made" in caplog.text
