"""ONNX export: static SAME padding, Pad folding, parity with PyTorch, INT8 and FP16 graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from visionflow.api import ClassifierModel
from visionflow.data.preprocess import Preprocessing
from visionflow.data.transforms import eval_transform
from visionflow.errors import ExportError
from visionflow.export.onnx import check_parity, export_classifier, make_session, static_padding
from visionflow.export.quantize import convert_fp16, quantize_int8
from visionflow.models.heads import LinearHead, TaskModel


class _SameNet(nn.Module):
    """TF-style SAME convolutions: stride 2 (asymmetric pad at even sizes) and stride 1."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Conv2dSame(3, 8, 3, stride=2)
        self.b = Conv2dSame(8, 8, 3, stride=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.b(torch.relu(self.a(x))))).flatten(1)


def _pixels(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_static_padding_keeps_outputs_and_leaves_no_pad_nodes(tmp_path):
    torch.manual_seed(0)
    model = TaskModel(_SameNet(), LinearHead(8, 3)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    copy = TaskModel(_SameNet(), LinearHead(8, 3)).eval()
    copy.load_state_dict(model.state_dict())
    assert static_padding(copy, 32) == 2
    with torch.no_grad():
        assert torch.equal(copy(x), before)
    assert set(copy.state_dict()) == set(model.state_dict())  # same weights, same names

    pre = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    path = export_classifier(model, pre, tmp_path / "same.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Pad" not in ops and ops.count("Conv") == 2
    conv = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")
    pads = next(list(a.ints) for a in conv.attribute if a.name == "pads")
    assert pads == [0, 0, 1, 1]  # stride 2, kernel 3, even size: TF pads bottom/right only
    parity = check_parity(model, pre, make_session(path), _pixels(5, 32))
    assert parity.max_abs_diff <= 1e-4 and parity.top1_agreement == 1.0


def test_exported_graph_takes_uint8_pixels_and_matches_pytorch(trained_run, tmp_path):
    clf = ClassifierModel.from_run(trained_run, device="cpu")
    pre = clf.preprocessing
    path = export_classifier(clf.model, pre, tmp_path / "m.onnx")
    session = make_session(path)
    inputs = session.get_inputs()
    assert inputs[0].name == "images" and inputs[0].type == "tensor(uint8)"
    assert inputs[0].shape[1:] == [pre.input_size, pre.input_size, 3]
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    pixels = _pixels(7, pre.input_size)  # a batch size never seen at export time
    logits, features = session.run(None, {"images": pixels})
    with torch.no_grad():
        x = torch.from_numpy(pre.normalize(pixels))
        ref_features = clf.model.cpu().float().eval().features(x.contiguous())
    assert logits.shape == (7, len(clf.classes))
    np.testing.assert_allclose(features, ref_features.numpy(), atol=1e-4)
    check_parity(clf.model, pre, session, pixels)


def test_parity_failure_is_an_error():
    pre = Preprocessing(input_size=16)
    model = TaskModel(nn.Sequential(nn.Flatten(), nn.LazyLinear(4)), LinearHead(4, 2)).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 16, 16))

    class Shifted:  # a "graph" whose logits are off by 1e-3
        def run(self, names, feeds):
            x = torch.from_numpy(pre.normalize(feeds["images"]))
            with torch.no_grad():
                return [model(x).numpy() + 1e-3]

    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        check_parity(model, pre, Shifted(), _pixels(3, 16))


def test_int8_and_fp16_graphs_agree_with_fp32(trained_run, tmp_path):
    clf = ClassifierModel.from_run(trained_run, device="cpu")
    pre = clf.preprocessing
    fp32 = export_classifier(clf.model, pre, tmp_path / "m.onnx")
    data = sorted(trained_run.parent.parent.joinpath("data").rglob("*.png"))
    pixels = pre.pixels([Image.open(p).convert("RGB") for p in data])
    settings = quantize_int8(fp32, tmp_path / "m8.onnx", pixels)
    assert settings["format"] == "QDQ"
    assert settings["calibration"]["images"] == len(pixels) - len(pixels) % 16  # equal batches
    graph = onnx.load(str(tmp_path / "m8.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    reference = make_session(fp32).run(["logits"], {"images": pixels})[0]
    int8 = make_session(tmp_path / "m8.onnx").run(["logits"], {"images": pixels})[0]
    assert (int8.argmax(1) == reference.argmax(1)).mean() >= 0.9
    convert_fp16(fp32, tmp_path / "m16.onnx")
    half = make_session(tmp_path / "m16.onnx").run(["logits"], {"images": pixels})[0]
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, reference, atol=0.05)
    with pytest.raises(ExportError, match="calibration method"):
        quantize_int8(fp32, tmp_path / "x.onnx", pixels, method="magic")
    with pytest.raises(ExportError, match="at least one image"):
        quantize_int8(fp32, tmp_path / "x.onnx", pixels[:0])


def _conv_weights(path) -> list[tuple[onnx.NodeProto, np.ndarray | None]]:
    """Each Conv of a QDQ graph with its int8 weight (None where the weight is float)."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    dequant = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for node in graph.node:
        if node.op_type == "Conv":
            dq = dequant.get(node.input[1])
            out.append((node, None if dq is None else inits[dq.input[0]].astype(np.int32)))
    return out


def test_int8_weights_cannot_saturate_u8s8_pairs(trained_run, tmp_path):
    """Without VNNI, u8 x s8 pairs are summed in 16 bits: every 1x1 weight row keeps its
    adjacent pairs within 128 (255 x 128 < 32,768) while using more than 7 bits, depthwise
    weights use all 8 bits, and the first convolution stays in float."""
    clf = ClassifierModel.from_run(trained_run, device="cpu")
    fp32 = export_classifier(clf.model, clf.preprocessing, tmp_path / "m.onnx")
    pixels = _pixels(16, clf.preprocessing.input_size)
    settings = quantize_int8(fp32, tmp_path / "m8.onnx", pixels)
    convs = _conv_weights(tmp_path / "m8.onnx")
    assert convs[0][1] is None and convs[0][0].name in settings["float_nodes"]
    kinds = {"depthwise": 0, "1x1": 0}
    for node, q in convs[1:]:
        assert q is not None, f"{node.name} was left in float"
        rows = np.abs(q.reshape(q.shape[0], -1))
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1 and q.shape[1] == 1:
            kinds["depthwise"] += 1
            assert rows.max() == 127
        elif q.shape[2:] == (1, 1):
            kinds["1x1"] += 1
            padded = np.pad(rows, ((0, 0), (0, rows.shape[1] % 2)))
            pairs = padded[:, 0::2] + padded[:, 1::2]
            assert pairs.max() <= 128, node.name
            assert pairs.max(axis=1).min() >= 126, node.name  # each row uses its range
            assert rows.max() > 64, node.name  # finer than 7-bit weights
    assert kinds["depthwise"] > 0 and kinds["1x1"] > 0
    full = quantize_int8(fp32, tmp_path / "m8f.onnx", pixels, full_range=True)
    assert full["weights"] == "int8 per-channel"
    assert all(q is not None for _, q in _conv_weights(tmp_path / "m8f.onnx"))


def test_one_preprocessing_for_training_eval_and_onnx():
    """The evaluation transform (training, PyTorch prediction) and the ONNX input path see the
    same pixels: resize + crop in PIL, normalisation by the same affine map."""
    pre = Preprocessing(input_size=24, crop_pct=0.875, interpolation="bicubic")
    image = Image.fromarray(_pixels(1, 40)[0][:, :30])  # 30 x 40, not square
    tensor = eval_transform(pre)(image).numpy()
    pixels = pre.pixels([image])
    assert pixels.shape == (1, 24, 24, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pre.normalize(pixels)[0], tensor, atol=1e-5)
