"""Training a detector: the run directory contract, the engine's detection batches, the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from detection_data import CLASSES, make_dataset
from typer.testing import CliRunner

from visionflow.cli import app
from visionflow.config import DetectConfig, load_detect_config
from visionflow.data.detection import DetectionSample
from visionflow.errors import CheckpointError, ConfigError, DataError
from visionflow.models.detection import build_detector, rebuild_detector
from visionflow.models.tasks.detection import DetectionTask
from visionflow.train.checkpoint import load_weights
from visionflow.train.detection import DetectionEngine, auto_img_size, train_detector
from visionflow.train.engine import FitConfig

TINY = dict(backbone="test_efficientnet", weights="none", img_size=64, budget=None, batch_size=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("det")
    data = make_dataset(root, images=20)
    run = root / "run"
    torch.set_num_threads(1)
    train_detector(data, DetectConfig(detector="fcos", epochs=2, **TINY), run_dir=run)
    return data, run


def test_run_directory_contract(trained: tuple[Path, Path]) -> None:
    _, run = trained
    for name in (
        "model.json", "model.safetensors", "index.json", "split.json", "config.json",
        "metrics.json", "history.json", "report.html", "data_report.json",
    ):  # fmt: skip
        assert (run / name).is_file(), name
    info = json.loads((run / "model.json").read_text())
    assert info["task"] == "detect"
    assert info["classes"] == sorted(CLASSES)
    assert info["detector"]["name"] == "fcos"
    assert 0.0 <= info["score_threshold"] <= 1.0
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert 0.0 <= metrics[split]["map_50"] <= 1.0
        assert set(metrics[split]["per_class"]) == set(CLASSES)
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1]
    assert all("val_map" in r and r["train_loss"] > 0 for r in history)
    html = (run / "report.html").read_text()
    assert "object detection" in html and "mAP@.5" in html and "AP@[.5:.95]" in html
    assert len(list((run / "gallery").glob("*.png"))) >= 1


def test_saved_weights_rebuild_the_trained_model(trained: tuple[Path, Path]) -> None:
    _, run = trained
    info = json.loads((run / "model.json").read_text())
    model = rebuild_detector(info["detector"])
    load_weights(run / "model.safetensors", model)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model([image])[0]
        again = model([image])[0]
    assert torch.equal(first["boxes"], again["boxes"])
    assert first["labels"].min() >= 1 if len(first["labels"]) else True


def test_a_finished_run_is_not_overwritten(trained: tuple[Path, Path]) -> None:
    data, run = trained
    with pytest.raises(CheckpointError, match="already holds a finished run"):
        train_detector(data, DetectConfig(**TINY, epochs=1), run_dir=run)


def test_frozen_backbone_stages_stay_frozen(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, images=8)
    from visionflow.data.detection.readers import read_detection
    from visionflow.data.detection.transforms import DetectionDataset, collate_detection

    index = read_detection(data)
    model = build_detector(
        "retinanet", backbone="test_efficientnet", num_classes=2, img_size=64, trainable_layers=1
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trained
    loader = torch.utils.data.DataLoader(
        DetectionDataset(index.samples, index.classes), batch_size=4, collate_fn=collate_detection
    )
    engine = DetectionEngine(
        model, DetectionTask(index.classes), FitConfig(epochs=1, lr=1e-2, channels_last=False)
    )
    engine.fit(loader)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in trained.items())
    assert {g["tag"] for g in engine._param_groups()} == {"backbone", "head"}


def test_no_boxes_is_a_clear_error(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, images=6)
    for label in (data / "labels").rglob("*.txt"):
        label.write_text("")
    with pytest.raises(DataError, match="no usable boxes"):
        train_detector(data, DetectConfig(**TINY, epochs=1), run_dir=tmp_path / "run")


def test_auto_img_size() -> None:
    def sample(w: int, h: int) -> DetectionSample:
        return DetectionSample(path=Path("/x.png"), width=w, height=h)

    assert auto_img_size([sample(200, 150)] * 3, "fcos") == 256
    assert auto_img_size([sample(300, 400), sample(410, 300), sample(100, 90)], "fcos") == 416
    assert auto_img_size([sample(4000, 3000)], "retinanet") == 512
    assert auto_img_size([sample(200, 150)], "ssdlite") == 320


def test_detect_config_rejects_unknown_keys_and_classification_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'detector'"):
        load_detect_config(overrides={"detecter": "fcos"})
    assert load_detect_config(preset="fast").budget == "5m"
    result = CliRunner().invoke(
        app, ["train", str(tmp_path), "--task", "detect", "--mixup", "0.2", "--no-search"]
    )
    assert result.exit_code != 0
    text = " ".join("".join(c for c in result.output if c.isalnum() or c in "-/ ").split())
    assert "--mixup only apply to --task classify" in text
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--task", "detect", "--trials", "3"])
    text = " ".join("".join(c for c in result.output if c.isalnum() or c in "-/ ").split())
    assert result.exit_code != 0 and "--trials configure a search add --search" in text
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--detector", "fcos"])
    assert result.exit_code != 0 and "only applies to --task detect" in result.output


def test_cli_trains_a_detector(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, images=12)
    result = CliRunner().invoke(
        app,
        [
            "train", str(data), "--detector", "ssdlite", "--epochs", "1",  # task: from the data
            "--backbone", "test_efficientnet", "--weights", "none", "--img-size", "64",
            "--budget", "none", "--batch-size", "4", "--out", str(tmp_path / "runs"),
            "--name", "cli", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["task"] == "detect" and payload["detector"] == "ssdlite"
    assert set(payload["metrics"]) == {"val", "test"}
    assert (tmp_path / "runs" / "cli" / "model.json").is_file()


def test_load_gives_a_detector_that_predicts_and_evaluates(trained: tuple[Path, Path]) -> None:
    import visionflow

    data, run = trained
    model = visionflow.load(run, device="cpu")
    assert isinstance(model, visionflow.DetectorModel) and model.task == "detect"
    image = sorted((data / "images").rglob("*.png"))[0]
    everything = model.predict(image, score_threshold=0.0)[0]
    shown = model.predict(image)[0]
    assert everything.width == 64 and everything.height == 64
    assert len(shown) <= len(everything)
    assert all(s >= model.score_threshold for s in shown.scores)
    assert set(everything.labels) <= set(CLASSES)
    metrics = model.evaluate(data)
    assert 0.0 <= metrics["map_50"] <= 1.0 and set(metrics["per_class"]) == set(CLASSES)


def test_auto_detector_fits_predicts_and_needs_fitting(tmp_path: Path) -> None:
    import visionflow
    from visionflow.prediction import Detections

    det = visionflow.AutoDetector(budget=None, runs_dir=tmp_path, name="api", epochs=1, **{
        k: v for k, v in TINY.items() if k != "budget"
    })  # fmt: skip
    with pytest.raises(ConfigError, match="not fitted yet"):
        det.predict("x.png")
    det.fit(make_dataset(tmp_path / "d", images=12))
    assert det.classes_ == sorted(CLASSES)
    found = det.predict(sorted((tmp_path / "d" / "yolo" / "images").rglob("*.png"))[:2])
    assert len(found) == 2 and all(isinstance(f, Detections) for f in found)
    assert (tmp_path / "api" / "report.html").is_file()


def test_an_interrupted_run_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_dataset(tmp_path, images=12)
    run = tmp_path / "run"
    original = DetectionEngine._forward_loss

    def interrupted(self: DetectionEngine, *args: object) -> object:
        if len(self.history) == 1:  # the first epoch is done and checkpointed
            raise KeyboardInterrupt
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(DetectionEngine, "_forward_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_detector(data, DetectConfig(detector="ssdlite", epochs=3, **TINY), run_dir=run)
    assert not (run / "model.json").exists()
    monkeypatch.setattr(DetectionEngine, "_forward_loss", original)
    result = train_detector(tmp_path / "elsewhere", None, run_dir=run, resume=True)
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert result.detector == "ssdlite" and (run / "model.json").is_file()
    with pytest.raises(CheckpointError, match="holds no detection run to resume"):
        train_detector(data, None, run_dir=tmp_path / "empty", resume=True)


def test_learning_rate_follows_the_budget_clock_and_never_rises() -> None:
    class Clock:
        seconds = 100.0
        now = 0.0

        def elapsed(self) -> float:
            return self.now

    model = build_detector("ssdlite", backbone="test_efficientnet", num_classes=2, img_size=64)
    clock = Clock()
    engine = DetectionEngine(
        model,
        DetectionTask(CLASSES),
        FitConfig(epochs=300, lr=1e-3, warmup_epochs=1, min_lr_ratio=0.01, channels_last=False),
        deadline=clock,
    )
    optimizer = torch.optim.AdamW(engine._param_groups(), lr=1e-3)
    scheduler = engine._scheduler(optimizer, steps_per_epoch=10)
    rates = []
    for step in range(80):  # 106 s of clock for a 100 s budget
        clock.now += 0.5 if step % 7 else 6.0  # an uneven machine
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[-1]["lr"])
    after_warmup = rates[10:]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after_warmup))
    assert rates[-1] == pytest.approx(1e-5)  # the budget is spent: the floor


def test_cli_evaluates_a_detection_run(trained: tuple[Path, Path]) -> None:
    data, run = trained
    result = CliRunner().invoke(app, ["evaluate", str(run), str(data), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "mAP@.5" in result.output and "AP@[.5:.95]" in result.output
    assert all(name in result.output for name in CLASSES)
    result = CliRunner().invoke(app, ["evaluate", str(run), str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["map_50"] <= 1.0


def test_nms_threshold_is_chosen_on_validation_and_travels_with_the_model(
    trained: tuple[Path, Path],
) -> None:
    _, run = trained
    chosen = json.loads((run / "metrics.json").read_text())["nms_selection"]
    assert chosen["chosen"] in (0.4, 0.5, 0.6, 0.7)
    assert set(chosen["val_map"]) == {"0.4", "0.5", "0.6", "0.7"}
    best = max(chosen["val_map"].values())
    assert chosen["val_map"][str(chosen["chosen"])] == best
    info = json.loads((run / "model.json").read_text())["detector"]
    assert info["nms_thresh"] == chosen["chosen"]


@pytest.mark.parametrize("name", ["fasterrcnn_fpn", "fcos"])
def test_set_nms_threshold(name: str) -> None:
    from visionflow.models.detection import detector_info, set_nms_threshold

    model = build_detector(name, backbone="test_efficientnet", num_classes=2, img_size=64)
    set_nms_threshold(model, 0.65)
    assert detector_info(model)["nms_thresh"] == 0.65
    assert detector_info(rebuild_detector(detector_info(model)))["nms_thresh"] == 0.65
    with pytest.raises(ConfigError, match="nms_thresh must be in"):
        set_nms_threshold(model, 0.0)


def test_search_tries_configurations_then_trains_the_best(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, images=16)
    result = CliRunner().invoke(
        app,
        [
            "train", str(data), "--task", "detect", "--search", "--trials", "2",
            "--param", "detector=[fcos,ssdlite]", "--param", "img_size=64",
            "--param", "augment=light", "--epochs", "1",
            "--backbone", "test_efficientnet", "--weights", "none", "--budget", "none",
            "--batch-size", "4", "--out", str(tmp_path / "runs"), "--name", "s", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    run = tmp_path / "runs" / "s"
    assert payload["search"]["counts"]["complete"] + payload["search"]["counts"]["pruned"] == 2
    first = payload["search"]["best"]
    assert first is not None and first["params"]["detector"] in ("fcos", "ssdlite")
    assert payload["detector"] == first["params"]["detector"]
    summary = json.loads((run / "search.json").read_text())
    assert summary["refit"]["img_size"] == 64 and summary["refit"]["augment"] == "light"
    assert (run / "leaderboard.csv").read_text().count("\n") == 3  # header + 2 trials
    assert (run / "model.json").is_file() and not (run / "trials").exists()
    info = json.loads((run / "model.json").read_text())["detector"]
    assert info["name"] == first["params"]["detector"] and info["img_size"] == 64
    assert json.loads((run / "config.json").read_text())["detector"] == info["name"]


def test_search_space_pins_and_refusals(tmp_path: Path) -> None:
    from visionflow.config import SearchConfig
    from visionflow.search.detection import _space, detection_space, search_detector

    cfg = DetectConfig(detector="retinanet", img_size=320, lr=2e-3)
    space = _space(cfg, SearchConfig(space={"augment": ["light"]}), {"detector", "lr"})
    assert space.fixed() == {"detector": "retinanet", "lr": 2e-3}
    assert space["img_size"] == detection_space()["img_size"]  # not given: still searched
    with pytest.raises(ConfigError, match="unknown search parameter 'detectr'"):
        _space(cfg, SearchConfig(space={"detectr": "fcos"}), set())
    with pytest.raises(ConfigError, match="--workers applies to classification only"):
        search_detector(tmp_path, cfg, SearchConfig(workers=2), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="needs --trials"):
        search_detector(tmp_path, DetectConfig(budget=None), SearchConfig(), run_dir=tmp_path / "r")


def test_search_stops_after_failed_trials_and_still_refits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import visionflow.search.detection as search_module
    from visionflow.config import SearchConfig

    real = search_module.train_detector

    def failing_trials(*args: object, **kwargs: object) -> object:
        if kwargs.get("trial") is not None:
            raise DataError("too slow for its share")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search_module, "train_detector", failing_trials)
    data = make_dataset(tmp_path, images=12)
    result = search_module.search_detector(
        data,
        DetectConfig(detector="ssdlite", epochs=1, **TINY),
        SearchConfig(trials=20),
        run_dir=tmp_path / "run",
    )
    assert result.counts["failed"] == 3 and result.best is None
    assert result.refit.detector == "ssdlite"  # no trial completed: the default recipe
    assert (tmp_path / "run" / "model.json").is_file()


def test_the_task_is_detected_from_the_data(tmp_path: Path) -> None:
    from visionflow.cli import _default_task
    from visionflow.data.detection.readers import find_detection_dataset

    yolo = make_dataset(tmp_path / "one", images=4)
    assert _default_task(yolo, None) == "detect"
    assert find_detection_dataset(yolo.parent) == "yolo in yolo/"  # a folder holding one
    assert _default_task(yolo.parent, None) == "detect"
    classes = tmp_path / "flowers" / "rose"
    classes.mkdir(parents=True)
    assert _default_task(classes.parent, None) == "classify"
    assert _default_task(None, None) == "classify"


def test_run_task_reads_the_model_then_the_config(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from visionflow._io import run_task

    _, run = trained
    assert run_task(run) == "detect"
    killed = tmp_path / "killed"
    killed.mkdir()
    assert run_task(killed) is None
    (killed / "config.json").write_text('{"task": "classify"}')
    assert run_task(killed) == "classify"
    (killed / "model.json").write_text("{not json")
    assert run_task(killed) == "classify"  # an unreadable manifest falls back to the config
