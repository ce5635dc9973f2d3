"""Data-quality checks on synthetic, separable embeddings and tiny planted images (no network,
no backbone): label issues, duplicates by perceptual hash and by embedding, leakage, outliers,
the embedding map, the report sections and the training-run hook."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from visionflow.data.index import DatasetIndex, Sample, Split
from visionflow.errors import ConfigError
from visionflow.explain.quality import (
    QualityConfig,
    analyze_quality,
    find_duplicates,
    find_label_issues,
    find_outliers,
    image_signatures,
    plot_embedding_map,
    prepare_embeddings,
)
from visionflow.explain.quality_report import (
    duplicate_section,
    label_issue_section,
    outlier_section,
    quality_sections,
    run_quality_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def clusters(n_per: int, k: int, dim: int = 32, seed: int = 0, spread: float = 0.25):
    """``k`` well-separated Gaussian clusters: (features, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3.0
    x = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centres])
    y = np.repeat(np.arange(k), n_per)
    return x.astype(np.float32), y


def texture(seed: int, size: int = 64) -> Image.Image:
    """A smooth random texture (blurred noise, upsampled): distinct per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- label issues
def test_flipped_labels_rank_first_with_the_true_label_suggested():
    x, y_true = clusters(30, 3)
    y = y_true.copy()
    flipped = [3, 40, 77, 15, 65]
    for i in flipped:
        y[i] = (y[i] + 1) % 3
    issues, estimated, notes = find_label_issues(prepare_embeddings(x), y, num_classes=3)
    top = [row for row, *_ in issues[: len(flipped)]]
    assert set(top) == set(flipped)
    for row, suggested, score, p_sug, likely in issues[: len(flipped)]:
        assert suggested == y_true[row]
        assert 0.5 < score <= 1.0 and p_sug > 0.5 and likely
    assert estimated is not None and estimated >= len(flipped)
    assert notes == []


def test_classes_smaller_than_the_folds_do_not_crash():
    x, y = clusters(12, 2)
    tiny_x, _ = clusters(2, 1, seed=5)
    lone_x, _ = clusters(1, 1, seed=9)
    x = np.concatenate([x, tiny_x, lone_x])
    y = np.concatenate([y, [2, 2], [3]])
    issues, _, notes = find_label_issues(
        prepare_embeddings(x), y, num_classes=4, config=QualityConfig(folds=5)
    )
    assert any("single image" in n for n in notes)
    assert all(row != len(y) - 1 for row, *_ in issues)  # the lone image is not judged
    assert all(suggested != 3 for _, suggested, *_ in issues)  # nor suggested


def test_one_usable_class_is_a_note_not_an_error():
    x, _ = clusters(5, 1)
    issues, estimated, notes = find_label_issues(x, np.zeros(5, int), num_classes=2)
    assert issues == [] and estimated is None
    assert any("fewer than 2 classes" in n for n in notes)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="filter_by"):
        QualityConfig(filter_by="magic")
    with pytest.raises(ConfigError, match="folds"):
        QualityConfig(folds=1)


# ----------------------------------------------------------------------------- duplicates
@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """``tmp_path/planted``: 8 distinct textures in a/ and b/, plus copies of a/t0: an exact
    byte copy, a JPEG re-encode, a 1.25x resize and a brightened version."""
    root = tmp_path / "planted"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
    for i in range(8):
        texture(i).save(root / ("a" if i < 4 else "b") / f"t{i}.png")
    original = Image.open(root / "a" / "t0.png")
    shutil.copyfile(root / "a" / "t0.png", root / "a" / "exact.png")
    (root / "a" / "reencoded.jpg").write_bytes(jpeg(original))
    original.resize((80, 80), Image.Resampling.BICUBIC).save(root / "a" / "resized.png")
    ImageEnhance.Brightness(original).enhance(1.1).save(root / "a" / "brighter.png")
    return root


def _index(root: Path, splits: dict[str, str] | None = None) -> DatasetIndex:
    samples = []
    for path in sorted(root.rglob("*.*")):
        rel = path.relative_to(root).as_posix()
        samples.append(Sample(path, path.parent.name, (splits or {}).get(rel)))
    return DatasetIndex(root=root, samples=samples)


def _noise_features(n: int, seed: int = 0) -> np.ndarray:
    """Embeddings with no near-parallel pair: only the pixels can match."""
    return np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)


def test_perceptual_hash_finds_exact_reencoded_resized_and_brighter_copies(planted, tmp_path):
    index = _index(planted)
    result = analyze_quality(index, features=_noise_features(len(index)), progress=False)
    assert len(result.duplicate_groups) == 1
    group = result.duplicate_groups[0]
    assert set(group.paths) == {
        "a/t0.png",
        "a/exact.png",
        "a/reencoded.jpg",
        "a/resized.png",
        "a/brighter.png",
    }
    assert group.kinds[0] == "exact" and "phash" in group.kinds
    assert group.labels_agree and not group.spans_splits
    assert result.leaks == []
    assert any(
        "1 group(s) of exact or near duplicates (4 extra copies)" in w for w in result.warnings
    )
    # the report's data checks found the byte copy: it is listed as such
    json.dumps(result.to_json())


def test_signatures_mark_undecodable_files(tmp_path):
    good = tmp_path / "good.png"
    texture(1).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    sigs, failures = image_signatures([good, bad])
    assert [row for row, _ in failures] == [1]
    assert sigs.hashes.shape == (2, 1) and sigs.thumbs.shape == (2, 256)


def test_embedding_cosine_groups_near_parallel_rows():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(10, 64))
    emb[7] = emb[2] + 0.01 * rng.normal(size=64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    groups = find_duplicates(10, embeddings=emb, config=QualityConfig(cosine=0.97))
    assert [(rows, kinds) for rows, kinds, _ in groups] == [([2, 7], ["embedding"])]
    assert groups[0][2] > 0.99
    # rows of the embeddings map onto their positions
    groups = find_duplicates(20, embeddings=emb, embedding_rows=list(range(10, 20)))
    assert groups[0][0] == [12, 17]


def test_leakage_across_splits_warns_and_names_the_files(planted):
    splits = {p.relative_to(planted).as_posix(): "train" for p in planted.rglob("*.*")}
    splits["a/reencoded.jpg"] = "test"
    splits["b/t5.png"] = "val"
    index = _index(planted, splits)
    result = analyze_quality(index, features=_noise_features(len(index)), progress=False)
    assert result.split_method == "given"
    assert len(result.leaks) == 1
    leak = result.leaks[0]
    assert "a/reencoded.jpg" in leak.paths and "a/t0.png" in leak.paths
    assert leak.splits[0] == "train"  # train members first
    warning = next(w for w in result.warnings if w.startswith("leakage"))
    assert "held-out accuracy is inflated" in warning
    assert "a/reencoded.jpg [test]" in warning and "a/t0.png [train]" in warning
    # an explicit Split wins over the samples' fields
    plain = _index(planted)
    positions = {s.path.relative_to(planted).as_posix(): i for i, s in enumerate(plain.samples)}
    test_pos = [positions["a/exact.png"]]
    split = Split(train=[i for i in range(len(plain)) if i not in test_pos], val=[], test=test_pos)
    result = analyze_quality(plain, split, features=_noise_features(len(plain)), progress=False)
    assert [set(x.paths) >= {"a/exact.png", "a/t0.png"} for x in result.leaks] == [True]


# ----------------------------------------------------------------------------- outliers
def test_far_away_points_are_outliers():
    x, y = clusters(20, 3, dim=16)
    rng = np.random.default_rng(1)
    far = rng.normal(size=(2, 16)) * 30.0
    x = np.concatenate([x, far])
    labels = [*y.tolist(), 0, 1]
    z = x - x.mean(axis=0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)  # centred and normalised, as analyze_quality
    found = find_outliers(z, labels, config=QualityConfig(outlier_z=3.5))
    rows = [row for row, *_ in found]
    assert set(rows[:2]) == {60, 61}
    for _, score, dist, class_dist in found[:2]:
        assert score >= 3.5 and 0 < dist <= 2 and class_dist is not None
    assert len(found) == 2  # nothing else in the tight clusters
    # too few images: no verdict
    assert find_outliers(z[:10], labels[:10]) == []


# ----------------------------------------------------------------------------- map, report
def test_embedding_map_png(tmp_path):
    x, y = clusters(10, 3)
    path = plot_embedding_map(
        prepare_embeddings(x),
        [f"c<{v}>" for v in y],
        tmp_path / "map.png",
        suspects=[1, 2],
        outliers=[5],
    )
    assert path.read_bytes().startswith(PNG)
    two = plot_embedding_map(x, ["a", "b"] * 15, tmp_path / "two.png")  # PCA
    assert two.read_bytes().startswith(PNG)
    few = plot_embedding_map(x[:2], ["a", "b"], tmp_path / "few.png")
    assert few.read_bytes().startswith(PNG)


@pytest.mark.slow
def test_embedding_map_tsne(tmp_path):
    x, _ = clusters(10, 3)
    tsne = plot_embedding_map(x, [None] * 30, tmp_path / "tsne.png", method="tsne")
    assert tsne.read_bytes().startswith(PNG)


def test_full_analysis_and_report_sections_escape_user_text(tmp_path):
    x, y_true = clusters(12, 2, dim=24)
    root = tmp_path / "data"
    samples = []
    names = ["<b>cats</b>", "dogs"]
    for i, label in enumerate(y_true):
        path = root / f"img_{i:02d}<x>.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        texture(100 + i).save(path)
        samples.append(Sample(path, names[label]))
    samples[3] = Sample(samples[3].path, names[1])  # flipped
    index = DatasetIndex(root=root, samples=samples)
    result = analyze_quality(
        index,
        features=x,
        out_dir=tmp_path / "out",
        config=QualityConfig(map_method="pca"),
        progress=False,
    )
    assert result.label_issues[0].path == "img_03<x>.png"
    assert result.label_issues[0].suggested == "<b>cats</b>"
    assert result.map_path is not None and result.map_path.is_file()
    thumbs = tmp_path / "out" / "thumbs"
    html = label_issue_section(result, thumbs).html
    assert "&lt;b&gt;cats&lt;/b&gt;" in html and "<b>cats" not in html
    assert "img_03&lt;x&gt;.png" in html and "data:image/png;base64," in html
    assert len(list(thumbs.glob("*.png"))) == len(result.label_issues)
    sections = quality_sections(result, thumbs)
    assert [s.title for s in sections] == [
        "Data quality: summary",
        "Data quality: label suspects",
        "Data quality: duplicates and leakage",
        "Data quality: outliers",
        "Data quality: embedding map",
    ]
    assert "No exact or near duplicates" in duplicate_section(result, thumbs).html
    assert "No outliers" in outlier_section(result, thumbs).html
    saved = result.save(tmp_path / "out" / "quality.json")
    assert json.loads(saved.read_text())["label_issues"][0]["given"] == "dogs"


def test_run_hook_uses_given_features_and_never_fails(planted, tmp_path):
    index = _index(planted)
    n = len(index)
    split = Split(train=list(range(n - 3)), val=list(range(n - 3, n - 1)), test=[n - 1])
    feats = _noise_features(n)
    # the test split has no features (a fine-tuned run): it is still hashed for leakage
    got = run_quality_report(
        index,
        split,
        {"train": (feats[: n - 3], None), "val": (feats[n - 3 : n - 1], None), "test": None},
        tmp_path / "q",
    )
    assert got.result is not None and (tmp_path / "q" / "quality.json").is_file()
    assert any("no embedding" in note for note in got.result.notes)
    assert len(got.sections) == 5
    skipped = run_quality_report(index, split, {}, tmp_path / "q2")
    assert skipped.result is None and "no frozen features" in skipped.sections[0].html
    late = run_quality_report(index, split, {"train": (feats, None)}, tmp_path / "q3", expired=True)
    assert "time budget" in late.sections[0].html

    def broken(name: str):
        raise RuntimeError("disk on fire")

    failed = run_quality_report(index, split, broken, tmp_path / "q4")
    assert failed.result is None and "disk on fire" in failed.sections[0].html


def test_run_hook_reports_leakage_as_a_finding(planted, tmp_path):
    index = _index(planted)
    by_name = {s.path.relative_to(planted).as_posix(): i for i, s in enumerate(index.samples)}
    test = [by_name["a/reencoded.jpg"]]
    split = Split(train=[i for i in range(len(index)) if i not in test], val=[], test=test)
    feats = _noise_features(len(index))
    got = run_quality_report(index, split, {"train": (feats[split.train], None)}, tmp_path / "q")
    assert got.findings[0].level == "warning"
    assert "a/reencoded.jpg [test]" in got.findings[0].detail
    html = "".join(s.html for s in got.sections)
    assert "Leakage" in html and "a/reencoded.jpg" in html


def test_trained_run_report_has_the_data_quality_sections(trained_run):
    report = (trained_run / "report.html").read_text(encoding="utf-8")
    assert "Data quality: label suspects" in report
    assert "Data quality: duplicates and leakage" in report
    quality = json.loads((trained_run / "quality" / "quality.json").read_text())
    assert quality["num_analysed"] == 36
    assert quality["embedding"]["source"] == "given features"
