"""benchmarks/search_efficiency.py's bookkeeping (compute to the common best, arms run apart
joined into one table, a folder-per-class dataset instead of the digits) and
benchmarks/emoji_data.py's dataset from an npm tarball, without training anything."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # after site-packages: its modules shadow nothing

import emoji_data  # noqa: E402
import search_efficiency as se  # noqa: E402


def _trial(number: int, state: str, value: float | None) -> dict:
    return {"number": number, "state": state, "value": value}


def test_best_so_far_counts_completed_trials_in_the_order_they_ran():
    trials = [
        _trial(0, "complete", 0.80),
        _trial(1, "pruned", 0.95),  # a pruned trial's last report is not a result
        _trial(2, "complete", 0.90),
        _trial(3, "complete", 0.85),
    ]
    curve = se._best_so_far(trials, [100, 20, 60, 40])
    assert curve == [[100.0, 0.80], [120.0, 0.80], [180.0, 0.90], [220.0, 0.90]]
    assert se.images_to_reach(curve, 0.90) == 180.0
    assert se.images_to_reach(curve, 0.80) == 100.0
    assert se.images_to_reach(curve, 0.95) is None
    assert se._best_so_far([_trial(0, "pruned", 0.5)], [10]) == [[10.0, None]]


def _arm(best: float, curve: list[list[float]], images: int) -> dict:
    return {
        "counts": {"complete": 2},
        "epochs": 10,
        "train_images": images,
        "train_images_recorded": images,
        "trial_seconds": 10.0,
        "search_seconds": 11.0,
        "cpu_seconds": 11.0,
        "best_value": best,
        "test_accuracy": 0.9,
        "best_so_far": curve,
    }


def test_arms_run_apart_are_joined_and_compared_at_their_common_best():
    asha = {"seed": 0, "pruners": ["asha"], "asha": _arm(0.9, [[50, 0.85], [80, 0.9]], 80)}
    none = {"seed": 0, "pruners": ["none"], "none": _arm(0.95, [[60, 0.9], [200, 0.95]], 200)}
    other = {"seed": 1, "pruners": ["none"], "none": _arm(0.9, [[60, 0.9]], 60)}
    joined = se._join_arms([none, asha, other])
    assert [r["seed"] for r in joined] == [0, 1]
    assert joined[0]["pruners"] == ["asha", "none"]  # "none" last
    table = se.table_b(joined)
    # the common best of seed 0 is 0.9 (asha's best): asha reached it after 80 images, none
    # after 60; all of asha's trials took 80 images against none's 200
    assert "| 0 | asha |" in table and "80 (90.0%)" in table and "60 (90.0%)" in table
    ratio_row = next(line for line in table.splitlines() if "**asha / none**" in line)
    assert "| 0.40x | 1.33x |" in ratio_row
    assert joined[0]["ratio"]["asha"]["to_common_best"] == pytest.approx(80 / 60)


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_write_split_draws_from_a_folder_dataset_and_names_classes_that_are_too_small(tmp_path):
    data = tmp_path / "data"
    for i in range(5):
        _png(data / "red" / f"{i}.png", (200 + i, 0, 0))
        _png(data / "blue" / f"{i}.png", (0, 0, 200 + i))
    _png(data / "green" / "0.png", (0, 200, 0))
    with pytest.raises(SystemExit, match=r"\['green'\] have fewer than"):
        se.write_split(tmp_path / "work", 3, 2, seed=0, data=data)

    (data / "green" / "0.png").unlink()
    (data / "green").rmdir()
    train, test = se.write_split(tmp_path / "work2", 3, 2, seed=0, data=data)
    for folder, n in ((train, 3), (test, 2)):
        assert sorted(p.name for p in folder.iterdir()) == ["blue", "red"]
        assert all(len(list((folder / c).iterdir())) == n for c in ("blue", "red"))
    assert not list(data.glob("*.csv")), "the user's folder is left as it was"


def _tarball(path: Path) -> Path:
    meta = [
        {"name": "A", "image": "a.png", "category": "Flags", "has_img_google": True},
        {"name": "B", "image": "b.png", "category": "Smileys & Emotion", "has_img_google": True},
        {"name": "C", "image": "c.png", "category": "Smileys & Emotion", "has_img_google": False},
        {"name": "D", "image": "d.png", "category": "Component", "has_img_google": True},
    ]
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps(meta).encode())
        for name in ("a", "b", "c", "d"):
            png = io.BytesIO()
            Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(png, format="PNG")
            add(f"package/img/google/64/{name}.png", png.getvalue())
    return path


def test_emoji_dataset_is_one_folder_per_category_of_the_vendors_images(tmp_path):
    counts = emoji_data.write_dataset(_tarball(tmp_path / "e.tgz"), "google", tmp_path / "out")
    assert dict(counts) == {"flags": 1, "smileys-emotion": 1}  # no C (not drawn), no Component
    assert (tmp_path / "out" / "smileys-emotion" / "b.png").is_file()
