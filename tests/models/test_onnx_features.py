"""Frozen features through ONNX Runtime: same numbers as PyTorch, or a quiet fallback."""

import logging

import pytest
import timm
import torch

from visionflow.models import onnx_features
from visionflow.models.onnx_features import onnx_feature_extractor


def _backbone():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    return model.eval()


def test_onnx_features_match_pytorch_and_leave_the_model_alone(tmp_path):
    model = _backbone().to(memory_format=torch.channels_last)
    path = tmp_path / "f" / "backbone.onnx"
    extractor = onnx_feature_extractor(model, 32, path)
    assert extractor is not None and path.is_file()
    assert extractor.max_abs_diff < 1e-4
    images = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        expected = model(images)
    torch.testing.assert_close(extractor(images), expected, atol=1e-4, rtol=1e-4)
    # dynamic batch, and the caller's model keeps its layout
    assert extractor(images[:1]).shape == (1, model.num_features)
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    # a second call reuses the exported file
    mtime = path.stat().st_mtime_ns
    assert onnx_feature_extractor(model, 32, path) is not None
    assert path.stat().st_mtime_ns == mtime


def test_disagreement_falls_back_to_pytorch(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(onnx_features, "PARITY_RTOL", -1.0)  # nothing can pass
    path = tmp_path / "backbone.onnx"
    with caplog.at_level(logging.WARNING):
        assert onnx_feature_extractor(_backbone(), 32, path) is None
    assert "using PyTorch" in caplog.text
    assert not path.exists()


def test_export_failure_falls_back(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(onnx_features, "_export", broken)
    with caplog.at_level(logging.WARNING):
        assert onnx_feature_extractor(_backbone(), 32, tmp_path / "b.onnx") is None
    assert "exporter exploded" in caplog.text


@pytest.mark.parametrize("onnx", [True, False])
def test_probe_is_the_same_with_and_without_onnx(image_folder, tmp_path, onnx):
    from visionflow.config import load_train_config
    from visionflow.train.recipe import train_classifier

    cfg = load_train_config(
        overrides={
            "backbone": "test_efficientnet",
            "weights": "none",
            "img_size": 32,
            "budget": None,
            "strategy": "probe",
            "onnx_features": onnx,
            "num_workers": 0,
        }
    )
    result = train_classifier(image_folder, cfg, run_dir=tmp_path / "run")
    phases = [p["name"] for p in result.phases]
    assert ("ONNX export (features)" in phases) is onnx
    assert result.metrics["test"]["n"] == 6
