"""INT8 and FP16 variants of an exported graph.

INT8 is static post-training quantisation with ONNX Runtime's tool: QDQ format, weights signed
8-bit per output channel, activations unsigned 8-bit per tensor, calibrated on training images.
Choices, each measured on the 2-core AVX2 machine of BENCHMARKS.md:

* Weight ranges are chosen so that CPUs without VNNI cannot saturate. They multiply u8 x s8
  pairs with ``vpmaddubsw``, whose 16-bit sum of two adjacent products saturates above 32,767:
  with full-range 8-bit weights a fine-tuned digits model fell from 96.7 to 41 % (BENCHMARKS.md).
  ONNX Runtime's answer, 7-bit weights everywhere (``reduce_range``), still lost 11-12.5 points.
  Instead, per layer kind (:func:`weight_overrides`):

  - depthwise convolutions take full 8-bit weights: ONNX Runtime's depthwise kernel sums in
    32 bits (measured: 8-bit depthwise weights gained 2-4 points, lost nothing);
  - 1x1 convolutions (a GEMM over input channels ``k``) take per output channel the largest
    range for which every adjacent pair ``|q[2i]| + |q[2i+1]|`` stays at most 128, so that
    ``255 x 128 = 32,640`` cannot saturate: ``scale = max_i(|w[2i]| + |w[2i+1]|) / 127``,
    about 7.6 bits on average instead of 7;
  - the first convolution stays in float: its input, the normalised image, uses the whole
    ``uint8`` range, its kernel's pair order is not the weight order (pair-bounded weights
    lost 1.5 points there) and 7-bit weights cost 1.3 points; it is 3 % of the network's work;
  - any other weight (larger kernels, grouped convolutions, the linear head) keeps 7 bits.

  With VNNI the bounds cost a little precision and no speed, so one graph is right for both
  (``full_range=True`` makes every weight 8-bit, for fleets that all have VNNI).
* The preprocessing nodes in front of the first convolution (layout change, cast,
  normalisation) stay in float: quantising the normalisation cost more than it saved.
* Only after the graph rewrites of :mod:`visionflow.export.onnx` (no ``Pad`` left) does INT8
  beat FP32 here; before them it was slower.

Whether the INT8 graph may be the default is decided by the caller from its measured accuracy
(:func:`visionflow.export.exporter.export_run`), never assumed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.errors import ExportError

__all__ = [
    "CALIBRATION_METHODS",
    "convert_fp16",
    "quantize_int8",
    "weight_kind",
    "weight_overrides",
]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class _Reader:
    """ONNX Runtime calibration reader over ``uint8`` pixel batches."""

    def __init__(self, pixels: np.ndarray, batch_size: int) -> None:
        # equal batches only: the histogram calibrators (percentile, entropy) stack the
        # per-batch outputs and fail on a shorter last batch, so the remainder is dropped
        batch_size = max(1, min(batch_size, len(pixels)))
        usable = len(pixels) - len(pixels) % batch_size
        self._batches: Iterator[np.ndarray] = iter(
            [pixels[i : i + batch_size] for i in range(0, usable, batch_size)]
        )
        self.images = usable

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}

    def rewind(self) -> None:  # part of the reader protocol; one pass is all we need
        pass


def float_prefix(graph: Any) -> list[str]:
    """Names of the nodes in front of the first convolution (layout change, cast,
    normalisation), which stay in float: quantising the normalisation cost more than it saved."""
    first = next((i for i, n in enumerate(graph.node) if n.op_type == "Conv"), 0)
    return [n.name for n in graph.node[:first]]


def _pair_maxima(rows: np.ndarray) -> np.ndarray:
    """Per row (output channel), the largest ``|w[2i]| + |w[2i+1]|`` (odd length: zero-padded)."""
    a = np.abs(rows.astype(np.float64))
    if a.shape[1] % 2:
        a = np.concatenate([a, np.zeros((a.shape[0], 1))], axis=1)
    return np.asarray((a[:, 0::2] + a[:, 1::2]).max(axis=1))


def weight_kind(shape: Sequence[int], group: int) -> str:
    """How a convolution weight of ``shape`` (out, in / group, kh, kw) is quantised:
    ``"depthwise"`` (8-bit), ``"pair"`` (1x1, pair-bounded) or ``"reduced"`` (7-bit, also any
    weight that is not a 4-D convolution's). The one rule for :func:`weight_overrides` and the
    quantisation-aware fine-tune (:mod:`visionflow.export.qat`)."""
    if len(shape) == 4 and group > 1 and group == shape[0] and shape[1] == 1:
        return "depthwise"
    if len(shape) == 4 and group == 1 and tuple(shape[2:]) == (1, 1):
        return "pair"
    return "reduced"


def weight_overrides(model: Any) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Per-weight quantisation ranges that no ``vpmaddubsw`` pair can saturate.

    Args:
        model: The ONNX model about to be quantised (after ``quant_pre_process``).

    Returns:
        ``TensorQuantOverrides`` for ONNX Runtime's quantiser (depthwise weights 8-bit, 1x1
        weights pair-bounded per output channel) and the names of the nodes to keep in float
        (the first convolution). Weights not named keep the quantiser's 7-bit default.
    """
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    overrides: dict[str, list[dict[str, Any]]] = {}
    float_nodes: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        if not float_nodes:
            float_nodes.append(node.name)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        kind = weight_kind(w.shape, next((a.i for a in node.attribute if a.name == "group"), 1))
        if kind == "depthwise":
            overrides[node.input[1]] = [{"axis": 0, "reduce_range": False}]
        elif kind == "pair":
            # symmetric int8 over [-bound, bound] has scale bound / 127, so every pair of
            # quantised weights sums to at most 127 + rounding = 128, and 255 x 128 < 2**15
            bound = np.maximum(_pair_maxima(w.reshape(w.shape[0], -1)), 1e-12)
            overrides[node.input[1]] = [
                {"axis": 0, "reduce_range": False, "rmin": float(-b), "rmax": float(b)}
                for b in bound
            ]
    return overrides, float_nodes


def quantize_qdq(
    prepared: str | Path,
    out: str | Path,
    reader: Any,
    *,
    method: str = "minmax",
    reduce_range: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    overrides: dict[str, list[dict[str, Any]]] | None = None,
    op_types: Sequence[str] | None = None,
) -> None:
    """ONNX Runtime's static quantiser with visionflow's fixed choices: QDQ format, activations
    ``uint8`` per tensor, weights ``int8`` per output channel.

    Args:
        prepared: A graph after ``quant_pre_process``.
        out: Where to write the quantised graph.
        reader: A calibration data reader (``get_next``/``rewind``).
        method: Activation ranges, one of :data:`CALIBRATION_METHODS`.
        reduce_range: 7-bit weights where ``overrides`` does not say otherwise.
        nodes_to_exclude: Nodes kept in float.
        overrides: ``TensorQuantOverrides`` (:func:`weight_overrides`).
        op_types: Only these node types are quantised (default: all the tool supports).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    extra: dict[str, Any] = {"TensorQuantOverrides": dict(overrides or {})}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    quantize_static(
        str(prepared),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=reduce_range,
        calibrate_method=calibrate,
        op_types_to_quantize=list(op_types) if op_types is not None else None,
        nodes_to_exclude=list(nodes_to_exclude),
        extra_options=extra,
    )


def quantize_int8(
    source: str | Path,
    target: str | Path,
    calibration: np.ndarray,
    *,
    method: str = "minmax",
    full_range: bool = False,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Write the static INT8 (QDQ) version of ``source`` to ``target``.

    Args:
        source: FP32 graph from :func:`~visionflow.export.onnx.export_classifier`.
        target: Where to write the quantised graph (atomically).
        calibration: ``uint8`` pixels ``(N, size, size, 3)``, typically 100-500 training images.
        method: ``"minmax"``, ``"percentile"`` (99.999th) or ``"entropy"`` activation ranges.
        full_range: 8-bit weights everywhere; only for CPUs that all have VNNI (see the module
            docstring). Otherwise weights are bounded per layer kind (:func:`weight_overrides`).
        batch_size: Calibration batch size.

    Returns:
        The settings used, for the bundle's manifest.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ExportError(
            f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}"
        )
    if len(calibration) == 0:
        raise ExportError("INT8 calibration needs at least one image")
    target = Path(target)
    level = logging.root.level  # the tool logs its advice through the root logger
    with tempfile.TemporaryDirectory(prefix="vf-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            logging.root.setLevel(logging.ERROR)
            quant_pre_process(str(source), str(prepared))
            model = onnx.load(str(prepared))
            keep_float = float_prefix(model.graph)
            overrides: dict[str, list[dict[str, Any]]] = {}
            if not full_range:
                overrides, float_convs = weight_overrides(model)
                keep_float += float_convs
            out = target.with_name(target.name + ".tmp")
            reader = _Reader(calibration, batch_size)
            quantize_qdq(
                prepared,
                out,
                reader,
                method=method,
                reduce_range=not full_range,
                nodes_to_exclude=keep_float,
                overrides=overrides,
            )
            os.replace(out, target)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"INT8 quantisation of {source} failed: {exc}") from exc
        finally:
            logging.root.setLevel(level)
    return {
        "format": "QDQ",
        "weights": "int8 per-channel"
        + (
            ""
            if full_range
            else ": depthwise 8-bit, 1x1 pair-bounded (no vpmaddubsw saturation), others 7-bit"
        ),
        "activations": "uint8 per-tensor",
        "calibration": {"method": method, "images": reader.images},
        "float_nodes": keep_float,
    }


def convert_fp16(source: str | Path, target: str | Path) -> dict[str, Any]:
    """Write an FP16 version of ``source`` for GPU serving (inputs and outputs unchanged:
    ``uint8`` pixels in, ``float32`` logits and features out)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = Path(target)
    out = target.with_name(target.name + ".tmp")
    try:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.checker.check_model(model)
        onnx.save(model, str(out))
        os.replace(out, target)
    except Exception as exc:
        out.unlink(missing_ok=True)
        raise ExportError(f"FP16 conversion of {source} failed: {exc}") from exc
    return {"inputs": "uint8", "outputs": "float32", "compute": "float16"}
