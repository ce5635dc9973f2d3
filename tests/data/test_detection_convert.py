"""Writers and ``convert``: every format reads back the same records; sources are never
written to; the ``visionflow convert`` and ``inspect --task detect`` commands."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from detection_synth import YOLO_TOL, assert_same_records, draw, write_all
from typer.testing import CliRunner

from visionflow.cli import app
from visionflow.data.detection import (
    DetectionIndex,
    DetectionSample,
    available_detection_writers,
    convert,
    read_detection,
    write_detection,
)
from visionflow.errors import ConfigError, DataError

FORMATS = ["coco", "voc", "yolo"]
runner = CliRunner()


@pytest.fixture
def det_datasets(tmp_path: Path) -> dict[str, Path]:
    return write_all(tmp_path)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("source", FORMATS)
@pytest.mark.parametrize("target", FORMATS)
def test_convert_reads_back_the_same_records(det_datasets, tmp_path, source, target):
    before = _snapshot(det_datasets[source])
    original = read_detection(det_datasets[source])
    result = convert(det_datasets[source], tmp_path / "out", to=target)
    assert result.source_format == source and result.issues == []
    assert (result.written.num_images, result.written.num_boxes) == (5, 7)
    assert result.written.linked == 5 and result.written.copied == 0
    back = read_detection(tmp_path / "out")
    assert back.format == target and back.issues == []
    tol = YOLO_TOL if "yolo" in (source, target) else 0.0
    assert_same_records(original, back, tol=tol)
    assert _snapshot(det_datasets[source]) == before  # the source is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_round_trip_coco_yolo_voc_coco(det_datasets, tmp_path):
    tmp_path = tmp_path / "trip"
    original = read_detection(det_datasets["coco"])
    convert(det_datasets["coco"], tmp_path / "yolo", to="yolo")
    convert(tmp_path / "yolo", tmp_path / "voc", to="voc")
    convert(tmp_path / "voc", tmp_path / "coco", to="coco", images="copy")
    final = read_detection(tmp_path / "coco")
    # VOC writes YOLO's 6-decimal noise (9.999984) as the whole pixel it is: exact again
    assert_same_records(original, final)
    text = (tmp_path / "voc" / "Annotations" / "img_b.xml").read_text()
    assert "<xmin>11</xmin>" in text  # apple (10, 30, 25, 61): 1-based first column
    data = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["apple", "leaf", "sky"]


def test_links_and_copies(det_datasets, tmp_path):
    src = next((det_datasets["voc"] / "JPEGImages").glob("img_a.png"))
    linked = convert(det_datasets["voc"], tmp_path / "l", to="yolo").written
    copied = convert(det_datasets["voc"], tmp_path / "c", to="yolo", images="copy").written
    assert (linked.linked, linked.copied) == (5, 0)
    assert (copied.linked, copied.copied) == (0, 5)
    assert (tmp_path / "l" / "images" / "train" / "img_a.png").samefile(src)
    copy = tmp_path / "c" / "images" / "train" / "img_a.png"
    assert not copy.samefile(src) and copy.read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    "where",
    [
        lambda src, tmp: src,  # over the source
        lambda src, tmp: src / "converted",  # inside it
        lambda src, tmp: src.parent,  # around it (non-empty anyway, but overlap is the reason)
    ],
)
def test_convert_refuses_to_write_into_the_source(det_datasets, tmp_path, where):
    src = det_datasets["yolo"]
    before = _snapshot(src)
    with pytest.raises(DataError, match="overlaps the source dataset"):
        convert(src, where(src, tmp_path), to="coco")
    assert _snapshot(src) == before
    with pytest.raises(DataError, match="overlaps the source dataset"):
        convert(src / "data.yaml", src / "images" / "x", to="voc")


def test_convert_refuses_a_non_empty_destination_and_bad_options(det_datasets, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists and is not an empty folder"):
        convert(det_datasets["coco"], busy, to="voc")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(det_datasets["coco"], empty, to="voc")  # an empty folder is fine
    assert (empty / "Annotations" / "img_a.xml").is_file()
    assert available_detection_writers() == FORMATS
    with pytest.raises(ConfigError, match="did you mean 'yolo'"):
        convert(det_datasets["coco"], tmp_path / "x", to="yolov5")
    with pytest.raises(ConfigError, match="images must be one of link, copy"):
        convert(det_datasets["coco"], tmp_path / "x", to="voc", images="move")
    with pytest.raises(ConfigError, match="precision"):
        convert(det_datasets["coco"], tmp_path / "x", to="yolo", precision=0)


def test_name_collisions_and_format_notes(tmp_path):
    """Two images named a.png in different folders, crowd and difficult flags, an unsplit image
    beside split ones, and a class without boxes: each format says what it could not keep."""
    root = tmp_path / "src"
    for folder in ("one", "two"):
        (root / folder).mkdir(parents=True)
        draw((10, 10), []).save(root / folder / "a.png")
    box = ((1.0, 1.0, 5.0, 5.0),)
    samples = [
        DetectionSample(path=root / "one" / "a.png", width=10, height=10, boxes=box,
                        labels=("cat",), iscrowd=(True,), split="train"),
        DetectionSample(path=root / "two" / "a.png", width=10, height=10, boxes=box,
                        labels=("cat",), difficult=(True,)),
    ]  # fmt: skip
    index = DetectionIndex(root=root, samples=samples, classes=["cat", "dog"])

    voc = write_detection(index, tmp_path / "voc", format="voc")
    assert sorted(p.name for p in (tmp_path / "voc" / "JPEGImages").iterdir()) == [
        "a.png",
        "a_1.png",
    ]
    assert any("1 crowd box(es)" in n for n in voc.notes)
    assert any("without boxes are not kept" in n and "dog" in n for n in voc.notes)
    back = read_detection(tmp_path / "voc")
    assert [(s.path.name, s.split, s.difficult) for s in back.samples] == [
        ("a.png", "train", (False,)),
        ("a_1.png", None, (True,)),
    ]

    yolo = write_detection(index, tmp_path / "yolo", format="yolo")
    assert any("1 image(s) without a split were written to train" in n for n in yolo.notes)
    assert any("difficult box(es)" in n for n in yolo.notes)
    back = read_detection(tmp_path / "yolo")
    assert back.classes == ["cat", "dog"]
    assert sorted(s.path.name for s in back.samples) == ["a.png", "a_1.png"]

    coco = write_detection(index, tmp_path / "coco", format="coco")
    assert not any("crowd" in n for n in coco.notes)
    back = read_detection(tmp_path / "coco")
    assert {(s.split, s.iscrowd) for s in back.samples} == {("train", (True,)), (None, (False,))}


def test_write_refuses_labels_outside_the_class_list(tmp_path):
    draw((10, 10), []).save(tmp_path / "a.png")
    sample = DetectionSample(
        path=tmp_path / "a.png", width=10, height=10, boxes=((0, 0, 1, 1),), labels=("x",)
    )
    index = DetectionIndex(root=tmp_path, samples=[sample], classes=["y"])
    with pytest.raises(DataError, match=r"class\(es\) \['x'\] are not in the class list"):
        write_detection(index, tmp_path.parent / f"{tmp_path.name}-out", format="coco")


def test_yolo_precision_and_voc_fractions(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    draw((30, 20), []).save(root / "a.png")
    sample = DetectionSample(
        path=root / "a.png", width=30, height=20, boxes=((1.25, 2.0, 7.75, 9.0),), labels=("z",)
    )
    index = DetectionIndex(root=root, samples=[sample])
    write_detection(index, tmp_path / "y", format="yolo", precision=3)
    assert (tmp_path / "y" / "labels" / "a.txt").read_text() == "0 0.150 0.275 0.217 0.350\n"
    write_detection(index, tmp_path / "v", format="voc")
    text = (tmp_path / "v" / "Annotations" / "a.xml").read_text()
    assert "<xmin>2.25</xmin>" in text and "<ymin>3</ymin>" in text
    assert read_detection(tmp_path / "v").samples[0].boxes == sample.boxes


# ----------------------------------------------------------------------------- CLI
def test_cli_convert(det_datasets, tmp_path):
    result = runner.invoke(
        app, ["convert", str(det_datasets["voc"]), str(tmp_path / "y"), "--to", "yolo", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["from"] == "voc" and payload["format"] == "yolo"
    assert payload["num_images"] == 5 and payload["issues"] == []
    result = runner.invoke(
        app,
        ["convert", str(tmp_path / "y"), str(tmp_path / "c"), "--to", "coco", "--from", "yolo",
         "--copy"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "yolo -> coco: 5 images (5 copied), 7 boxes" in " ".join(result.stdout.split())
    result = runner.invoke(app, ["convert", str(tmp_path / "y"), str(tmp_path / "y" / "in"),
                                 "--to", "voc"])  # fmt: skip
    assert result.exit_code == 3
    assert "overlaps the source dataset" in result.output
    result = runner.invoke(app, ["convert", str(tmp_path / "y"), str(tmp_path / "z"), "--to", "x"])
    assert result.exit_code == 2


def test_cli_convert_lists_source_problems(tmp_path):
    root = tmp_path / "y"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    draw((10, 10), []).save(root / "images" / "a.png")
    (root / "classes.txt").write_text("cat\n")
    (root / "labels" / "a.txt").write_text("5 0.5 0.5 0.5 0.5\n")
    result = runner.invoke(app, ["convert", str(root), str(tmp_path / "out"), "--to", "coco"])
    assert result.exit_code == 0, result.output
    assert "1 annotation problem(s) in the source" in result.stderr
    assert "labels/a.txt:1: class id 5" in result.stderr


def test_cli_inspect_detect(tmp_path, det_datasets):
    report = tmp_path / "report.json"
    result = runner.invoke(
        app, ["inspect", str(det_datasets["coco"]), "--task", "detect", "--out", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert "7 of 7 boxes usable" in " ".join(result.stdout.split())
    data = json.loads(report.read_text())
    assert data["format"] == "coco" and data["num_negatives"] == 1
    result = runner.invoke(app, ["inspect", str(det_datasets["coco"]), "--task", "segment"])
    assert result.exit_code != 0
    # a dataset whose every box is degenerate: reported, then exit code 3
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    draw((10, 10), []).save(bad / "images" / "a.png")
    (bad / "classes.txt").write_text("cat\n")
    (bad / "labels").mkdir()
    (bad / "labels" / "a.txt").write_text("0 0.5 0.5 0 0.2\n")
    result = runner.invoke(app, ["inspect", str(bad), "--task", "detect", "--json",
                                 "--out", str(tmp_path / "bad.json")])  # fmt: skip
    assert result.exit_code == 3
    assert json.loads(result.stdout)["issue_counts"] == {"degenerate": 1}


def test_hard_link_fallback_copies_across_devices(det_datasets, tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    written = convert(det_datasets["coco"], tmp_path / "out", to="voc").written
    assert (written.linked, written.copied) == (0, 5)
    index = read_detection(tmp_path / "out")
    assert all(s.path.is_file() for s in index.samples)
    assert replace(index.samples[0], path=Path("x")).width > 0


def test_readme_example_runs(det_datasets, tmp_path):
    """The Python example of the README's detection section, on the fixture's VOC dataset."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Detection data", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"data/voc_coco"', repr(str(tmp_path / "voc_coco")))
    code = code.replace('"data/voc"', repr(str(det_datasets["voc"])))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["target"]["boxes"].dtype == torch.float32
    assert read_detection(tmp_path / "voc_coco").format == "coco"
