import json
from pathlib import Path

import pytest

from visionflow.data import (
    DatasetIndex,
    Sample,
    load_split,
    read_dataset,
    save_split,
    stratified_split,
)
from visionflow.errors import ConfigError, DataError


def _index(counts, root=Path("/data")):
    samples = [
        Sample(root / label / f"{i:03d}.png", label)
        for label, n in counts.items()
        for i in range(n)
    ]
    return DatasetIndex(root=root, samples=samples, format="folder")


def _labels(index, positions):
    out = {}
    for i in positions:
        out[index.samples[i].label] = out.get(index.samples[i].label, 0) + 1
    return out


def test_stratified_per_class():
    index = _index({"a": 20, "b": 10, "c": 3})
    split = stratified_split(index, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert split.method == "stratified" and split.seed == 0
    assert _labels(index, split.val) == {"a": 4, "b": 2, "c": 1}
    assert _labels(index, split.test) == {"a": 2, "b": 1, "c": 1}
    assert _labels(index, split.train) == {"a": 14, "b": 7, "c": 1}
    for name in ("train", "val", "test"):
        assert split[name] == sorted(split[name])


def test_no_overlap_full_coverage_and_small_classes():
    index = _index({"a": 7, "b": 2, "c": 1, "d": 4})
    split = stratified_split(index, seed=3)
    every = split.train + split.val + split.test
    assert sorted(every) == list(range(len(index)))
    assert len(set(every)) == len(every)
    assert _labels(index, split.train)["c"] == 1 and _labels(index, split.train)["b"] == 2
    assert _labels(index, split.val)["d"] == 1 and _labels(index, split.test)["d"] == 1


def test_deterministic_and_seeded():
    index = _index({"a": 40, "b": 40})
    one = stratified_split(index, seed=1)
    assert one == stratified_split(index, seed=1)
    assert one.test != stratified_split(index, seed=2).test


def test_zero_fractions_and_bad_fractions():
    index = _index({"a": 5, "b": 5})
    split = stratified_split(index, val_fraction=0.2, test_fraction=0.0)
    assert split.test == [] and len(split.val) == 2
    for kw in (
        {"val_fraction": 1.0},
        {"test_fraction": -0.1},
        {"val_fraction": 0.5, "test_fraction": 0.5},
    ):
        with pytest.raises(ConfigError, match="fraction"):
            stratified_split(index, **kw)


def test_given_split_is_honoured(tmp_path):
    samples = [
        Sample(tmp_path / f"{s}{i}.png", "ab"[i % 2], split=s)
        for s in ("train", "val", "test")
        for i in range(4)
    ]
    index = DatasetIndex(root=tmp_path, samples=samples)
    split = stratified_split(index, seed=5)
    assert split.method == "given" and split.seed is None
    assert split.train == [0, 1, 2, 3] and split.val == [4, 5, 6, 7]
    assert split.test == [8, 9, 10, 11]


def test_given_split_without_val_carves_val_from_train(tmp_path):
    samples = [Sample(tmp_path / f"tr{i}.png", "ab"[i % 2], split="train") for i in range(20)]
    samples += [Sample(tmp_path / f"te{i}.png", "ab"[i % 2], split="test") for i in range(4)]
    split = stratified_split(DatasetIndex(root=tmp_path, samples=samples), val_fraction=0.2)
    assert split.method == "given" and split.seed == 0 and split.test == [20, 21, 22, 23]
    assert len(split.val) == 4 and set(split.val) <= set(range(20))
    assert sorted(split.train + split.val) == list(range(20))


def test_save_load_roundtrip(image_folder, tmp_path):
    index = read_dataset(image_folder)
    split = stratified_split(index, seed=7)
    target = save_split(split, index, tmp_path / "split.json")
    data = json.loads(target.read_text())
    assert data["method"] == "stratified" and data["seed"] == 7
    assert all(not p.startswith("/") and "/" in p for p in data["train"])
    loaded = load_split(target, index)
    assert (loaded.train, loaded.val, loaded.test) == (split.train, split.val, split.test)
    assert loaded.method == "file" and loaded.seed == 7
    # positions follow the paths when the index changes order
    reordered = DatasetIndex(
        root=index.root, samples=list(reversed(index.samples)), classes=index.classes
    )
    again = load_split(target, reordered)
    n = len(index) - 1
    assert sorted(n - i for i in again.test) == split.test


def test_csv_split_file(image_folder, tmp_path):
    index = read_dataset(image_folder)
    rels = [s.path.relative_to(index.root).as_posix() for s in index.samples]
    lines = ["path,split", f"{rels[0]},train", f"{index.samples[1].path},valid", f"{rels[2]},TEST"]
    lines.append("elsewhere/unknown.png,train")  # not in the index: ignored
    (tmp_path / "split.csv").write_text("\n".join(lines) + "\n")
    split = load_split(tmp_path / "split.csv", index)
    assert (split.train, split.val, split.test, split.method) == ([0], [1], [2], "file")
    (tmp_path / "split.tsv").write_text(f"path\tsplit\n{rels[3]}\tval\n")
    assert load_split(tmp_path / "split.tsv", index).val == [3]


def test_bad_split_files(image_folder, tmp_path):
    index = read_dataset(image_folder)
    rel = index.samples[0].path.relative_to(index.root).as_posix()
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,split\n{rel},train\n{rel}x,holdout\n")
    with pytest.raises(DataError, match=r"bad\.csv line 3: unknown split 'holdout'"):
        load_split(bad, index)
    bad.write_text(f"path,split\n{rel},train\n{rel},test\n")
    with pytest.raises(DataError, match="listed twice"):
        load_split(bad, index)
    bad.write_text("path,split\nnot/here.png,train\n")
    with pytest.raises(DataError, match=r"bad\.csv: none of its paths"):
        load_split(bad, index)
    bad.write_text("file,part\na.png,train\n")
    with pytest.raises(DataError, match="path and a split column"):
        load_split(bad, index)
    js = tmp_path / "bad.json"
    js.write_text(json.dumps({"train": [rel], "holdout": []}))
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_split(js, index)
    js.write_text(json.dumps({"train": [0, 1]}))
    with pytest.raises(DataError, match="not a path"):
        load_split(js, index)
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "missing.json", index)
