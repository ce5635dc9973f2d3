"""The Python API: AutoClassifier and visionflow.load, with every kind of image input."""

import numpy as np
import pytest
from PIL import Image

import visionflow
from visionflow.errors import ConfigError

TINY = {"backbone": "test_efficientnet", "weights": "none", "img_size": 32, "epochs": 2,
        "batch_size": 8, "patience": None, "num_workers": 0}  # fmt: skip


def test_fit_predict_evaluate_and_load(image_folder, tmp_path):
    clf = visionflow.AutoClassifier(
        budget="2m", runs_dir=tmp_path, name="api", search=False, **TINY
    )
    with pytest.raises(ConfigError, match="not fitted"):
        clf.predict(["x.png"])
    clf.fit(image_folder)
    assert clf.run_dir_ == tmp_path / "api"
    assert clf.classes_ == ["blue", "green", "red"]

    path = sorted((image_folder / "red").iterdir())[0]
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil)
    gray = np.asarray(pil.convert("L"))
    labels = clf.predict([path, str(path), pil, array, gray])
    assert len(labels) == 5 and set(labels) <= set(clf.classes_)
    # the same pixels give the same answer whatever the container
    assert labels[0] == labels[1] == labels[2] == labels[3]

    proba = clf.predict_proba([path, pil])
    assert proba.shape == (2, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(proba[0], proba[1], atol=1e-5)

    metrics = clf.evaluate(image_folder)
    assert metrics["n"] == 36 and 0.0 <= metrics["accuracy"] <= 1.0

    model = visionflow.load(tmp_path / "api")
    preds = model.predict(path, topk=3)
    assert len(preds) == 1
    assert [label for label, _ in preds[0].topk] == sorted(
        model.classes, key=lambda c: -float(proba[0][model.classes.index(c)])
    )
    assert preds[0].probability == pytest.approx(float(proba[0].max()), abs=1e-5)

    bundle = clf.export(tmp_path / "api.vfb")
    exported = visionflow.load(bundle)
    assert (
        exported.predict([path, pil, array, gray, path.read_bytes()], topk=1)[0].label
        == (labels[0])
    )
    np.testing.assert_allclose(exported.predict_proba([path]), proba[:1], atol=1e-4)


def test_unknown_setting_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="backbon"):
        visionflow.AutoClassifier(runs_dir=tmp_path, backbon="resnet18").fit(tmp_path)
