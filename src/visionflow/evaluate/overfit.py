"""Plain-words diagnosis of a training run: over- and underfitting, noisy validation.

:func:`diagnose` reads the per-epoch history of the training loop and the final accuracies per
split and returns :class:`Finding` objects, most severe first. The rules are deliberately simple
and their thresholds are written in the messages, so a reader can judge them:

* train accuracy above validation accuracy by more than 0.10 (warning) or 0.20 (problem);
* validation loss rising for the last epochs after its minimum while the training loss still
  falls (warning, names the best epoch);
* train accuracy below 0.60 with validation close to it (underfitting, warning);
* a validation set under 30 images (its accuracy moves in steps of ``1/n_val``);
* validation and test accuracy more than 0.10 apart (warning);
* none of the fitting rules triggered: an info finding that says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Finding", "diagnose"]

_LEVELS = ("problem", "warning", "info")

#: Gap train - val accuracy above which we warn / call it a problem.
GAP_WARNING = 0.10
GAP_PROBLEM = 0.20
#: Train accuracy below which a run counts as underfitting (when val is close to it).
UNDERFIT_ACCURACY = 0.60
#: A validation set smaller than this gets a note on its resolution.
SMALL_VAL = 30
#: Validation and test accuracy further apart than this disagree.
VAL_TEST_GAP = 0.10
#: Epochs after the validation-loss minimum needed before calling it a rise.
RISE_MIN_EPOCHS = 2
#: Relative rise of validation loss above its minimum that counts.
RISE_MIN_RELATIVE = 0.05


@dataclass(frozen=True)
class Finding:
    """One diagnosis: ``level`` is ``"info"``, ``"warning"`` or ``"problem"``."""

    level: str
    title: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _final_accuracy(final: dict[str, dict[str, float]], split: str) -> float | None:
    entry = final.get(split)
    if not isinstance(entry, dict):
        return None
    return _number(entry.get("accuracy"))


def _reference_record(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record whose weights were kept: the last one marked best, else the last one."""
    for record in reversed(history):
        if record.get("best"):
            return record
    return history[-1] if history else None


def _epoch_name(record: dict[str, Any], position: int) -> str:
    epoch = record.get("epoch")
    phase = record.get("phase")
    label = f"epoch {epoch}" if epoch is not None else f"record {position + 1}"
    return f"{label} of phase '{phase}'" if phase else label


def _wilson_width(p: float, n: int, z: float = 1.96) -> float:
    """Width of the 95% Wilson interval of a binomial proportion ``p`` measured on ``n``."""
    denom = 1 + z * z / n
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 2 * half


def _val_loss_rise(history: list[dict[str, Any]]) -> Finding | None:
    val: list[tuple[int, float, float | None]] = []
    for i, record in enumerate(history):
        v = _number(record.get("val_loss"))
        if v is not None:
            val.append((i, v, _number(record.get("train_loss"))))
    if len(val) < RISE_MIN_EPOCHS + 1:
        return None
    best = min(range(len(val)), key=lambda j: (val[j][1], j))
    after = len(val) - 1 - best
    if after < RISE_MIN_EPOCHS:
        return None
    pos_best, v_best, t_best = val[best]
    _, v_last, t_last = val[-1]
    if v_last - v_best <= max(RISE_MIN_RELATIVE * abs(v_best), 1e-6):
        return None
    if t_best is None or t_last is None or not t_last < t_best:
        return None
    best_name = _epoch_name(history[pos_best], pos_best)
    return Finding(
        "warning",
        "Validation loss rises while training loss falls",
        f"Validation loss was lowest ({v_best:.4f}) at {best_name} and rose to {v_last:.4f} "
        f"over the {after} epochs after it, while training loss kept falling "
        f"({t_best:.4f} → {t_last:.4f}). The model is starting to memorise the training set: "
        "keep the weights of the best epoch (early stopping), or add regularisation or "
        "augmentation.",
    )


def diagnose(
    history: list[dict[str, Any]],
    *,
    final: dict[str, dict[str, float]],
    n_val: int,
) -> list[Finding]:
    """Explain in plain words how well a run fits, most severe finding first.

    Args:
        history: Per-epoch records of the training loop (``epoch``, ``phase``, ``train_loss``,
            ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``best``...); any key may be
            missing or ``None`` (train accuracy is ``None`` under mixup).
        final: Final metrics per split, e.g. ``{"train": {"accuracy": 0.99}, "val": {...}}``;
            any subset of ``train``, ``val``, ``test``. Missing accuracies are taken from the
            best history record.
        n_val: Number of validation images.

    Returns:
        Findings ordered problem, warning, info (stable within a level).
    """
    history = [r for r in history if isinstance(r, dict)]
    reference = _reference_record(history)
    train_acc = _final_accuracy(final, "train")
    val_acc = _final_accuracy(final, "val")
    test_acc = _final_accuracy(final, "test")
    if reference is not None:
        if train_acc is None:
            train_acc = _number(reference.get("train_accuracy"))
        if val_acc is None:
            val_acc = _number(reference.get("val_accuracy"))

    findings: list[Finding] = []
    fit_issue = False

    if train_acc is not None and val_acc is not None:
        gap = train_acc - val_acc
        if gap > GAP_WARNING:
            level = "problem" if gap > GAP_PROBLEM else "warning"
            findings.append(
                Finding(
                    level,
                    "Overfitting: training accuracy well above validation",
                    f"Train accuracy is {_pct(train_acc)} but validation accuracy is "
                    f"{_pct(val_acc)}, a gap of {100 * gap:.1f} points (warning above "
                    f"{100 * GAP_WARNING:.0f}, problem above {100 * GAP_PROBLEM:.0f}). The model "
                    "fits the training images better than new ones: more data, stronger "
                    "augmentation, more regularisation or fewer fine-tuned layers usually help.",
                )
            )
            fit_issue = True

    rise = _val_loss_rise(history)
    if rise is not None:
        findings.append(rise)
        fit_issue = True

    if (
        train_acc is not None
        and train_acc < UNDERFIT_ACCURACY
        and (val_acc is None or abs(train_acc - val_acc) <= GAP_WARNING)
    ):
        val_text = f" and validation {_pct(val_acc)}" if val_acc is not None else ""
        findings.append(
            Finding(
                "warning",
                "Underfitting: the model does not fit the training set",
                f"Train accuracy is only {_pct(train_acc)}{val_text} (below "
                f"{_pct(UNDERFIT_ACCURACY)}). The model has not learned the training images "
                "yet: give it a longer time budget, unfreeze more layers, try a larger model or "
                "a higher learning rate, and check that the labels are right.",
            )
        )
        fit_issue = True

    if n_val <= 0:
        findings.append(
            Finding(
                "warning",
                "No validation images",
                "There is no validation set, so over- and underfitting cannot be measured and "
                "model selection relies on training numbers only.",
            )
        )
    elif n_val < SMALL_VAL:
        p = val_acc if val_acc is not None else 0.5
        width = _wilson_width(p, n_val)
        findings.append(
            Finding(
                "warning" if n_val < 10 else "info",
                "Small validation set",
                f"The validation set has {n_val} images, so its accuracy moves in steps of "
                f"{_pct(1 / n_val)} and a rough 95% confidence interval around "
                f"{_pct(p)} is {100 * width:.0f} points wide. Treat small differences between "
                "epochs or models as noise; more validation images give steadier numbers.",
            )
        )

    if val_acc is not None and test_acc is not None and abs(val_acc - test_acc) > VAL_TEST_GAP:
        findings.append(
            Finding(
                "warning",
                "Validation and test accuracy disagree",
                f"Validation accuracy is {_pct(val_acc)} but test accuracy is {_pct(test_acc)} "
                f"({100 * abs(val_acc - test_acc):.1f} points apart, more than "
                f"{100 * VAL_TEST_GAP:.0f}). The two sets may come from different distributions, "
                "one may be too small, or choices were tuned to the validation set.",
            )
        )

    if not fit_issue:
        if train_acc is None and val_acc is None and not history:
            findings.append(
                Finding(
                    "info",
                    "Not enough information to diagnose fitting",
                    "Neither a training history nor final accuracies were given.",
                )
            )
        else:
            parts = []
            if train_acc is not None:
                parts.append(f"train {_pct(train_acc)}")
            if val_acc is not None:
                parts.append(f"validation {_pct(val_acc)}")
            numbers = f" ({', '.join(parts)})" if parts else ""
            findings.append(
                Finding(
                    "info",
                    "No sign of over- or underfitting",
                    f"Training and validation numbers are close and the validation loss does "
                    f"not rise at the end{numbers}.",
                )
            )

    order = {level: i for i, level in enumerate(_LEVELS)}
    return sorted(findings, key=lambda f: order.get(f.level, len(_LEVELS)))
