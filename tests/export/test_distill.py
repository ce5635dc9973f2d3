"""Distillation: a tiny student learns from the session's tiny teacher run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import visionflow
from visionflow._io import atomic_write_json, read_json
from visionflow.api import ClassifierModel
from visionflow.cli import app
from visionflow.errors import BudgetError, CheckpointError, ConfigError
from visionflow.export.distill import distill_run, distillation_loss

#: A tiny timm test model with another mean/std (0.5) and resize filter than the teacher's.
STUDENT = "test_resnet"
FAST = {"weights": "none", "budget": None, "batch_size": 8, "lr": 3e-3, "bench_repeats": 3}


def _data(run: Path) -> Path:
    return run.parent.parent / "data"  # the trained_run fixture's layout


@pytest.fixture(scope="module")
def student_weights(tmp_path_factory) -> Path:
    """A weights file for the student: resolved as "pretrained" (source ``file``)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model(STUDENT).state_dict()
    path = tmp_path_factory.mktemp("weights") / f"{STUDENT}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_loss_terms():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    ce = torch.nn.functional.cross_entropy(s, y)
    loss, _, _ = distillation_loss(s, t, y, temperature=2.0, alpha=0.0)
    assert torch.allclose(loss, ce)
    loss, kl, _ = distillation_loss(s, t, y, temperature=2.0, alpha=1.0)
    p = torch.softmax(t / 2, 1)
    expected = (p * (p.log() - torch.log_softmax(s / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(kl * 4, expected)
    same, _, _ = distillation_loss(t, t, y, temperature=4.0, alpha=1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)  # nothing to learn from itself


def test_student_run_loads_predicts_and_compares(trained_run, tmp_path):
    out = tmp_path / "student"
    lines: list[str] = []
    result = distill_run(
        trained_run, STUDENT, out_dir=out, epochs=3, export=False, progress=lines.append, **FAST
    )
    assert result.run_dir == out and result.bundle is None
    for name in ("model.json", "model.safetensors", "index.json", "split.json", "metrics.json",
                 "config.json", "history.json", "distill.json", "distill.md"):  # fmt: skip
        assert (out / name).is_file(), name
    assert read_json(out / "split.json") == read_json(trained_run / "split.json")
    info = read_json(out / "model.json")
    assert info["backbone"] == STUDENT and info["trained_on"] == ["train"]
    assert info["preprocessing"]["input_size"] == 32  # the teacher's size
    assert info["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # the student's own normalisation
    assert info["distilled_from"]["backbone"] == "test_efficientnet"
    assert info["distilled_from"]["temperature"] == 4.0
    metrics = read_json(out / "metrics.json")["splits"]
    assert set(metrics) == {"train", "val", "test"} and metrics == result.metrics
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in metrics.values())
    assert len(result.history) == 3 and any(line.startswith("epoch 1/3") for line in lines)

    model = visionflow.load(out, device="cpu")
    assert isinstance(model, ClassifierModel)
    first = sorted((_data(trained_run) / "red").iterdir())[0]
    assert model.predict(first)[0].label in model.classes
    assert model.evaluate(_data(trained_run))["n"] == 36

    cmp = read_json(out / "distill.json")
    assert cmp == result.comparison
    assert cmp["teacher"]["backbone"] == "test_efficientnet"
    assert cmp["student"]["backbone"] == STUDENT
    assert cmp["latency"]["engine"] == "PyTorch eager"
    for role in ("teacher", "student"):
        row = cmp[role]
        assert row["parameters"] > 0 and row["weights_mb"] > 0 and row["latency_ms"] > 0
        assert row["onnx_mb"] is None  # not exported
    student_params = sum(p.numel() for p in model.model.parameters())
    assert cmp["student"]["parameters"] == student_params
    table = (out / "distill.md").read_text()
    assert "| teacher | `test_efficientnet`" in table and f"| student | `{STUDENT}`" in table
    assert "PyTorch eager" in table and result.markdown == table

    with pytest.raises(CheckpointError, match="not empty"):
        distill_run(trained_run, STUDENT, out_dir=out, epochs=1, export=False, **FAST)


def test_soft_labels_teach_what_the_labels_do_not(trained_run, tmp_path):
    """Training labels rotated (blue -> green -> red -> blue), alpha=1: the labels carry no
    weight, so the student must learn the teacher's (right) answers, not the rotated ones."""
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_run, teacher, ignore=shutil.ignore_patterns("features", "checkpoint"))
    index = read_json(teacher / "index.json")
    classes = index["classes"]
    for pos in read_json(teacher / "split.json")["train"]:
        sample = index["samples"][pos]
        sample["label"] = classes[(classes.index(sample["label"]) + 1) % len(classes)]
    atomic_write_json(teacher / "index.json", index)

    result = distill_run(
        teacher, STUDENT, out_dir=tmp_path / "s", alpha=1.0, epochs=4, export=False, **FAST
    )
    assert result.comparison["agreement"]["test"] >= 0.8
    assert result.metrics["test"]["accuracy"] >= 0.8  # val/test labels were left right
    assert result.metrics["train"]["accuracy"] <= 0.4  # ...and it did not learn the rotation
    assert result.history[-1]["train_ce"] > result.history[-1]["train_kl"]


def test_export_compares_onnx_runtime_latency(trained_run, tmp_path, student_weights):
    pytest.importorskip("onnxruntime")
    settings = {**FAST, "weights": student_weights}
    result = distill_run(trained_run, STUDENT, out_dir=tmp_path / "s", epochs=1, **settings)
    # "pretrained": the head starts as a linear probe and BatchNorm statistics stay fixed
    phases = read_json(tmp_path / "s" / "metrics.json")["phases"]
    assert phases[0]["name"] == "linear probe (student head)"
    assert read_json(tmp_path / "s" / "config.json")["freeze_bn"] is True
    assert result.bundle == tmp_path / "s" / "model.vfb" and result.bundle.is_file()
    bundle = visionflow.load(result.bundle)
    assert bundle.meta["backbone"] == STUDENT
    assert bundle.meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    cmp = result.comparison
    assert cmp["latency"]["engine"] == "ONNX Runtime FP32"
    for role in ("teacher", "student"):
        assert cmp[role]["onnx_mb"] > 0 and cmp[role]["latency_ms"] > 0
    assert not (trained_run / "model.vfb").exists()  # the teacher's run stays untouched


def test_budget_is_respected(trained_run, tmp_path, student_weights):
    settings = {**FAST, "budget": "1s", "export": False, "epochs": 50}
    # a pretrained student whose first epoch does not fit keeps its linear-probe head
    result = distill_run(
        trained_run, STUDENT, out_dir=tmp_path / "a", **{**settings, "weights": student_weights}
    )
    assert result.stopped == "budget" and result.best_epoch is None and result.history == []
    assert "linear probe" in result.comparison["training"]["kept"]
    assert visionflow.load(tmp_path / "a", device="cpu").predict(
        sorted((_data(trained_run) / "red").iterdir())[0]
    )
    # a randomly initialised one has nothing to keep
    with pytest.raises(BudgetError, match="ran out"):
        distill_run(trained_run, STUDENT, out_dir=tmp_path / "b", **settings)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"student": "test_resnett"}, ConfigError, "did you mean 'test_resnet'"),
        ({"alpha": 1.5}, ConfigError, "alpha"),
        ({"alpha": -0.1}, ConfigError, "alpha"),
        ({"temperature": 0.0}, ConfigError, "temperature"),
        ({"augment": "heavy"}, ConfigError, "augment"),
        ({"budget": "soon"}, BudgetError, "not a duration"),
    ],
)
def test_bad_settings(trained_run, tmp_path, kwargs, error, match):
    args = {"student": STUDENT, "out_dir": tmp_path / "s", "export": False, **FAST, **kwargs}
    with pytest.raises(error, match=match):
        distill_run(trained_run, **args)
    assert not (tmp_path / "s").exists()


def test_missing_teacher(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        distill_run(tmp_path / "nope", STUDENT, **FAST)
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.json missing"):
        distill_run(tmp_path / "half", STUDENT, **FAST)


def test_cli(trained_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-student"
    args = ["distill", str(trained_run), "--student", STUDENT, "--weights", "none", "--out",
            str(out), "--epochs", "1", "--batch-size", "8", "--no-export", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["run"] == str(out) and payload["student"]["backbone"] == STUDENT
    bad = runner.invoke(app, ["distill", str(trained_run), "--student", "test_resnett"])
    assert bad.exit_code == 2 and "did you mean" in bad.output
    gone = runner.invoke(app, ["distill", str(tmp_path / "nope"), "--student", STUDENT])
    assert gone.exit_code == 5
