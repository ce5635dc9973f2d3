"""Box-aware augmentation: boxes stay inside the image and on the pixels they labelled."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from detection_synth import DET_COLOURS, write_all
from torch.utils.data import DataLoader

from visionflow.data.detection import read_detection
from visionflow.data.detection.transforms import (
    DetectionDataset,
    collate_detection,
    detection_eval_transform,
    detection_train_transform,
)
from visionflow.errors import ConfigError, DataError


@pytest.fixture
def det_datasets(tmp_path: Path) -> dict[str, Path]:
    return write_all(tmp_path)


def _mask(image: torch.Tensor, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels close to ``colour`` (the fixture draws each class in one colour; the resize blurs
    edges, so only pixels within 40 levels per channel count)."""
    pixels = (image.permute(1, 2, 0).numpy() * 255).astype(np.int16)
    return np.all(np.abs(pixels - np.asarray(colour)) <= 40, axis=-1)


def _assert_boxes_on_their_pixels(image: torch.Tensor, target: dict, classes: list[str]) -> None:
    """Every box lies in the image, is mostly its class's colour, and is tight around it."""
    _, height, width = image.shape
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert boxes.shape == (len(labels), 4) and target["iscrowd"].shape == labels.shape
    for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (box, width, height)
        mask = _mask(image, DET_COLOURS[classes[label - 1]])
        # the box's interior (1 px in from each side, for the blurred edge) is the colour
        inner = mask[int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1]
        if inner.size:
            assert inner.mean() > 0.9, (box, inner.mean())
        # and the colour inside the box reaches the box's sides (within 2 px): it is tight
        inside = mask[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))]
        ys, xs = np.nonzero(inside)
        assert len(xs), box
        assert xs.min() <= 2 and ys.min() <= 2
        assert inside.shape[1] - 1 - xs.max() <= 2 and inside.shape[0] - 1 - ys.max() <= 2


def test_eval_transform_resizes_boxes_with_the_image(det_datasets):
    index = read_detection(det_datasets["coco"])
    dataset = DetectionDataset(index.samples, index.classes, detection_eval_transform(128))
    for i, sample in enumerate(index.samples):
        image, target = dataset[i]
        assert image.dtype == torch.float32 and 0.0 <= image.min() <= image.max() <= 1.0
        assert max(image.shape[1:]) == 128
        scale = 128 / max(sample.width, sample.height)
        expected = torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4) * scale
        assert torch.allclose(target["boxes"], expected, atol=0.51 * scale + 1e-4)
        assert target["image_id"] == i
        assert target["labels"].tolist() == [index.classes.index(n) + 1 for n in sample.labels]
        _assert_boxes_on_their_pixels(image, target, index.classes)


def test_train_augmentation_keeps_boxes_on_their_pixels(det_datasets):
    index = read_detection(det_datasets["voc"])
    transform = detection_train_transform(
        96, photometric=0.0, zoom_out=0.5, iou_crop=0.7, scale_range=(0.6, 1.0)
    )
    dataset = DetectionDataset(index.samples, index.classes, transform, seed=7)
    flipped = cropped = zoomed = 0
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for i, sample in enumerate(index.samples):
            image, target = dataset[i]
            _assert_boxes_on_their_pixels(image, target, index.classes)
            if len(sample) and len(target["boxes"]):
                # where did the first box go? flips move it to the other side
                x_centre = (target["boxes"][0, 0] + target["boxes"][0, 2]).item() / 2
                first = sample.boxes[0]
                before = (first[0] + first[2]) / 2 / sample.width
                after = x_centre / image.shape[2]
                flipped += abs(before - 0.5) > 0.15 and (before - 0.5) * (after - 0.5) < 0
            aspect = image.shape[2] / image.shape[1]
            cropped += abs(aspect - sample.width / sample.height) > 0.05
            zoomed += bool((_mask(image, (124, 116, 104)).mean() > 0.2).item())
    assert flipped and cropped and zoomed  # every geometric operation happened, boxes followed


def test_photometric_jitter_changes_pixels_not_boxes(det_datasets):
    index = read_detection(det_datasets["coco"])
    plain = DetectionDataset(index.samples, index.classes, detection_eval_transform(64))
    jitter = detection_train_transform(
        64, hflip=False, photometric=1.0, zoom_out=0.0, iou_crop=0.0, scale_range=(1.0, 1.0)
    )
    jittered = DetectionDataset(index.samples, index.classes, jitter, seed=0)
    image_a, target_a = plain[1]
    image_b, target_b = jittered[1]
    assert image_a.shape == image_b.shape and not torch.equal(image_a, image_b)
    assert torch.equal(target_a["boxes"], target_b["boxes"])


def test_seeded_augmentation_is_reproducible_and_restores_the_rng(det_datasets):
    index = read_detection(det_datasets["yolo"])
    transform = detection_train_transform(64)
    a = DetectionDataset(index.samples, index.classes, transform, seed=1)
    b = DetectionDataset(index.samples, index.classes, transform, seed=1)
    state = torch.get_rng_state()
    first = [a[i] for i in range(len(a))]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    for i in reversed(range(len(b))):  # any order gives the same draws
        image, target = b[i]
        assert torch.equal(image, first[i][0])
        assert torch.equal(target["boxes"], first[i][1]["boxes"])
    a.set_epoch(1)
    changed = [not torch.equal(a[i][0], first[i][0]) for i in range(len(a))]
    assert any(changed)


def test_negatives_and_crowd_flags_go_through(det_datasets):
    index = read_detection(det_datasets["coco"])
    negative = next(s for s in index.samples if not len(s))
    crowd = replace(index.samples[1], iscrowd=(True, False))
    transform = detection_train_transform(48, iou_crop=1.0, zoom_out=1.0)
    dataset = DetectionDataset([negative, crowd], index.classes, transform, seed=0)
    _, target = dataset[0]  # an image without boxes: the IoU crop does not spin
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    for epoch in range(5):
        dataset.set_epoch(epoch)
        _, target = dataset[1]
        # the crowd flag is filtered with its box: still aligned with the labels
        assert target["iscrowd"].shape == target["labels"].shape
        if len(target["labels"]) == 2:
            assert target["iscrowd"].tolist() == [1, 0]


def test_collate_and_loader(det_datasets):
    index = read_detection(det_datasets["coco"])
    dataset = DetectionDataset(index.samples, index.classes, detection_eval_transform(32))
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 3
    assert all(isinstance(t["boxes"], torch.Tensor) for t in targets)
    assert type(targets[0]["boxes"]) is torch.Tensor  # plain tensors, not tv_tensors
    raw, _ = DetectionDataset(index.samples, index.classes)[0]  # no transform: a float image
    assert raw.dtype == torch.float32 and raw.shape[1:] == (
        index.samples[0].height,
        index.samples[0].width,
    )


def test_dataset_errors(det_datasets, tmp_path):
    index = read_detection(det_datasets["coco"])
    dataset = DetectionDataset(index.samples, ["apple"], detection_eval_transform(32))
    with pytest.raises(DataError, match=r"class\(es\) \['leaf'\] are not in the class list"):
        dataset[1]
    wrong = replace(index.samples[0], width=index.samples[0].width + 1)
    with pytest.raises(DataError, match="the file changed since the dataset was read"):
        DetectionDataset([wrong], index.classes)[0]
    for kwargs in ({"photometric": 2.0}, {"max_zoom_out": 0.5}, {"scale_range": (1.0, 0.5)}):
        with pytest.raises(ConfigError):
            detection_train_transform(64, **kwargs)
    with pytest.raises(ConfigError, match="size must be an integer"):
        detection_eval_transform(4)
