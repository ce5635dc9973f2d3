"""Detection checks: every planted problem is found, named by its source, and handled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from detection_synth import DET_IMAGES, draw, write_all
from rich.console import Console

from visionflow.data.detection import (
    SIZE_BUCKETS,
    DetectionIndex,
    DetectionSample,
    check_detection,
    read_detection,
)
from visionflow.data.detection.checks import size_bucket
from visionflow.errors import ConfigError, DataError

ANN = "annotations/instances.json"


@pytest.fixture
def det_datasets(tmp_path: Path) -> dict[str, Path]:
    return write_all(tmp_path)


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A COCO dataset with one of each problem (ids say which):

    * image 1 ``ok.png`` 40x30: a good box (ann 1), a box reaching outside (ann 2), one
      entirely outside (ann 3), a zero-width box (ann 4), a duplicate of ann 1 (ann 5, IoU
      0.97), an identical copy of ann 1 (ann 6), a same-place box of another class (ann 7,
      kept), an unknown category (ann 8), a sub-pixel box (ann 9);
    * image 2 ``negative.png``: no annotations (a negative, kept);
    * image 3 ``gone.png``: listed, file missing (its ann 10 cannot be used);
    * ann 11 refers to image id 99, which is not listed;
    * image 4 ``broken.png``: a PNG header with truncated pixel data (ann 12);
    * image 5 ``liar.png`` declares 100x100 but is 20x20 (ann 13, kept);
    * image 6 ``emptied.png``: its only box is degenerate (ann 14).
    """
    root = tmp_path / "planted"
    images = root / "images"
    images.mkdir(parents=True)
    draw((40, 30), [("apple", (5, 5, 20, 20))]).save(images / "ok.png")
    draw((16, 16), []).save(images / "negative.png")
    draw((20, 20), []).save(images / "liar.png")
    draw((20, 20), []).save(images / "emptied.png")
    full = images / "full.png"
    draw((64, 64), []).save(full)
    (images / "broken.png").write_bytes(full.read_bytes()[:80])
    full.unlink()

    def ann(aid, image_id, bbox, category=1):
        return {"id": aid, "image_id": image_id, "category_id": category, "bbox": bbox}

    obj = {
        "images": [
            {"id": 1, "file_name": "ok.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "negative.png"},
            {"id": 3, "file_name": "gone.png"},
            {"id": 4, "file_name": "broken.png"},
            {"id": 5, "file_name": "liar.png", "width": 100, "height": 100},
            {"id": 6, "file_name": "emptied.png"},
        ],
        "annotations": [
            ann(1, 1, [5, 5, 15, 15]),
            ann(2, 1, [30, 20, 20, 20]),
            ann(3, 1, [50, 5, 5, 5]),
            ann(4, 1, [10, 10, 0, 5]),
            ann(5, 1, [5, 5, 15, 14.6]),
            ann(6, 1, [5, 5, 15, 15]),
            ann(7, 1, [5, 5, 15, 15], category=2),
            ann(8, 1, [1, 1, 5, 5], category=42),
            ann(9, 1, [1, 1, 0.5, 5]),
            ann(10, 3, [1, 1, 5, 5]),
            ann(11, 99, [1, 1, 5, 5]),
            ann(12, 4, [1, 1, 5, 5]),
            ann(13, 5, [1, 1, 5, 5], category=2),
            ann(14, 6, [3, 3, 4, -1]),
        ],
        "categories": [{"id": 1, "name": "apple"}, {"id": 2, "name": "leaf"}],
    }
    (root / "annotations").mkdir()
    (root / ANN).write_text(json.dumps(obj))
    return root


def _sources(report, kind):
    return sorted(i.source for i in report.of_kind(kind))


def test_every_planted_problem_is_reported_with_its_source(planted):
    index = read_detection(planted)
    report, clean = check_detection(index)

    assert _sources(report, "clipped") == [f"{ANN}:annotation 2"]
    assert _sources(report, "outside") == [f"{ANN}:annotation 3"]
    assert _sources(report, "degenerate") == [
        f"{ANN}:annotation 14",
        f"{ANN}:annotation 4",
        f"{ANN}:annotation 9",
    ]
    assert _sources(report, "duplicate") == [f"{ANN}:annotation 5", f"{ANN}:annotation 6"]
    assert _sources(report, "unknown_class") == [f"{ANN}:annotation 8"]
    assert _sources(report, "missing_image") == [f"{ANN}:annotation 11", f"{ANN}:image 3"]
    assert _sources(report, "unreadable_image") == [f"{ANN}:image 4"]
    assert _sources(report, "size_mismatch") == [f"{ANN}:image 5"]

    clipped = report.of_kind("clipped")[0]
    assert "reaches outside the 40x30 image; clipped to (30, 20, 40, 30)" in clipped.message
    assert clipped.action == "clipped"
    dup = next(i for i in report.of_kind("duplicate") if i.source.endswith("annotation 5"))
    assert f"repeats {ANN}:annotation 1" in dup.message
    assert "image_id 99" in next(i.message for i in report.of_kind("missing_image"))
    assert "gone.png: file not found" in " ".join(i.message for i in report.issues)

    ok = next(s for s in clean.samples if s.path.name == "ok.png")
    assert ok.labels == ("apple", "apple", "leaf")
    assert ok.boxes == ((5, 5, 20, 20), (30, 20, 40, 30), (5, 5, 20, 20))
    assert ok.box_sources == tuple(f"{ANN}:annotation {k}" for k in (1, 2, 7))

    names = sorted(s.path.name for s in clean.samples)
    assert names == ["emptied.png", "liar.png", "negative.png", "ok.png"]  # broken.png dropped
    assert (report.num_images, report.num_usable) == (5, 4)
    assert (report.num_negatives, report.num_emptied) == (2, 1)
    assert report.counts == {"apple": 2, "leaf": 2}
    assert report.images_per_class == {"apple": 1, "leaf": 2}
    assert report.num_boxes == 11 and report.num_kept_boxes == 4
    assert report.issue_counts()["degenerate"] == 3
    assert any("lost all their boxes" in w for w in report.warnings)
    # the reader's own findings stay on the cleaned index; the checks' are in the report
    assert clean.issues == index.issues
    report.raise_for_problems()  # usable boxes remain


def test_report_json_and_rendering(planted, tmp_path):
    report, _ = check_detection(read_detection(planted), decode=False)
    assert not report.of_kind("unreadable_image")  # only a full decode finds truncated pixels
    saved = report.save(tmp_path / "report.json")
    data = json.loads(saved.read_text())
    assert data["issue_counts"]["duplicate"] == 2
    assert data["box_sizes"]["(all)"] == {"small": 5, "medium": 0, "large": 0}
    assert {i["kind"] for i in data["issues"]} >= {"clipped", "outside", "unknown_class"}
    console = Console(record=True, width=200)
    report.render(console)
    text = console.export_text()
    for title in ("Boxes clipped to the image", "Duplicate boxes (removed)", "Unknown class ids"):
        assert title in text
    assert f"{ANN}:annotation 8" in text
    assert "negatives, kept" in text


def test_clean_dataset_has_no_issues_and_counts_sizes(det_datasets):
    index = read_detection(det_datasets["yolo"])
    report, clean = check_detection(index)
    assert report.issues == [] and report.warnings == []
    assert report.num_negatives == 1 and report.num_emptied == 0
    expected: dict[str, dict[str, int]] = {}
    for _, _, _, boxes in DET_IMAGES:
        for label, box in boxes:
            bucket = size_bucket(box)
            for key in (label, "(all)"):
                expected.setdefault(key, {"small": 0, "medium": 0, "large": 0})[bucket] += 1
    assert report.box_sizes == expected
    assert expected["(all)"]["medium"] > 0 and expected["(all)"]["small"] > 0
    assert report.counts == {"apple": 2, "leaf": 2, "sky": 3}
    assert [s.boxes for s in clean.samples] == [s.boxes for s in index.samples]


def test_size_buckets_follow_coco():
    assert SIZE_BUCKETS == {"small": 1024, "medium": 9216}
    assert size_bucket((0, 0, 31, 33)) == "small"  # 1023 px
    assert size_bucket((0, 0, 32, 32)) == "medium"
    assert size_bucket((0, 0, 96, 96)) == "large"


def test_yolo_unknown_class_and_orphan_label_reach_the_report(tmp_path):
    root = tmp_path / "y"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    draw((20, 20), []).save(root / "images" / "a.png")
    (root / "classes.txt").write_text("cat\n")
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n7 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    report, _ = check_detection(read_detection(root))
    assert _sources(report, "unknown_class") == ["labels/a.txt:2"]
    assert _sources(report, "missing_image") == ["labels/orphan.txt"]
    assert (
        "class id 7 is not in the class names (ids 0-0)"
        in report.of_kind("unknown_class")[0].message
    )


def test_nothing_usable_raises(tmp_path):
    draw((8, 8), []).save(tmp_path / "a.png")
    index = DetectionIndex(
        root=tmp_path,
        samples=[DetectionSample(path=tmp_path / "a.png", width=8, height=8)],
        classes=["x"],
    )
    report, _ = check_detection(index)
    with pytest.raises(DataError, match="no usable boxes"):
        report.raise_for_problems()
    report, _ = check_detection(DetectionIndex(root=tmp_path, samples=[], classes=["x"]))
    with pytest.raises(DataError, match="no usable images"):
        report.raise_for_problems()


def test_check_options_are_validated(det_datasets):
    index = read_detection(det_datasets["voc"])
    for kwargs in ({"min_box_size": -1}, {"duplicate_iou": 0}, {"workers": 0}):
        with pytest.raises(ConfigError):
            check_detection(index, **kwargs)
    # a larger minimum drops the thin sky box of img_e (8 px wide)
    report, _ = check_detection(index, min_box_size=10, decode=False)
    assert _sources(report, "degenerate") == ["Annotations/img_e.xml:object 1"]


def test_box_iou_matrix_pairs_crowds_and_empty_boxes():
    import numpy as np

    from visionflow.data.detection import box_iou, box_iou_matrix

    a = [(0, 0, 10, 10), (5, 5, 15, 15), (3, 3, 3, 8)]
    b = [(0, 0, 10, 10), (0, 0, 20, 20)]
    iou = box_iou_matrix(a, b)
    assert iou.shape == (3, 2)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert iou[i, j] == pytest.approx(box_iou(x, y))
    crowd = box_iou_matrix(a, b, crowd=[False, True])
    assert crowd[0, 1] == 1.0 and crowd[1, 1] == 1.0  # inside the crowd region: covered
    assert crowd[2, 1] == 0.0  # no area: 0, not a division by zero
    assert box_iou_matrix(np.zeros((0, 4)), b).shape == (0, 2)
