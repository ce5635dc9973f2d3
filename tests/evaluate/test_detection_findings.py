"""Plain-words diagnoses in a detection run's report."""

from __future__ import annotations

from visionflow.evaluate.detection_report import detection_findings


def _history(values: list[float]) -> list[dict[str, float]]:
    return [{"epoch": i, "val_map": v} for i, v in enumerate(values)]


def _metrics(aps: dict[str, float], val: float = 0.7, test: float = 0.7) -> dict:
    per_class = {name: {"ap_50": ap, "gt": 10} for name, ap in aps.items()}
    return {"val": {"map_50": val}, "test": {"map_50": test, "per_class": per_class}}


def test_still_improving_when_the_budget_ended() -> None:
    found = detection_findings(_history([0.1, 0.2, 0.3, 0.35]), _metrics({"a": 0.7}), "budget")
    assert [f.title for f in found] == ["Still improving when the budget ended"]
    assert detection_findings(_history([0.1, 0.2, 0.3, 0.35]), _metrics({"a": 0.7}), "epochs") == []


def test_past_its_best_names_the_peak() -> None:
    (finding,) = detection_findings(_history([0.1, 0.4, 0.35, 0.3]), _metrics({"a": 0.7}), "budget")
    assert finding.level == "warning" and "peaked at 0.400 (epoch 2 of 4)" in finding.detail


def test_a_lagging_class_and_disagreeing_splits() -> None:
    metrics = _metrics({"card": 0.8, "coin": 0.8, "digit": 0.4}, val=0.8, test=0.6)
    found = detection_findings(_history([0.3, 0.3, 0.3]), metrics, None)
    titles = [f.title for f in found]
    assert titles == ["Class 'digit' lags behind", "Validation and test disagree"]
    assert "0.400 against 0.800" in found[0].detail
