"""``visionflow select`` on a trained run (and a bundle), the CSV it writes, and the round trip
``train --labels``: the filled-in rows join the run's data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import COLOURS, TINY_TRAIN, noisy_rgb
from visionflow._io import read_json
from visionflow.cli import app
from visionflow.config import load_train_config
from visionflow.data.index import DatasetIndex
from visionflow.errors import ConfigError, DataError
from visionflow.explain.active import (
    SELECTION_COLUMNS,
    select_for_labelling,
    write_selection_csv,
)

runner = CliRunner()


def _pool(trained_run: Path, tmp_path: Path) -> Path:
    """``tmp_path/pool``: 3 new images per class, 2 byte copies of training images, a byte copy
    of a new image, an unreadable JPEG and a hidden folder (ignored)."""
    pool = tmp_path / "pool"
    (pool / "sub").mkdir(parents=True)
    rng = np.random.default_rng(11)
    for name, colour in COLOURS.items():
        for i in range(3):
            noisy_rgb(rng, colour).save(pool / ("sub" if i else ".") / f"{name}_{i}.png")
    data = trained_run.parent.parent / "data"
    shutil.copyfile(data / "red" / "red_00.png", pool / "seen_before.png")
    shutil.copyfile(data / "blue" / "blue_02.jpg", pool / "sub" / "seen_too.jpg")
    shutil.copyfile(pool / "green_0.png", pool / "sub" / "green_again.png")
    (pool / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (pool / ".hidden").mkdir()
    noisy_rgb(rng, (0, 0, 0)).save(pool / ".hidden" / "ignored.png")
    return pool


def test_select_skips_training_images_duplicates_and_unreadable_files(trained_run, tmp_path):
    pool = _pool(trained_run, tmp_path)
    stages: set[str] = set()
    result = select_for_labelling(
        trained_run, pool, n=4, strategy="hybrid", device="cpu",
        progress=lambda stage, done, total: stages.add(stage),
    )  # fmt: skip
    assert result.scored == 9
    assert sorted(p.name for p in result.in_training) == ["seen_before.png", "seen_too.jpg"]
    assert [p.name for p in result.duplicates] == ["green_again.png"]
    assert [Path(p).name for p, _ in result.unreadable] == ["broken.jpg"]
    assert result.training_found and result.labelled_embedded == 36
    assert [r.rank for r in result.rows] == [1, 2, 3, 4]
    assert len({r.path for r in result.rows}) == 4
    assert all(r.suggested_label in COLOURS and 0 <= r.confidence <= 1 for r in result.rows)
    assert all(".hidden" not in r.path.parts for r in result.rows)
    assert stages == {"hashing the training data", "scoring the pool"}
    payload = result.to_json()
    assert payload["skipped_in_training"] == 2 and payload["unreadable"][0]["reason"]


def test_the_csv_is_written_atomically_and_never_over_labels(trained_run, tmp_path):
    pool = _pool(trained_run, tmp_path)
    result = select_for_labelling(trained_run, pool, n=3, strategy="margin", device="cpu")
    out = write_selection_csv(result, tmp_path / "to_label.csv")
    with open(out, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == SELECTION_COLUMNS
    assert [r[1] for r in rows[1:]] == ["", "", ""]  # the label column, for a person
    assert all(r[0].startswith("pool/") for r in rows[1:])  # relative to the CSV's folder
    assert [r[5] for r in rows[1:]] == ["1", "2", "3"]
    with pytest.raises(ConfigError, match=r"already exists.*--overwrite"):
        write_selection_csv(result, out)
    elsewhere = write_selection_csv(result, tmp_path / "sub" / "x.csv")
    with open(elsewhere, encoding="utf-8", newline="") as fh:
        first = next(csv.DictReader(fh))
    assert Path(first["path"]).is_absolute()  # the pool is not under the CSV's folder


def test_select_with_a_bundle_uses_its_run_for_the_training_data(trained_run, tmp_path):
    from visionflow.export.exporter import export_run

    bundle = export_run(trained_run, tmp_path / "tiny.vfb").path
    pool = _pool(trained_run, tmp_path)
    result = select_for_labelling(bundle, pool, n=2, strategy="diversity")
    assert result.scored == 9 and len(result.in_training) == 2
    assert result.labelled_embedded == 36 and len(result.rows) == 2


def test_select_refuses_an_empty_pool(trained_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copyfile(trained_run.parent.parent / "data" / "red" / "red_00.png", empty / "a.png")
    with pytest.raises(DataError, match=r"no new readable image.*1 already in the training data"):
        select_for_labelling(trained_run, empty, n=2, strategy="entropy", device="cpu")
    with pytest.raises(DataError, match="not a folder"):
        select_for_labelling(trained_run, tmp_path / "nowhere", n=2, device="cpu")


def test_select_command_writes_the_csv_and_names_unreadable_files(trained_run, tmp_path):
    pool = _pool(trained_run, tmp_path)
    out = tmp_path / "to_label.csv"
    args = ["select", str(trained_run), str(pool), "--n", "3", "--out", str(out)]
    result = runner.invoke(app, [*args, "--strategy", "entropy", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "fill in the label column" in " ".join(result.stdout.split())
    stderr = " ".join(result.stderr.split())
    assert "2 already in the training data" in stderr and "broken.jpg" in stderr
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.stderr
    payload = runner.invoke(app, [*args, "--overwrite", "--json", "--strategy", "coreset"])
    assert payload.exit_code == 0, payload.output
    data = json.loads(payload.stdout)
    assert data["strategy"] == "coreset" and data["selected"] == 3 and data["csv"] == str(out)
    bad = runner.invoke(app, [*args, "--overwrite", "--strategy", "uncertain"])
    assert bad.exit_code == 2 and "unknown selection strategy" in bad.stderr


def _fill(csv_path: Path, labels: list[str]) -> None:
    """Fill the label column the way a person would (an empty string leaves a row out)."""
    with open(csv_path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    for row, label in zip(rows[1:], labels, strict=True):
        row[1] = label
    with open(csv_path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_train_with_labels_adds_the_filled_rows_to_the_run(trained_run, tmp_path, image_folder):
    pool = _pool(trained_run, tmp_path)
    out = tmp_path / "to_label.csv"
    picked = select_for_labelling(trained_run, pool, n=3, strategy="margin", device="cpu")
    write_selection_csv(picked, out)
    _fill(out, [picked.rows[0].suggested_label, "", picked.rows[2].suggested_label])
    config = tmp_path / "tiny.yaml"
    # the probe alone: the merge is what is tested, not the fine-tune
    config.write_text(yaml.safe_dump({**TINY_TRAIN, "strategy": "probe", "device": "cpu"}))
    args = ["train", str(image_folder), "--config", str(config), "--no-search", "--json",
            "--out", str(tmp_path / "runs"), "--name", "more", "--labels", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "more"
    index = DatasetIndex.from_json(read_json(run / "index.json"))
    paths = {s.path.resolve() for s in index.samples}
    assert len(index) == 36 + 2
    assert picked.rows[0].path.resolve() in paths and picked.rows[1].path.resolve() not in paths
    merge = read_json(run / "labels.json")
    assert merge["added"] == 2 and merge["skipped_empty_label"] == 1
    assert read_json(run / "config.json")["labels"] == [str(out.resolve())]
    split = read_json(run / "split.json")
    assert sum(len(split[k]) for k in ("train", "val", "test")) == 38


def test_prepared_data_of_a_search_includes_the_labels(trained_run, tmp_path, image_folder):
    from visionflow.train.recipe import prepare_data

    pool = _pool(trained_run, tmp_path)
    labels = tmp_path / "l.csv"
    labels.write_text(f"path,label\n{pool / 'red_0.png'},red\n{pool / 'blue_0.png'},\n")
    cfg = load_train_config(overrides={**TINY_TRAIN, "labels": [str(labels)]})
    prepared = prepare_data(image_folder, cfg, run_dir=tmp_path / "search")
    assert len(prepared.index) == 37
    assert prepared.index.samples[-1].path == pool / "red_0.png"
    again = prepare_data(image_folder, cfg, run_dir=tmp_path / "search")  # resumed: same data
    assert [s.path for s in again.index.samples] == [s.path for s in prepared.index.samples]


def test_train_rejects_a_bad_label_naming_the_file_and_line(tmp_path, image_folder):
    labels = tmp_path / "l.csv"
    labels.write_text("path,label\ndata/red/red_00.png,purple\n")
    args = ["train", str(image_folder), "--no-search", "--labels", str(labels),
            "--out", str(tmp_path / "runs")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3
    message = " ".join(result.stderr.split())
    assert f"{labels.resolve()} line 2: label 'purple'" in message
