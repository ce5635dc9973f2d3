import numpy as np
import pytest

from visionflow.evaluate import (
    classification_metrics,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_per_class,
    plot_reliability,
    reliability_bins,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000
    leftovers = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def history():
    out = []
    for i in range(3):
        out.append(
            {
                "epoch": i,
                "phase": "probe",
                "train_loss": 1.0 - 0.1 * i,
                "train_accuracy": 0.5 + 0.1 * i,
                "val_loss": 1.0 - 0.05 * i,
                "val_accuracy": 0.5 + 0.05 * i,
                "best": True,
            }
        )
    for i in range(4):
        out.append(
            {
                "epoch": i,
                "phase": "finetune",
                "train_loss": 0.6 - 0.1 * i,
                "train_accuracy": None,
                "val_loss": 0.5 + 0.02 * (i - 1) ** 2,
                "val_accuracy": 0.8,
                "best": i == 1,
            }
        )
    return out


def test_learning_curves(tmp_path):
    path = plot_learning_curves(history(), tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    assert_png(path)


@pytest.mark.parametrize("records", [[], [{}], [{"epoch": 0, "phase": "$x$", "val_loss": 0.5}]])
def test_learning_curves_edge_cases(tmp_path, records):
    assert_png(plot_learning_curves(records, tmp_path / "sub" / "curves.png"))


@pytest.mark.parametrize("num_classes", [1, 3, 50])
def test_confusion_matrix(tmp_path, num_classes):
    rng = np.random.default_rng(num_classes)
    y = rng.integers(0, num_classes, 200)
    probs = rng.dirichlet(np.ones(num_classes), 200)
    names = [f"class_{i}$" for i in range(num_classes)]
    m = classification_metrics(y, probs, names)
    assert_png(plot_confusion_matrix(m["confusion_matrix"], names, tmp_path / "cm.png"))
    assert_png(plot_per_class(m["per_class"], tmp_path / "per_class.png"))


def test_confusion_matrix_with_empty_row(tmp_path):
    cm = [[3, 1], [0, 0]]
    assert_png(plot_confusion_matrix(cm, ["a", "b"], tmp_path / "cm.png"))


def test_confusion_matrix_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError):
        plot_confusion_matrix([[1, 2]], ["a"], tmp_path / "cm.png")


def test_reliability(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 300)
    y = rng.integers(0, 4, 300)
    assert_png(plot_reliability(reliability_bins(y, probs), tmp_path / "rel.png"))


def test_reliability_empty(tmp_path):
    bins = reliability_bins(np.array([], dtype=int), np.zeros((0, 3)))
    assert_png(plot_reliability(bins, tmp_path / "rel.png"))
    assert_png(plot_reliability([], tmp_path / "rel2.png"))


def test_per_class_edge_cases(tmp_path):
    assert_png(plot_per_class({}, tmp_path / "empty.png"))
    one = {"only": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 4}}
    assert_png(plot_per_class(one, tmp_path / "one.png"))
    none_f1 = {"a": {"f1": None, "support": 0}, "b": {"f1": 0.5}}
    assert_png(plot_per_class(none_f1, tmp_path / "none.png"))


def test_overwrites_existing_file(tmp_path):
    target = tmp_path / "curves.png"
    target.write_bytes(b"old")
    assert_png(plot_learning_curves(history(), target))
