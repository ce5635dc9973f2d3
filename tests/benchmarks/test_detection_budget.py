"""benchmarks/_detection_data.py and benchmarks/detection_budget.py: the generated set reads back
as the same records in COCO, VOC and YOLO, is a pure function of its seed, and the benchmark's
plumbing (data, subprocess, metrics.json, tables) works with a stand-in for `visionflow train`.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # after site-packages: its modules shadow nothing

import _detection_data as gen  # noqa: E402
import detection_budget  # noqa: E402

from visionflow.data.detection import read_detection  # noqa: E402
from visionflow.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> gen.GeneratedSet:
    return gen.generate_detection_set(tmp_path_factory.mktemp("detset") / "set", images=12, seed=3)


def _image_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "voc" / "JPEGImages").iterdir()}


def test_the_three_formats_read_back_as_the_generated_records(small_set):
    m = small_set.manifest
    assert m["images"] == 12 and m["seed"] == 3
    assert m["classes"] == list(gen.CLASSES) == small_set.index.classes
    assert sum(m["images_per_split"].values()) == 12
    assert set(m["images_per_split"]) == {"train", "val", "test"}
    assert sum(m["boxes_per_class"].values()) == m["boxes"] == small_set.index.num_boxes > 0
    assert sum(m["boxes_per_size"].values()) == m["boxes"]

    report = gen.verify_detection_set(small_set.root)
    assert {fmt: r["images"] for fmt, r in report.items()} == {f: 12 for f in gen.FORMATS}
    assert report["coco"]["max_box_difference_px"] == report["voc"]["max_box_difference_px"] == 0
    assert report["yolo"]["max_box_difference_px"] <= gen.YOLO_TOLERANCE
    for s in small_set.index.samples:
        assert min(s.width, s.height) >= 160 and max(s.width, s.height) <= 320
        assert s.split in ("train", "val", "test")
        for x1, y1, x2, y2 in s.boxes:  # whole pixels, inside the image, not degenerate
            assert all(v == int(v) for v in (x1, y1, x2, y2))
            assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
            assert min(x2 - x1, y2 - y1) >= 6


def test_images_depend_only_on_seed_and_position(small_set, tmp_path):
    fewer = gen.generate_detection_set(tmp_path / "fewer", images=4, seed=3)
    other = gen.generate_detection_set(tmp_path / "other", images=4, seed=4)
    first = _image_bytes(small_set.root)
    assert _image_bytes(fewer.root).items() <= first.items()  # same bytes, any set size
    assert all(first[name] != data for name, data in _image_bytes(other.root).items())


def test_verification_names_a_changed_box(small_set, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_set.root, copy)
    sample = next(s for s in small_set.index.samples if s.boxes)
    xml = copy / "voc" / "Annotations" / f"{sample.path.stem}.xml"
    x1 = int(sample.boxes[0][0]) + 1  # VOC's 1-based xmin
    text = xml.read_text()
    xml.write_text(text.replace(f"<xmin>{x1}</xmin>", f"<xmin>{x1 + 2}</xmin>", 1))
    with pytest.raises(DataError, match=rf"{sample.path.name}: box 1 .*\(voc\)"):
        gen.verify_detection_set(copy)
    with pytest.raises(DataError, match="not empty"):
        gen.generate_detection_set(copy, images=3)


FAKE_TRAIN = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    args = sys.argv[1:]
    run = Path(args[args.index("--out") + 1]) / args[args.index("--name") + 1]
    run.mkdir(parents=True)
    (run / "argv.json").write_text(json.dumps({"argv": args, "omp": os.environ["OMP_NUM_THREADS"]}))
    test = {"map": 0.41, "map_50": 0.625,
            "per_class": {"card": {"ap_50": 0.7}, "coin": {"ap_50": 0.8}, "digit": 0.375}}
    (run / "metrics.json").write_text(json.dumps({"val": {"map_50": 0.6}, "test": test}))
    print(json.dumps({"run_dir": str(run), "seconds": 1.5, "metrics": {"test": {"map_50": 0}}}))
    """
)


def test_benchmark_trains_through_the_cli_and_reads_metrics_json(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setattr(
        detection_budget, "_visionflow_command", lambda: [sys.executable, str(fake)]
    )
    out = tmp_path / "bench"
    argv = ["detection_budget.py", "--images", "5", "--seed", "2", "--budget", "2m"]
    argv += ["--format", "yolo", "--cpus", "1", "--out", str(out), "--keep", "--", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    detection_budget.main()

    printed = capsys.readouterr().out
    assert (
        "| 0.625 | 0.410 | card 0.700, coin 0.800, digit 0.375 | **pass** (>= 0.5) | 1 |" in printed
    )
    result = json.loads((out / "result.json").read_text())
    run_dir = Path(result["train"]["run_dir"])
    called = json.loads((run_dir / "argv.json").read_text())
    assert called["omp"] == "1"
    assert called["argv"][:4] == ["train", str(out / "data" / "yolo"), "--task", "detect"]
    assert called["argv"][-2:] == ["--epochs", "1"] and "--json" in called["argv"]
    assert "--detector" not in called["argv"]  # auto: the CLI's own default
    assert read_detection(out / "data" / "yolo").format == "yolo"

    # --table reprints the saved result; a run without --keep leaves only result.json
    monkeypatch.setattr(sys, "argv", ["detection_budget.py", "--table", str(out / "result.json")])
    detection_budget.main()
    assert "**pass**" in capsys.readouterr().out
    again = tmp_path / "again"
    dry = ["detection_budget.py", "--images", "3", "--out", str(again), "--dry-run"]
    monkeypatch.setattr(sys, "argv", dry)
    detection_budget.main()
    assert sorted(p.name for p in again.iterdir()) == ["result.json"]
