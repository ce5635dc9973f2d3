"""Active learning strategies on synthetic probabilities and embeddings, and the merge of a
filled-in label CSV into a dataset (visionflow.data.readers.labels)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import COLOURS, noisy_rgb, write_class_folder
from visionflow.data.index import DatasetIndex, Sample, Split
from visionflow.data.readers import read_dataset
from visionflow.data.readers.labels import merge_labels
from visionflow.errors import ConfigError, DataError
from visionflow.explain.active import (
    available_strategies,
    entropy_scores,
    get_strategy,
    k_center_greedy,
    margin_scores,
    register_strategy,
    select,
    typical_clusters,
)

ALL = ["entropy", "margin", "least-confidence", "diversity", "coreset", "hybrid", "random"]


def _clusters(sizes: list[int], dim: int = 16, spread: float = 0.05, seed: int = 0):
    """Well-separated clusters: returns embeddings and the cluster id of each row."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 10.0
    rows, ids = [], []
    for c, size in enumerate(sizes):
        rows.append(centres[c] + spread * rng.standard_normal((size, dim)))
        ids += [c] * size
    return np.vstack(rows).astype(np.float32), np.asarray(ids)


def test_registry_lists_every_strategy_and_refuses_unknown_names():
    assert available_strategies()[: len(ALL)] == ALL
    with pytest.raises(ConfigError, match=r"'margn'.*did you mean 'margin'.*hybrid"):
        get_strategy("margn")
    with pytest.raises(ConfigError, match="choose from: entropy, margin"):
        select(np.full((3, 2), 0.5), 1, strategy="nope")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("margin")(lambda p, n, e, lab, r: (np.arange(n), np.zeros(n)))


def test_uncertainty_strategies_pick_what_they_measure():
    probs = np.array(
        [
            [0.98, 0.01, 0.01],  # confident
            [0.45, 0.45, 0.10],  # a tie between two classes: the smallest margin
            [0.40, 0.30, 0.30],  # the flattest: highest entropy, lowest top probability
            [0.80, 0.15, 0.05],
        ]
    )
    assert select(probs, 1, strategy="entropy").indices.tolist() == [2]
    assert select(probs, 1, strategy="margin").indices.tolist() == [1]
    assert select(probs, 1, strategy="least-confidence").indices.tolist() == [2]
    ranked = select(probs, 4, strategy="entropy")
    assert ranked.indices.tolist()[-1] == 0  # the confident one last
    assert np.all(np.diff(ranked.scores) <= 0)
    np.testing.assert_allclose(entropy_scores(np.full((1, 4), 0.25)), [1.0])
    np.testing.assert_allclose(margin_scores(probs)[1], 1.0)


def test_diversity_covers_the_clusters_and_avoids_labelled_ones():
    emb, ids = _clusters([30, 20, 10, 5])
    probs = np.full((len(emb), 2), 0.5)
    picked = select(probs, 4, strategy="diversity", embeddings=emb, seed=1)
    assert sorted(ids[picked.indices].tolist()) == [0, 1, 2, 3]
    assert ids[picked.indices[0]] == 0  # the largest region first; score = its size
    assert picked.scores[0] == 30
    labelled = emb[ids == 0][:1]  # cluster 0 is already labelled
    again = select(probs, 3, strategy="diversity", embeddings=emb, labelled=labelled, seed=1)
    assert sorted(ids[again.indices].tolist()) == [1, 2, 3]


def test_coreset_is_k_center_greedy():
    emb, ids = _clusters([30, 20, 10, 5])
    picks, scores = k_center_greedy(emb, 4, rng=np.random.default_rng(0))
    assert sorted(ids[picks].tolist()) == [0, 1, 2, 3]
    assert np.all(np.diff(scores) <= 1e-6)  # each pick covers less than the one before
    labelled = emb[ids == 2][:2]
    first = select(
        np.full((len(emb), 2), 0.5), 1, strategy="coreset", embeddings=emb, labelled=labelled
    )
    assert ids[first.indices[0]] != 2


def test_hybrid_takes_uncertain_images_from_different_clusters():
    emb, ids = _clusters([8, 8, 40])
    probs = np.zeros((len(emb), 2))
    probs[ids == 0] = [0.50, 0.50]  # the most uncertain cluster
    probs[ids == 1] = [0.60, 0.40]  # uncertain too
    probs[ids == 2] = [0.99, 0.01]  # confident
    by_margin = select(probs, 2, strategy="margin", seed=0)
    assert ids[by_margin.indices].tolist() == [0, 0]  # redundant: both from one cluster
    hybrid = select(probs, 2, strategy="hybrid", embeddings=emb, seed=0)
    assert ids[hybrid.indices].tolist() == [0, 1]  # one per cluster, most uncertain first
    np.testing.assert_allclose(hybrid.scores, [1.0, 0.8])


@pytest.mark.parametrize("strategy", ALL)
def test_every_strategy_is_deterministic_and_handles_a_small_pool(strategy):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=40)
    emb = rng.standard_normal((40, 8)).astype(np.float32)
    labelled = rng.standard_normal((5, 8)).astype(np.float32)
    kw = {"strategy": strategy, "embeddings": emb, "labelled": labelled}
    a = select(probs, 7, seed=3, **kw)
    b = select(probs, 7, seed=3, **kw)
    assert a.indices.tolist() == b.indices.tolist()
    np.testing.assert_array_equal(a.scores, b.scores)
    assert len(set(a.indices.tolist())) == 7
    everything = select(probs, 100, seed=3, **kw)  # n larger than the pool: all of it, once
    assert sorted(everything.indices.tolist()) == list(range(40))
    assert len(select(probs, 0, **kw)) == 0


def test_random_depends_on_the_seed():
    probs = np.full((50, 3), 1 / 3)
    a = select(probs, 10, strategy="random", seed=0).indices.tolist()
    b = select(probs, 10, strategy="random", seed=1).indices.tolist()
    assert a != b


def test_duplicate_embeddings_still_give_distinct_picks():
    emb = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # three distinct points
    probs = np.tile([[0.5, 0.5]], (30, 1))
    for strategy in ("diversity", "hybrid", "coreset"):
        picked = select(probs, 6, strategy=strategy, embeddings=emb)
        assert len(set(picked.indices.tolist())) == 6
    picks, _ = typical_clusters(emb, 6, labelled=emb[:2])
    assert len(set(picks.tolist())) == 6


def test_select_checks_its_inputs():
    probs = np.full((4, 2), 0.5)
    with pytest.raises(ConfigError, match="needs embeddings"):
        select(probs, 2, strategy="hybrid")
    with pytest.raises(ConfigError, match="one row per pool image"):
        select(probs, 2, strategy="diversity", embeddings=np.zeros((3, 5)))
    with pytest.raises(ConfigError, match=r"shape \(images, 5\)"):
        select(probs, 2, strategy="coreset", embeddings=np.zeros((4, 5)), labelled=np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="0 or more"):
        select(probs, -1, strategy="margin")


# ------------------------------------------------------------------------------ merge
def _pool(tmp_path: Path) -> Path:
    """``tmp_path/pool``: 2 new images per colour class (different noise than the dataset)."""
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(7)
    for name, colour in COLOURS.items():
        for i in range(2):
            noisy_rgb(rng, colour).save(pool / f"{name}_new{i}.png")
    return pool


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_filled_rows_join_the_index_and_empty_ones_are_counted(image_folder, tmp_path):
    pool = _pool(tmp_path)
    csv = _write(
        tmp_path / "to_label.csv",
        "path,label,suggested_label,confidence,score,rank\n"
        "pool/red_new0.png,red,red,0.9,0.5,1\n"
        f"{(pool / 'blue_new0.png').resolve()},blue,green,0.4,0.4,2\n"
        "pool/green_new0.png,,green,0.3,0.3,3\n"
        "pool/green_new1.png,green,green,0.3,0.3,4\n",
    )
    index = read_dataset(image_folder)
    merged = merge_labels(index, [csv])
    assert len(merged.index) == len(index) + 3
    assert merged.index.classes == index.classes
    added = {s.path.name: s.label for s in merged.added}
    assert added == {"red_new0.png": "red", "blue_new0.png": "blue", "green_new1.png": "green"}
    assert merged.empty == [f"{csv} line 4"]
    assert merged.to_json()["added_per_class"] == {"blue": 1, "green": 1, "red": 1}
    assert "3 labelled image(s) added" in merged.summary()
    assert "1 row(s) with an empty label skipped" in merged.summary()
    assert len(index) == 36  # the input index is not changed
    # the merged index survives a round trip through index.json (paths outside the root)
    again = DatasetIndex.from_json(merged.index.to_json())
    assert [s.path for s in again.samples] == [s.path for s in merged.index.samples]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("pool/red_new0.png,purple", r"line 3: label 'purple' .* not a class.*blue, green, red"),
        ("pool/red_new0.png,Red", r"line 3: label 'Red'.*did you mean 'red'"),
        ("pool/nothere.png,red", r"line 3: 'pool/nothere.png' does not exist"),
        ("pool/red_new0.png,red,extra,cells", r"line 3: expected 2 columns \(path, label\)"),
        ("pool/red_new0.png", r"line 3: expected 2 columns"),
        (",red", r"line 3: the path is empty"),
        ("pool,red", r"line 3: 'pool' is not a regular file"),
    ],
)
def test_bad_rows_are_errors_naming_the_file_and_line(image_folder, tmp_path, row, message):
    _pool(tmp_path)
    csv = _write(tmp_path / "labels.csv", f"path,label\npool/blue_new0.png,blue\n{row}\n")
    with pytest.raises(DataError, match=message) as info:
        merge_labels(read_dataset(image_folder), [csv])
    assert str(csv) in str(info.value)


def test_a_file_without_the_columns_or_missing_is_an_error(image_folder, tmp_path):
    index = read_dataset(image_folder)
    with pytest.raises(DataError, match=r"no label column.*'path', 'labl'"):
        merge_labels(index, [_write(tmp_path / "a.csv", "path,labl\nx.png,red\n")])
    with pytest.raises(DataError, match="does not exist"):
        merge_labels(index, [tmp_path / "missing.csv"])
    with pytest.raises(DataError, match="not UTF-8"):
        (tmp_path / "b.csv").write_bytes(b"path,label\n\xff\xfe.png,red\n")
        merge_labels(index, [tmp_path / "b.csv"])


def test_images_already_in_the_data_are_not_counted_twice(image_folder, tmp_path):
    pool = _pool(tmp_path)
    shutil.copyfile(image_folder / "red" / "red_00.png", pool / "copy.png")
    csv = _write(
        tmp_path / "to_label.csv",
        "path,label\n"
        "pool/copy.png,blue\n"  # the same bytes as data/red/red_00.png
        f"{image_folder / 'green' / 'green_00.png'},green\n"  # the dataset's own file
        "pool/red_new0.png,red\n",
    )
    second = _write(tmp_path / "more.csv", "file,class\npool/red_new0.png,red\n")
    merged = merge_labels(read_dataset(image_folder), [csv, second])
    assert [s.path.name for s in merged.added] == ["red_new0.png"]
    assert len(merged.already) == 2
    assert "labelled 'red' there; that label is kept" in merged.already[0]
    assert merged.repeated == [f"{second} line 2: same image as {csv} line 4"]


def test_the_same_image_with_two_labels_is_an_error(image_folder, tmp_path):
    pool = _pool(tmp_path)
    shutil.copyfile(pool / "red_new0.png", pool / "red_copy.png")
    csv = _write(tmp_path / "l.csv", "path,label\npool/red_new0.png,red\npool/red_copy.png,blue\n")
    with pytest.raises(DataError, match=r"l.csv line 3: .*'blue', but .*l.csv line 2 .*'red'"):
        merge_labels(read_dataset(image_folder), [csv])


def test_new_rows_go_to_train_when_the_split_is_fixed(tmp_path):
    root = tmp_path / "given"
    write_class_folder(root / "train", COLOURS, 4, seed=0)
    write_class_folder(root / "val", COLOURS, 2, seed=1)
    pool = _pool(tmp_path)
    csv = _write(tmp_path / "l.csv", f"path,label\n{pool / 'red_new1.png'},red\n")
    merged = merge_labels(read_dataset(root), [csv])
    assert merged.added[0].split == "train"


def test_complete_split_puts_rows_a_split_file_misses_into_train(image_folder, tmp_path):
    _pool(tmp_path)
    csv = _write(tmp_path / "l.csv", "path,label\npool/red_new1.png,red\n")
    merged = merge_labels(read_dataset(image_folder), [csv])
    n = len(merged.index)
    split = Split(train=list(range(0, n - 1, 2)), val=list(range(1, n - 1, 2)), test=[])
    completed = merged.complete_split(split, merged.index)
    assert completed.train[-1] == n - 1 and completed.val == split.val
    assert merged.complete_split(completed, merged.index) is completed


def test_merge_of_no_rows_keeps_the_index(image_folder, tmp_path):
    csv = _write(tmp_path / "l.csv", "path,label\n")
    index = read_dataset(image_folder)
    merged = merge_labels(index, [csv])
    assert merged.added == [] and len(merged.index) == len(index)
    assert isinstance(merged.index.samples[0], Sample)
