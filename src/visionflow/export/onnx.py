"""ONNX export of a trained classifier, made fast for ONNX Runtime and checked against PyTorch.

The exported graph is the whole prediction path after the geometric step:

* input ``images``: ``uint8`` pixels ``(batch, size, size, 3)``, resized and centre-cropped by
  :meth:`~visionflow.data.preprocess.Preprocessing.resize_crop` (the only preprocessing a
  client runs; four times less data to copy than float32 NCHW);
* inside: NHWC to NCHW, ``pixels * scale + shift`` (the normalisation, baked in, so a client can
  not forget or get it wrong), the backbone and the head;
* outputs ``logits`` ``(batch, classes)`` and ``features`` ``(batch, dim)``: the pooled
  embedding, which serving uses for drift monitoring at no extra cost.

Two graph rewrites make it fast on CPUs (measured in BENCHMARKS.md, "Inference"):

* TensorFlow-style "SAME" convolutions (timm's ``Conv2dSame``, used by the ``tf_*`` models)
  compute their padding from the input shape at run time; the input size of a bundle is fixed,
  so the padding is made static before export (symmetric ones become the convolution's own
  padding);
* the remaining asymmetric zero ``Pad`` nodes are folded into the following ``Conv``'s ``pads``
  (ONNX allows asymmetric pads, PyTorch does not). ONNX Runtime did neither by itself: the
  dynamic shape arithmetic and the ``Pad`` nodes (with layout reorders around them) took about
  a third of the time, and ``Pad`` a quarter of the INT8 graph's.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ExportError
from visionflow.export.runtime import make_session

__all__ = [
    "OPSET",
    "Parity",
    "check_parity",
    "export_classifier",
    "fold_pads",
    "make_session",
    "static_padding",
]

#: ONNX opset of exported graphs (ONNX Runtime 1.18+ runs it; QDQ per-channel needs >= 13;
#: detection graphs need its NonMaxSuppression, RoiAlign and Resize).
OPSET = 17


class _StaticPadConv2d(nn.Conv2d):
    """A ``Conv2dSame`` whose padding was computed once for a fixed input size."""

    static_pad: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_pad is not None:
            x = F.pad(x, self.static_pad)
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def static_padding(model: nn.Module, input_size: int) -> int:
    """Turn every run-time "SAME" convolution of ``model`` into a static one, in place.

    Returns how many were changed. The weights stay where they are (same parameter names), and
    outputs are identical for inputs of ``input_size``; use it on a copy meant for export.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    sizes: dict[nn.Module, tuple[int, int]] = {}

    def remember(module: nn.Module, args: tuple[Any, ...]) -> None:
        sizes[module] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    hooks = [
        m.register_forward_pre_hook(remember) for m in model.modules() if isinstance(m, Conv2dSame)
    ]
    if not hooks:
        return 0
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    for module, size in sizes.items():
        assert isinstance(module, nn.Conv2d)
        left, right, top, bottom = pad_same_arg(
            list(size), list(module.weight.shape[-2:]), list(module.stride), list(module.dilation)
        )
        module.__class__ = _StaticPadConv2d
        assert isinstance(module, _StaticPadConv2d)
        if left == right and top == bottom:
            module.padding = (top, left)
            module.static_pad = None
        else:
            module.static_pad = [left, right, top, bottom]
    return len(sizes)


class _Exportable(nn.Module):
    """``uint8`` NHWC pixels in; ``(logits, features)`` out."""

    def __init__(self, model: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        backbone, head = model.backbone, model.head
        assert isinstance(backbone, nn.Module) and isinstance(head, nn.Module)
        self.backbone = backbone
        self.head = head
        scale, shift = pre.affine()
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", torch.from_numpy(scale).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.from_numpy(shift).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift
        features: torch.Tensor = self.backbone(x)
        logits: torch.Tensor = self.head(features)
        return logits, features


def export_classifier(model: nn.Module, pre: Preprocessing, path: str | Path) -> Path:
    """Export ``model`` (a :class:`~visionflow.models.heads.TaskModel`) to ``path``.

    The graph takes ``uint8`` pixels of ``pre.input_size`` (any batch size) and returns logits
    and features; see the module docstring. Written atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    static_padding(model, pre.input_size)
    wrapper = _Exportable(model, pre).eval()
    example = torch.zeros(1, pre.input_size, pre.input_size, 3, dtype=torch.uint8)
    return trace_to_onnx(
        wrapper,
        example,
        path,
        input_names=["images"],
        output_names=["logits", "features"],
        dynamic_axes={name: {0: "batch"} for name in ("images", "logits", "features")},
        what=type(model).__name__,
    )


def trace_to_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    what: str,
) -> Path:
    """Trace ``module`` on ``example`` to ONNX (TorchScript exporter, :data:`OPSET`), then
    constant-fold it and fold its zero pads into ``path`` (:func:`fold_pads`); the raw trace is
    a temporary file next to ``path``.

    Raises:
        ExportError: Tracing or folding failed (``what`` names the model in the message).
    """
    raw = path.with_name(path.name + ".raw.tmp")
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter is deprecated in favour of dynamo, which needs
            # more dependencies and exports slower, and warns about every traced size; the
            # graph is checked against PyTorch on real images anyway
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(raw),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
        fold_pads(raw, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export of {what} failed: {exc}") from exc
    finally:
        raw.unlink(missing_ok=True)
    return path


def fold_pads(source: str | Path, target: str | Path) -> int:
    """Constant-fold ``source`` (ONNX Runtime's portable "basic" level) and fold zero ``Pad``
    nodes into the ``Conv`` they feed; write ``target`` atomically. Returns the folds made."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp)
    options.log_severity_level = 3  # it warns about initializers it drops
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Pad" or node.output[0] in outputs:
            continue
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        if mode != b"constant" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if len(node.input) > 2 and node.input[2]:
            value = inits.get(node.input[2])
            if value is None or numpy_helper.to_array(value).any():
                continue
        if len(node.input) > 3 and node.input[3]:  # explicit axes (opset 18+): leave it
            continue
        pads = [int(v) for v in numpy_helper.to_array(inits[node.input[1]]).tolist()]
        users = consumers.get(node.output[0], [])
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
            continue
        if len(users) != 1 or users[0].op_type != "Conv":
            continue
        conv = users[0]
        auto = next((a.s for a in conv.attribute if a.name == "auto_pad"), b"NOTSET")
        if auto not in (b"NOTSET", b""):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        for attr in [a for a in conv.attribute if a.name in ("pads", "auto_pad")]:
            conv.attribute.remove(attr)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = node.input[0]
        graph.node.remove(node)
        folded += 1
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    os.replace(tmp, target)
    return folded


class Parity:
    """How an exported graph agrees with PyTorch on real images."""

    def __init__(self, images: int, max_abs_diff: float, top1_agreement: float) -> None:
        self.images = images
        self.max_abs_diff = max_abs_diff
        self.top1_agreement = top1_agreement

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "max_abs_diff": self.max_abs_diff,
            "top1_agreement": self.top1_agreement,
        }


def check_parity(
    model: nn.Module,
    pre: Preprocessing,
    session: Any,
    pixels: np.ndarray,
    *,
    atol: float = 1e-4,
    batch_size: int = 16,
    logits: np.ndarray | None = None,
) -> Parity:
    """Compare ``session`` with ``model`` on ``pixels`` (``uint8`` NHWC).

    ``logits`` are the session's logits for ``pixels`` when the caller already has them (the
    graph is then not run again).

    Raises:
        ExportError: logits differ by more than ``atol`` anywhere, or a top-1 class differs.
    """
    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    worst, agree = 0.0, 0
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        with torch.inference_mode():
            ref = model(torch.from_numpy(pre.normalize(chunk))).float().numpy()
        if logits is None:
            got = session.run(["logits"], {"images": chunk})[0]
        else:
            got = logits[start : start + batch_size]
        worst = max(worst, float(np.abs(got - ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
    parity = Parity(len(pixels), worst, agree / max(1, len(pixels)))
    if worst > atol or agree != len(pixels):
        raise ExportError(
            f"the ONNX graph disagrees with PyTorch on {len(pixels)} validation images: "
            f"max |logit difference| {worst:.3g} (allowed {atol:g}), top-1 agreement "
            f"{parity.top1_agreement:.2%}; the export was not written"
        )
    return parity
