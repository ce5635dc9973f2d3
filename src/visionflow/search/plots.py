"""Plots, parameter importances and the HTML report section of a hyper-parameter search.

Everything here works from leaderboard rows (:meth:`Study.leaderboard`, or a
``leaderboard.csv`` read back into the same shape: values and params may then be strings, and
``info`` a JSON string), never from Optuna's study object, so a finished search can be re-plotted
offline from its files. Figures follow :mod:`visionflow.evaluate.plots`: a bare
:class:`~matplotlib.figure.Figure` on the Agg canvas (no pyplot state) written atomically; each
plot function returns the path it wrote.

Parameter importance (:func:`param_importances`) does not use ``optuna.importance``: its
evaluators (fANOVA, MDI, PED-ANOVA) all take an ``optuna.Study`` and read the distributions of
its trials, and they drop every trial that lacks one of the parameters, which in our conditional
space (a ``probe`` trial samples no fine-tune parameter) would drop most trials. Instead we do
what Optuna's ``MeanDecreaseImpurityImportanceEvaluator`` does (a scikit-learn random forest of
64 trees on the encoded parameters, impurity importances summed per parameter) on the rows
themselves, encoding a parameter a trial did not sample as its own value (see
:func:`param_importances`).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from visionflow.evaluate.plots import _empty, _label, _new_figure, _number, _save, _tight
from visionflow.evaluate.report import ReportSection, html_image, html_table

__all__ = [
    "param_importances",
    "plot_optimization_history",
    "plot_param_importance",
    "plot_trial_curves",
    "search_report_section",
]

#: Fewer complete trials than this give no importances: a forest on 3 points says nothing.
MIN_TRIALS_FOR_IMPORTANCE = 4
#: Rows shown in the leaderboard table of the report section.
LEADERBOARD_ROWS = 20
#: A positive numeric parameter spanning more than this ratio is encoded as log10.
_LOG_SPAN = 100.0
_N_TREES = 64
_MAX_DEPTH = 64
_SEED = 0
_ERROR_MAX = 300

_STATE_ORDER = ("complete", "pruned", "failed", "running", "waiting", "surplus")


# ---------------------------------------------------------------------------- row access
def _info(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row["info"]`` as a dict (a JSON string from a CSV is parsed; anything else is ``{}``)."""
    info = row.get("info")
    if isinstance(info, str) and info.strip():
        try:
            info = json.loads(info)
        except ValueError:
            return {}
    return info if isinstance(info, dict) else {}


def _params(row: Mapping[str, Any]) -> dict[str, Any]:
    params = row.get("params")
    return params if isinstance(params, dict) else {}


def _state(row: Mapping[str, Any]) -> str:
    return str(row.get("state", "")).strip().lower()


def _finite(value: Any) -> float | None:
    number = _number(value)
    return number if math.isfinite(number) else None


def _trial_number(row: Mapping[str, Any]) -> int | None:
    number = _finite(row.get("number"))
    return int(number) if number is not None else None


def _curve(row: Mapping[str, Any]) -> list[tuple[float, float]]:
    """The ``[epoch, val_accuracy]`` points of ``info["curve"]`` that are finite numbers."""
    raw = _info(row).get("curve")
    if not isinstance(raw, list | tuple):
        return []
    points = []
    for point in raw:
        if isinstance(point, list | tuple) and len(point) >= 2:
            epoch, value = _finite(point[0]), _finite(point[1])
            if epoch is not None and value is not None:
                points.append((epoch, value))
    return points


def _score(row: Mapping[str, Any]) -> float | None:
    """The trial's value; for a pruned trial without one, the last point of its curve."""
    value = _finite(row.get("value"))
    if value is None and _state(row) == "pruned":
        points = _curve(row)
        if points:
            return points[-1][1]
    return value


def _strategy(row: Mapping[str, Any]) -> Any:
    strategy = _info(row).get("strategy")
    return strategy if strategy is not None else _params(row).get("strategy")


def _ranked(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows in leaderboard order: complete best first, then pruned by value, then the rest."""
    group = {"complete": 0, "pruned": 1}

    def key(row: Mapping[str, Any]) -> tuple[int, float, float]:
        g = group.get(_state(row), 2)
        score = _score(row) if g < 2 else None
        number = _trial_number(row)
        return (g, -score if score is not None else math.inf, number if number is not None else 0)

    return sorted((r for r in rows if isinstance(r, Mapping)), key=key)


# ---------------------------------------------------------------------------- plots
def plot_optimization_history(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]
) -> Path:
    """Each finished trial's validation accuracy by trial number, and the best so far.

    Complete trials are dots and carry the best-so-far step line; pruned trials are hollow
    markers at their last reported value (left out when they reported none); failed trials are
    crosses along the bottom edge, since they have no value.
    """
    complete: list[tuple[int, float]] = []
    pruned: list[tuple[int, float]] = []
    failed: list[int] = []
    for row in rows:
        if not isinstance(row, Mapping):
            continue
        number, state = _trial_number(row), _state(row)
        if number is None:
            continue
        score = _score(row)
        if state == "complete" and score is not None:
            complete.append((number, score))
        elif state == "pruned" and score is not None:
            pruned.append((number, score))
        elif state == "failed":
            failed.append(number)
    complete.sort()
    pruned.sort()

    fig = _new_figure(8, 4.5)
    ax = fig.subplots()
    ax.set_title("Optimization history")
    if not complete and not pruned:
        _empty(ax, "no trial finished with a value yet")
        return _save(fig, path)
    if complete:
        x = np.array([n for n, _ in complete])
        y = np.array([v for _, v in complete])
        ax.plot(x, y, "o", color="tab:blue", label="complete")
        best = np.maximum.accumulate(y)
        last = max(n for n, _ in complete + pruned)
        ax.step(
            np.append(x, last),
            np.append(best, best[-1]),
            where="post",
            color="tab:red",
            label="best so far",
        )
    else:
        note = "no complete trial yet"
        ax.text(0.5, 0.95, note, ha="center", va="top", transform=ax.transAxes, color="0.4")
    if pruned:
        ax.plot(
            [n for n, _ in pruned],
            [v for _, v in pruned],
            "o",
            markerfacecolor="none",
            markeredgecolor="tab:gray",
            label="pruned (last value)",
        )
    if failed:
        ax.plot(
            failed,
            [0.04] * len(failed),
            "x",
            markersize=7,
            color="tab:orange",
            transform=ax.get_xaxis_transform(),
            label="failed (no value)",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _tight(fig)
    return _save(fig, path)


def plot_param_importance(importances: Mapping[str, float], path: str | os.PathLike[str]) -> Path:
    """Horizontal bars of each parameter's importance, the largest at the top."""
    items = sorted(
        ((str(k), _finite(v) or 0.0) for k, v in importances.items()),
        key=lambda kv: (kv[1], kv[0]),
    )
    n = len(items)
    fig = _new_figure(7, min(max(2.5, 0.4 * n + 1.2), 30.0))
    ax = fig.subplots()
    ax.set_title("Parameter importance")
    if n == 0:
        _empty(ax, f"too few trials to estimate importances (need {MIN_TRIALS_FOR_IMPORTANCE})")
        return _save(fig, path)
    values = np.array([v for _, v in items])
    ax.barh(range(n), values, color="tab:purple", edgecolor="black")
    ax.set_yticks(range(n))
    ax.set_yticklabels([_label(k) for k, _ in items], fontsize=9)
    for i, value in enumerate(values):
        ax.text(value, i, f" {100 * value:.1f}%", va="center", fontsize=8)
    ax.set_xlim(0, max(1.0, float(values.max())) * 1.15)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel("importance (share of explained variance, random forest)")
    ax.grid(True, axis="x", alpha=0.3)
    _tight(fig)
    return _save(fig, path)


def plot_trial_curves(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], top: int = 5
) -> Path:
    """Validation accuracy by epoch of the ``top`` best trials that recorded a curve.

    Complete and pruned trials are ranked together by their value (a pruned one by its last
    reported value), so a pruned trial shows when it was competitive before being cut; its
    curve is dashed. The legend gives the trial number and strategy.
    """
    candidates = []
    for row in rows:
        if not isinstance(row, Mapping) or _state(row) not in ("complete", "pruned"):
            continue
        points = _curve(row)
        if not points:
            continue
        score = _score(row)
        if score is None:
            score = max(v for _, v in points)
        number = _trial_number(row)
        candidates.append((row, points, score, number if number is not None else -1))
    candidates.sort(key=lambda c: (-c[2], _state(c[0]) != "complete", c[3]))
    chosen = candidates[: max(0, int(top))]

    fig = _new_figure(8, 4.5)
    ax = fig.subplots()
    ax.set_title(f"Validation accuracy of the best {len(chosen)} trial(s)" if chosen else "Trials")
    if not chosen:
        _empty(ax, "no trial recorded a learning curve")
        return _save(fig, path)
    colors = [f"C{i % 10}" for i in range(len(chosen))]
    for (row, points, _, number), color in zip(chosen, colors, strict=True):
        pruned = _state(row) == "pruned"
        strategy = _strategy(row)
        name = f"#{number}" + (f" {strategy}" if strategy is not None else "")
        name += " (pruned)" if pruned else ""
        ax.plot(
            [e for e, _ in points],
            [v for _, v in points],
            "--" if pruned else "-",
            marker=".",
            color=color,
            label=_label(name),
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _tight(fig)
    return _save(fig, path)


# ---------------------------------------------------------------------------- importance
def _as_param_value(value: Any) -> Any:
    """``None`` for a missing value (None, "", NaN); a number for a numeric string; else as is."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else None
    return value


def _encode(column: list[Any]) -> np.ndarray:
    """One parameter's values as feature columns (rows x k).

    Numbers stay one column (log10 when all are positive and span more than two decades); a
    missing value becomes a sentinel below every observed one, so a tree can split it off.
    Anything else is one-hot, a missing value being the all-zero row.
    """
    present = [v for v in column if v is not None]
    if all(isinstance(v, float) for v in present):
        values = np.array([np.nan if v is None else v for v in column], dtype=np.float64)
        seen = values[~np.isnan(values)]
        if seen.min() > 0 and seen.max() / seen.min() > _LOG_SPAN:
            values = np.log10(values)
            seen = np.log10(seen)
        low, span = float(seen.min()), float(np.ptp(seen))
        return np.where(np.isnan(values), low - max(span, 1.0), values)[:, None]
    levels = sorted({json.dumps(v, default=str) for v in present})
    out = np.zeros((len(column), len(levels)), dtype=np.float64)
    index = {level: j for j, level in enumerate(levels)}
    for i, v in enumerate(column):
        if v is not None:
            out[i, index[json.dumps(v, default=str)]] = 1.0
    return out


def param_importances(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """How much each searched parameter explains the validation accuracy of complete trials.

    A random forest regressor (64 trees, depth up to 64, ``random_state=0``: deterministic)
    learns the value from the parameters; a parameter's importance is the impurity decrease
    (variance explained) of its splits, summed over its one-hot columns for a categorical one,
    normalised to sum 1. This is Optuna's ``MeanDecreaseImpurityImportanceEvaluator`` without
    the study object, so it works on rows read back from ``leaderboard.csv``. Numbers are used
    raw, or as log10 when all are positive and span more than two decades (learning rates).
    A parameter a trial did not sample (fine-tune parameters of a probe trial) is encoded as a
    value of its own. Like all impurity importances it favours parameters with many distinct
    values and splits credit between correlated ones: read it as a ranking, not a measurement.

    Returns:
        ``{name: importance}``, largest first; parameters with a single value over the complete
        trials are left out; ``{}`` with fewer than 4 complete trials or nothing varying. When
        every trial scored the same, every varying parameter gets 0.
    """
    complete = [
        r
        for r in rows
        if isinstance(r, Mapping) and _state(r) == "complete" and _finite(r.get("value"))
    ]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    complete.sort(key=lambda r: (_trial_number(r) is None, _trial_number(r) or 0))
    names: list[str] = []
    for row in complete:
        names.extend(str(k) for k in _params(row) if str(k) not in names)
    columns: dict[str, list[Any]] = {}
    for name in names:
        column = [_as_param_value(_params(r).get(name)) for r in complete]
        distinct = {json.dumps(v, default=str) for v in column}
        if len(distinct) > 1:
            columns[name] = column
    if not columns:
        return {}
    y = np.array([_finite(r.get("value")) for r in complete], dtype=np.float64)
    if float(np.ptp(y)) == 0.0:
        return {name: 0.0 for name in sorted(columns)}

    blocks = [_encode(column) for column in columns.values()]
    owner = np.concatenate([np.full(b.shape[1], i) for i, b in enumerate(blocks)])
    from sklearn.ensemble import RandomForestRegressor  # heavy import, only needed here

    forest = RandomForestRegressor(
        n_estimators=_N_TREES,
        max_depth=_MAX_DEPTH,
        min_samples_split=2,
        min_samples_leaf=1,
        random_state=_SEED,
        n_jobs=1,
    )
    forest.fit(np.hstack(blocks), y)
    per_param = np.zeros(len(blocks))
    np.add.at(per_param, owner, forest.feature_importances_)
    total = float(per_param.sum())
    if not math.isfinite(total) or total <= 0:
        return {name: 0.0 for name in sorted(columns)}
    scores = {name: float(per_param[i] / total) for i, name in enumerate(columns)}
    return dict(sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])))


# ---------------------------------------------------------------------------- report
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}%"


def _summary(counts: Mapping[str, int], budget_note: str) -> str:
    known = [s for s in _STATE_ORDER if s in counts]
    others = sorted(str(s) for s in counts if s not in _STATE_ORDER)
    parts = []
    total = 0
    for state in [*known, *others]:
        count = counts.get(state, 0)
        if isinstance(count, bool) or not isinstance(count, int):
            continue
        total += count
        if count:
            parts.append(f"{count} {state}")
    text = f"{total} trial{'s' if total != 1 else ''}"
    if parts:
        text += ": " + ", ".join(parts)
    text += "."
    if budget_note:
        text += f" {budget_note}"
    return f"<p>{_esc(text)}</p>"


def _leaderboard_html(rows: Sequence[Mapping[str, Any]]) -> str:
    ranked = _ranked(rows)
    if not ranked:
        return "<p>No trial yet.</p>"
    table = []
    for rank, row in enumerate(ranked[:LEADERBOARD_ROWS], start=1):
        params = _params(row)
        duration = _finite(row.get("duration_s"))
        table.append(
            [
                rank,
                _trial_number(row),
                _state(row) or None,
                _pct(_score(row)),
                _strategy(row),
                params.get("backbone"),
                params.get("img_size"),
                params.get("lr"),
                None if duration is None else f"{duration:.1f} s",
            ]
        )
    headers = [
        "rank",
        "trial",
        "state",
        "val. accuracy",
        "strategy",
        "backbone",
        "img_size",
        "lr",
        "duration",
    ]
    out = html_table(table, headers=headers)
    if len(ranked) > LEADERBOARD_ROWS:
        out += f"<p>… and {len(ranked) - LEADERBOARD_ROWS} more trials (see leaderboard.csv).</p>"
    errors = []
    for row in ranked:
        error = _info(row).get("error")
        if _state(row) == "failed" and error:
            text = str(error)
            if len(text) > _ERROR_MAX:
                text = text[: _ERROR_MAX - 1] + "…"
            errors.append(f"<li>trial {_esc(_trial_number(row))}: <code>{_esc(text)}</code></li>")
    if errors:
        shown = errors[:LEADERBOARD_ROWS]
        more = len(errors) - len(shown)
        tail = f"<li>… and {more} more</li>" if more > 0 else ""
        out += (
            f"<details><summary>Failed trials ({len(errors)})</summary>"
            f"<ul>{''.join(shown)}{tail}</ul></details>"
        )
    return out


def _best_html(best: Mapping[str, Any] | None) -> str:
    if not best:
        return "<p>No trial completed, so there is no best configuration yet.</p>"
    info = _info(best)
    rows: list[list[Any]] = [
        ["trial", _trial_number(best)],
        ["validation accuracy", _pct(_finite(best.get("value")))],
    ]
    rows += [[name, value] for name, value in _params(best).items()]
    for key in ("strategy", "epochs"):
        if key in info and key not in _params(best):
            rows.append([key, info[key]])
    return html_table(rows, headers=["parameter", "value"])


def search_report_section(
    rows: Sequence[Mapping[str, Any]],
    images: Mapping[str, Path],
    *,
    best: Mapping[str, Any] | None,
    counts: Mapping[str, int],
    budget_note: str,
) -> ReportSection:
    """The "Hyper-parameter search" section of the HTML report.

    A summary line (trials per state from ``counts``, or from ``rows`` when it is empty, and
    ``budget_note``), the top 20 of the leaderboard, the
    errors of failed trials, the ``best`` configuration and the ``images`` (caption -> PNG,
    e.g. the three plots of this module) inline. Every value is escaped.
    """
    if not counts:  # e.g. rows read back from leaderboard.csv: count them
        counts = {}
        for row in rows:
            if isinstance(row, Mapping):
                counts[_state(row)] = counts.get(_state(row), 0) + 1
    parts = [
        _summary(counts, budget_note),
        "<h3>Leaderboard</h3>",
        _leaderboard_html(rows),
        "<h3>Best configuration</h3>",
        _best_html(best),
    ]
    if images:
        parts.append("<h3>Plots</h3>")
        for caption, image in images.items():
            parts.append(
                f"<figure>{html_image(Path(image), str(caption))}"
                f"<figcaption>{_esc(caption)}</figcaption></figure>"
            )
    return ReportSection(title="Hyper-parameter search", html="\n".join(parts))
