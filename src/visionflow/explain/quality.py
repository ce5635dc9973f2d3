"""Data quality: label issues, near-duplicates, leakage across splits and outliers.

Everything runs on the embeddings of a frozen pretrained backbone
(:mod:`visionflow.models.features`, cached on disk) plus two cheap pixel signatures per image,
so a dataset is checked without training anything on it:

* **label issues**: out-of-fold predicted probabilities from a stratified k-fold logistic
  regression on the embeddings (centred, L2-normalised, PCA-whitened), ranked by cleanlab's
  confident learning (:func:`cleanlab.filter.find_label_issues`, most suspicious first). Each
  suspect has its given label, the suggested one and a score (``1 - p(given label)``); the ones
  cleanlab's noise-rate estimate also counts as errors are marked ``likely``. On the digits
  benchmark (BENCHMARKS.md) this ranking put 0.8-0.9 flipped labels among the top k.
* **near-duplicates**: exact byte copies (from :func:`visionflow.data.checks.check_dataset`), pairs
  whose perceptual hashes (:func:`imagehash.phash`) are close *and* whose small grey thumbnails
  correlate, and pairs whose embeddings are almost parallel; pairs are grouped with union-find.
  A group says whether its labels agree.
* **leakage**: a duplicate group with members in different splits: the held-out images were in
  effect seen in training, so held-out accuracy is inflated; the warning names the files.
* **outliers**: images far from all other images in embedding space (mean cosine distance of
  the centred embeddings to their nearest neighbours), flagged by a robust z-score (median and
  MAD) above a threshold.
* **embedding map**: a 2-D projection (LDA or PCA; t-SNE on request) coloured by label,
  suspects and outliers marked, as a PNG.

:func:`analyze_quality` runs all of it on a :class:`~visionflow.data.index.DatasetIndex` (and an
optional :class:`~visionflow.data.index.Split`) and returns one :class:`QualityResult`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from visionflow._io import atomic_write, atomic_write_json
from visionflow._progress import transient_bar
from visionflow.data.checks import BadFile, DataReport, check_dataset
from visionflow.data.images import DEFAULT_MAX_PIXELS, load_image
from visionflow.data.index import SPLIT_NAMES, DatasetIndex, Sample, Split
from visionflow.errors import ConfigError, ImageDecodeError

__all__ = [
    "DuplicateGroup",
    "LabelIssue",
    "Leak",
    "Outlier",
    "QualityConfig",
    "QualityResult",
    "analyze_quality",
    "find_duplicates",
    "find_label_issues",
    "find_leakage",
    "find_outliers",
    "image_signatures",
    "plot_embedding_map",
    "prepare_embeddings",
]

_FILTERS = (
    "predicted_neq_given",
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
)


@dataclass(frozen=True)
class QualityConfig:
    """Settings of the checks; the defaults were chosen on the digits benchmark (BENCHMARKS.md).

    Attributes:
        folds: Folds of the out-of-fold logistic regression (fewer when the largest class is
            smaller).
        C: Inverse L2 strength of the logistic regression (on whitened, normalised embeddings).
        dims: PCA dimensions the embeddings are whitened to (at most a quarter of the images).
        filter_by: cleanlab's ``filter_by``: which samples are listed as suspects. The default
            lists every sample whose out-of-fold prediction disagrees with its label, ranked by
            confident learning's self-confidence; ``likely`` marks those cleanlab's noise-rate
            estimate counts as errors.
        relabel_confidence: A likely label issue whose suggested label has at least this
            out-of-fold probability gets the default action ``relabel`` (else ``keep``).
        hash_size: Side of the perceptual hash (``hash_size**2`` bits).
        hash_distance: Largest Hamming distance of two perceptual hashes for a candidate pair.
        thumb_size: Side of the grey thumbnails compared to find candidate pairs.
        thumb_correlation: Smallest correlation of two thumbnails for a candidate pair.
        pixel_correlation: A candidate pair is a near-duplicate when, at the best of a few
            alignments (the whole image, or a crop of ``align_crops`` of it, centred or in a
            corner, against the other), the two grey images correlate at least this much at
            ``align_size`` pixels. On the digits benchmark planted copies (re-encoded, resized,
            cropped, brightened) scored 0.997 or more and the closest distinct digits 0.996.
        align_crops: Crop fractions tried when aligning a candidate pair.
        align_size: Side at which aligned images are compared.
        max_candidates: Most candidate pairs aligned (the most similar first); more is noted.
        cosine: Smallest cosine similarity of two (centred) embeddings for a near-duplicate.
        cosine_relative: The pair must also be this many times closer (in cosine distance) than
            the median image is to its nearest neighbour: in a dataset of look-alikes (tight
            classes, a product photographed a hundred times) every neighbour is "close", and
            only a pair much closer than usual is a copy.
        outlier_k: Neighbours averaged for the outlier distance.
        outlier_z: Robust z-score above which an image is an outlier.
        outlier_ratio: An outlier must also be this many times farther from its neighbours
            than the median image (in a tight, uniform set a z-score alone flags noise).
        min_outlier_images: Fewer images than this: no outlier check (the statistics would be
            meaningless).
        map_method: ``"auto"`` (LDA, the class-separating directions, with 3 or more classes,
            else PCA), ``"pca"``, ``"lda"`` or ``"tsne"``. t-SNE draws the nicest maps but
            is opt-in: on a busy 2-core machine it took 3-25 s for 40 images and 10-40 s for
            1,800, more than all the checks together.
        tsne_max: Above this many images ``"tsne"`` falls back to ``"auto"``.
        seed: Seed of the folds, PCA and t-SNE.
    """

    folds: int = 5
    C: float = 1.0
    dims: int = 128
    filter_by: str = "predicted_neq_given"
    relabel_confidence: float = 0.8
    hash_size: int = 8
    hash_distance: int = 20
    thumb_size: int = 16
    thumb_correlation: float = 0.97
    pixel_correlation: float = 0.995
    align_crops: tuple[float, ...] = (0.97, 0.94, 0.91, 0.88)
    align_size: int = 32
    max_candidates: int = 50_000
    cosine: float = 0.97
    cosine_relative: float = 0.1
    outlier_k: int = 10
    outlier_z: float = 3.0
    outlier_ratio: float = 1.5
    min_outlier_images: int = 20
    map_method: str = "auto"
    tsne_max: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"quality folds must be at least 2, got {self.folds}")
        if self.filter_by not in _FILTERS:
            raise ConfigError(
                f"quality filter_by {self.filter_by!r} is not one of cleanlab's {_FILTERS}"
            )
        if self.map_method not in ("auto", "pca", "tsne", "lda"):
            raise ConfigError(f"map_method must be auto, pca, tsne or lda, got {self.map_method!r}")
        for name in ("thumb_correlation", "pixel_correlation", "cosine", "relabel_confidence"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"quality {name} must be in (0, 1], got {value}")


# ----------------------------------------------------------------------------- findings
@dataclass
class LabelIssue:
    """A sample whose given label the out-of-fold model doubts.

    Attributes:
        position: Position in the analysed index.
        path: Path relative to the dataset root (POSIX).
        given: The label in the dataset.
        suggested: The most probable other label.
        score: ``1 - p(given)`` out of fold: higher is more suspicious.
        suggested_probability: ``p(suggested)`` out of fold.
        likely: cleanlab's noise-rate estimate also counts it as an error.
        rank: 1 for the most suspicious.
        split: The sample's split, when known.
    """

    position: int
    path: str
    given: str
    suggested: str
    score: float
    suggested_probability: float
    likely: bool
    rank: int
    split: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "path": self.path,
            "given": self.given,
            "suggested": self.suggested,
            "score": round(self.score, 6),
            "suggested_probability": round(self.suggested_probability, 6),
            "likely": self.likely,
            "split": self.split,
        }


@dataclass
class DuplicateGroup:
    """Images that are copies of each other (exactly or nearly).

    Attributes:
        id: Group number (``g1``, ``g2``... in the review file), largest groups first.
        positions: Members' positions in the analysed index, train members first, then by path.
        paths: Members' paths relative to the dataset root.
        labels: Members' labels.
        splits: Members' splits (``None`` when unknown).
        kinds: How the members were matched: ``exact``, ``phash``, ``embedding``.
        similarity: The weakest match that holds the group together (1.0 for exact copies;
            thumbnail correlation or embedding cosine otherwise).
    """

    id: int
    positions: list[int]
    paths: list[str]
    labels: list[str | None]
    splits: list[str | None]
    kinds: list[str]
    similarity: float

    @property
    def labels_agree(self) -> bool:
        return len({lab for lab in self.labels if lab is not None}) <= 1

    @property
    def spans_splits(self) -> bool:
        return len({s for s in self.splits if s is not None}) > 1

    def to_json(self) -> dict[str, Any]:
        return {
            "group": f"g{self.id}",
            "paths": list(self.paths),
            "labels": list(self.labels),
            "splits": list(self.splits),
            "kinds": list(self.kinds),
            "similarity": round(self.similarity, 6),
            "labels_agree": self.labels_agree,
            "spans_splits": self.spans_splits,
        }


@dataclass
class Leak:
    """A duplicate group whose members sit in different splits."""

    group: int
    paths: list[str]
    splits: list[str | None]

    def describe(self) -> str:
        return " = ".join(f"{p} [{s or '?'}]" for p, s in zip(self.paths, self.splits, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {"group": f"g{self.group}", "paths": list(self.paths), "splits": list(self.splits)}


@dataclass
class Outlier:
    """An image far from the rest of the data in embedding space.

    Attributes:
        score: Robust z-score of ``distance`` (median and MAD over all images).
        distance: Mean cosine distance to the ``outlier_k`` nearest other images.
        class_distance: The same over images of its own class (``None`` when unlabelled or its
            class is too small).
    """

    position: int
    path: str
    label: str | None
    score: float
    distance: float
    class_distance: float | None
    split: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "score": round(self.score, 4),
            "distance": round(self.distance, 6),
            "class_distance": None
            if self.class_distance is None
            else round(self.class_distance, 6),
            "split": self.split,
        }


@dataclass
class QualityResult:
    """Everything :func:`analyze_quality` found; :meth:`to_json` is what ``quality.json`` holds.

    Attributes:
        root: The dataset root; every path below is relative to it.
        classes: Class names.
        num_images: Images in the index.
        num_analysed: Readable images that were analysed.
        label_issues: Suspects, most suspicious first.
        estimated_label_errors: cleanlab's estimate of how many labels are wrong (``None`` when
            the label check did not run).
        duplicate_groups: Exact and near-duplicate groups.
        leaks: Duplicate groups spanning splits.
        outliers: Outliers, most extreme first.
        unreadable: Files the data checks could not decode (not analysed).
        warnings: One line per problem a person should act on.
        notes: What was skipped and why.
        map_path: The embedding map PNG, when one was written.
        embedding: Backbone, weights and preprocessing of the embeddings, and how they were got.
        timings: Seconds per stage.
        split_method: Where the splits came from (``"given"``, a split's method) or ``None``.
        paths: Relative path of every index position (for the review file).
        labels: Label of every index position.
        splits: Split of every index position (``None`` when unknown).
    """

    root: str
    classes: list[str]
    num_images: int
    num_analysed: int
    label_issues: list[LabelIssue] = field(default_factory=list)
    estimated_label_errors: int | None = None
    duplicate_groups: list[DuplicateGroup] = field(default_factory=list)
    leaks: list[Leak] = field(default_factory=list)
    outliers: list[Outlier] = field(default_factory=list)
    unreadable: list[BadFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    map_path: Path | None = None
    embedding: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    split_method: str | None = None
    paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "classes": list(self.classes),
            "num_images": self.num_images,
            "num_analysed": self.num_analysed,
            "estimated_label_errors": self.estimated_label_errors,
            "label_issues": [x.to_json() for x in self.label_issues],
            "duplicate_groups": [g.to_json() for g in self.duplicate_groups],
            "leaks": [x.to_json() for x in self.leaks],
            "outliers": [x.to_json() for x in self.outliers],
            "unreadable": [b.to_json() for b in self.unreadable],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "map": None if self.map_path is None else str(self.map_path),
            "embedding": dict(self.embedding),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "split_method": self.split_method,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` atomically."""
        return atomic_write_json(path, self.to_json())


# ----------------------------------------------------------------------------- embeddings
def prepare_embeddings(features: np.ndarray, *, dims: int = 128, seed: int = 0) -> np.ndarray:
    """Centre, L2-normalise, PCA-whiten to at most ``dims`` (and a quarter of the rows) and
    L2-normalise again.

    Pooled CNN features share a large common component (every cosine is near 1); centring
    removes it, and whitening gives the few informative directions the same weight as the
    dominant ones, which made the out-of-fold model's label-error ranking clearly better on the
    digits benchmark (precision at k 0.86 against 0.80 unwhitened).
    """
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        return np.zeros((len(x), 0))
    x = _unit(x - x.mean(axis=0))
    n_comp = min(dims, x.shape[1], max(2, len(x) // 4), len(x))
    if n_comp < 2 or len(x) < 3:
        return x
    with _one_thread():
        pca = PCA(n_components=n_comp, whiten=True, svd_solver="randomized", random_state=seed)
        z = pca.fit_transform(x)
    return _unit(z)


def _one_thread() -> Any:
    """BLAS/OpenMP limited to one thread: the fits here are small, and on a busy machine
    threads spinning for a core made a 5-fold logistic regression 5-50x slower (0.5 s against
    10 s for 1,500 images on 2 shared cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.where(norms > 1e-12, norms, 1.0))


# ----------------------------------------------------------------------------- label issues
def find_label_issues(
    embeddings: np.ndarray,
    labels: Sequence[int],
    *,
    num_classes: int,
    config: QualityConfig | None = None,
) -> tuple[list[tuple[int, int, float, float, bool]], int | None, list[str]]:
    """Rank samples whose label the out-of-fold model doubts.

    Args:
        embeddings: ``(n, d)`` prepared embeddings (:func:`prepare_embeddings`).
        labels: Class id of each row.
        num_classes: Number of classes (ids ``0..num_classes-1``).
        config: Thresholds and folds.

    Returns:
        ``(issues, estimated_errors, notes)``: ``issues`` holds ``(row, suggested class id,
        score, suggested probability, likely)``, most suspicious first; ``estimated_errors`` is
        the number cleanlab's confident learning (``prune_by_noise_rate``) counts as wrong, the
        ``likely`` ones; ``notes`` says what
        could not be checked (classes with a single image are left out: nothing else shows what
        they look like).
    """
    from cleanlab.filter import find_label_issues as cl_find
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    cfg = config or QualityConfig()
    y = np.asarray(labels, dtype=np.int64)
    x = np.asarray(embeddings, dtype=np.float64)
    notes: list[str] = []
    counts = np.bincount(y, minlength=num_classes) if len(y) else np.zeros(num_classes, int)
    small = [c for c in range(num_classes) if counts[c] == 1]
    if small:
        notes.append(
            f"{len(small)} class(es) have a single image; their labels are not checked and "
            "nothing is suggested as them"
        )
    keep_rows = np.flatnonzero(np.isin(y, np.flatnonzero(counts >= 2)))
    present = np.flatnonzero(counts >= 2)
    if len(present) < 2:
        notes.append("label issues: fewer than 2 classes have 2 or more images; not checked")
        return [], None, notes
    remap = np.full(num_classes, -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    xs, ys = x[keep_rows], remap[y[keep_rows]]
    k = len(present)
    n_splits = int(max(2, min(cfg.folds, np.bincount(ys).max())))
    probs = np.zeros((len(ys), k))
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=cfg.seed)
    with warnings.catch_warnings(), _one_thread():
        # a class smaller than the number of folds is spread over fewer folds (every training
        # fold still holds one of its images); that is what we want, not a problem
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        for train_idx, test_idx in splitter.split(xs, ys):
            model = LogisticRegression(C=cfg.C, max_iter=1000)
            model.fit(xs[train_idx], ys[train_idx])
            fold = np.full((len(test_idx), k), 1e-9)
            fold[:, model.classes_.astype(int)] = model.predict_proba(xs[test_idx])
            probs[test_idx] = fold / fold.sum(axis=1, keepdims=True)
    ranked = cl_find(
        ys, probs, filter_by=cfg.filter_by, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    likely_mask = cl_find(ys, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    estimated = int(np.count_nonzero(likely_mask))
    issues = []
    for row in ranked:
        row = int(row)
        p = probs[row].copy()
        given = int(ys[row])
        p_given = float(p[given])
        p[given] = -1.0
        suggested = int(np.argmax(p))
        issues.append(
            (
                int(keep_rows[row]),
                int(present[suggested]),
                1.0 - p_given,
                float(probs[row, suggested]),
                bool(likely_mask[row]),
            )
        )
    return issues, estimated, notes


# ----------------------------------------------------------------------------- duplicates
@dataclass
class Signatures:
    """Per-image pixel signatures: perceptual hash bits and a normalised grey thumbnail."""

    hashes: np.ndarray  # (n, hash_size**2 // 64) uint64 words
    thumbs: np.ndarray  # (n, thumb_size**2) float32, zero-mean, unit norm


def image_signatures(
    paths: Sequence[Path],
    *,
    hash_size: int = 8,
    thumb_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_image: Callable[[], None] | None = None,
) -> tuple[Signatures, list[tuple[int, str]]]:
    """Perceptual hash and grey thumbnail of every image; ``(signatures, failures)`` where
    failures are ``(row, reason)`` of files that could not be decoded (their rows stay zero)."""
    import imagehash
    from PIL import Image

    bits = hash_size * hash_size
    words = max(1, (bits + 63) // 64)
    hashes = np.zeros((len(paths), words), dtype=np.uint64)
    thumbs = np.zeros((len(paths), thumb_size * thumb_size), dtype=np.float32)
    failures: list[tuple[int, str]] = []
    for row, path in enumerate(paths):
        try:
            image = load_image(path, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            failures.append((row, exc.reason))
            if on_image is not None:
                on_image()
            continue
        flat = imagehash.phash(image, hash_size=hash_size).hash.flatten()
        padded = np.zeros(words * 64, dtype=bool)
        padded[: flat.size] = flat
        hashes[row] = np.packbits(padded).view(">u8").astype(np.uint64)
        grey = image.convert("L").resize((thumb_size, thumb_size), Image.Resampling.BILINEAR)
        t = np.asarray(grey, dtype=np.float32).ravel()
        t = t - t.mean()
        norm = float(np.linalg.norm(t))
        thumbs[row] = t / norm if norm > 1e-6 else t
        if on_image is not None:
            on_image()
    return Signatures(hashes, thumbs), failures


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _pairs_above(
    a: np.ndarray, threshold: float, block: int = 512
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Row pairs ``i < j`` of ``a @ a.T`` at or above ``threshold``, computed in blocks."""
    n = len(a)
    for start in range(0, n, block):
        sims = a[start : start + block] @ a.T
        rows, cols = np.nonzero(sims >= threshold)
        rows = rows + start
        keep = cols > rows
        yield rows[keep], cols[keep], sims[rows[keep] - start, cols[keep]]


def _hamming(hashes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bits that differ between the hashes of each ``(rows[i], cols[i])`` pair."""
    xor = hashes[rows] ^ hashes[cols]
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.asarray(np.bitwise_count(xor).sum(axis=1))
    return np.unpackbits(xor.view(np.uint8), axis=1).sum(axis=1)


def find_duplicates(
    n: int,
    *,
    signatures: Signatures | None = None,
    images: Sequence[Path] | None = None,
    embeddings: np.ndarray | None = None,
    embedding_rows: Sequence[int] | None = None,
    exact_groups: Sequence[Sequence[int]] = (),
    config: QualityConfig | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    notes: list[str] | None = None,
) -> list[tuple[list[int], list[str], float]]:
    """Group ``n`` rows into duplicate groups (union-find over matching pairs).

    A pair matches when

    * its rows are in one of ``exact_groups`` (byte copies): kind ``exact``;
    * its thumbnails correlate at ``thumb_correlation`` and its perceptual hashes differ in at
      most ``hash_distance`` bits (a candidate), and the images (``images[row]``, decoded
      again) correlate at ``pixel_correlation`` at their best alignment: kind ``phash``;
      without ``images`` the thumbnails' own correlation is used;
    * its embeddings (rows ``embedding_rows``, centred and normalised by the caller) have a
      cosine of at least ``cosine`` and are ``1 / cosine_relative`` times closer than the
      median nearest-neighbour pair: kind ``embedding``.

    Returns:
        ``(rows, kinds, similarity)`` per group of two or more rows, where ``similarity`` is
        the weakest of the matches that joined the group.
    """
    cfg = config or QualityConfig()
    uf = _UnionFind(n)
    kinds: dict[int, set[str]] = {}
    weakest: dict[int, float] = {}
    edges: list[tuple[int, int, str, float]] = []
    for group in exact_groups:
        first, *others = list(group)
        for other in others:
            edges.append((first, other, "exact", 1.0))
    if signatures is not None and n > 1:
        cand_i, cand_j, cand_s = [], [], []
        for rows, cols, sims in _pairs_above(signatures.thumbs, cfg.thumb_correlation):
            if len(rows) == 0:
                continue
            ok = _hamming(signatures.hashes, rows, cols) <= cfg.hash_distance
            cand_i.append(rows[ok])
            cand_j.append(cols[ok])
            cand_s.append(sims[ok])
        ci = np.concatenate(cand_i) if cand_i else np.zeros(0, np.int64)
        cj = np.concatenate(cand_j) if cand_j else np.zeros(0, np.int64)
        cs = np.concatenate(cand_s) if cand_s else np.zeros(0, np.float32)
        order = np.argsort(-cs, kind="stable")
        if len(order) > cfg.max_candidates:
            if notes is not None:
                notes.append(
                    f"near-duplicates: {len(order)} candidate pairs, only the "
                    f"{cfg.max_candidates} most similar were compared"
                )
            order = order[: cfg.max_candidates]
        aligner = _Aligner(images, cfg, max_pixels) if images is not None else None
        for k in order:
            i, j = int(ci[k]), int(cj[k])
            sim = aligner.similarity(i, j) if aligner is not None else float(cs[k])
            if sim >= cfg.pixel_correlation:
                edges.append((i, j, "phash", min(1.0, sim)))
    if embeddings is not None and len(embeddings) > 1:
        index_of = list(embedding_rows) if embedding_rows is not None else list(range(n))
        emb = np.asarray(embeddings, np.float32)
        typical = _median_nn_distance(emb, cfg.seed)
        threshold = max(cfg.cosine, 1.0 - cfg.cosine_relative * typical)
        for rows, cols, sims in _pairs_above(emb, threshold):
            for i, j, s in zip(rows, cols, sims, strict=True):
                edges.append((index_of[int(i)], index_of[int(j)], "embedding", float(min(1.0, s))))
    for i, j, _, _ in edges:
        uf.union(i, j)
    for i, _, kind, sim in edges:
        root = uf.find(i)
        kinds.setdefault(root, set()).add(kind)
        weakest[root] = min(weakest.get(root, 1.0), sim)
    members: dict[int, list[int]] = {}
    for i in range(n):
        root = uf.find(i)
        if root in kinds:
            members.setdefault(root, []).append(i)
    names = ("exact", "phash", "embedding")
    return [
        (rows, [k for k in names if k in kinds[root]], weakest[root])
        for root, rows in members.items()
        if len(rows) > 1
    ]


class _Aligner:
    """Best correlation of two images over a few crops of one against the whole other.

    A slight crop, a resize or a re-encode leaves a copy that matches its original almost
    perfectly once aligned, while two distinct images that merely look alike (two handwritten
    sevens) do not; the thumbnails that find candidates cannot tell these apart.
    """

    def __init__(self, images: Sequence[Path], cfg: QualityConfig, max_pixels: int) -> None:
        self.images = images
        self.cfg = cfg
        self.max_pixels = max_pixels
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray] | None] = OrderedDict()

    def _vec(self, image: Any) -> np.ndarray:
        from PIL import Image

        side = self.cfg.align_size
        a = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR), np.float32)
        a = a.ravel() - a.mean()
        norm = float(np.linalg.norm(a))
        return np.asarray(a / norm) if norm > 1e-6 else a

    def _views(self, row: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(whole, crops)`` vectors of an image (cached, least recently used dropped)."""
        if row in self._cache:
            self._cache.move_to_end(row)
            return self._cache[row]
        try:
            image = load_image(self.images[row], max_pixels=self.max_pixels).convert("L")
        except ImageDecodeError:
            views = None
        else:
            if max(image.size) > 4 * self.cfg.align_size:  # bounded memory and time
                image.thumbnail((4 * self.cfg.align_size,) * 2)
            w, h = image.size
            crops = [self._vec(image)]
            for f in self.cfg.align_crops:
                cw, ch = w * f, h * f
                for ox, oy in ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
                    x0, y0 = (w - cw) * ox, (h - ch) * oy
                    box = (round(x0), round(y0), round(x0 + cw), round(y0 + ch))
                    crops.append(self._vec(image.crop(box)))
            views = (crops[0], np.stack(crops))
        self._cache[row] = views
        if len(self._cache) > 512:
            self._cache.popitem(last=False)
        return views

    def similarity(self, i: int, j: int) -> float:
        a, b = self._views(i), self._views(j)
        if a is None or b is None:
            return 0.0
        return float(max((a[1] @ b[0]).max(), (b[1] @ a[0]).max()))


def _median_nn_distance(a: np.ndarray, seed: int, sample: int = 2000) -> float:
    """Median cosine distance of a row to its nearest other row (over at most ``sample`` rows)."""
    n = len(a)
    rows = np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False)
    sims = a[rows] @ a.T
    sims[np.arange(len(rows)), rows] = -np.inf
    return float(np.median(1.0 - sims.max(axis=1)))


def find_leakage(groups: Sequence[DuplicateGroup]) -> list[Leak]:
    """The duplicate groups whose members are in more than one split."""
    return [Leak(g.id, list(g.paths), list(g.splits)) for g in groups if g.spans_splits]


# ----------------------------------------------------------------------------- outliers
def find_outliers(
    embeddings: np.ndarray,
    labels: Sequence[int | None],
    *,
    exclude: Sequence[Sequence[int]] = (),
    config: QualityConfig | None = None,
) -> list[tuple[int, float, float, float | None]]:
    """Rows far from every other row: ``(row, robust z, distance, class distance)``, most
    extreme first.

    The distance of a row is the mean cosine distance to its ``outlier_k`` nearest rows (rows
    in the same ``exclude`` group, i.e. its own duplicates, do not count as neighbours); the
    robust z-score is ``(distance - median) / (1.4826 * MAD)`` over all rows; an outlier has a
    z-score of at least ``outlier_z`` and a distance of at least ``outlier_ratio`` times the
    median.
    """
    cfg = config or QualityConfig()
    z = np.asarray(embeddings, dtype=np.float32)
    n = len(z)
    if n < max(cfg.min_outlier_images, cfg.outlier_k + 2):
        return []
    k = cfg.outlier_k
    same = np.full(n, -1, dtype=np.int64)
    for g, group in enumerate(exclude):
        same[list(group)] = g
    labs = np.array([-1 if lab is None else int(lab) for lab in labels], dtype=np.int64)
    dist = np.empty(n)
    class_dist: list[float | None] = [None] * n
    for start in range(0, n, 1024):
        sims = z[start : start + 1024] @ z.T
        for r in range(len(sims)):
            i = start + r
            row = sims[r].copy()
            row[i] = -np.inf
            if same[i] >= 0:
                row[same == same[i]] = -np.inf
            top = np.partition(row, -k)[-k:]
            dist[i] = 1.0 - float(np.mean(top[np.isfinite(top)])) if np.isfinite(top).any() else 1.0
            if labs[i] >= 0:
                own = row[labs == labs[i]]
                own = own[np.isfinite(own)]
                if len(own) >= 1:
                    kk = min(k, len(own))
                    class_dist[i] = 1.0 - float(np.mean(np.partition(own, -kk)[-kk:]))
    median = float(np.median(dist))
    mad = float(np.median(np.abs(dist - median))) * 1.4826
    if mad <= 1e-12:
        return []
    scores = (dist - median) / mad
    rows = np.flatnonzero((scores >= cfg.outlier_z) & (dist >= cfg.outlier_ratio * median))
    rows = rows[np.argsort(-scores[rows])]
    return [(int(i), float(scores[i]), float(dist[i]), class_dist[i]) for i in rows]


# ----------------------------------------------------------------------------- the map
def plot_embedding_map(
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    path: str | os.PathLike[str],
    *,
    suspects: Sequence[int] = (),
    outliers: Sequence[int] = (),
    method: str = "auto",
    tsne_max: int = 1000,
    seed: int = 0,
    title: str = "Embedding map",
) -> Path:
    """A 2-D projection of ``embeddings`` coloured by label; ``suspects`` (label issues) are
    black crosses, ``outliers`` red rings. ``method="auto"``: LDA (the class-separating
    directions) with 3 or more classes, else PCA; ``"tsne"`` for 10 to ``tsne_max`` points.
    Returns the PNG's path."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    fig = Figure(figsize=(7.5, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    used = method
    if n < 3 or x.ndim != 2 or x.shape[1] < 2:
        ax.text(
            0.5,
            0.5,
            "too few images to map",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
        used = "none"
    else:
        names = sorted({lab for lab in labels if lab is not None})
        if method == "auto" or (method == "tsne" and not 10 <= n <= tsne_max):
            used = "lda" if len(names) >= 3 else "pca"
        xy = _project(x, used, seed, labels)
        cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
        labs = np.array(["" if lab is None else lab for lab in labels], dtype=object)
        for c, name in enumerate(names):
            m = labs == name
            colour = cmap(c % cmap.N)
            ax.scatter(
                xy[m, 0], xy[m, 1], s=10, color=colour, alpha=0.7, linewidths=0, label=_text(name)
            )
        unl = labs == ""
        if unl.any():
            ax.scatter(
                xy[unl, 0],
                xy[unl, 1],
                s=10,
                color="0.6",
                alpha=0.6,
                linewidths=0,
                label="(unlabelled)",
            )
        if len(suspects):
            s = np.asarray(list(suspects), dtype=np.int64)
            ax.scatter(
                xy[s, 0],
                xy[s, 1],
                s=36,
                marker="x",
                color="black",
                linewidths=1.2,
                label="label suspect",
            )
        if len(outliers):
            o = np.asarray(list(outliers), dtype=np.int64)
            ax.scatter(
                xy[o, 0],
                xy[o, 1],
                s=70,
                facecolors="none",
                edgecolors="red",
                linewidths=1.5,
                label="outlier",
            )
        ax.legend(loc="best", fontsize=7, markerscale=1.5, ncols=2 if len(names) > 10 else 1)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(f"{_text(title)} ({used.upper() if used != 'none' else 'n/a'}, {n} images)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        fig.clear()


def _project(
    x: np.ndarray, method: str, seed: int, labels: Sequence[str | None] = ()
) -> np.ndarray:
    from sklearn.decomposition import PCA

    if method == "lda":
        # the two directions that best separate the classes (t-SNE is too slow on large sets);
        # mislabelled images then sit inside another class's cloud
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        known = np.array([lab is not None for lab in labels], dtype=bool)
        names = np.array(["" if lab is None else str(lab) for lab in labels], dtype=object)
        if len(set(names[known])) >= 3:
            with _one_thread():
                start = _reduce(x, 64, seed)
                lda = LinearDiscriminantAnalysis(n_components=2).fit(start[known], names[known])
                return np.asarray(lda.transform(start))

    if method == "tsne":
        from sklearn.manifold import TSNE

        start = _reduce(x, 50, seed)
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
        return np.asarray(
            TSNE(
                2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed
            ).fit_transform(start)
        )
    return np.asarray(PCA(2, random_state=seed).fit_transform(x))


def _reduce(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """``x`` projected on its first ``dims`` principal components (fewer with fewer rows)."""
    from sklearn.decomposition import PCA

    k = min(dims, x.shape[1], len(x) - 1)
    if k >= x.shape[1] or k < 2:
        return x
    return np.asarray(PCA(k, svd_solver="randomized", random_state=seed).fit_transform(x))


def _text(value: Any, limit: int = 40) -> str:
    s = str(value)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


# ----------------------------------------------------------------------------- everything
class _Stages:
    """One transient Rich bar per stage on stderr; a no-op when disabled."""

    def __init__(self, bar: Progress | None) -> None:
        self.bar = bar

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        bar = self.bar
        if bar is None:
            return _ignore
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        return advance


def _ignore(n: int = 1) -> None:
    return None


@contextmanager
def _stages(enabled: bool) -> Iterator[_Stages]:
    if not enabled:
        yield _Stages(None)
        return
    bar = transient_bar(Console(stderr=True), remaining=False)
    with bar:
        yield _Stages(bar)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def analyze_quality(
    index: DatasetIndex,
    split: Split | None = None,
    *,
    features: np.ndarray | None = None,
    feature_positions: Sequence[int] | None = None,
    data_report: DataReport | None = None,
    check: bool = True,
    backbone: str = "tf_efficientnet_lite0",
    weights: str | os.PathLike[str] | None = None,
    img_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    out_dir: str | os.PathLike[str] | None = None,
    config: QualityConfig | None = None,
    progress: bool | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> QualityResult:
    """Run every data-quality check on ``index``.

    Args:
        index: The dataset, as a reader returned it (unreadable files are fine: they are
            listed and left out).
        split: Which positions are train/val/test (for leakage); default: the samples' own
            ``split`` fields when the source fixes them, else no leakage check.
        features: Backbone features already computed (a training run's cached probe
            features): ``(len(feature_positions), dim)``. Without them the embeddings are
            computed with ``backbone`` (and cached in ``cache_dir``).
        feature_positions: The index positions the rows of ``features`` belong to (default:
            all, in order). Positions without features are still hashed (duplicates, leakage)
            but get no label or outlier check.
        data_report: The report of :func:`~visionflow.data.checks.check_dataset` on this
            index, if already made (its exact duplicates and unreadable files are used).
        check: Run the data checks when no ``data_report`` is given. A run's index was already
            checked (its exact copies dropped), so it passes ``check=False``.
        backbone, weights, img_size, device: The embedding model (when ``features`` is None).
        cache_dir: Where embeddings are cached (``None``: not cached).
        out_dir: Where the embedding map PNG is written (``None``: no map).
        config: Thresholds (:class:`QualityConfig`).
        progress: Rich progress bars on stderr (default: when stderr is a terminal).
        max_pixels: Decompression-bomb guard of the decoder.

    Raises:
        ConfigError: ``features`` and ``feature_positions`` disagree, or a bad setting.
        WeightsError: The backbone's weights cannot be found (when embeddings are computed).
    """
    cfg = config or QualityConfig()
    if progress is None:
        progress = Console(stderr=True).is_terminal
    root = Path(index.root)
    n = len(index.samples)
    paths = [_rel(s.path, root) for s in index.samples]
    labels = [s.label for s in index.samples]
    splits, split_method = _split_of(index, split)
    result = QualityResult(
        root=str(root),
        classes=list(index.classes),
        num_images=n,
        num_analysed=0,
        split_method=split_method,
        paths=paths,
        labels=labels,
        splits=splits,
    )
    timings = result.timings

    with _stages(progress) as stage:
        # ---- data checks: unreadable files and exact copies
        t0 = time.monotonic()
        if data_report is None and check:
            data_report, _ = check_dataset(index, max_pixels=max_pixels, progress=progress)
            timings["data checks"] = time.monotonic() - t0
        by_path: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            by_path.setdefault(p, []).append(i)
        bad: set[int] = set()
        exact: list[list[int]] = []
        if data_report is not None:
            result.unreadable = list(data_report.unreadable)
            for b in data_report.unreadable:
                bad.update(by_path.get(b.path, []))
            for group in data_report.duplicates:
                exact.append([i for p in group for i in by_path.get(p, [])])
            for conflict in data_report.conflicts:
                exact.append([i for p in conflict["paths"] for i in by_path.get(p, [])])

        # ---- pixel signatures (every readable image)
        t0 = time.monotonic()
        readable = [i for i in range(n) if i not in bad]
        advance = stage("hashing images", len(readable))
        sigs, failures = image_signatures(
            [index.samples[i].path for i in readable],
            hash_size=cfg.hash_size,
            thumb_size=cfg.thumb_size,
            max_pixels=max_pixels,
            on_image=lambda: advance(1),
        )
        if failures:
            failed = {readable[r] for r, _ in failures}
            for r, reason in failures:
                result.unreadable.append(BadFile(paths[readable[r]], reason))
            keep = [r for r in range(len(readable)) if readable[r] not in failed]
            sigs = Signatures(sigs.hashes[keep], sigs.thumbs[keep])
            readable = [readable[r] for r in keep]
            bad |= failed
        result.num_analysed = len(readable)
        timings["hashing"] = time.monotonic() - t0

        # ---- embeddings
        t0 = time.monotonic()
        emb_positions, raw = _embeddings(
            index,
            readable,
            features,
            feature_positions,
            result,
            backbone=backbone,
            weights=weights,
            img_size=img_size,
            cache_dir=cache_dir,
            device=device,
            max_pixels=max_pixels,
            stage=stage,
        )
        timings["embeddings"] = time.monotonic() - t0
        z = prepare_embeddings(raw, dims=cfg.dims, seed=cfg.seed) if raw is not None else None
        cos = _unit(raw - raw.mean(axis=0)) if raw is not None and len(raw) > 1 else None

        # ---- label issues
        t0 = time.monotonic()
        mapping = index.class_to_idx
        if z is not None:
            lab_rows = [r for r, i in enumerate(emb_positions) if labels[i] in mapping]
            if lab_rows:
                issues, estimated, notes = find_label_issues(
                    z[lab_rows],
                    [mapping[str(labels[emb_positions[r]])] for r in lab_rows],
                    num_classes=len(index.classes),
                    config=cfg,
                )
                result.notes.extend(notes)
                result.estimated_label_errors = estimated
                for rank, (row, suggested, score, p_sug, likely) in enumerate(issues, start=1):
                    pos = emb_positions[lab_rows[row]]
                    result.label_issues.append(
                        LabelIssue(
                            pos,
                            paths[pos],
                            str(labels[pos]),
                            index.classes[suggested],
                            score,
                            p_sug,
                            likely,
                            rank,
                            splits[pos],
                        )
                    )
            else:
                result.notes.append("label issues: no labelled image has an embedding")
        timings["label issues"] = time.monotonic() - t0

        # ---- duplicates and leakage
        t0 = time.monotonic()
        row_of = {pos: r for r, pos in enumerate(readable)}
        exact_rows = [[row_of[i] for i in g if i in row_of] for g in exact]
        emb_rows = [row_of[i] for i in emb_positions] if cos is not None else None
        found = find_duplicates(
            len(readable),
            signatures=sigs,
            embeddings=cos,
            embedding_rows=emb_rows,
            exact_groups=[g for g in exact_rows if len(g) > 1],
            images=[index.samples[i].path for i in readable],
            config=cfg,
            max_pixels=max_pixels,
            notes=result.notes,
        )
        groups = []
        for rows, kinds, sim in found:
            members = sorted(
                (readable[r] for r in rows), key=lambda i: (_split_rank(splits[i]), paths[i])
            )
            groups.append((members, kinds, sim))
        groups.sort(key=lambda g: (-len(g[0]), paths[g[0][0]]))
        for gid, (members, kinds, sim) in enumerate(groups, start=1):
            result.duplicate_groups.append(
                DuplicateGroup(
                    gid,
                    members,
                    [paths[i] for i in members],
                    [labels[i] for i in members],
                    [splits[i] for i in members],
                    kinds,
                    sim,
                )
            )
        result.leaks = find_leakage(result.duplicate_groups)
        timings["duplicates"] = time.monotonic() - t0

        # ---- outliers
        t0 = time.monotonic()
        if cos is not None:
            emb_row_of = {pos: r for r, pos in enumerate(emb_positions)}
            dup_exclude = [
                [emb_row_of[i] for i in g.positions if i in emb_row_of]
                for g in result.duplicate_groups
            ]
            if len(cos) < max(cfg.min_outlier_images, cfg.outlier_k + 2):
                result.notes.append(
                    f"outliers: {len(cos)} image(s) with embeddings, fewer than "
                    f"{cfg.min_outlier_images}; not checked"
                )
            for row, score, dist, cdist in find_outliers(
                cos,
                [
                    mapping.get(str(labels[i])) if labels[i] is not None else None
                    for i in emb_positions
                ],
                exclude=[g for g in dup_exclude if len(g) > 1],
                config=cfg,
            ):
                pos = emb_positions[row]
                result.outliers.append(
                    Outlier(pos, paths[pos], labels[pos], score, dist, cdist, splits[pos])
                )
        timings["outliers"] = time.monotonic() - t0

        # ---- map
        if out_dir is not None and cos is not None:
            t0 = time.monotonic()
            emb_row_of = {pos: r for r, pos in enumerate(emb_positions)}
            result.map_path = plot_embedding_map(
                cos,
                [labels[i] for i in emb_positions],
                Path(out_dir) / "embedding_map.png",
                suspects=[emb_row_of[x.position] for x in result.label_issues if x.likely],
                outliers=[emb_row_of[x.position] for x in result.outliers],
                method=cfg.map_method,
                tsne_max=cfg.tsne_max,
                seed=cfg.seed,
            )
            timings["map"] = time.monotonic() - t0
    result.warnings = _warnings(result)
    return result


def _embeddings(
    index: DatasetIndex,
    readable: list[int],
    features: np.ndarray | None,
    feature_positions: Sequence[int] | None,
    result: QualityResult,
    *,
    backbone: str,
    weights: str | os.PathLike[str] | None,
    img_size: int | None,
    cache_dir: str | os.PathLike[str] | None,
    device: str,
    max_pixels: int,
    stage: _Stages,
) -> tuple[list[int], np.ndarray | None]:
    """``(positions, raw features)`` of the readable images that have embeddings."""
    ok = set(readable)
    if features is not None:
        feats = np.asarray(features, dtype=np.float32)
        positions = (
            list(feature_positions)
            if feature_positions is not None
            else list(range(len(index.samples)))
        )
        if feats.ndim != 2 or len(feats) != len(positions):
            raise ConfigError(
                f"features have shape {feats.shape} but {len(positions)} positions were given; "
                "pass one feature row per position"
            )
        keep = [r for r, p in enumerate(positions) if p in ok]
        missing = len(readable) - len({positions[r] for r in keep})
        if missing > 0:
            result.notes.append(
                f"{missing} image(s) have no embedding (no cached features): checked for "
                "duplicates by their pixels only, not for label issues or as outliers"
            )
        result.embedding = {"source": "given features", "dim": int(feats.shape[1])}
        if len(keep) < 2:
            return [], None
        return [positions[r] for r in keep], feats[keep]
    if len(readable) < 2:
        result.notes.append("fewer than 2 readable images: no embeddings")
        return [], None
    from visionflow.models.features import compute_features

    advance = stage(f"embeddings ({backbone})", len(readable))
    # the labels are left out: an image's embedding does not depend on them, so relabelling
    # (the point of cleaning) keeps the cache valid
    fs = compute_features(
        [Sample(path=index.samples[i].path) for i in readable],
        backbone=backbone,
        weights=weights,
        img_size=img_size,
        classes=[],
        cache_dir=cache_dir,
        device=device,
        max_pixels=max_pixels,
        on_batch=advance,
    )
    result.embedding = {
        "backbone": fs.backbone,
        "weights": fs.weights,
        "preprocessing": fs.preprocessing.to_json(),
        "backend": fs.backend,
        "dim": int(fs.features.shape[1]),
        "cache": None if fs.path is None else str(fs.path),
    }
    return list(readable), fs.features.numpy().astype(np.float32)


def _split_of(index: DatasetIndex, split: Split | None) -> tuple[list[str | None], str | None]:
    out: list[str | None] = [s.split for s in index.samples]
    if split is not None:
        out = [None] * len(index.samples)
        for name in SPLIT_NAMES:
            for i in split[name]:
                if 0 <= i < len(out):
                    out[i] = name
        return out, split.method
    return out, ("given" if any(s is not None for s in out) else None)


def _split_rank(split: str | None) -> int:
    return SPLIT_NAMES.index(split) if split in SPLIT_NAMES else len(SPLIT_NAMES)


_LISTED = 5


def _warnings(result: QualityResult) -> list[str]:
    out = []
    if result.leaks:
        shown = "; ".join(leak.describe() for leak in result.leaks[:_LISTED])
        more = len(result.leaks) - _LISTED
        tail = f"; and {more} more" if more > 0 else ""
        out.append(
            f"leakage: {len(result.leaks)} duplicate group(s) span splits, so the held-out "
            f"accuracy is inflated (these images were in effect seen in training): {shown}{tail}"
        )
    likely = sum(1 for x in result.label_issues if x.likely)
    if likely:
        out.append(
            f"{likely} image(s) are likely mislabelled (cleanlab estimates "
            f"{result.estimated_label_errors} label error(s)); see the label issues"
        )
    conflicting = [g for g in result.duplicate_groups if not g.labels_agree]
    if conflicting:
        out.append(f"{len(conflicting)} duplicate group(s) carry different labels")
    extra = sum(len(g.positions) - 1 for g in result.duplicate_groups)
    if extra:
        out.append(
            f"{len(result.duplicate_groups)} group(s) of exact or near duplicates "
            f"({extra} extra cop{'y' if extra == 1 else 'ies'})"
        )
    if result.outliers:
        out.append(f"{len(result.outliers)} outlier image(s) far from the rest of the data")
    if result.unreadable:
        out.append(f"{len(result.unreadable)} unreadable file(s) were not analysed")
    return out
