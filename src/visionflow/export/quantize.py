"""INT8 and FP16 variants of an exported graph.

INT8 is static post-training quantisation with ONNX Runtime's tool: QDQ format, weights signed
8-bit per output channel, activations unsigned 8-bit per tensor, calibrated on training images.
Choices, each measured on the 2-core AVX2 machine of BENCHMARKS.md:

* ``reduce_range`` (7-bit weights) is on by default: CPUs without VNNI multiply u8 x s8 pairs
  with ``vpmaddubsw``, whose 16-bit intermediate sums saturate with full-range weights (silent
  accuracy loss); with VNNI it costs a little precision and no speed, so one graph is right for
  both (``full_range=True`` when every target CPU has VNNI).
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.errors import ExportError

__all__ = ["CALIBRATION_METHODS", "convert_fp16", "quantize_int8"]

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
        full_range: 8-bit weights; only for CPUs that all have VNNI (see the module docstring).
        batch_size: Calibration batch size.

    Returns:
        The settings used, for the bundle's manifest.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ExportError(
            f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}"
        )
    if len(calibration) == 0:
        raise ExportError("INT8 calibration needs at least one image")
    target = Path(target)
    calib = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    level = logging.root.level  # the tool logs its advice through the root logger
    with tempfile.TemporaryDirectory(prefix="vf-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            logging.root.setLevel(logging.ERROR)
            quant_pre_process(str(source), str(prepared))
            graph = onnx.load(str(prepared)).graph
            first = next((i for i, n in enumerate(graph.node) if n.op_type == "Conv"), 0)
            keep_float = [n.name for n in graph.node[:first]]
            out = target.with_name(target.name + ".tmp")
            reader = _Reader(calibration, batch_size)
            quantize_static(
                str(prepared),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=not full_range,
                calibrate_method=calib,
                nodes_to_exclude=keep_float,
                extra_options=extra,
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
        "weights": "int8 per-channel" + ("" if full_range else " (7-bit range)"),
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
