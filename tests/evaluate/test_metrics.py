import json
import math

import numpy as np
import pytest

from visionflow.evaluate import (
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
)

NAMES = ["a", "b", "c", "d"]


def one_hot(labels, num_classes, confidence=1.0):
    probs = np.full((len(labels), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(labels)), labels] = confidence
    return probs


def test_perfect_predictions():
    y = np.array([0, 1, 2, 3, 0, 1])
    m = classification_metrics(y, one_hot(y, 4), NAMES)
    assert m["n"] == 6
    assert m["accuracy"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["weighted_f1"] == 1.0
    assert m["top_k"] == {"top3": 1.0}
    assert m["ece"] == pytest.approx(0.0)
    assert m["log_loss"] == pytest.approx(0.0, abs=1e-9)
    assert m["confusion_matrix"] == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert m["class_names"] == NAMES


def test_all_wrong():
    y = np.array([0, 1, 2, 3])
    pred = np.array([1, 2, 3, 0])
    probs = np.full((4, 4), 0.1)
    probs[np.arange(4), pred] = 0.65
    probs[np.arange(4), y] = 0.15
    m = classification_metrics(y, probs, NAMES, topk=(2, 3))
    assert m["accuracy"] == 0.0
    assert m["balanced_accuracy"] == 0.0
    assert m["macro_f1"] == 0.0
    assert m["weighted_f1"] == 0.0
    assert m["ece"] == pytest.approx(0.65)
    assert m["log_loss"] == pytest.approx(-math.log(0.15))
    assert m["top_k"] == {"top2": 1.0, "top3": 1.0}  # the true class is always second
    assert all(row[i] == 0 for i, row in enumerate(m["confusion_matrix"]))


def test_known_confusion():
    # true:  0 0 0 1 1 2 ; predicted: 0 0 1 1 1 0
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 1, 0])
    m = classification_metrics(y, one_hot(pred, 3, confidence=0.8), ["x", "y", "z"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    px, rx = 2 / 3, 2 / 3
    py, ry = 2 / 3, 1.0
    f1x = 2 * px * rx / (px + rx)
    f1y = 2 * py * ry / (py + ry)
    assert m["per_class"]["x"]["f1"] == pytest.approx(f1x)
    assert m["per_class"]["y"]["precision"] == pytest.approx(py)
    assert m["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((f1x + f1y) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * f1x + 2 * f1y) / 6)
    assert "top3" not in m["top_k"]  # k must be smaller than the number of classes


def test_absent_class_keeps_its_row_and_column():
    y = np.array([0, 0, 1, 1])
    probs = one_hot(np.array([0, 1, 1, 1]), 4, confidence=0.9)
    m = classification_metrics(y, probs, NAMES)
    assert len(m["confusion_matrix"]) == 4
    assert all(len(row) == 4 for row in m["confusion_matrix"])
    assert m["per_class"]["c"]["support"] == 0
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # balanced accuracy averages recall over the classes present in y_true only
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    # macro-F1 over classes seen in y_true or predictions (a and b)
    f1a, f1b = 2 / 3, 0.8
    assert m["macro_f1"] == pytest.approx((f1a + f1b) / 2)


def test_prediction_of_absent_class_does_not_warn():
    y = np.array([0, 0])
    probs = one_hot(np.array([0, 3]), 4, confidence=0.9)
    m = classification_metrics(y, probs, NAMES)
    assert m["balanced_accuracy"] == 0.5
    assert m["per_class"]["d"]["precision"] == 0.0


def test_top_k():
    probs = np.array(
        [
            [0.5, 0.3, 0.1, 0.1],  # true 1: second
            [0.4, 0.3, 0.2, 0.1],  # true 2: third
            [0.4, 0.3, 0.2, 0.1],  # true 3: fourth
            [0.1, 0.2, 0.3, 0.4],  # true 3: first
        ]
    )
    y = np.array([1, 2, 3, 3])
    m = classification_metrics(y, probs, NAMES, topk=(1, 2, 3, 4, 10))
    assert m["top_k"] == {"top1": 0.25, "top2": 0.5, "top3": 0.75}
    assert m["accuracy"] == 0.25


def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    n = 4000
    # 2 classes, confidence 0.75 and right exactly 75% of the time: calibrated
    y = np.zeros(n, dtype=int)
    y[: n // 4] = 1
    probs = np.tile([0.75, 0.25], (n, 1))
    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)
    # same accuracy, 0.99 confidence: overconfident by 0.24
    over = np.tile([0.99, 0.01], (n, 1))
    assert expected_calibration_error(y, over) == pytest.approx(0.24)
    # random labels, calibrated by construction in expectation
    conf = rng.uniform(0.5, 1.0, n)
    labels = (rng.uniform(size=n) > conf).astype(int)
    random_probs = np.stack([conf, 1 - conf], axis=1)
    assert expected_calibration_error(labels, random_probs) < 0.05


def test_reliability_bins_layout():
    y = np.array([0, 1, 0])
    probs = np.array([[1.0, 0.0], [0.55, 0.45], [0.05, 0.95]])
    bins = reliability_bins(y, probs, n_bins=10)
    assert len(bins) == 10
    assert bins[0]["lower"] == 0.0 and bins[-1]["upper"] == 1.0
    assert sum(b["count"] for b in bins) == 3
    top = bins[-1]
    assert top["count"] == 2  # 1.0 and 0.95
    assert top["accuracy"] == 0.5
    assert top["confidence"] == pytest.approx(0.975)
    assert bins[5]["count"] == 1 and bins[5]["accuracy"] == 0.0
    assert bins[2]["confidence"] is None and bins[2]["accuracy"] is None


def test_single_class_does_not_warn():
    m = classification_metrics(np.array([0, 0]), np.ones((2, 1)), ["only"])
    assert m["accuracy"] == 1.0 and m["top_k"] == {}
    assert m["confusion_matrix"] == [[2]]


def test_matches_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 300)
    probs = rng.dirichlet(np.ones(5), 300)
    pred = probs.argmax(axis=1)
    m = classification_metrics(y, probs, list("abcde"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["log_loss"] == pytest.approx(log_loss(y, probs, labels=range(5)))


def test_json_serialisable_and_plain_types():
    y = np.array([0, 1, 2, 2], dtype=np.int32)
    probs = one_hot(np.array([0, 1, 1, 2]), 3, confidence=0.6).astype(np.float32)
    m = classification_metrics(y, probs, ["x", "y", "z"], topk=(2,))
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m

    def walk(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
        else:
            assert obj is None or type(obj) in (int, float, str, bool), type(obj)

    walk(m)


def test_empty_input():
    m = classification_metrics(np.array([], dtype=int), np.zeros((0, 4)), NAMES)
    assert m["n"] == 0
    assert m["accuracy"] is None and m["ece"] is None and m["log_loss"] is None
    assert m["top_k"] == {"top3": None}
    assert m["confusion_matrix"] == [[0] * 4 for _ in range(4)]
    json.dumps(m, allow_nan=False)
    assert math.isnan(expected_calibration_error([], np.zeros((0, 2))))


def test_log_loss_clips_zero_probability():
    y = np.array([0])
    probs = np.array([[0.0, 1.0]])
    m = classification_metrics(y, probs, ["a", "b"])
    assert m["log_loss"] == pytest.approx(-math.log(1e-15))


@pytest.mark.parametrize(
    ("y", "probs", "names"),
    [
        (np.array([0, 1]), np.ones((3, 2)) / 2, ["a", "b"]),  # length mismatch
        (np.array([0, 2]), np.ones((2, 2)) / 2, ["a", "b"]),  # label out of range
        (np.array([0, 1]), np.ones((2, 2)) / 2, ["a"]),  # names mismatch
        (np.array([0, 1]), np.ones(2) / 2, ["a", "b"]),  # probs not 2-d
    ],
)
def test_invalid_input(y, probs, names):
    with pytest.raises(ValueError):
        classification_metrics(y, probs, names)
