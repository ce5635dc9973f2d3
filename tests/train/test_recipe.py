import json
from html import escape

import pytest

from visionflow.api import load
from visionflow.config import load_train_config
from visionflow.errors import CheckpointError
from visionflow.train.callbacks import Callback
from visionflow.train.recipe import train_classifier

TINY = {"backbone": "test_efficientnet", "weights": "none", "img_size": 32, "budget": None,
        "epochs": 3, "batch_size": 8, "patience": None, "num_workers": 0}  # fmt: skip


def _cfg(**kw):
    return load_train_config(overrides={**TINY, **kw})


def test_end_to_end_run_directory(image_folder, tmp_path):
    run_dir = tmp_path / "runs" / "one"
    result = train_classifier(image_folder, _cfg(), run_dir=run_dir)
    for name in (
        "config.json",
        "data_report.json",
        "index.json",
        "split.json",
        "weights.json",
        "model.json",
        "model.safetensors",
        "metrics.json",
        "history.json",
        "report.html",
        "confusion_matrix.png",
        "learning_curves.png",
        "state.json",
    ):
        assert (run_dir / name).is_file(), name  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["chosen"] in {"probe", "finetune"}
    assert set(metrics["splits"]) == {"train", "val", "test"}
    names = [p["name"] for p in metrics["phases"]]
    assert names == [
        "data checks",
        "ONNX export (features)",
        "linear probe",
        "fine-tune",
        "weight ensemble",
    ]
    ensemble = metrics["phases"][-1]
    assert [t["alpha"] for t in ensemble["tried"]] == [1.0, 0.75, 0.5]
    assert ensemble["alpha"] in {1.0, 0.75, 0.5}
    assert len(result.history) == 3
    assert json.loads((run_dir / "state.json").read_text())["stage"] == "done"
    html = (run_dir / "report.html").read_text()
    assert "test_efficientnet" in html and "data:image/png;base64" in html

    model = load(run_dir)
    images = sorted(image_folder.rglob("*.png"))[:4]
    preds = model.predict(images, topk=2)
    assert len(preds) == 4 and all(len(p.topk) == 2 for p in preds)
    assert all(p.label in model.classes for p in preds)
    evaluated = model.evaluate(image_folder)
    assert evaluated["n"] == sum(metrics["splits"][s]["n"] for s in ("train", "val", "test"))


def test_run_is_not_overwritten(image_folder, tmp_path):
    train_classifier(image_folder, _cfg(strategy="probe"), run_dir=tmp_path / "r")
    with pytest.raises(CheckpointError, match="already holds a run"):
        train_classifier(image_folder, _cfg(), run_dir=tmp_path / "r")
    with pytest.raises(CheckpointError, match="already finished"):
        train_classifier(None, _cfg(), run_dir=tmp_path / "r", resume=True)


class _Kill(Callback):
    def on_epoch_end(self, engine, record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt


def test_resume_after_kill(image_folder, tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train_classifier(image_folder, _cfg(), run_dir=run_dir, callbacks=[_Kill()])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stage"] == "probed" and state["finetune_epochs"] == 3
    result = train_classifier(None, _cfg(), run_dir=run_dir, resume=True)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert json.loads((run_dir / "state.json").read_text())["stage"] == "done"


def test_finetune_only_and_probe_only(image_folder, tmp_path):
    ft = train_classifier(image_folder, _cfg(strategy="finetune"), run_dir=tmp_path / "ft")
    assert ft.chosen == "finetune"
    probe = train_classifier(image_folder, _cfg(strategy="probe"), run_dir=tmp_path / "pr")
    assert probe.chosen == "probe" and probe.history == []
    assert load(tmp_path / "pr").predict_proba(sorted(image_folder.rglob("*.png"))[:2]).shape == (
        2,
        3,
    )


def test_salted_folder_trains_and_names_every_bad_file(salted_folder, tmp_path):
    from PIL import Image

    Image.new("RGB", (100, 100), (200, 120, 40)).save(salted_folder / "cats" / "huge.png")
    run_dir = tmp_path / "salted-run"
    train_classifier(salted_folder, _cfg(epochs=1, max_pixels=5000), run_dir=run_dir)
    report = json.loads((run_dir / "data_report.json").read_text())
    bad = {b["path"]: b["reason"] for b in report["unreadable"]}
    assert set(bad) == {
        "cats/corrupt.jpg",
        "cats/empty.png",
        "cats/notes.txt",
        "cats/huge.png",
        "dogs/truncated.jpg",
    }
    assert "5000" in bad["cats/huge.png"] or "pixel" in bad["cats/huge.png"]
    html = (run_dir / "report.html").read_text()
    for path, reason in bad.items():
        assert path in html
        assert escape(reason) in html
    assert "dogs/from_cats_01.png" in html  # the label conflict is shown too
    used = json.loads((run_dir / "index.json").read_text())["samples"]
    assert not {s["path"] for s in used} & (set(bad) | {"dogs/from_cats_01.png"})


@pytest.mark.parametrize("strategy", ["auto", "probe"])
def test_reported_test_metrics_match_the_saved_model(image_folder, tmp_path, strategy):
    """metrics.json must describe model.safetensors, whichever model was kept."""
    run_dir = tmp_path / strategy
    train_classifier(image_folder, _cfg(strategy=strategy, epochs=2), run_dir=run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    index = json.loads((run_dir / "index.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    test = [index["samples"][i] for i in split["test"]]
    model = load(run_dir)
    probs = model.predict_proba([image_folder / s["path"] for s in test])
    truth = [model.classes.index(s["label"]) for s in test]
    accuracy = float((probs.argmax(1) == truth).mean())
    assert accuracy == pytest.approx(metrics["splits"]["test"]["accuracy"])


def test_feature_cache_is_shared_by_runs_and_invalidated_by_changes(image_folder, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(strategy="probe", feature_cache=str(cache))

    def probe_phase(result):
        return next(p for p in result.phases if p["name"] == "linear probe")

    first = train_classifier(image_folder, cfg, run_dir=tmp_path / "a")
    assert probe_phase(first)["feature_cache_hits"] == 0
    assert len(list(cache.glob("*.safetensors"))) == 3  # train, val and (evaluation) test
    second = train_classifier(image_folder, cfg, run_dir=tmp_path / "b")
    assert probe_phase(second)["feature_cache_hits"] == 2
    assert second.metrics["val"]["accuracy"] == first.metrics["val"]["accuracy"]
    assert not list(cache.glob(".*.tmp"))

    # replacing one image changes the key of the split that holds it
    target = sorted((image_folder / "red").iterdir())[0]
    from PIL import Image

    with Image.open(target) as original:
        fmt = original.format
    Image.new("RGB", (32, 32), (0, 0, 255)).save(target, format=fmt)
    third = train_classifier(image_folder, cfg, run_dir=tmp_path / "c")
    assert probe_phase(third)["feature_cache_hits"] < 2


def test_the_fine_tune_stops_before_the_time_held_back_for_the_evaluation(image_folder, tmp_path):
    """The plan holds back time for the final evaluation; the engine's deadline does too, so
    epochs slower than planned cannot eat into it (a search's default trial ran to 101 %)."""
    seen: list[float | None] = []

    class Watch(Callback):
        def on_epoch_end(self, engine, record):
            seen.append(engine.deadline.seconds)

    train_classifier(image_folder, _cfg(budget="60s", epochs=2), run_dir=tmp_path / "r",
                     callbacks=[Watch()])  # fmt: skip
    assert seen and all(s is not None and s <= 60 - 8 for s in seen)
