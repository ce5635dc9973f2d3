"""Detectors on timm backbones: losses, outputs, thresholds, learning, errors and weights."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from torchvision.ops import box_iou

from visionflow.data.detection.records import DetectionSample
from visionflow.data.detection.transforms import (
    DetectionDataset,
    collate_detection,
    detection_train_transform,
)
from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ConfigError, WeightsError
from visionflow.models.backbones import create_backbone
from visionflow.models.detection import (
    build_detector,
    detector_info,
    list_detectors,
    register_detector,
)
from visionflow.models.weights import ResolvedWeights, resolve_weights

TINY = "test_efficientnet"
DETECTORS = sorted(list_detectors())
LOSS_KEYS = {
    "fasterrcnn_fpn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "ssdlite": {"classification", "bbox_regression"},
}


@pytest.fixture(autouse=True)
def _seeded_single_thread() -> Iterator[None]:
    """Fixed, restored RNG (same initialisations and images every run) and one intra-op
    thread: these models are tiny, and on a busy 2-core machine two threads made a training
    step 100x slower (3 s instead of 0.03 s) through contention."""
    state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.random.set_rng_state(state)


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, 96, 128), torch.rand(3, 112, 96)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 70.0, 60.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0], [4.0, 4.0, 30.0, 28.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    return images, targets


def _tiny(name: str, **kwargs: object) -> torch.nn.Module:
    kwargs.setdefault("fpn_channels", 32)  # small heads keep the tests fast
    return build_detector(name, backbone=TINY, num_classes=2, img_size=96, **kwargs)  # type: ignore[arg-type]


def test_registry_lists_the_required_detectors() -> None:
    assert {"fasterrcnn_fpn", "fcos", "retinanet", "ssdlite"} <= set(DETECTORS)
    assert all(isinstance(d, str) and d for d in list_detectors().values())


@pytest.mark.parametrize("name", DETECTORS)
def test_train_forward_returns_finite_losses(name: str) -> None:
    model = _tiny(name)
    model.train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS[name]
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("name", DETECTORS)
def test_eval_forward_gives_foreground_labels_in_input_pixels(name: str) -> None:
    # score 0 would let the background column through if it were decoded
    model = _tiny(name, score_thresh=0.0, detections_per_img=20)
    model.eval()
    images, _ = _batch()
    with torch.inference_mode():
        out = model(images)
    assert len(out) == 2
    for image, det in zip(images, out, strict=True):
        n = det["boxes"].shape[0]
        assert 0 < n <= 20
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,)
        assert det["labels"].dtype == torch.int64
        assert int(det["labels"].min()) >= 1 and int(det["labels"].max()) <= 2
        h, w = image.shape[1:]
        assert float(det["boxes"][:, 2].max()) <= w + 1e-3
        assert float(det["boxes"][:, 3].max()) <= h + 1e-3


@pytest.mark.parametrize("name", DETECTORS)
def test_score_and_nms_thresholds_are_applied(name: str) -> None:
    images, _ = _batch()
    loose = _tiny(name, score_thresh=0.0, nms_thresh=1.0, detections_per_img=300).eval()
    with torch.inference_mode():
        scores = loose(images[:1])[0]["scores"]
    cut = float(scores.median())
    strict = _tiny(name, score_thresh=cut, nms_thresh=0.3, detections_per_img=300)
    strict.load_state_dict(loose.state_dict())
    strict.eval()
    with torch.inference_mode():
        det = strict(images[:1])[0]
    assert det["scores"].numel() < scores.numel()
    assert bool((det["scores"] > cut - 1e-6).all())
    for label in det["labels"].unique():
        boxes = det["boxes"][det["labels"] == label]
        # zero-area boxes of an untrained model give 0/0; NMS never suppresses with those
        iou = box_iou(boxes, boxes).fill_diagonal_(0).nan_to_num(0.0)
        assert iou.numel() == 1 or float(iou.max()) <= 0.3 + 1e-4
    info = detector_info(strict)
    assert info["score_thresh"] == pytest.approx(cut)
    assert info["nms_thresh"] == pytest.approx(0.3)


@pytest.mark.parametrize("name", DETECTORS)
def test_a_few_sgd_steps_reduce_the_loss(name: str) -> None:
    image = torch.full((3, 96, 96), 0.2)
    image[:, 30:70, 20:60] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    target = {"boxes": torch.tensor([[20.0, 30.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
    model = _tiny(name)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = sum(model([image], [target]).values())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # randomly initialised models on one image: the loss falls, if not monotonically (FCOS)
    assert min(losses[-3:]) < 0.98 * losses[0], losses


def test_detector_info_is_json_and_describes_the_model() -> None:
    import json

    model = _tiny("fcos", score_thresh=0.25, nms_thresh=0.4, detections_per_img=7)
    info = json.loads(json.dumps(detector_info(model)))
    assert info["name"] == "fcos" and info["backbone"] == TINY
    assert info["num_classes"] == 2 and info["label_offset"] == 1
    assert (info["img_size"], info["min_size"], info["max_size"]) == (96, 96, 96)
    assert (info["score_thresh"], info["nms_thresh"], info["detections_per_img"]) == (0.25, 0.4, 7)
    cfg = timm.create_model(TINY).pretrained_cfg
    assert info["mean"] == list(cfg["mean"]) and info["std"] == list(cfg["std"])
    assert info["weights"] is None and info["frozen_bn"] is False
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    model.score_thresh = 0.5  # what the model holds is reported
    assert detector_info(model)["score_thresh"] == 0.5
    with pytest.raises(ConfigError, match="build_detector"):
        detector_info(torch.nn.Linear(2, 2))


def test_ssdlite_reports_its_square_input() -> None:
    info = detector_info(build_detector("ssdlite", backbone=TINY, num_classes=1, img_size=128))
    assert (info["img_size"], info["min_size"], info["max_size"]) == (128, 128, 128)
    assert info["strides"] == [16, 32]


def test_unknown_names_and_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'fasterrcnn_fpn'"):
        build_detector("fasterrcnn", backbone=TINY, num_classes=2)
    with pytest.raises(ConfigError, match=r"unknown backbone 'test_efficientnett'.*did you mean"):
        build_detector("ssdlite", backbone="test_efficientnett", num_classes=2)
    with pytest.raises(ConfigError, match="num_classes"):
        build_detector("ssdlite", backbone=TINY, num_classes=0)
    with pytest.raises(ConfigError, match="score_thresh"):
        build_detector("ssdlite", backbone=TINY, num_classes=1, score_thresh=1.5)
    with pytest.raises(ConfigError, match="trainable_layers=9"):
        build_detector("fcos", backbone=TINY, num_classes=1, trainable_layers=9)
    with pytest.raises(ConfigError, match="already registered"):
        register_detector("ssdlite", default_img_size=320, description="again")(lambda o: o)  # type: ignore[arg-type,return-value]


def test_trainable_layers_freeze_the_early_stages() -> None:
    model = _tiny("fasterrcnn_fpn", trainable_layers=1)
    body = model.backbone.body.body
    frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
    trained = {n for n, p in body.named_parameters() if p.requires_grad}
    assert "conv_stem.weight" in frozen
    assert trained and all(n.startswith("blocks.4.") for n in trained)
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert detector_info(model)["trainable_layers"] == 1


def _weights_from(model_name: str, state: dict[str, torch.Tensor]) -> ResolvedWeights:
    return ResolvedWeights(
        backbone=model_name,
        source="file",
        location=f"/weights/{model_name}.safetensors",
        sha256=None,
        preprocessing=Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        state_dict=state,
    )


def _assert_body_equals(body: torch.nn.Module, reference: dict[str, torch.Tensor]) -> int:
    compared = 0
    for key, tensor in body.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        src = key if key in reference else key.replace("_", ".", 1)
        assert torch.equal(tensor, reference[src]), key
        compared += 1
    return compared


@pytest.mark.parametrize("backbone", [TINY, "test_convnext"])
def test_classifier_weights_are_mapped_onto_the_feature_backbone(backbone: str) -> None:
    classifier = timm.create_model(backbone)
    for m in classifier.modules():  # non-trivial statistics, so a missed buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = classifier.state_dict()
    model = build_detector(
        "fcos",
        backbone=backbone,
        num_classes=2,
        img_size=96,
        weights=_weights_from(backbone, state),
    )
    body = model.backbone.body.body
    assert _assert_body_equals(body, state) > 10
    info = detector_info(model)
    assert info["frozen_bn"] is True and info["trainable_layers"] == min(3, 3)
    assert info["mean"] == [0.5, 0.5, 0.5] and info["weights"]["source"] == "file"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())


def test_weights_for_another_architecture_are_refused() -> None:
    other = timm.create_model("test_resnet").state_dict()
    with pytest.raises(WeightsError, match="resolved for 'test_resnet'"):
        build_detector(
            "ssdlite", backbone=TINY, num_classes=1, weights=_weights_from("test_resnet", other)
        )
    with pytest.raises(WeightsError, match=r"do not cover the feature backbone.*missing"):
        build_detector("ssdlite", backbone=TINY, num_classes=1, weights=_weights_from(TINY, other))
    partial = dict(timm.create_model(TINY).state_dict())
    partial.pop("blocks.1.0.conv_pwl.weight")
    with pytest.raises(WeightsError, match=r"blocks\.1\.0\.conv_pwl\.weight"):
        build_detector(
            "fasterrcnn_fpn", backbone=TINY, num_classes=1, weights=_weights_from(TINY, partial)
        )
    empty = ResolvedWeights.from_provenance(_weights_from(TINY, partial).provenance())
    with pytest.raises(WeightsError, match="carry no tensors"):
        build_detector("fcos", backbone=TINY, num_classes=1, weights=empty)


@pytest.mark.slow
def test_packaged_imagenet_weights_load_into_every_detector() -> None:
    weights = resolve_weights("tf_efficientnet_lite0", "package")
    reference = create_backbone("tf_efficientnet_lite0", weights=weights).state_dict()
    for name in DETECTORS:
        model = build_detector(
            name, backbone="tf_efficientnet_lite0", num_classes=3, weights=weights, img_size=128
        )
        body = model.backbone.body.body
        assert _assert_body_equals(body, reference) > 100, name
        info = detector_info(model)
        assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]
        assert info["weights"]["source"] == "package" and info["frozen_bn"] is True
        model.eval()
        with torch.inference_mode():
            out = model([torch.rand(3, 100, 128)])
        assert bool(out[0]["boxes"].isfinite().all())


@pytest.mark.parametrize("name", DETECTORS)
def test_detection_dataset_batches_feed_the_detectors(name: str, tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i, (w, h) in enumerate([(120, 90), (80, 110)]):
        img = Image.new("RGB", (w, h), (40, 40, 40))
        img.paste((220, 30, 30), (10, 10, 60, 50))
        path = tmp_path / f"img{i}.png"
        img.save(path)
        paths.append((path, w, h))
    samples = [
        DetectionSample(
            path=p, width=w, height=h, boxes=((10.0, 10.0, 60.0, 50.0),), labels=("red",)
        )
        for p, w, h in paths
    ]
    dataset = DetectionDataset(
        samples, ["red", "blue"], detection_train_transform(96, photometric=0.0), seed=0
    )
    images, targets = collate_detection([dataset[0], dataset[1]])
    model = _tiny(name)
    losses = model.train()(images, targets)
    assert set(losses) == LOSS_KEYS[name]
    assert all(math.isfinite(v.item()) for v in losses.values())
    with torch.inference_mode():
        out = model.eval()(images)
    assert [d["boxes"].shape[1] for d in out] == [4, 4]
