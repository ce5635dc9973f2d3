"""``visionflow export`` end to end: a run becomes a bundle that loads and predicts anywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import visionflow
from visionflow.api import ClassifierModel
from visionflow.cli import app
from visionflow.errors import BundleError, CheckpointError, ExportError
from visionflow.export.exporter import PROJECTION_DIM, export_run
from visionflow.export.runtime import BundleModel, load_bundle

runner = CliRunner()


def _images(run: Path) -> list[Path]:
    return sorted((run.parent.parent / "data").rglob("*.png"))


@pytest.fixture(scope="module")
def bundle(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny.vfb"
    export_run(trained_run, out, int8=True, fp16=True)
    return out


def test_bundle_predicts_like_the_run_without_the_run(bundle, trained_run, tmp_path):
    moved = tmp_path / "elsewhere" / "model.vfb"  # no run directory next to it
    moved.parent.mkdir()
    shutil.copyfile(bundle, moved)
    fp32 = load_bundle(moved, graph="fp32", cache_dir=tmp_path / "cache")
    torch_model = ClassifierModel.from_run(trained_run, device="cpu")
    images = _images(trained_run)
    np.testing.assert_allclose(
        fp32.predict_proba(images), torch_model.predict_proba(images), atol=1e-4
    )
    default = visionflow.load(moved)
    assert isinstance(default, BundleModel)
    assert default.graph == "model.int8.onnx"  # accepted: it lost nothing on validation
    labels = [p.label for p in default.predict(images)]
    assert labels == [p.label for p in torch_model.predict(images)]
    assert default.embed(images[:3]).shape == (3, fp32.meta["feature_dim"])
    assert visionflow.load(moved).evaluate(trained_run.parent.parent / "data")["accuracy"] == 1.0


def test_manifest_records_parity_int8_decision_and_reference(bundle, tmp_path):
    meta = load_bundle(bundle, cache_dir=tmp_path).meta
    assert meta["format"].startswith("visionflow-bundle/")
    assert set(meta["files"]) == {
        "model.onnx",
        "model.int8.onnx",
        "model.fp16.onnx",
        "weights.safetensors",
        "README.md",
    }
    parity = meta["graphs"]["fp32"]["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    int8 = meta["graphs"]["int8"]
    assert int8["accepted"] and int8["drop"] <= 0.01 and int8["settings"]["format"] == "QDQ"
    # the first way tried passed: the quantisation-aware copy, said in the model card too
    qat = int8["settings"]["weights_from"]["quantisation_aware_fine_tune"]
    assert qat["epochs"] == 2 and qat["images"] > 0 and len(int8["tried"]) == 1
    # checked on validation and test together, FP32's accuracy on the same images beside it
    checked = int8["checked_on"]
    assert (
        checked["splits"] == ["val", "test"]
        and checked["images"] > meta["graphs"]["fp32"]["parity"]["images"]
    )
    assert int8["drop"] == pytest.approx(checked["fp32_accuracy"] - checked["accuracy"])
    card = load_bundle(bundle, cache_dir=tmp_path).bundle.file("README.md").read_text()
    assert "fine-tuned for 2 epoch(s)" in card
    ref = meta["reference"]
    emb = ref["embedding"]
    assert len(emb["mean"]) == emb["dim"] == meta["feature_dim"]
    k = len(emb["components"])
    assert 1 <= k <= PROJECTION_DIM and all(len(row) == emb["dim"] for row in emb["components"])
    assert len(emb["points"]) == ref["images"] and all(len(p) == k for p in emb["points"])
    assert sum(ref["class_priors"].values()) == pytest.approx(1.0)
    assert set(ref["image"]) == {"width", "height", "brightness", "contrast"}
    assert meta["preprocessing"]["input_size"] == 32
    assert meta["data_fingerprint"] and meta["versions"]["onnxruntime"]


def test_int8_that_loses_accuracy_is_not_the_default(trained_run, tmp_path):
    # an impossible threshold (INT8 must *gain* 5 points) stands in for a lossy quantisation
    result = export_run(trained_run, tmp_path / "b", int8=True, max_int8_drop=-0.05)
    assert result.default_graph == "model.onnx"
    int8 = result.meta["graphs"]["int8"]
    assert not int8["accepted"] and "loses" in int8["note"]
    # every way was tried (a copy fine-tuned for INT8, then the model itself with two
    # calibrations) and the one that lost least was kept
    tried = int8["tried"]
    assert [(t["weights"], t["calibration"]) for t in tried] == [
        ("quantisation-aware", "minmax"),
        ("post-training", "minmax"),
        ("post-training", "percentile"),
    ]
    assert int8["val_accuracy"] == max(t["val_accuracy"] for t in tried)
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if "int8" in p.name) == [
        "model.int8.onnx"
    ]
    assert "not the default" in (tmp_path / "b" / "README.md").read_text()
    assert load_bundle(tmp_path / "b").graph == "model.onnx"
    assert load_bundle(tmp_path / "b", graph="int8").graph == "model.int8.onnx"


def test_flipped_byte_in_a_graph_is_refused(bundle, tmp_path):
    bad = tmp_path / "bad.vfb"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = bytearray(src.read(info))
            if info.filename == "model.onnx":
                data[len(data) // 2] ^= 0x01
            dst.writestr(info, bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx"):
        visionflow.load(bad)


def test_export_errors(trained_run, tmp_path):
    (tmp_path / "taken.vfb").write_bytes(b"x")
    with pytest.raises(ExportError, match="exists"):
        export_run(trained_run, tmp_path / "taken.vfb")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no trained model"):
        export_run(tmp_path / "empty_run", tmp_path / "x.vfb")
    with pytest.raises(BundleError, match=r"holds no int8 graph"):
        export_run(trained_run, tmp_path / "plain")
        load_bundle(tmp_path / "plain", graph="int8")
    with pytest.raises(ExportError, match="qat_images and qat_epochs must be at least 1"):
        export_run(trained_run, tmp_path / "q.vfb", int8=True, qat_epochs=0)
    # the CLI refuses it as a usage error, before anything is written
    result = CliRunner().invoke(
        app, ["export", str(trained_run), "--out", str(tmp_path / "c.vfb"), "--qat-epochs", "0"]
    )
    assert result.exit_code == 2 and "--qat-epochs" in result.output
    assert not (tmp_path / "c.vfb").exists()


def test_int8_without_the_quantisation_aware_fine_tune(trained_run, tmp_path):
    int8 = export_run(trained_run, tmp_path / "b", int8=True, qat=False).meta["graphs"]["int8"]
    assert int8["accepted"] and int8["settings"]["weights_from"] == "the model"
    assert [(t["weights"], t["calibration"]) for t in int8["tried"]] == [
        ("post-training", "minmax")
    ]
    assert "fine-tuned" not in (tmp_path / "b" / "README.md").read_text()


def test_bundle_prediction_does_not_import_torch(bundle, tmp_path):
    code = (
        "import sys, visionflow, numpy as np;"
        f"m = visionflow.load({str(bundle)!r});"
        "p = m.predict(np.zeros((40, 40, 3), np.uint8))[0];"
        "print(p.label in m.classes, 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]


def test_cli_export_predict_benchmark(trained_run, tmp_path):
    target = tmp_path / "cli.vfb"
    result = runner.invoke(
        app, ["export", str(trained_run), "--out", str(target), "--int8", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["bundle"] == str(target) and "reference" not in payload["manifest"]
    result = runner.invoke(app, ["export", str(trained_run), "--out", str(target)])
    assert result.exit_code == ExportError.exit_code and "exists" in result.output

    images = [str(p) for p in _images(trained_run)[:2]]
    result = runner.invoke(app, ["predict", str(target), *images, "-f", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["predictions"]) == 2

    result = runner.invoke(app, ["benchmark", str(target), "--repeats", "5", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    engines = [r["engine"] for r in rows]
    assert engines[0] == "PyTorch eager" and any("INT8" in e for e in engines)
    assert all(r["p50_ms"] > 0 and r["throughput"] > 0 for r in rows)
