"""Linear probe: multinomial logistic regression on frozen backbone features.

On small datasets a well-regularised probe on good pretrained features is a strong model by
itself, and it is the best starting head for fine-tuning (LP-FT: Kumar et al., 2022, "Fine-Tuning
can Distort Pretrained Features"): a random head sends large, noisy gradients into the backbone
during the first steps, a probe-initialised one does not.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from visionflow.errors import DataError

__all__ = ["ProbeResult", "fit_linear_probe"]

#: Inverse L2 strengths tried; chosen by validation accuracy, then validation loss.
DEFAULT_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class ProbeResult:
    """A fitted probe, already folded into one linear layer on raw (unscaled) features."""

    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor  # (classes,)
    C: float
    val_accuracy: float | None
    val_loss: float | None
    scores: list[dict[str, float | None]] = field(default_factory=list)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias


def _fold(model: LogisticRegression, mean: np.ndarray, scale: np.ndarray, num_classes: int):  # type: ignore[no-untyped-def]
    """Fold standardisation into the linear layer: W' = W / s, b' = b - W' . m."""
    coef = np.zeros((num_classes, mean.shape[0]))
    intercept = np.full(num_classes, -1e4)  # classes absent from training never win
    present = model.classes_.astype(int)
    if len(present) == 2 and model.coef_.shape[0] == 1:  # sklearn's binary shortcut
        coef[present[1]] = model.coef_[0] / 2
        coef[present[0]] = -model.coef_[0] / 2
        intercept[present[1]] = model.intercept_[0] / 2
        intercept[present[0]] = -model.intercept_[0] / 2
    else:
        coef[present] = model.coef_
        intercept[present] = model.intercept_
    weight = coef / scale
    bias = intercept - weight @ mean
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


def _score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    acc = float((logits.argmax(1) == y).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    return acc, loss


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
    max_iter: int = 500,
) -> ProbeResult:
    """Fit one probe per ``C`` and keep the best on the validation split.

    Without a validation split the middle ``C`` is used. ``class_weight="balanced"`` reweights
    an imbalanced training set.
    """
    if len(train_features) == 0:
        raise DataError("the training split is empty; nothing to fit a probe on")
    x = train_features.double().numpy()
    y = train_targets.long().numpy()
    if len(np.unique(y)) < 2:
        raise DataError("the training split holds a single class; at least two are needed")
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    xs = (x - mean) / scale
    has_val = val_features is not None and val_targets is not None and len(val_targets) > 0
    candidates = list(Cs) if has_val else [list(Cs)[len(Cs) // 2]]
    best: ProbeResult | None = None
    scores: list[dict[str, float | None]] = []
    for c in candidates:
        model = LogisticRegression(C=c, max_iter=max_iter, class_weight=class_weight, tol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(xs, y)
        weight, bias = _fold(model, mean, scale, num_classes)
        acc: float | None = None
        loss: float | None = None
        if has_val:
            assert val_features is not None and val_targets is not None  # for mypy
            logits = val_features.float() @ weight.T + bias
            acc, loss = _score(logits, val_targets.long())
        scores.append({"C": c, "val_accuracy": acc, "val_loss": loss})
        result = ProbeResult(weight, bias, c, acc, loss)
        if best is None or _better(result, best):
            best = result
    assert best is not None
    best.scores = scores
    return best


def _better(a: ProbeResult, b: ProbeResult) -> bool:
    if a.val_accuracy is None or b.val_accuracy is None:
        return False
    if a.val_accuracy != b.val_accuracy:
        return a.val_accuracy > b.val_accuracy
    return (a.val_loss or 0.0) < (b.val_loss or 0.0)
