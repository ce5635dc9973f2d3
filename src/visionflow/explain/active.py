"""Active learning: which unlabelled images to label next.

A *strategy* ranks a pool of unlabelled images from what a model says about each of them: its
class probabilities and, for the strategies that look at where images lie, its embeddings (the
pooled backbone features). Strategies are registered by name (:func:`register_strategy`,
:func:`available_strategies`, :func:`get_strategy`) and called through :func:`select`, which is
deterministic for a given ``seed``:

* ``entropy``, ``margin``, ``least-confidence``: uncertainty sampling. Each image is scored on
  its own, so a batch of them is often redundant (ten near-copies of the same confusing image).
  ``margin`` (1 - the gap between the two most likely classes) is usually the strongest of the
  three when there are many classes; ``entropy`` also counts doubt spread over the tail.
* ``diversity``: k-center greedy on L2-normalised embeddings (the greedy core-set of Sener and
  Savarese, 2018): each pick is the image farthest from everything labelled or already picked,
  so a batch covers the pool. It ignores the model's doubts; it is the cold-start choice.
* ``hybrid``: both. The most uncertain ``HYBRID_POOL_FACTOR * n`` images (by margin) are the
  candidates, and k-center greedy, seeded with the labelled images, picks ``n`` of them: doubtful
  images, none of them close to each other or to what is already labelled.
* ``random``: a uniform sample, the baseline every strategy has to beat.

:func:`select_for_labelling` applies a strategy to a folder of images with a trained model (a
run directory or a bundle): it skips pool images that are already in the model's training data
(the same bytes, by sha256) and unreadable files (each reported), and returns the rows of the
CSV that :func:`write_selection_csv` writes for a person to fill in.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionflow._io import atomic_write_bytes, read_json
from visionflow.errors import ConfigError, DataError, ImageDecodeError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "HYBRID_POOL_FACTOR",
    "SELECTION_COLUMNS",
    "ActiveSelection",
    "Selection",
    "SelectionRow",
    "Strategy",
    "available_strategies",
    "entropy_scores",
    "get_strategy",
    "k_center_greedy",
    "least_confidence_scores",
    "margin_scores",
    "register_strategy",
    "select",
    "select_for_labelling",
    "write_selection_csv",
]

#: ``hybrid`` draws its ``n`` picks from the ``HYBRID_POOL_FACTOR * n`` most uncertain images.
HYBRID_POOL_FACTOR = 10
#: Columns of the CSV written by :func:`write_selection_csv`, in order.
SELECTION_COLUMNS = ("path", "label", "suggested_label", "confidence", "score", "rank")

#: A strategy: ``(probs, n, embeddings, labelled, rng) -> (ranked positions, scores)``.
StrategyFn = Callable[
    [np.ndarray, int, np.ndarray | None, np.ndarray | None, np.random.Generator],
    tuple[np.ndarray, np.ndarray],
]


@dataclass(frozen=True)
class Strategy:
    """A registered selection strategy.

    Attributes:
        name: What users pass as ``strategy``.
        fn: ``fn(probs, n, embeddings, labelled, rng)`` returns ``n`` distinct positions into
            the pool, most worth labelling first, and one score per position (higher: more
            worth it, in the strategy's own units). ``embeddings`` (pool x dim) and
            ``labelled`` (labelled images x dim) are ``None`` when not available; ``n`` is at
            least 1 and at most the pool size.
        needs_embeddings: :func:`select` refuses to call it without embeddings.
        summary: One line for help texts.
    """

    name: str
    fn: StrategyFn
    needs_embeddings: bool
    summary: str


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
    name: str, *, needs_embeddings: bool = False, summary: str | None = None
) -> Callable[[StrategyFn], StrategyFn]:
    """Register a selection strategy under ``name`` (a decorator; see :class:`Strategy` for
    the contract).

    Raises:
        ValueError: The name is empty or already registered.
    """
    if not name:
        raise ValueError("a strategy needs a name")

    def decorator(fn: StrategyFn) -> StrategyFn:
        if name in _STRATEGIES:
            raise ValueError(f"a selection strategy named {name!r} is already registered")
        doc = (fn.__doc__ or name).strip().splitlines()[0]
        _STRATEGIES[name] = Strategy(name, fn, needs_embeddings, summary or doc)
        return fn

    return decorator


def available_strategies() -> list[str]:
    """Names of the registered strategies, in registration order."""
    return list(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``.

    Raises:
        ConfigError: No strategy has that name (the message lists the choices).
    """
    if name not in _STRATEGIES:
        close = difflib.get_close_matches(name, list(_STRATEGIES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown selection strategy {name!r}{hint} (choose from: {', '.join(_STRATEGIES)})"
        )
    return _STRATEGIES[name]


@dataclass(frozen=True)
class Selection:
    """What :func:`select` picked: pool positions, best first, and their scores."""

    strategy: str
    indices: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------- scores
def entropy_scores(probs: np.ndarray) -> np.ndarray:
    """Entropy of each row divided by ``log(classes)``: 0 for a certain prediction, 1 for a
    uniform one."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    if p.shape[1] < 2:
        return np.zeros(len(p))
    out: np.ndarray = -(p * np.log(p)).sum(axis=1) / np.log(p.shape[1])
    return out


def margin_scores(probs: np.ndarray) -> np.ndarray:
    """``1 - (p1 - p2)`` with ``p1, p2`` the two largest probabilities: 1 for a tie."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] < 2:
        return np.zeros(len(p))
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    out: np.ndarray = 1.0 - (top2[:, 1] - top2[:, 0])
    return out


def least_confidence_scores(probs: np.ndarray) -> np.ndarray:
    """``1 - p1``: how far the most likely class is from certain."""
    out: np.ndarray = 1.0 - np.asarray(probs, dtype=np.float64).max(axis=1)
    return out


def _rank(scores: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` highest scores, ties broken by a seeded shuffle (not by position, so equal
    scores do not always favour the first files of the folder)."""
    shuffled = rng.permutation(len(scores))
    order = shuffled[np.argsort(-scores[shuffled], kind="stable")][:n]
    return order.astype(np.int64), scores[order].astype(np.float64)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = x / np.maximum(norms, 1e-12)
    return out


def _nearest_distance(points: np.ndarray, centres: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance from each unit-norm point to its nearest unit-norm centre."""
    best = np.full(len(points), -np.inf, dtype=np.float32)
    for start in range(0, len(centres), chunk):
        sims = points @ centres[start : start + chunk].T
        best = np.maximum(best, sims.max(axis=1))
    out: np.ndarray = np.sqrt(np.clip(2.0 - 2.0 * best, 0.0, None))
    return out


def k_center_greedy(
    embeddings: np.ndarray,
    n: int,
    *,
    labelled: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center (core-set) selection on L2-normalised embeddings.

    Every pick is the point farthest from its nearest *centre*; the pick then becomes a centre.
    The centres start as the ``labelled`` embeddings, or, with none, as the pool's mean
    direction (so the first pick is the most atypical image, and the next ones cover the pool
    around it). Ties are broken by ``rng``.

    Returns:
        ``n`` distinct positions in pick order and each pick's distance to its nearest centre
        at the time it was picked (non-increasing: how much of the pool it newly covers).
    """
    rng = rng or np.random.default_rng(0)
    points = _normalise(embeddings)
    n = min(n, len(points))
    if labelled is not None and len(labelled):
        seeds = _normalise(labelled)
    else:
        seeds = _normalise(points.mean(axis=0, keepdims=True))
    dist = _nearest_distance(points, seeds)
    order = rng.permutation(len(points))
    picks: list[int] = []
    scores: list[float] = []
    for _ in range(n):
        i = int(order[np.argmax(dist[order])])
        picks.append(i)
        scores.append(float(dist[i]))
        new = np.sqrt(np.clip(2.0 - 2.0 * (points @ points[i]), 0.0, None))
        dist = np.minimum(dist, new)
        dist[i] = -1.0  # never again
    return np.asarray(picks, dtype=np.int64), np.asarray(scores, dtype=np.float64)


# ----------------------------------------------------------------------- strategies
@register_strategy("entropy", summary="most uncertain first (entropy of the probabilities)")
def _entropy(
    probs: np.ndarray,
    n: int,
    embeddings: np.ndarray | None,
    labelled: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    return _rank(entropy_scores(probs), n, rng)


@register_strategy("margin", summary="smallest gap between the two most likely classes first")
def _margin(
    probs: np.ndarray,
    n: int,
    embeddings: np.ndarray | None,
    labelled: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    return _rank(margin_scores(probs), n, rng)


@register_strategy("least-confidence", summary="lowest top-class probability first")
def _least_confidence(
    probs: np.ndarray,
    n: int,
    embeddings: np.ndarray | None,
    labelled: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    return _rank(least_confidence_scores(probs), n, rng)


def _embedded(embeddings: np.ndarray | None, name: str) -> np.ndarray:
    if embeddings is None:  # select() checks this first; a direct call gets the same answer
        raise ConfigError(f"strategy {name!r} needs embeddings of the pool images")
    return embeddings


def _project(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """L2-normalised rows, reduced by PCA to ``dims`` dimensions when they have more (k-means
    on 1,280-dimensional features costs 20x the time for the same clusters)."""
    x = _normalise(x)
    if x.shape[1] <= dims or len(x) <= dims:
        return x
    from sklearn.decomposition import PCA

    out: np.ndarray = PCA(dims, svd_solver="randomized", random_state=seed).fit_transform(x)
    return out.astype(np.float32)


def _kmeans(
    points: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids and centres of a seeded k-means (a single k-means++ start)."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    model = KMeans(n_clusters=k, n_init=1, random_state=int(rng.integers(2**31 - 1)))
    with warnings.catch_warnings():
        # fewer distinct points than clusters (duplicate images): some clusters stay empty,
        # which the callers handle
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(points, sample_weight=weights)
    return model.labels_.astype(np.int64), model.cluster_centers_.astype(np.float32)


def _nearest_member(points: np.ndarray, members: np.ndarray, centre: np.ndarray) -> int:
    dist = np.linalg.norm(points[members] - centre, axis=1)
    return int(members[int(np.argmin(dist))])


def typical_clusters(
    embeddings: np.ndarray,
    n: int,
    *,
    labelled: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Representative images of the largest regions of the pool that hold no labelled image.

    TypiClust (Hacohen et al., 2022) in its simplest form: k-means on the L2-normalised
    embeddings of the pool and the labelled images together, with ``labelled + n`` clusters
    (so at least ``n`` of them hold no labelled image); from the ``n`` largest clusters without
    a labelled image, the image nearest the centre. Typical images teach a small model more
    than the outliers farthest-first picks. When duplicates leave fewer clusters, the rest is
    filled by :func:`k_center_greedy`.

    Returns:
        ``n`` distinct positions, largest cluster first, and the size of each pick's cluster
        (pool images it stands for).
    """
    rng = rng or np.random.default_rng(0)
    n = min(n, len(embeddings))
    n_labelled = 0 if labelled is None else len(labelled)
    stacked = embeddings if labelled is None else np.vstack([embeddings, labelled])
    points = _project(stacked, 64, int(rng.integers(2**31 - 1)))
    k = min(len(points), n_labelled + n)
    ids, centres = _kmeans(points, k, rng)
    pool_ids = ids[: len(embeddings)]
    covered = set(ids[len(embeddings) :].tolist())
    sizes = np.bincount(pool_ids, minlength=k)
    clusters = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] and c not in covered]
    picks = [_nearest_member(points, np.flatnonzero(pool_ids == c), centres[c]) for c in clusters]
    scores = [float(sizes[c]) for c in clusters]
    picks, scores = picks[:n], scores[:n]
    if len(picks) < n:
        rest = np.setdiff1d(np.arange(len(embeddings)), picks)
        known = [x for x in (labelled, embeddings[picks]) if x is not None and len(x)]
        seen = np.vstack(known) if known else None
        more, _ = k_center_greedy(embeddings[rest], n - len(picks), labelled=seen, rng=rng)
        picks += rest[more].tolist()
        scores += [1.0] * len(more)
    return np.asarray(picks, dtype=np.int64), np.asarray(scores, dtype=np.float64)


@register_strategy(
    "diversity",
    needs_embeddings=True,
    summary="typical images of the largest pool regions with no labelled image",
)
def _diversity(
    probs: np.ndarray,
    n: int,
    embeddings: np.ndarray | None,
    labelled: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    return typical_clusters(_embedded(embeddings, "diversity"), n, labelled=labelled, rng=rng)


@register_strategy(
    "coreset",
    needs_embeddings=True,
    summary="k-center greedy: each pick the farthest from everything labelled or picked",
)
def _coreset(
    probs: np.ndarray,
    n: int,
    embeddings: np.ndarray | None,
    labelled: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    return k_center_greedy(_embedded(embeddings, "coreset"), n, labelled=labelled, rng=rng)


@register_strategy(
    "hybrid",
    needs_embeddings=True,
    summary=f"one image per cluster of the {HYBRID_POOL_FACTOR}n most uncertain (margin)",
)
def _hybrid(
    probs: np.ndarray,
    n: int,
    embeddings: np.ndarray | None,
    labelled: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Diverse mini-batch active learning (Zhdanov, 2019): the ``HYBRID_POOL_FACTOR * n`` most
    uncertain images by margin, clustered by uncertainty-weighted k-means into ``n`` clusters;
    the image nearest each centre, most uncertain first."""
    emb = _embedded(embeddings, "hybrid")
    uncertainty = margin_scores(probs)
    candidates, _ = _rank(uncertainty, min(len(probs), HYBRID_POOL_FACTOR * n), rng)
    if len(candidates) <= n:
        return candidates, uncertainty[candidates]
    points = _normalise(emb[candidates])
    weights = np.maximum(uncertainty[candidates], 1e-6)
    ids, centres = _kmeans(points, n, rng, weights)
    picked = [
        _nearest_member(points, np.flatnonzero(ids == c), centres[c])
        for c in range(n)
        if np.any(ids == c)
    ]
    if len(picked) < n:  # empty clusters (duplicates): the most uncertain of the rest
        taken = set(picked)
        picked += [i for i in range(len(candidates)) if i not in taken][: n - len(picked)]
    chosen = candidates[np.asarray(picked, dtype=np.int64)]
    order = np.argsort(-uncertainty[chosen], kind="stable")
    return chosen[order], uncertainty[chosen[order]]


@register_strategy("random", summary="a uniform random sample (the baseline)")
def _random(
    probs: np.ndarray,
    n: int,
    embeddings: np.ndarray | None,
    labelled: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    return rng.permutation(len(probs))[:n].astype(np.int64), np.zeros(n)


def select(
    probs: np.ndarray,
    n: int,
    *,
    strategy: str = "hybrid",
    embeddings: np.ndarray | None = None,
    labelled: np.ndarray | None = None,
    seed: int = 0,
) -> Selection:
    """Rank a pool and return the ``n`` images most worth labelling (fewer if the pool is
    smaller).

    Args:
        probs: The model's class probabilities, one row per pool image.
        n: How many to pick.
        strategy: A registered strategy name (:func:`available_strategies`).
        embeddings: One feature row per pool image (needed by ``diversity`` and ``hybrid``).
        labelled: Feature rows of already labelled images: diversity keeps away from them.
        seed: Seeds tie-breaks and ``random``; the same inputs and seed give the same result.

    Raises:
        ConfigError: Unknown strategy, negative ``n``, missing or mis-shaped embeddings.
    """
    spec = get_strategy(strategy)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ConfigError(f"probs must be a (pool, classes) array, got shape {probs.shape}")
    if n < 0:
        raise ConfigError(f"n must be 0 or more, got {n}")
    if embeddings is not None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(probs):
            raise ConfigError(
                f"embeddings must have one row per pool image ({len(probs)}), got shape "
                f"{embeddings.shape}"
            )
    if labelled is not None:
        labelled = np.asarray(labelled, dtype=np.float32)
        if labelled.ndim != 2 or (
            embeddings is not None and labelled.shape[1] != embeddings.shape[1]
        ):
            want = embeddings.shape[1] if embeddings is not None else "?"
            raise ConfigError(
                f"labelled embeddings must have shape (images, {want}), got {labelled.shape}"
            )
    if spec.needs_embeddings and embeddings is None:
        raise ConfigError(f"strategy {strategy!r} needs embeddings of the pool images")
    n = min(n, len(probs))
    if n == 0:
        return Selection(strategy, np.zeros(0, np.int64), np.zeros(0))
    indices, scores = spec.fn(probs, n, embeddings, labelled, np.random.default_rng(seed))
    return Selection(strategy, np.asarray(indices, np.int64), np.asarray(scores, np.float64))


# ----------------------------------------------------------------- pools of images
@dataclass(frozen=True)
class SelectionRow:
    """One image to label: where it is, what the model thinks and why it was picked."""

    path: Path
    suggested_label: str
    confidence: float
    score: float
    rank: int

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "suggested_label": self.suggested_label,
            "confidence": self.confidence,
            "score": self.score,
            "rank": self.rank,
        }


@dataclass
class ActiveSelection:
    """What :func:`select_for_labelling` found and picked.

    Attributes:
        strategy: The strategy used.
        model: The run directory or bundle that scored the pool.
        pool: The pool folder.
        classes: The model's classes (what the ``label`` column may hold).
        rows: The picks, best first.
        scored: Pool images the model scored (candidates).
        in_training: Pool images skipped because the same bytes are in the training data.
        duplicates: Pool images skipped as byte copies of an earlier pool image.
        unreadable: ``(path, reason)`` of pool files that could not be decoded.
        outside: Pool entries skipped because they are symlinks leading out of the pool.
        labelled_embedded: Training images whose embeddings seeded the diversity strategies.
        training_data: Where the training data was read from, or why it was not (a bundle
            whose run directory is gone: then nothing can be skipped as already labelled).
        training_found: Whether the training data was found.
    """

    strategy: str
    model: str
    pool: Path
    classes: list[str]
    rows: list[SelectionRow] = field(default_factory=list)
    scored: int = 0
    in_training: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    outside: list[Path] = field(default_factory=list)
    labelled_embedded: int = 0
    training_data: str = ""
    training_found: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "model": self.model,
            "pool": str(self.pool),
            "classes": list(self.classes),
            "scored": self.scored,
            "selected": len(self.rows),
            "skipped_in_training": len(self.in_training),
            "skipped_duplicates": len(self.duplicates),
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
            "outside_pool": [str(p) for p in self.outside],
            "labelled_embedded": self.labelled_embedded,
            "training_data": self.training_data,
            "training_found": self.training_found,
            "rows": [r.to_json() for r in self.rows],
        }


def _forward(model: Any, images: list[Image.Image], batch_size: int) -> tuple[Any, Any]:
    """Probabilities and features of decoded images, for a run's model or a bundle's."""
    from visionflow.export.runtime import BundleModel, softmax

    if isinstance(model, BundleModel):
        logits, feats = model.run(model.preprocessing.pixels(images))
        return softmax(logits), feats
    return model.predict_proba_features(images, batch_size=batch_size)


def _training_index(model: Any) -> tuple[Any, str]:
    """The model's training data (a :class:`~visionflow.data.index.DatasetIndex`) and where it
    came from, or ``None`` and why not."""
    from visionflow.data.index import DatasetIndex
    from visionflow.export.runtime import BundleModel

    if isinstance(model, BundleModel):
        run_path = (model.meta.get("run") or {}).get("path")
        if not run_path:
            return None, "the bundle names no run directory"
        run_dir = Path(str(run_path))
    else:
        run_dir = Path(model.run_dir) if model.run_dir is not None else Path()
    file = run_dir / "index.json"
    if not file.is_file():
        return None, f"{file} not found"
    try:
        return DatasetIndex.from_json(read_json(file)), str(file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{file} is unreadable ({exc})"


def _pool_files(pool: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``pool`` (recursive, hidden folders skipped) and the symlinks among
    them that lead out of it (skipped: a pool folder must not make us read other files)."""
    from visionflow.prediction import expand_inputs

    if not pool.is_dir():
        raise DataError(f"pool folder {pool} does not exist or is not a folder")
    root = pool.resolve()
    inside: list[Path] = []
    outside: list[Path] = []
    for path in expand_inputs([pool]):
        try:
            ok = path.resolve(strict=True).is_relative_to(root)
        except (OSError, RuntimeError):
            ok = False
        (inside if ok else outside).append(path)
    return inside, outside


def _read(path: Path, max_pixels: int) -> tuple[str, Image.Image]:
    """sha256 of the file's bytes and the decoded image (one read)."""
    from visionflow.data.images import load_image_bytes

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    return digest, load_image_bytes(data, max_pixels=max_pixels, name=str(path))


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def select_for_labelling(
    model: str | Path | Any,
    pool: str | Path,
    *,
    n: int = 50,
    strategy: str = "hybrid",
    seed: int = 0,
    batch_size: int = 32,
    labelled_limit: int = 1000,
    max_pixels: int = 64_000_000,
    device: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
) -> ActiveSelection:
    """Pick the ``n`` images of a folder most worth labelling next, by ``strategy``.

    Every image under ``pool`` (recursively) is read once: its sha256 is compared with the
    model's training data (the run's ``index.json``; for a bundle, that of the run it was
    exported from, when that still exists), byte copies of training images or of earlier pool
    images are skipped, and unreadable files are recorded with the reason. The model scores the
    rest: probabilities and backbone features in one forward pass. For ``diversity``,
    ``coreset`` and ``hybrid`` the features of up to ``labelled_limit`` training images
    (a seeded sample) are computed too, so the picks keep away from what is labelled.

    Args:
        model: A run directory, a bundle, or a model from :func:`visionflow.load`.
        pool: The folder of unlabelled images.
        n: How many images to pick (fewer when the pool is smaller).
        strategy: A registered strategy (:func:`available_strategies`).
        seed: Seeds the strategy and the sample of labelled images.
        batch_size: Images per forward pass.
        labelled_limit: Most training images embedded for the diversity strategies.
        max_pixels: Larger images are refused as unreadable (decompression-bomb guard).
        device: Where a run's model runs (``auto``, ``cpu``, ``cuda``...).
        progress: Called as ``progress(stage, done, total)`` while hashing and scoring.

    Raises:
        ConfigError: Unknown strategy, ``n`` < 1 or ``labelled_limit`` < 0.
        DataError: The pool is not a folder or holds no readable image that is new.
        CheckpointError, BundleError: The model cannot be loaded.
    """
    from visionflow._io import sha256_file

    spec = get_strategy(strategy)
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if labelled_limit < 0:
        raise ConfigError(f"labelled_limit must be 0 or more, got {labelled_limit}")
    if isinstance(model, str | Path):
        from visionflow.api import load

        where = str(model)
        model = load(model, device=device)
    else:
        where = str(getattr(model, "run_dir", None) or getattr(model, "bundle", "") or "model")
    pool = Path(pool)
    files, outside = _pool_files(pool)
    result = ActiveSelection(
        strategy=strategy, model=where, pool=pool, classes=list(model.classes), outside=outside
    )

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    # the training data: hashes of every file, embeddings of a sample
    index, result.training_data = _training_index(model)
    result.training_found = index is not None
    train_paths = [s.path for s in index.samples] if index is not None else []
    trained: set[str] = set()
    for i, path in enumerate(train_paths):
        with contextlib.suppress(OSError):  # a file that is gone cannot be in the pool
            trained.add(sha256_file(path))
        report("hashing the training data", i + 1, len(train_paths))
    labelled: np.ndarray | None = None
    if spec.needs_embeddings and train_paths and labelled_limit > 0:
        rng = np.random.default_rng(seed)
        order = sorted(rng.permutation(len(train_paths))[:labelled_limit].tolist())
        images = []
        for pos in order:
            try:
                images.append(_read(train_paths[pos], max_pixels)[1])
            except ImageDecodeError:
                continue
        rows = [
            _forward(model, images[s : s + batch_size], batch_size)[1]
            for s in range(0, len(images), batch_size)
        ]
        if rows:
            labelled = np.concatenate(rows)
            result.labelled_embedded = len(labelled)

    # the pool: read, skip what is known or broken, score the rest
    kept: list[Path] = []
    seen: set[str] = set()
    probs_rows: list[np.ndarray] = []
    feat_rows: list[np.ndarray] = []
    done = 0
    for chunk in _chunks(files, batch_size):
        images, names = [], []
        for path in chunk:
            try:
                digest, image = _read(path, max_pixels)
            except ImageDecodeError as exc:
                result.unreadable.append((str(path), exc.reason))
                continue
            if digest in trained or digest in seen:
                (result.in_training if digest in trained else result.duplicates).append(path)
                continue
            seen.add(digest)
            images.append(image)
            names.append(path)
        if images:
            probs, feats = _forward(model, images, batch_size)
            probs_rows.append(np.asarray(probs))
            feat_rows.append(np.asarray(feats))
            kept.extend(names)
        done += len(chunk)
        report("scoring the pool", done, len(files))
    result.scored = len(kept)
    if not kept:
        found = f"{len(files)} image file(s)"
        raise DataError(
            f"{pool}: no new readable image to choose from ({found}: "
            f"{len(result.in_training)} already in the training data, "
            f"{len(result.duplicates)} duplicates, {len(result.unreadable)} unreadable)"
        )
    probs_all = np.concatenate(probs_rows)
    picked = select(
        probs_all,
        n,
        strategy=strategy,
        embeddings=np.concatenate(feat_rows),
        labelled=labelled,
        seed=seed,
    )
    for rank, (pos, score) in enumerate(zip(picked.indices, picked.scores, strict=True), 1):
        row = probs_all[pos]
        top = int(np.argmax(row))
        result.rows.append(
            SelectionRow(
                path=kept[pos],
                suggested_label=result.classes[top],
                confidence=float(row[top]),
                score=float(score),
                rank=rank,
            )
        )
    return result


def write_selection_csv(
    selection: ActiveSelection, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write the picks as a CSV to fill in (columns :data:`SELECTION_COLUMNS`; ``label`` is
    left empty for a person), atomically.

    Paths are relative to the CSV's folder when the images lie under it, else absolute; that
    is how ``visionflow train --labels`` reads them back.

    Raises:
        ConfigError: ``out`` exists and ``overwrite`` is false (it may hold labels already
            typed in).
    """
    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(
            f"{target} already exists (it may hold labels already filled in); pass --overwrite "
            "or choose another --out"
        )
    base = Path(os.path.abspath(target.parent))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SELECTION_COLUMNS)
    for row in selection.rows:
        absolute = Path(os.path.abspath(row.path))
        shown = absolute.relative_to(base) if absolute.is_relative_to(base) else absolute
        writer.writerow(
            [
                shown.as_posix(),
                "",
                row.suggested_label,
                f"{row.confidence:.4f}",
                f"{row.score:.6g}",
                row.rank,
            ]
        )
    return atomic_write_bytes(target, buf.getvalue().encode("utf-8"))
