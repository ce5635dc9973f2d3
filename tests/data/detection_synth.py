"""A tiny detection dataset written in COCO, Pascal VOC and YOLO from the same boxes, and the
comparison of records read from different formats (shared by tests/data/test_detection_*.py).

The three layouts are written here by hand, the way other tools write them (not by visionflow's
writers), so the readers are tested against files they did not produce. This is a plain module,
not a ``conftest.py``: a second module named ``conftest`` would shadow ``tests/conftest.py`` for
the test files that import helpers from it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.data.detection import DetectionIndex, DetectionSample

#: Class -> colour of its rectangles.
DET_COLOURS = {"apple": (220, 30, 30), "leaf": (30, 200, 40), "sky": (40, 60, 230)}

#: (file name, (width, height), split, [(class, (x1, y1, x2, y2))]) with integer, continuous
#: pixel boxes: box (4, 6, 20, 30) is drawn over columns 4..19 and rows 6..29.
DET_IMAGES = [
    ("img_a.png", (64, 48), "train", [("apple", (4, 6, 20, 30)), ("leaf", (26, 8, 62, 44))]),
    ("img_b.png", (48, 64), "train", [("sky", (0, 0, 48, 16)), ("apple", (10, 30, 25, 61))]),
    ("img_c.png", (40, 40), "val", [("leaf", (5, 5, 35, 35))]),
    ("img_d.png", (56, 32), "test", []),
    ("img_e.png", (50, 30), "val", [("sky", (1, 1, 9, 29)), ("sky", (20, 2, 49, 12))]),
]

#: COCO category ids (deliberately not 0.. in name order) and YOLO's class order.
COCO_IDS = {"apple": 3, "leaf": 7, "sky": 1}
YOLO_NAMES = ["sky", "apple", "leaf"]


def draw(size: tuple[int, int], boxes: list[tuple[str, tuple[int, int, int, int]]]) -> Image.Image:
    """A dark noisy image with each box's pixels filled with its class colour."""
    width, height = size
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(0, 30, size=(height, width, 3)).astype(np.uint8)
    for label, (x1, y1, x2, y2) in boxes:
        pixels[y1:y2, x1:x2] = DET_COLOURS[label]
    return Image.fromarray(pixels, "RGB")


def write_coco(root: Path) -> Path:
    """COCO 2017 layout: annotations/instances_<split>2017.json and <split>2017/ image folders."""
    categories = [
        {"id": cid, "name": name, "supercategory": "thing"} for name, cid in COCO_IDS.items()
    ]
    for split in ("train", "val", "test"):
        images, annotations = [], []
        for k, (name, size, s, boxes) in enumerate(DET_IMAGES):
            if s != split:
                continue
            image_id = 100 + k
            folder = root / f"{split}2017"
            folder.mkdir(parents=True, exist_ok=True)
            draw(size, boxes).save(folder / name)
            images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
            for label, (x1, y1, x2, y2) in boxes:
                annotations.append(
                    {
                        "id": 1000 + len(annotations),
                        "image_id": image_id,
                        "category_id": COCO_IDS[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
    return root


def voc_xml(name: str, size: tuple[int, int], boxes, *, extra: str = "") -> str:
    objects = "".join(
        f"<object><name>{label}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>\n"
        for label, (x1, y1, x2, y2) in boxes
    )
    return (
        f"<annotation>\n<folder>VOC2007</folder>\n<filename>{name}</filename>\n"
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>\n"
        f"{extra}{objects}</annotation>\n"
    )


def write_voc(root: Path) -> Path:
    """VOC layout: Annotations/*.xml (1-based inclusive boxes), JPEGImages/, ImageSets/Main."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for name, size, split, boxes in DET_IMAGES:
        draw(size, boxes).save(root / "JPEGImages" / name)
        stem = Path(name).stem
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(name, size, boxes))
        lists[split].append(stem)
    for split, stems in lists.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    # per-class lists, as in the real devkit: must be ignored
    (root / "ImageSets" / "Main" / "apple_train.txt").write_text("img_a  1\nimg_b  1\n")
    return root


def yolo_line(label: str, box, size: tuple[int, int]) -> str:
    (x1, y1, x2, y2), (w, h) = box, size
    values = ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)
    return f"{YOLO_NAMES.index(label)} " + " ".join(f"{v:.6f}" for v in values) + "\n"


def write_yolo(root: Path) -> Path:
    """Ultralytics layout: data.yaml, images/<split>/, labels/<split>/<stem>.txt (6 decimals)."""
    for name, size, split, boxes in DET_IMAGES:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        draw(size, boxes).save(root / "images" / split / name)
        if boxes:  # the negative has no label file at all
            lines = "".join(yolo_line(label, box, size) for label, box in boxes)
            (root / "labels" / split / f"{Path(name).stem}.txt").write_text(lines)
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\ntest: images/test\n"
        "names:\n  0: sky\n  1: apple\n  2: leaf\n"
    )
    return root


def write_all(tmp_path: Path) -> dict[str, Path]:
    """The labels of :data:`DET_IMAGES` as ``{"coco": root, "voc": root, "yolo": root}``."""
    return {
        "coco": write_coco(tmp_path / "coco"),
        "voc": write_voc(tmp_path / "voc"),
        "yolo": write_yolo(tmp_path / "yolo"),
    }


#: YOLO keeps 6 decimals of normalised numbers: each is off by at most 0.5e-6, so a corner
#: ``(cx - w/2) * W`` is off by at most 0.75e-6 * W; the fixture's images are at most 64 px, so
#: every coordinate is within 0.75e-6 * 64 = 4.8e-5 px. COCO and VOC keep integers: exact.
YOLO_TOL = 1e-4


def _by_name(index: DetectionIndex) -> dict[str, DetectionSample]:
    """Records keyed by file name, with the path reduced to it (layouts differ in folders)."""
    out = {s.path.name: replace(s, path=Path(s.path.name)) for s in index.samples}
    assert len(out) == len(index.samples)
    return out


def assert_same_records(a: DetectionIndex, b: DetectionIndex, *, tol: float = 0.0) -> None:
    """Equal records by file name: everything identical, boxes within ``tol`` pixels."""
    assert a.classes == b.classes
    ra, rb = _by_name(a), _by_name(b)
    assert ra.keys() == rb.keys()
    fields = ("width", "height", "labels", "iscrowd", "difficult", "split")
    for name in ra:
        sa, sb = ra[name], rb[name]
        assert [getattr(sa, f) for f in fields] == [getattr(sb, f) for f in fields], name
        assert len(sa.boxes) == len(sb.boxes), name
        for box_a, box_b in zip(sa.boxes, sb.boxes, strict=True):
            assert box_a == pytest.approx(box_b, abs=tol, rel=0), name
        if tol == 0.0:
            assert sa == sb
