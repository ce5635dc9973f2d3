import json
import math

import pytest
from rich.console import Console

from visionflow.data import DataReport, check_dataset, read_dataset
from visionflow.errors import ConfigError, DataError

UNREADABLE = ["cats/corrupt.jpg", "cats/empty.png", "cats/notes.txt", "dogs/truncated.jpg"]


@pytest.fixture
def salted(salted_folder):
    index = read_dataset(salted_folder)
    report, clean = check_dataset(index, workers=4)
    return index, report, clean


def test_salted_lists_every_problem(salted):
    index, report, _ = salted
    assert [b.path for b in report.unreadable] == UNREADABLE
    reasons = {b.path: b.reason for b in report.unreadable}
    assert reasons["cats/empty.png"] == "empty file"
    assert "truncated" in reasons["dogs/truncated.jpg"]
    assert "not an image" in reasons["cats/notes.txt"]
    assert report.duplicates == [["cats/cats_00.png", "cats/copy_of_00.png"]]
    assert len(report.conflicts) == 1
    conflict = report.conflicts[0]
    assert conflict["paths"] == ["cats/cats_01.png", "dogs/from_cats_01.png"]
    assert conflict["labels"] == ["cats", "dogs"] and len(conflict["sha256"]) == 64
    assert [b.path for b in report.tiny] == ["dogs/tiny.png"]
    assert "4x4" in report.tiny[0].reason
    assert report.num_files == len(index) == 27
    assert report.counts == {"cats": 9, "dogs": 11}
    assert report.num_usable == 20
    assert report.imbalance_ratio == pytest.approx(11 / 9)
    assert report.small_classes == {}
    for mode in ("CMYK", "RGBA", "RGB", "P"):
        assert mode in report.modes
    assert any(m.startswith("I") for m in report.modes)
    assert report.size_stats["width"] == {"min": 4, "median": 32.0, "max": 32}
    assert report.size_stats["height"]["max"] == 48  # the EXIF-rotated one, oriented
    assert any("unreadable" in w for w in report.warnings)
    assert any("different labels" in w for w in report.warnings)


def test_cleaned_index_excludes_bad_files_and_conflicts(salted):
    index, _, clean = salted
    kept = {s.path.relative_to(index.root).as_posix() for s in clean.samples}
    assert not kept & set(UNREADABLE)
    assert "cats/cats_01.png" not in kept and "dogs/from_cats_01.png" not in kept
    assert "cats/cats_00.png" in kept and "cats/copy_of_00.png" not in kept
    assert "dogs/tiny.png" in kept and "cats/rotated.jpg" in kept
    assert clean.classes == index.classes and clean.root == index.root
    assert clean.format == "folder"
    # original order is kept
    order = [index.samples.index(s) for s in clean.samples]
    assert order == sorted(order)


def test_checks_are_deterministic(salted_folder):
    index = read_dataset(salted_folder)
    one, _ = check_dataset(index, workers=1)
    two, _ = check_dataset(index, workers=8)
    assert one.to_json() == two.to_json()


def test_raise_for_problems_names_small_class(salted):
    _, report, _ = salted
    report.raise_for_problems(min_per_class=3)
    with pytest.raises(DataError, match=r"fewer than 10 usable images \('cats' has 9\)"):
        report.raise_for_problems(min_per_class=10)
    with pytest.raises(DataError, match="4 unreadable"):
        report.raise_for_problems(min_per_class=10)


def test_empty_class_gives_infinite_ratio_and_json_null(image_folder):
    index = read_dataset(image_folder)
    index = index.subset([i for i, s in enumerate(index.samples) if s.label != "red"])
    report, clean = check_dataset(index, min_per_class=3)
    assert clean.classes == ["blue", "green", "red"]
    assert report.counts["red"] == 0 and math.isinf(report.imbalance_ratio)
    assert report.small_classes == {"red": 0}
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["imbalance_ratio"] is None
    with pytest.raises(DataError, match="'red' has 0"):
        report.raise_for_problems(min_per_class=3)


def test_no_usable_and_single_class(tmp_path):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_bytes(b"nope")
    report, clean = check_dataset(read_dataset(root))
    assert len(clean) == 0
    with pytest.raises(DataError, match="no usable labelled images"):
        report.raise_for_problems(min_per_class=1)


def test_single_class(image_folder):
    index = read_dataset(image_folder)
    only_red = index.subset([i for i, s in enumerate(index.samples) if s.label == "red"])
    only_red.classes = ["red"]
    report, _ = check_dataset(only_red)
    with pytest.raises(DataError, match="fewer than 2 classes"):
        report.raise_for_problems(min_per_class=1)


def test_json_roundtrip_save_and_render(salted, tmp_path):
    _, report, _ = salted
    data = report.to_json()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["unreadable"][0] == {
        "path": "cats/corrupt.jpg",
        "reason": report.unreadable[0].reason,
    }
    target = report.save(tmp_path / "out" / "report.json")
    assert json.loads(target.read_text()) == data
    console = Console(record=True, width=120)
    report.render(console)
    text = console.export_text()
    for needle in ("cats", "dogs", "cats/corrupt.jpg", "copy_of_00.png", "from_cats_01.png"):
        assert needle in text


def test_render_truncates_long_lists():
    report = DataReport(
        root="r", format="folder", num_files=30, num_usable=0, classes=["a"], counts={"a": 0},
        imbalance_ratio=math.inf,
    )  # fmt: skip
    from visionflow.data import BadFile

    report.unreadable = [BadFile(f"a/{i:02d}.png", "empty file") for i in range(30)]
    console = Console(record=True, width=120)
    report.render(console)
    text = console.export_text()
    assert "a/19.png" in text and "a/20.png" not in text and "and 10 more" in text


def test_unlabelled_samples_and_bad_workers(image_folder):
    from dataclasses import replace

    index = read_dataset(image_folder)
    index.samples[0] = replace(index.samples[0], label=None)
    report, clean = check_dataset(index, progress=True)
    assert report.num_unlabelled == 1 and report.counts["blue"] == 11
    assert len(clean) == 36
    with pytest.raises(ConfigError, match="workers"):
        check_dataset(index, workers=0)


def test_render_summarises_a_dataset_of_small_images():
    from visionflow.data import BadFile

    report = DataReport(
        root="r", format="folder", num_files=40, num_usable=40, classes=["a"], counts={"a": 40},
        imbalance_ratio=1.0,
    )  # fmt: skip
    report.tiny = [BadFile(f"a/{i:02d}.png", "8x8 pixels") for i in range(40)]
    console = Console(record=True, width=120)
    report.render(console)
    text = console.export_text()
    assert "all 40 usable images (8x8 pixels)" in text and "a/00.png" not in text
