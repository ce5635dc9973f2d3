"""``visionflow clean``: the review files, the cache, ``--apply`` honouring edited actions, the
refusals, and the guarantee that the dataset's files are never touched (tiny backbone, random
weights, 32 px)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from visionflow.cli import app
from visionflow.data.readers import read_dataset
from visionflow.errors import DataError
from visionflow.explain.clean import REVIEW_COLUMNS, read_review_csv

runner = CliRunner()
TINY = ["--backbone", "test_efficientnet", "--weights", "none", "--img-size", "32"]


@pytest.fixture
def dirty(image_folder: Path) -> Path:
    """The 3-colour dataset plus a byte copy (red_00 -> red/copy.png), a smooth green picture
    and its JPEG re-encode (green/leaf.png, green/leaf_again.jpg), and a red image filed under
    blue (blue/red_stray.png)."""
    shutil.copyfile(image_folder / "red" / "red_00.png", image_folder / "red" / "copy.png")
    ramp = np.linspace(0, 1, 48)
    leaf = np.stack(
        [
            60 * ramp[None, :] + 20 * ramp[:, None],
            150 + 80 * np.outer(ramp, ramp),
            40 + 60 * np.sin(6 * ramp)[:, None] * ramp[None, :],
        ],
        axis=-1,
    )
    Image.fromarray(leaf.astype(np.uint8)).save(image_folder / "green" / "leaf.png")
    buf = io.BytesIO()
    Image.open(image_folder / "green" / "leaf.png").save(buf, "JPEG", quality=80)
    (image_folder / "green" / "leaf_again.jpg").write_bytes(buf.getvalue())
    shutil.copyfile(image_folder / "red" / "red_03.png", image_folder / "blue" / "red_stray.png")
    return image_folder


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``root``: content hash, size and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[path.relative_to(root).as_posix()] = (digest, st.st_size, st.st_mtime_ns)
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(REVIEW_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def test_review_then_apply_edited_actions_never_touching_the_source(dirty, tmp_path):
    before = snapshot(dirty)
    out = tmp_path / "out"
    result = runner.invoke(app, ["clean", str(dirty), "--out", str(out), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)["review"]
    for name in ("review.csv", "review.html", "quality.json", "embedding_map.png"):
        assert (out / name).is_file(), name
    rows = read_rows(out / "review.csv")
    assert list(rows[0]) == list(REVIEW_COLUMNS)
    by_path = {(r["path"], r["issue"]): r for r in rows}
    # the byte copy: one group, the first copy kept, the other dropped by default
    copy_rows = [r for r in rows if r["path"] in ("red/copy.png", "red/red_00.png")]
    assert {r["issue"] for r in copy_rows} == {"duplicate"}
    assert len({r["group"] for r in copy_rows}) == 1
    assert sorted(r["action"] for r in copy_rows) == ["drop", "keep"]
    # the re-encoded JPEG: a near duplicate of its PNG
    assert ("green/leaf_again.jpg", "duplicate") in by_path
    # the stray red image under blue: a labelled copy that disagrees with red_03
    stray = by_path[("blue/red_stray.png", "duplicate")]
    assert "labels disagree" in stray["detail"] and stray["action"] == "keep"
    html = (out / "review.html").read_text(encoding="utf-8")
    assert "red/copy.png" in html and "data:image/png;base64," in html
    assert payload["by_issue"]["duplicate"]["drop"] >= 2
    assert json.loads((out / "quality.json").read_text())["embedding"]["backend"] != "cache"

    # a second run reads the embeddings from the cache
    again = runner.invoke(app, ["clean", str(dirty), "--out", str(out), *TINY, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "quality.json").read_text())["embedding"]["backend"] == "cache"

    # edit: relabel the stray image as red, drop blue_00, keep both byte copies after all
    assert by_path[("red/red_00.png", "duplicate")]["action"] == "drop"
    edited = []
    for r in rows:
        if r["path"] == "blue/red_stray.png":
            r = {**r, "action": "relabel", "suggested_label": "red"}
        if r["path"] == "red/red_00.png":
            r = {**r, "action": "keep"}
        edited.append(r)
    edited.append(
        {
            **dict.fromkeys(REVIEW_COLUMNS, ""),
            "path": "blue/blue_00.png",
            "issue": "outlier",
            "action": "DROP",
        }
    )
    review = tmp_path / "edited.csv"
    write_rows(review, edited)
    applied = runner.invoke(
        app,
        ["clean", str(dirty), "--out", str(out), "--apply", "--review", str(review), "--json"],
    )
    assert applied.exit_code == 0, applied.output
    info = json.loads(applied.stdout)["apply"]
    assert info["relabelled"] == 1
    cleaned = read_dataset(out / "cleaned")
    labels = {s.path.relative_to(out / "cleaned").as_posix(): s.label for s in cleaned.samples}
    assert labels["images/blue/red_stray.png"] == "red"
    assert "images/blue/blue_00.png" not in labels
    assert "images/red/copy.png" in labels and "images/red/red_00.png" in labels
    dropped = {r["path"] for r in edited if r["action"].lower() == "drop"}
    assert "green/leaf_again.jpg" in dropped
    assert not any(f"images/{p}" in labels for p in dropped)
    assert len(labels) == len(before) - len(dropped)
    # hard links (or copies) with the same bytes as the originals
    linked = out / "cleaned" / "images" / "red" / "red_00.png"
    assert linked.read_bytes() == (dirty / "red" / "red_00.png").read_bytes()
    # applying again replaces the cleaned folder
    again = runner.invoke(app, ["clean", str(dirty), "--out", str(out), "--apply", "--copy"])
    assert again.exit_code == 0, again.output
    assert "images/red/red_00.png" not in {
        s.path.relative_to(out / "cleaned").as_posix()
        for s in read_dataset(out / "cleaned").samples
    }
    assert snapshot(dirty) == before  # nothing in the dataset changed, ever


def test_apply_without_a_review_runs_the_checks_first(dirty, tmp_path):
    before = snapshot(dirty)
    out = tmp_path / "o"
    result = runner.invoke(app, ["clean", str(dirty), "-o", str(out), *TINY, "--apply"])
    assert result.exit_code == 0, result.output
    assert (out / "review.csv").is_file() and (out / "cleaned" / "labels.csv").is_file()
    assert "cleaned dataset" in result.output
    assert snapshot(dirty) == before


def test_out_inside_the_dataset_is_refused(dirty):
    before = snapshot(dirty)
    result = runner.invoke(app, ["clean", str(dirty), "--out", str(dirty / "review"), *TINY])
    assert result.exit_code == 2
    assert "inside the dataset" in result.output
    assert snapshot(dirty) == before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"path": "red/nope.png"}, "'red/nope.png' is not an image of the dataset"),
        ({"action": "burn"}, "unknown action 'burn'"),
        ({"action": "relabel", "suggested_label": "purple"}, "cannot relabel"),
    ],
)
def test_bad_review_rows_name_the_line(dirty, tmp_path, edit, message):
    rows = [dict.fromkeys(REVIEW_COLUMNS, "") for _ in range(3)]
    for i, r in enumerate(rows):
        r.update(path=f"red/red_0{i}.png", issue="outlier", action="keep")
    rows[1].update(edit)
    review = tmp_path / "review.csv"
    write_rows(review, rows)
    result = runner.invoke(
        app,
        ["clean", str(dirty), "--out", str(tmp_path / "o"), "--apply", "--review", str(review)],
    )
    assert result.exit_code == 3, result.output
    assert "review.csv line 3" in result.output and message in result.output
    with pytest.raises(DataError, match="line 3"):
        read_review_csv(review, read_dataset(dirty))
    assert not (tmp_path / "o" / "cleaned").exists()


def test_missing_review_file_and_conflicting_relabels(dirty, tmp_path):
    missing = runner.invoke(
        app,
        [
            "clean",
            str(dirty),
            "-o",
            str(tmp_path / "o"),
            "--apply",
            "--review",
            str(tmp_path / "none.csv"),
        ],
    )
    assert missing.exit_code == 3 and "does not exist" in missing.output
    rows = [dict.fromkeys(REVIEW_COLUMNS, "") for _ in range(2)]
    rows[0].update(path="red/red_00.png", action="relabel", suggested_label="blue")
    rows[1].update(path="red/red_00.png", action="relabel", suggested_label="green")
    review = tmp_path / "review.csv"
    write_rows(review, rows)
    result = runner.invoke(
        app, ["clean", str(dirty), "-o", str(tmp_path / "o"), "--apply", "--review", str(review)]
    )
    assert result.exit_code == 3
    assert "line 3" in result.output and "line 2" in result.output
