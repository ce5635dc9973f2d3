"""Linear probe: multinomial logistic regression on frozen backbone features.

On small datasets a well-regularised probe on good pretrained features is a strong model by
itself, and it is the best starting head for fine-tuning (LP-FT: Kumar et al., 2022, "Fine-Tuning
can Distort Pretrained Features"): a random head sends large, noisy gradients into the backbone
during the first steps, a probe-initialised one does not.

Three choices matter on small data, each measured (see BENCHMARKS.md):

* features are scaled by one global factor (their RMS), not standardised per dimension: per-dim
  standardisation blows up near-constant dimensions into noise and cost 5-6 points of accuracy
  on the digits benchmark;
* the regularisation strength ``C`` is chosen by stratified cross-validation on the training
  split (a 6-image-per-class validation split is too noisy to choose from);
* the chosen probe is refitted on train + validation, so no labelled image is wasted.

With fewer images than feature dimensions (the usual small-data case) the fits run on the
images' coordinates in the span of the features (an SVD): an L2-regularised linear model's
weights always lie in that span, so the solution is the same and the fits are several times
faster (a 5-fold search over six ``C`` on 240 images of 1280 features: 3 s instead of 60 s).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from visionflow.errors import DataError

__all__ = ["DEFAULT_CS", "ProbeResult", "fit_linear_probe"]

#: Inverse L2 strengths tried, on RMS-normalised features.
DEFAULT_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
#: Above this many training images ``C`` is chosen on the validation split, which is then large
#: enough to choose from, while CV (k fits per C) gets expensive: on the 1,259 training images
#: of the digits demo the 5-fold search took 85 s of a 4-minute budget.
CV_MAX_IMAGES = 1000


@dataclass
class ProbeResult:
    """A fitted probe, folded into linear layers that act on raw (unscaled) features.

    Attributes:
        weight, bias: The probe fitted on the training split only (the LP-FT head, and the model
            whose ``val_accuracy`` is reported).
        final_weight, final_bias: The same ``C`` refitted on train + validation (``refit``), or
            the training-only layer when there was nothing to add.
        C: The chosen inverse regularisation strength.
        val_accuracy, val_loss: Of the training-only probe on the validation split.
        cv_accuracy: Mean cross-validated accuracy of the chosen ``C`` on the training split.
        selected_by: ``"cv"``, ``"val"``, ``"given"`` (one ``C`` passed) or ``"default"``;
            ``"cv (k of n folds: time)"`` when the time ran out during the cross-validation.
        scores: Every ``C`` tried with its selection score.
    """

    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor  # (classes,)
    C: float
    val_accuracy: float | None
    val_loss: float | None
    final_weight: torch.Tensor | None = None
    final_bias: torch.Tensor | None = None
    cv_accuracy: float | None = None
    selected_by: str = "default"
    refit: bool = False
    scores: list[dict[str, float | None]] = field(default_factory=list)

    def logits(self, features: torch.Tensor, *, final: bool = True) -> torch.Tensor:
        """Logits of the final (refitted) probe, or of the training-only one."""
        if final and self.final_weight is not None and self.final_bias is not None:
            return features.float() @ self.final_weight.T + self.final_bias
        return features.float() @ self.weight.T + self.bias

    def final_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.final_weight is not None and self.final_bias is not None:
            return self.final_weight, self.final_bias
        return self.weight, self.bias


def _fold(
    model: LogisticRegression, scale: float, num_classes: int, basis: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the fit back to raw features: W' = (W_z B) / s for the basis B and scale s."""
    fitted = model.coef_ if basis is None else model.coef_ @ basis
    coef = np.zeros((num_classes, fitted.shape[1]))
    intercept = np.full(num_classes, -1e4)  # classes absent from training never win
    present = model.classes_.astype(int)
    if len(present) == 2 and fitted.shape[0] == 1:  # sklearn's binary shortcut
        coef[present[1]], coef[present[0]] = fitted[0] / 2, -fitted[0] / 2
        intercept[present[1]] = model.intercept_[0] / 2
        intercept[present[0]] = -model.intercept_[0] / 2
    else:
        coef[present] = fitted
        intercept[present] = model.intercept_
    return torch.from_numpy(coef / scale).float(), torch.from_numpy(intercept).float()


def _span(x: np.ndarray) -> np.ndarray | None:
    """Orthonormal rows spanning the rows of ``x`` when there are fewer rows than columns."""
    if x.shape[0] >= x.shape[1]:
        return None
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * 1e-10 if len(s) else s > 0
    return np.ascontiguousarray(vt[keep])


def _score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    acc = float((logits.argmax(1) == y).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    return acc, loss


def _fit(
    x: np.ndarray, y: np.ndarray, c: float, class_weight: str | None, max_iter: int
) -> LogisticRegression:
    model = LogisticRegression(C=c, max_iter=max_iter, class_weight=class_weight, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _cv_scores(
    x: np.ndarray,
    y: np.ndarray,
    cs: Sequence[float],
    folds: int,
    class_weight: str | None,
    seed: int,
    max_iter: int,
    time_up: Callable[[], bool] | None = None,
) -> tuple[list[tuple[float, float]], int]:
    """(mean accuracy, mean log loss) of each ``C`` over stratified folds, and the number of
    folds run: when ``time_up()`` turns true the folds not started are skipped (at least one
    always runs), so a contended CPU cannot stretch the probe past its time."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    accs: list[list[float]] = [[] for _ in cs]
    losses: list[list[float]] = [[] for _ in cs]
    run = 0
    for train_idx, test_idx in splitter.split(x, y):
        if run and time_up is not None and time_up():
            break
        run += 1
        # along the regularisation path, each fit starts from the previous solution
        model = LogisticRegression(max_iter=max_iter, class_weight=class_weight, warm_start=True)
        for i, c in enumerate(cs):
            model.set_params(C=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x[train_idx], y[train_idx])
            proba = np.clip(model.predict_proba(x[test_idx]), 1e-12, 1.0)
            cols = {int(k): i for i, k in enumerate(model.classes_)}
            truth = y[test_idx]
            hit = np.array([cols.get(int(t), -1) for t in truth])
            picked = np.where(hit >= 0, proba[np.arange(len(truth)), np.maximum(hit, 0)], 1e-12)
            accs[i].append(float((model.classes_[proba.argmax(1)] == truth).mean()))
            losses[i].append(float(-np.log(picked).mean()))
    scores = [(float(np.mean(a)), float(np.mean(lo))) for a, lo in zip(accs, losses, strict=True)]
    return scores, run


def fit_linear_probe(
    train_features: torch.Tensor,
    train_targets: torch.Tensor,
    val_features: torch.Tensor | None,
    val_targets: torch.Tensor | None,
    *,
    num_classes: int,
    Cs: Sequence[float] = DEFAULT_CS,
    class_weight: str | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    cv_folds: int = 5,
    refit: bool = True,
    time_up: Callable[[], bool] | None = None,
) -> ProbeResult:
    """Choose ``C``, fit on the training split, report on validation, refit on both.

    ``C`` is chosen by stratified ``cv_folds``-fold cross-validation on the training split when
    every class has at least two training images and there are at most ``CV_MAX_IMAGES`` of them;
    otherwise on the validation split; otherwise ``C = 1``. ``class_weight="balanced"``
    reweights an imbalanced training set. ``time_up()`` is asked between the fits of the
    selection: when it turns true the selection ends with what it has measured (``C = 1`` when
    nothing was), and the final fits still run (they are one or two fits, not ``k x |Cs|``).
    """
    if len(train_features) == 0:
        raise DataError("the training split is empty; nothing to fit a probe on")
    x = train_features.double().numpy()
    y = train_targets.long().numpy()
    if len(np.unique(y)) < 2:
        raise DataError("the training split holds a single class; at least two are needed")
    scale = float(np.sqrt(np.mean(x**2))) or 1.0
    xs = x / scale
    has_val = val_features is not None and val_targets is not None and len(val_targets) > 0
    xv = val_features.double().numpy() / scale if has_val and val_features is not None else None
    yv = val_targets.long().numpy() if has_val and val_targets is not None else None
    raw_xs, raw_xv = xs, xv
    basis = _span(xs)
    if basis is not None:
        xs = xs @ basis.T
        xv = xv @ basis.T if xv is not None else None

    smallest = min(int(c) for c in np.bincount(y) if c > 0)
    folds = min(cv_folds, smallest)
    scores: list[dict[str, float | None]] = []
    selected_by = "given" if len(Cs) == 1 else "default"
    chosen = float(Cs[0]) if len(Cs) == 1 else 1.0
    cv_accuracy: float | None = None
    if folds >= 2 and len(y) <= CV_MAX_IMAGES and len(Cs) > 1:
        results, ran = _cv_scores(xs, y, Cs, folds, class_weight, seed, max_iter, time_up)
        best = max(range(len(Cs)), key=lambda i: (results[i][0], -results[i][1]))
        chosen, cv_accuracy = Cs[best], results[best][0]
        selected_by = "cv" if ran == folds else f"cv ({ran} of {folds} folds: time)"
        scores = [
            {"C": c, "cv_accuracy": acc, "cv_loss": loss}
            for c, (acc, loss) in zip(Cs, results, strict=True)
        ]
    elif has_val and xv is not None and yv is not None and len(Cs) > 1:
        best_key: tuple[float, float] | None = None
        # middle out: when the time cap stops the loop early, the values tried are the ones
        # most often chosen, not only the strongest regularisation
        middle = float(np.median(np.log(Cs)))
        for c in sorted(Cs, key=lambda c: abs(float(np.log(c)) - middle)):
            if best_key is not None and time_up is not None and time_up():
                break
            w, b = _fold(
                _fit(xs, y, c, class_weight, max_iter), 1.0, num_classes
            )  # in xs coordinates
            acc, loss = _score(torch.from_numpy(xv).float() @ w.T + b, torch.from_numpy(yv))
            scores.append({"C": c, "val_accuracy": acc, "val_loss": loss})
            if best_key is None or (acc, -loss) > best_key:
                best_key, chosen = (acc, -loss), c
        selected_by = "val"

    weight, bias = _fold(_fit(xs, y, chosen, class_weight, max_iter), scale, num_classes, basis)
    val_accuracy = val_loss = None
    if has_val and val_features is not None and val_targets is not None:
        logits = val_features.float() @ weight.T + bias
        val_accuracy, val_loss = _score(logits, val_targets.long())
    result = ProbeResult(
        weight=weight,
        bias=bias,
        C=chosen,
        val_accuracy=val_accuracy,
        val_loss=val_loss,
        cv_accuracy=cv_accuracy,
        selected_by=selected_by,
        scores=scores,
    )
    if refit and raw_xv is not None and yv is not None:
        every = np.concatenate([raw_xs, raw_xv])
        # a basis of its own: directions only the validation images span would be unconstrained
        # by the data and make the optimiser crawl (10x slower, measured)
        every_basis = _span(every)
        if every_basis is not None:
            every = every @ every_basis.T
        both = _fit(every, np.concatenate([y, yv]), chosen, class_weight, max_iter)
        result.final_weight, result.final_bias = _fold(both, scale, num_classes, every_basis)
        result.refit = True
    return result
