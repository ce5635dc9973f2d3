import json

import numpy as np
import pytest

from visionflow.errors import ConfigError, DataError
from visionflow.evaluate.detection import (
    HEADLINE_METRIC,
    PRIMARY_METRIC,
    best_score_threshold,
    evaluate_detections,
)

CLASSES = ["cat", "dog"]

SCALARS = [
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
]


def pred(boxes, labels, scores):
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "scores": np.asarray(scores, dtype=np.float64),
    }


def target(boxes, labels, iscrowd=None):
    out = {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
    }
    if iscrowd is not None:
        out["iscrowd"] = np.asarray(iscrowd)
    return out


# One small (20x20), one medium (50x40) and one large (200x150) object over two images, and an
# image without objects.
TARGETS = [
    target([[10, 10, 30, 30], [100, 50, 150, 90]], [0, 1]),
    target([[0, 0, 200, 150]], [1]),
    target([], []),
]


def perfect():
    return [pred(t["boxes"], t["labels"], np.full(len(t["labels"]), 0.9)) for t in TARGETS]


def test_perfect_predictions_score_one():
    m = evaluate_detections(perfect(), TARGETS, CLASSES)
    for name in SCALARS:
        assert getattr(m, name) == pytest.approx(1.0), name
    assert m.per_class["cat"] == {"ap": 1.0, "ap_50": 1.0, "ap_75": 1.0, "gt": 1, "predictions": 1}
    assert m.per_class["dog"]["gt"] == 2
    assert (m.images, m.gt_boxes, m.predictions) == (3, 3, 3)
    curve = m.pr_curves["dog"]
    assert len(curve["recall"]) == len(curve["precision"]) == len(curve["score"]) == 101
    assert curve["precision"] == [1.0] * 101
    assert PRIMARY_METRIC == "map" and HEADLINE_METRIC == "map_50"


def test_shifted_box_keeps_ap50_but_lowers_map():
    # IoU of the shifted box is 90*100 / (110*100) = 0.818: a hit at 0.5..0.8, a miss above.
    m = evaluate_detections(
        [pred([[10, 0, 110, 100]], [0], [0.8])], [target([[0, 0, 100, 100]], [0])], CLASSES
    )
    assert m.map_50 == pytest.approx(1.0)
    assert m.map_75 == pytest.approx(1.0)
    assert m.map == pytest.approx(0.7)  # 7 of the 10 IoU thresholds
    assert m.per_class["cat"]["ap"] == pytest.approx(0.7)


def test_false_positive_with_higher_score_lowers_ap():
    truth = [target([[0, 0, 50, 50]], [0])]
    hit, miss = [0, 0, 50, 50], [200, 200, 250, 250]
    fp_first = evaluate_detections([pred([hit, miss], [0, 0], [0.5, 0.9])], truth, CLASSES)
    fp_last = evaluate_detections([pred([hit, miss], [0, 0], [0.9, 0.5])], truth, CLASSES)
    assert fp_first.map_50 == pytest.approx(0.5)  # precision 1/2 at the only recall level
    assert fp_last.map_50 == pytest.approx(1.0)
    # A false positive of the other class, or on an image without objects, counts too.
    wrong_class = evaluate_detections([pred([hit, hit], [0, 1], [0.5, 0.9])], truth, CLASSES)
    assert wrong_class.map_50 == pytest.approx(1.0)  # dog has no ground truth: not averaged
    negatives = evaluate_detections(
        [pred([hit], [0], [0.5]), pred([miss], [0], [0.9])],
        [*truth, target([], [])],
        CLASSES,
    )
    assert negatives.map_50 == pytest.approx(0.5)


def test_class_without_ground_truth_is_none_and_left_out_of_the_mean():
    preds = [pred([[0, 0, 50, 50], [60, 60, 90, 90]], [0, 1], [0.9, 0.8])]
    m = evaluate_detections(preds, [target([[0, 0, 50, 50]], [0])], CLASSES)
    assert m.per_class["dog"] == {
        "ap": None,
        "ap_50": None,
        "ap_75": None,
        "gt": 0,
        "predictions": 1,
    }
    assert m.pr_curves["dog"] is None
    assert m.map == pytest.approx(1.0)
    assert m.map_50 == pytest.approx(1.0)


def test_no_ground_truth_at_all_gives_none_everywhere():
    preds = [pred([[0, 0, 50, 50]], [0], [0.9]), pred([], [], [])]
    m = evaluate_detections(preds, [target([], []), target([], [])], CLASSES)
    for name in SCALARS:
        assert getattr(m, name) is None, name
    assert all(v["ap"] is None for v in m.per_class.values())
    assert m.pr_curves == {"cat": None, "dog": None}
    assert (m.images, m.gt_boxes, m.predictions) == (2, 0, 1)
    json.dumps(m.to_json(curves=True), allow_nan=False)


def test_crowd_regions_are_neither_missed_nor_false_positives():
    truth = [target([[0, 0, 50, 50], [100, 100, 300, 300]], [0, 0], iscrowd=[0, 1])]
    # One detection finds the object, a stronger one sits inside the crowd region.
    preds = [pred([[0, 0, 50, 50], [120, 120, 180, 180]], [0, 0], [0.6, 0.9])]
    m = evaluate_detections(preds, truth, CLASSES)
    assert m.map == pytest.approx(1.0)
    assert m.mar_100 == pytest.approx(1.0)
    assert m.per_class["cat"]["gt"] == 1
    assert m.gt_boxes == 1
    # Float flags, as a torch.zeros(...) default gives them, are accepted.
    truth[0]["iscrowd"] = np.array([0.0, 1.0], dtype=np.float32)
    assert evaluate_detections(preds, truth, CLASSES).map == pytest.approx(1.0)


def test_ap_by_object_size():
    # The small and the medium objects are found, the large one is missed.
    found = pred(TARGETS[0]["boxes"], TARGETS[0]["labels"], [0.9, 0.8])
    m = evaluate_detections([found, pred([], [], []), pred([], [], [])], TARGETS, CLASSES)
    assert m.map_small == pytest.approx(1.0)
    assert m.map_medium == pytest.approx(1.0)
    assert m.map_large == pytest.approx(0.0)
    # Without medium objects the bucket has no AP rather than a zero.
    only_small = evaluate_detections(
        [pred([[10, 10, 30, 30]], [0], [0.9])], [target([[10, 10, 30, 30]], [0])], CLASSES
    )
    assert only_small.map_small == pytest.approx(1.0)
    assert only_small.map_medium is None and only_small.map_large is None


def test_recall_at_one_detection_per_image():
    truth = [target([[0, 0, 40, 40], [100, 100, 140, 140]], [0, 0])]
    preds = [pred(truth[0]["boxes"], [0, 0], [0.9, 0.8])]
    m = evaluate_detections(preds, truth, CLASSES)
    assert m.mar_1 == pytest.approx(0.5)
    assert m.mar_10 == pytest.approx(1.0)


def test_to_json_and_summary_rows():
    m = evaluate_detections(perfect(), TARGETS, CLASSES)
    out = m.to_json()
    assert list(out) == [*SCALARS, "per_class", "images", "gt_boxes", "predictions"]
    assert "pr_curves" not in out
    with_curves = m.to_json(curves=True)
    assert set(with_curves["pr_curves"]) == set(CLASSES)
    assert json.loads(json.dumps(with_curves, allow_nan=False)) == with_curves
    rows = m.summary_rows()
    assert [r["class"] for r in rows] == ["cat", "dog", "all classes"]
    assert rows[1] == {
        "class": "dog",
        "ground truth": 2,
        "predictions": 2,
        "AP@[.5:.95]": 1.0,
        "AP@.5": 1.0,
        "AP@.75": 1.0,
    }
    assert rows[-1]["ground truth"] == 3
    assert len(m.summary_rows(total=False)) == 2


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    preds = [
        {
            "boxes": torch.tensor([[10.0, 10, 30, 30]], requires_grad=True),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1]) - 1,
        }
    ]
    truth = [{"boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.tensor([0])}]
    assert evaluate_detections(preds, truth, CLASSES).map == pytest.approx(1.0)


def good_inputs():
    return (
        [pred([[0, 0, 10, 10]], [0], [0.5]), pred([[0, 0, 10, 10]], [1], [0.5])],
        [target([[0, 0, 10, 10]], [0]), target([[0, 0, 10, 10]], [1])],
    )


@pytest.mark.parametrize(
    ("side", "index", "field", "value", "message"),
    [
        ("predictions", 1, "boxes", [[0, 0, 10, 10, 1]], r"predictions\[1\]\['boxes'\].*N x 4"),
        ("targets", 1, "boxes", [[0, 0, np.nan, 10]], r"targets\[1\]\['boxes'\]\[0\]\[2\].*NaN"),
        ("targets", 0, "boxes", [[5, 5, 2, 10]], r"targets\[0\]\['boxes'\]\[0\].*x2 < x1"),
        ("predictions", 1, "labels", [2], r"predictions\[1\]\['labels'\]\[0\] = 2.*0\.\.1"),
        ("targets", 0, "labels", [-1], r"targets\[0\]\['labels'\]\[0\] = -1 is outside"),
        ("targets", 0, "labels", [0.5], r"targets\[0\]\['labels'\]\[0\].*not an integer"),
        ("targets", 1, "labels", [0, 1], r"targets\[1\]\['labels'\] has shape \(2,\).*\(1,\)"),
        ("predictions", 1, "scores", [1.5], r"predictions\[1\]\['scores'\]\[0\] = 1.5.*\[0, 1\]"),
        ("predictions", 0, "scores", ["high"], r"predictions\[0\]\['scores'\] is not numeric"),
        ("targets", 1, "iscrowd", [2], r"targets\[1\]\['iscrowd'\]\[0\] = 2"),
        ("targets", 1, "width", -3, r"targets\[1\]\['width'\]"),
    ],
)
def test_bad_input_names_image_and_field(side, index, field, value, message):
    preds, truth = good_inputs()
    (preds if side == "predictions" else truth)[index][field] = value
    with pytest.raises(DataError, match=message):
        evaluate_detections(preds, truth, CLASSES)
    with pytest.raises(DataError, match=message):
        best_score_threshold(preds, truth, CLASSES)


def test_bad_input_shapes_and_arguments():
    preds, truth = good_inputs()
    with pytest.raises(DataError, match="predictions has 2 images but targets has 1"):
        evaluate_detections(preds, truth[:1], CLASSES)
    del preds[1]["scores"]
    with pytest.raises(DataError, match=r"predictions\[1\] has no 'scores'"):
        evaluate_detections(preds, truth, CLASSES)
    with pytest.raises(DataError, match=r"targets\[0\] is a list"):
        evaluate_detections(preds[:1], [[0, 0, 1, 1]], CLASSES)
    with pytest.raises(DataError, match="targets must be a sequence"):
        evaluate_detections(preds, truth[0], CLASSES)
    with pytest.raises(DataError, match="classes is empty"):
        evaluate_detections([], [], [])
    with pytest.raises(DataError, match=r"classes\[1\] repeats"):
        evaluate_detections([], [], ["a", "a"])
    with pytest.raises(ConfigError, match="iou_type='segm'"):
        evaluate_detections([], [], CLASSES, iou_type="segm")
    with pytest.raises(ConfigError, match="iou=0"):
        best_score_threshold([], [], CLASSES, iou=0)


def test_best_score_threshold_hand_built():
    # Three cats in one image. By score: 0.9 finds cat A, 0.8 finds B, 0.7 repeats A (a false
    # positive: A is taken), 0.6 finds C, 0.3 is far from anything. F1 = 2TP / (TP + FP + 3):
    # 0.9 -> 2/4, 0.8 -> 4/5, 0.7 -> 4/6, 0.6 -> 6/7 (best), 0.3 -> 6/8.
    a, b, c = [0, 0, 40, 40], [100, 0, 140, 40], [0, 100, 40, 140]
    truth = [target([a, b, c], [0, 0, 0]), target([], [])]
    preds = [
        pred([a, [1, 1, 41, 41], b, [2, 100, 42, 140]], [0, 0, 0, 0], [0.9, 0.7, 0.8, 0.6]),
        pred([[300, 300, 340, 340]], [0], [0.3]),
    ]
    best = best_score_threshold(preds, truth, CLASSES)
    assert best.threshold == pytest.approx(0.6)
    assert (best.tp, best.fp, best.fn) == (3, 1, 0)
    assert best.precision == pytest.approx(0.75)
    assert best.recall == pytest.approx(1.0)
    assert best.f1 == pytest.approx(6 / 7)
    assert best.to_json()["threshold"] == pytest.approx(0.6)
    # At IoU 0.99 the shifted detection of C no longer counts: 0.8 wins with F1 4/5 (TP 2).
    strict = best_score_threshold(preds, truth, CLASSES, iou=0.99)
    assert strict.threshold == pytest.approx(0.8)
    assert (strict.tp, strict.fp, strict.fn) == (2, 0, 1)


def test_best_score_threshold_ties_crowds_and_nothing_to_find():
    a, b = [0, 0, 40, 40], [100, 0, 140, 40]
    crowd = [200, 200, 400, 400]
    truth = [target([a, b, crowd], [0, 1, 0], iscrowd=[0, 0, 1])]
    # Two detections tie at 0.5 (one right, one wrong): a threshold keeps both or neither. The
    # strongest sits on the crowd region and is ignored rather than a false positive.
    preds = [
        pred([[250, 250, 300, 300], a, b, [500, 0, 540, 40]], [0, 0, 1, 1], [0.95, 0.9, 0.5, 0.5])
    ]
    best = best_score_threshold(preds, truth, CLASSES)
    assert best.threshold == pytest.approx(0.5)
    assert (best.tp, best.fp, best.fn) == (2, 1, 0)
    # Nothing to find, nothing found, or nothing right: no threshold.
    for p, t, objects in [
        (preds, [target([], [])], 0),
        ([pred([], [], [])], truth, 2),
        ([pred([[500, 500, 510, 510]], [0], [0.9])], truth, 2),
    ]:
        none = best_score_threshold(p, t, CLASSES)
        assert none.threshold is None
        assert (none.tp, none.fp, none.fn, none.f1) == (0, 0, objects, 0.0)


def reference_ap50(preds, truth, num_classes):
    """AP@0.5 per class with COCO's 101-point interpolation, written independently of COCO."""

    def iou(box, boxes):
        lt = np.maximum(box[:2], boxes[:, :2])
        rb = np.minimum(box[2:], boxes[:, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
        return inter / (area(box) + area(boxes) - inter)

    out = []
    for k in range(num_classes):
        gts = [t["boxes"][t["labels"] == k] for t in truth]
        n_pos = sum(len(g) for g in gts)
        if n_pos == 0:
            out.append(None)
            continue
        dets = [
            (s, i, b)
            for i, p in enumerate(preds)
            for b, s, lbl in zip(p["boxes"], p["scores"], p["labels"], strict=True)
            if lbl == k
        ]
        dets.sort(key=lambda d: -d[0])
        taken = [np.zeros(len(g), bool) for g in gts]
        hits = []
        for _, i, box in dets:
            if len(gts[i]) == 0:
                hits.append(False)
                continue
            overlap = np.where(taken[i], -1.0, iou(box, gts[i]))
            j = int(np.argmax(overlap))
            hits.append(bool(overlap[j] >= 0.5))
            if hits[-1]:
                taken[i][j] = True
        tp = np.cumsum(hits)
        fp = np.cumsum(np.logical_not(hits))
        recall = tp / n_pos
        precision = tp / np.maximum(tp + fp, 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        points = [
            precision[np.argmax(recall >= r)] if len(recall) and recall[-1] >= r else 0.0
            for r in np.linspace(0, 1, 101)
        ]
        out.append(float(np.mean(points)))
    return out


def test_matches_an_independent_ap50_on_a_random_case():
    rng = np.random.default_rng(7)
    num_classes = 3
    preds, truth = [], []
    for image in range(25):
        n_gt = int(rng.integers(0, 6)) if image % 5 else 0  # every fifth image is a negative
        xy = rng.uniform(0, 300, (n_gt, 2))
        wh = rng.uniform([5, 20], [120, 60], (n_gt, 2))  # wide boxes: XYWH mix-ups show
        gt_boxes = np.concatenate([xy, xy + wh], axis=1)
        gt_labels = rng.integers(0, num_classes, n_gt)
        truth.append({"boxes": gt_boxes, "labels": gt_labels})
        found = rng.random(n_gt) < 0.7
        noisy = gt_boxes[found] + rng.normal(0, 6, (int(found.sum()), 4))
        noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
        relabel = np.where(
            rng.random(int(found.sum())) < 0.15, (gt_labels[found] + 1) % 3, gt_labels[found]
        )
        n_fp = int(rng.integers(0, 4))
        fxy = rng.uniform(0, 300, (n_fp, 2))
        fp_boxes = np.concatenate([fxy, fxy + rng.uniform(5, 80, (n_fp, 2))], axis=1)
        preds.append(
            {
                "boxes": np.concatenate([noisy, fp_boxes]),
                "labels": np.concatenate([relabel, rng.integers(0, num_classes, n_fp)]),
                "scores": np.concatenate(
                    [rng.uniform(0.3, 1, len(noisy)), rng.uniform(0, 0.8, n_fp)]
                ),
            }
        )
    names = ["a", "b", "c"]
    m = evaluate_detections(preds, truth, names)
    expected = reference_ap50(preds, truth, num_classes)
    got = [m.per_class[n]["ap_50"] for n in names]
    assert got == pytest.approx(expected, abs=1e-9)
    assert min(got) > 0.1 and max(got) < 0.9  # a non-trivial case: hits and misses
    assert m.map_50 == pytest.approx(np.mean(expected), abs=1e-9)
    assert [m.per_class[n]["gt"] for n in names] == [
        sum(int((t["labels"] == k).sum()) for t in truth) for k in range(3)
    ]
