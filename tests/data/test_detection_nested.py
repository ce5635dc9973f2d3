"""A folder holding the same detection dataset in several formats (how held-out sets ship)."""

from __future__ import annotations

from pathlib import Path

import pytest
from detection_synth import write_all

from visionflow.data.detection.readers import read_detection
from visionflow.errors import DataError


def test_a_folder_of_the_same_labels_in_three_formats_reads_the_first(tmp_path: Path) -> None:
    paths = write_all(tmp_path)
    root = Path(next(iter(paths.values()))).parent
    index = read_detection(root)
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    assert index.samples == read_detection(first).samples
    note = index.issues[0]
    assert note.kind == "nested_dataset" and note.action == f"read {first.name}/"
    assert "with the same images and boxes" in note.message


def test_formats_that_disagree_are_an_error_naming_them(tmp_path: Path) -> None:
    paths = write_all(tmp_path)
    root = Path(next(iter(paths.values()))).parent
    yolo = Path(paths["yolo"])
    label = sorted((yolo / "labels").rglob("*.txt"))[0]
    label.write_text(label.read_text().replace("0.", "0.1", 1))
    with pytest.raises(DataError, match=r"holds 3 that differ: .*point at one of them"):
        read_detection(root)
