import json

import numpy as np
import pytest

from visionflow.errors import DataError
from visionflow.evaluate.detection import evaluate_detections
from visionflow.evaluate.detection_plots import plot_ap_by_class, plot_pr_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000
    assert [p for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def metrics(classes=("cat", "dog", "$bird$")):
    """cat is found (with a stronger false positive), dog is missed, the third has no boxes."""
    truth = [
        {"boxes": np.array([[0, 0, 40, 40], [100, 100, 160, 150]]), "labels": np.array([0, 1])},
        {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, dtype=int)},
    ]
    preds = [
        {
            "boxes": np.array([[0, 0, 40, 40], [200, 0, 240, 40], [100, 0, 140, 30]]),
            "labels": np.array([0, 0, 2]),
            "scores": np.array([0.7, 0.9, 0.4]),
        },
        {"boxes": np.array([[5, 5, 30, 30]]), "labels": np.array([1]), "scores": np.array([0.6])},
    ]
    return evaluate_detections(preds, truth, list(classes))


def test_plots_of_metrics_and_of_their_json(tmp_path):
    m = metrics()
    assert m.per_class["$bird$"]["ap"] is None
    path = plot_pr_curves(m, tmp_path / "pr.png")
    assert path == tmp_path / "pr.png"
    assert_png(path)
    assert_png(plot_ap_by_class(m, tmp_path / "ap.png"))
    # The JSON form (as read back from metrics.json) draws the same plots.
    data = json.loads(json.dumps(m.to_json(curves=True)))
    assert_png(plot_pr_curves(data, tmp_path / "pr_json.png"))
    assert_png(plot_ap_by_class(m.to_json(), tmp_path / "ap_json.png"))


def test_plots_without_ground_truth_and_with_many_classes(tmp_path):
    empty = evaluate_detections(
        [{"boxes": [], "labels": [], "scores": []}],
        [{"boxes": [], "labels": []}],
        ["cat", "dog"],
    )
    assert_png(plot_pr_curves(empty, tmp_path / "pr_empty.png"))
    assert_png(plot_ap_by_class(empty, tmp_path / "ap_empty.png"))
    many = metrics([f"class with a rather long name {k}" for k in range(30)])
    assert_png(plot_pr_curves(many, tmp_path / "pr_many.png"))
    assert_png(plot_ap_by_class(many, tmp_path / "ap_many.png"))


def test_plots_reject_what_they_cannot_draw(tmp_path):
    with pytest.raises(DataError, match=r"to_json\(curves=True\)"):
        plot_pr_curves(metrics().to_json(), tmp_path / "pr.png")
    with pytest.raises(DataError, match="per_class"):
        plot_ap_by_class({"map": 0.5}, tmp_path / "ap.png")
    assert list(tmp_path.iterdir()) == []
