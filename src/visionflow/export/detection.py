"""Detection export: a finished detection run becomes a verified bundle whose ONNX graph is the
whole detector, resize and post-processing (box decoding, NMS) included.

The graph's contract (read by :mod:`visionflow.export.detect_runtime`):

* input ``image``: ``uint8`` RGB pixels ``(height, width, 3)`` of **one** image, any size
  (dynamic axes). ``uint8`` HWC is what a decoder hands over, so a client does nothing but
  decode; the graph casts, scales to ``[0, 1]``, normalises, resizes and pads exactly as the
  PyTorch model does (torchvision's ``GeneralizedRCNNTransform``);
* outputs ``boxes`` ``(n, 4)`` float XYXY in the input image's pixels, ``scores`` ``(n,)`` and
  ``labels`` ``(n,)`` int64, **0-based** class ids: the background offset of the detector
  (labels ``1..num_classes``) is subtracted inside the graph, so no client can forget it.

How the graph is made. torchvision's detectors export with the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``, opset 17); all four registered detectors (SSDlite,
RetinaNet, FCOS, Faster R-CNN with FPN) export and match PyTorch on this torch/torchvision
(2.14 / 0.29). Three things had to be fixed, each found by comparing with PyTorch:

* **The resize size.** torchvision's traced resize computes the target size in float32 while
  eager PyTorch computes it in float64: a 100 px image became 319 px instead of 320 and every
  box moved. The export copy's transform computes the size in float64 with the same floor as
  eager PyTorch, from 1-element tensors (the exporter turns arithmetic on 0-d float64 tensors
  into float32 without a word). SSDlite resizes to a fixed square and needs none of this.
* **TensorFlow "SAME" padding** (timm's ``tf_*`` backbones): tracing bakes the padding of the
  example input into the graph. It does not depend on the input here, because the backbone only
  ever sees sizes that are multiples of 32 (the FPN detectors pad to that; SSDlite's input is a
  fixed square); that is checked on three input shapes before the padding is made static
  (:func:`~visionflow.export.onnx.static_padding`) and the remaining zero ``Pad`` nodes folded
  into the convolutions (:func:`~visionflow.export.onnx.fold_pads`).
* **No detections**: torchvision scripts its NMS when tracing (an ``If`` node for the empty
  case), so an image without detections gives empty outputs; the tests check it.

Frozen BatchNorm (pretrained backbones) exports as a multiply-add that ONNX Runtime folds.

INT8 (``--int8``): static QDQ quantisation of the convolutions only, calibrated on training
images (:func:`quantize_detector_int8`); it becomes the default graph only when its mAP@.5 on
the held-out images is within ``max_int8_drop`` of the FP32 graph's. FP16 is refused: box
decoding and NMS need float32.

Parity. The graph is run against the PyTorch model on held-out images of the run (validation
split, else test) and on three reshaped copies of one of them (a tall strip, a wide strip and a
quarter-size copy the graph must upscale), because a dataset of same-sized images would not
catch a size baked in by tracing. Detections are matched one to one (same class, nearest box);
every detection scoring at least the display threshold on either side must have a partner with
the same class, boxes within ``box_atol`` pixels (plus ``box_rtol`` times the image's longer
side) and scores within ``score_atol``. Exempt are only detections whose fate hangs on a float
rounding: within ``score_atol`` of the threshold, of the lowest score of a full list, or with
an IoU within ``1e-3`` of the NMS threshold against a stronger box of their class. Measured on
``tf_efficientnet_lite0`` detectors (``benchmarks/detection_export.py``, 200-700 px images):
briefly trained SSDlite and FCOS at 320 px differ by at most 1e-4 px and 1e-6 in score; the
worst case, Faster R-CNN with an untrained head (every proposal survives to the RoI head),
by 0.006 px and 2e-4. The tolerances (0.05 px + 1e-4 x side, 1e-3) leave a margin of five
(Faster R-CNN's scores) to a thousand times for other CPUs and backbones, while a real export
bug (the float32 resize above moved boxes by several pixels, scores by 0.01-0.17) is far
outside them.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visionflow._io import read_json
from visionflow.data.detection.records import box_iou_matrix
from visionflow.data.images import DEFAULT_MAX_PIXELS, load_image
from visionflow.errors import CheckpointError, ConfigError, ExportError, ImageDecodeError
from visionflow.export.detect_runtime import (
    DEFAULT_SCORE_THRESHOLD,
    INPUT_NAME,
    OUTPUT_NAMES,
    detections_from_arrays,
    run_detection_graph,
)
from visionflow.prediction import Detections, ImageInput, as_list, to_image

if TYPE_CHECKING:
    from visionflow.export.exporter import ExportResult

__all__ = [
    "DetectionParity",
    "check_detection_parity",
    "export_detection_run",
    "export_detector",
    "load_detector_run",
    "quantize_detector_int8",
    "torch_detect",
]

#: Detectors this module knows how to export (registered names).
SUPPORTED = ("fasterrcnn_fpn", "fcos", "retinanet", "ssdlite")
#: Parity tolerances (see the module docstring for what was measured).
BOX_ATOL = 0.05
BOX_RTOL = 1e-4
SCORE_ATOL = 1e-3
#: How close to the NMS threshold an IoU must be for a missing box to count as a rounding.
_NMS_MARGIN = 1e-3


# ----------------------------------------------------------------------------- runs


def load_detector_run(
    run_dir: str | Path, *, device: str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained detector of a run directory (eval mode, on ``device``) and its
    ``model.json``.

    Raises:
        CheckpointError: ``run_dir`` holds no finished detection run (files missing, another
            task, a ``model.json`` without ``detector``/``classes``, weights that do not fit).
        ConfigError: The recorded detector names an unknown architecture.
    """
    from visionflow.models.detection import rebuild_detector
    from visionflow.train.checkpoint import load_weights
    from visionflow.train.device import select_device

    run = Path(run_dir)
    manifest, weights = run / "model.json", run / "model.safetensors"
    if not manifest.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{run} holds no trained model (model.json / model.safetensors missing); was the "
            "run finished?"
        )
    try:
        meta = read_json(manifest)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest} cannot be read as JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("task") != "detect":
        task = meta.get("task") if isinstance(meta, dict) else None
        raise CheckpointError(f"{run}: task {task!r} is not object detection")
    info, classes = meta.get("detector"), meta.get("classes")
    if not isinstance(info, dict) or not isinstance(classes, list) or not classes:
        raise CheckpointError(
            f"{manifest} lacks the 'detector' description or the 'classes' list; the run was "
            "written by another version or edited"
        )
    if int(info.get("num_classes", -1)) != len(classes):
        raise CheckpointError(
            f"{manifest}: the detector has {info.get('num_classes')} classes but 'classes' "
            f"lists {len(classes)}"
        )
    model = rebuild_detector(info)
    load_weights(weights, model)
    return model.eval().to(select_device(device)), meta


def torch_detect(
    model: nn.Module,
    classes: Sequence[str],
    inputs: ImageInput | Sequence[ImageInput],
    *,
    score_threshold: float,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Detections]:
    """Detections of a PyTorch detector (from :func:`load_detector_run`), one image at a time,
    answered like :meth:`~visionflow.export.detect_runtime.DetectionBundleModel.detect`."""
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ConfigError(f"score threshold must be in [0, 1], got {score_threshold}")
    device = next(model.parameters()).device
    out = []
    for item in as_list(inputs):
        image, source = to_image(item, max_pixels)
        boxes, scores, labels = _torch_run(model, np.asarray(image, dtype=np.uint8), device)
        out.append(
            detections_from_arrays(
                source, image.size, boxes, scores, labels, float(score_threshold), classes
            )
        )
    return out


def _torch_run(
    model: nn.Module, pixels: np.ndarray, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes, scores, 0-based labels)`` of PyTorch for ``uint8`` HWC pixels, computed from
    the pixels exactly as the graph computes them (cast, then divide by 255)."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    with torch.inference_mode():
        result = model([x.to(device or "cpu")])[0]
    return (
        result["boxes"].float().cpu().numpy().reshape(-1, 4),
        result["scores"].float().cpu().numpy().reshape(-1),
        result["labels"].cpu().numpy().astype(np.int64).reshape(-1) - 1,
    )


# ----------------------------------------------------------------------------- graph


def _export_transform_class(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (torchvision's ``GeneralizedRCNNTransform``) whose evaluation resize computes
    the target size as eager PyTorch does (float64), in a form the exporter keeps dynamic."""

    class _ExportTransform(base):  # type: ignore[valid-type,misc]
        def resize(
            self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
            if self.fixed_size is not None or target is not None or self.training:
                return super().resize(image, target)
            # eager: scale = min(min_size / short, max_size / long) in float64 (Python floats)
            # and size = floor(side * scale); 1-element tensors, not 0-d ones, or the exporter
            # computes in float32
            hw = torch._shape_as_tensor(image)[-2:].to(torch.float64)
            short = hw.min(0, keepdim=True).values
            long = hw.max(0, keepdim=True).values
            lo = torch.tensor([float(self.min_size[-1])], dtype=torch.float64)
            hi = torch.tensor([float(self.max_size)], dtype=torch.float64)
            scale = torch.cat([lo / short, hi / long]).min(0, keepdim=True).values
            size = torch.floor(hw * scale).to(torch.int64)
            # traced sizes: 0-d tensors standing for ints, so the graph's output size is dynamic
            out_size: Any = (size[0], size[1])
            resized = F.interpolate(
                image[None], size=out_size, mode="bilinear", align_corners=False
            )[0]
            return resized, None

    _ExportTransform.__name__ = _ExportTransform.__qualname__ = base.__name__
    return _ExportTransform


class _DetectionGraph(nn.Module):
    """``uint8`` ``(H, W, 3)`` pixels in; ``boxes``, ``scores``, 0-based ``labels`` out."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = image.permute(2, 0, 1).float() / 255.0
        result = self.detector([x])[0]
        return result["boxes"], result["scores"], result["labels"] - 1


def _same_padding_is_fixed(model: nn.Module, img_size: int) -> bool:
    """Whether every run-time "SAME" convolution of ``model`` pads alike for a square, a tall
    and a wide input (so the padding traced from one example holds for every image)."""
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    convs = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    if not convs:
        return True
    seen: dict[nn.Module, set[tuple[int, ...]]] = {m: set() for m in convs}

    def remember(module: nn.Module, args: tuple[Any, ...]) -> None:
        assert isinstance(module, nn.Conv2d)  # only hooked on Conv2dSame
        size = [int(args[0].shape[-2]), int(args[0].shape[-1])]
        pads = pad_same_arg(
            size, list(module.weight.shape[-2:]), list(module.stride), list(module.dilation)
        )
        seen[module].add(tuple(pads))

    hooks = [m.register_forward_pre_hook(remember) for m in convs]
    side, third = img_size, max(8, img_size // 3)
    try:
        with torch.inference_mode():
            for h, w in ((side, side), (side, third), (third, side)):
                model([torch.zeros(3, h, w)])
    finally:
        for hook in hooks:
            hook.remove()
    return all(len(pads) == 1 for pads in seen.values())


def export_detector(model: nn.Module, path: str | Path) -> Path:
    """Export a detector built by :func:`~visionflow.models.detection.build_detector` to
    ``path`` (written atomically); see the module docstring for the graph's contract.

    Raises:
        ExportError: The detector is of a kind this module cannot export, its backbone pads
            differently for different input shapes, or the exporter fails.
    """
    from visionflow.export.onnx import static_padding, trace_to_onnx
    from visionflow.models.detection import detector_info

    info = detector_info(model)
    if info["name"] not in SUPPORTED:
        raise ExportError(
            f"detector {info['name']!r} has no ONNX export path (supported: {list(SUPPORTED)}); "
            "train one of those to get a bundle"
        )
    transform = getattr(model, "transform", None)
    if transform is None:
        raise ExportError(f"{type(model).__name__} has no torchvision transform; cannot export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    copy_ = copy.deepcopy(model).cpu().float().eval()
    copy_.transform.__class__ = _export_transform_class(type(transform))
    size = int(info["img_size"])
    if not _same_padding_is_fixed(copy_, size):
        raise ExportError(
            f"backbone {info['backbone']!r} pads its 'SAME' convolutions differently for "
            "different input shapes, which a traced graph cannot follow; choose a backbone "
            "without TensorFlow padding (one not named tf_*)"
        )
    static_padding(copy_, size)
    graph = _DetectionGraph(copy_).eval()
    # a landscape example: square examples hide width/height mix-ups
    rng = np.random.default_rng(0)
    example = torch.from_numpy(rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8))
    axes = {INPUT_NAME: {0: "height", 1: "width"}} | {n: {0: "detections"} for n in OUTPUT_NAMES}
    return trace_to_onnx(
        graph,
        example,
        path,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes=axes,
        what=f"detector {info['name']!r}",
    )


# ----------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class DetectionParity:
    """How an exported detection graph agrees with PyTorch.

    Attributes:
        images: Images compared (held-out images plus the reshaped probes).
        probes: Of which reshaped copies (tall, wide, small) checking dynamic sizes.
        score_threshold: Display threshold the counts and the pass/fail rule use.
        detections: PyTorch detections at or above the threshold, all images.
        matched: Of those, found by the graph with the same class within tolerance.
        max_box_diff: Largest coordinate difference of matched pairs, pixels (all scores).
        max_box_diff_rel: The same divided by the image's longer side.
        max_score_diff: Largest score difference of matched pairs (all scores).
        label_agreement: PyTorch detections at or above the threshold where both engines name
            the same class for the strongest detection overlapping them (IoU >= 0.5): the
            class a person would see there.
        count_agreement: Images with as many detections above the threshold in both.
        exempt: Unmatched detections excused as rounding (see the module docstring).
        tolerances: ``box_atol``, ``box_rtol``, ``score_atol`` used.
    """

    images: int
    probes: int
    score_threshold: float
    detections: int
    matched: int
    max_box_diff: float
    max_box_diff_rel: float
    max_score_diff: float
    label_agreement: float
    count_agreement: float
    exempt: int
    tolerances: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tally:
    detections: int = 0
    matched: int = 0
    same_label: int = 0
    counts_equal: int = 0
    box: float = 0.0
    box_rel: float = 0.0
    score: float = 0.0
    exempt: int = 0


def _pair(
    ref: tuple[np.ndarray, np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray, np.ndarray],
    box_tol: float,
    score_tol: float,
) -> list[tuple[int, int]]:
    """One-to-one partners ``(i, j)``: each PyTorch detection, strongest first, takes the
    nearest unpaired graph detection (box, then score) of its class within the tolerances;
    one without such a partner stays unpaired and takes nothing from the others."""
    rb, rs, rl = ref
    gb, gs, gl = got
    free = np.ones(len(gs), dtype=bool)
    pairs = []
    for i in np.argsort(-rs, kind="stable"):
        box = np.abs(gb - rb[i]).max(axis=1) if len(gs) else np.zeros(0)
        score = np.abs(gs - rs[i])
        ok = free & (gl == rl[i]) & (box <= box_tol) & (score <= score_tol)
        if not ok.any():
            continue
        cost = np.where(ok, box + score, np.inf)
        j = int(np.argmin(cost))
        free[j] = False
        pairs.append((int(i), j))
    return pairs


def _strongest(dets: tuple[np.ndarray, np.ndarray, np.ndarray], box: np.ndarray) -> int:
    """The label of the strongest detection overlapping ``box`` by IoU >= 0.5 (-1: none)."""
    boxes, scores, labels = dets
    near = box_iou_matrix(box, boxes)[0] >= 0.5 if len(scores) else np.zeros(0, dtype=bool)
    if not near.any():
        return -1
    return int(labels[near][np.argmax(scores[near])])


def _excused(
    k: int,
    own: tuple[np.ndarray, np.ndarray, np.ndarray],
    other_scores: np.ndarray,
    threshold: float,
    score_atol: float,
    nms_thresh: float,
    full: int,
) -> bool:
    """Whether detection ``k`` of one side may be missing from the other by a float rounding."""
    boxes, scores, labels = own
    score = float(scores[k])
    if score < threshold + score_atol:
        return True  # at the display threshold
    for side in (scores, other_scores):
        if len(side) >= full and score <= float(side.min()) + score_atol:
            return True  # at the end of a list cut at detections_per_img
    stronger = (scores > score) & (labels == labels[k])
    if stronger.any():
        iou = box_iou_matrix(boxes[k], boxes[stronger])[0]
        if (np.abs(iou - nms_thresh) <= _NMS_MARGIN).any():
            return True  # NMS decided by a rounding
    return False


def check_detection_parity(
    model: nn.Module,
    session: Any,
    images: Sequence[np.ndarray],
    *,
    probes: int = 0,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    box_atol: float = BOX_ATOL,
    box_rtol: float = BOX_RTOL,
    score_atol: float = SCORE_ATOL,
) -> DetectionParity:
    """Compare the graph in ``session`` with the PyTorch ``model`` on ``images`` (``uint8`` HWC).

    Args:
        model: The detector the graph was exported from.
        session: ONNX Runtime session of the graph.
        images: The images; the last ``probes`` of them are the reshaped probes.
        probes: How many of ``images`` are probes (only reported).
        score_threshold: Detections at or above it must agree (see the module docstring).
        box_atol: Allowed box coordinate difference, pixels...
        box_rtol: ...plus this times the image's longer side.
        score_atol: Allowed score difference.

    Raises:
        ExportError: A detection at or above the threshold has no partner within tolerance;
            the message names the image and the detection.
    """
    from visionflow.models.detection import detector_info

    info = detector_info(model)
    nms_thresh, full = float(info["nms_thresh"]), int(info["detections_per_img"])
    reference = copy.deepcopy(model).cpu().float().eval()
    tally = _Tally()
    problems: list[str] = []
    for n, pixels in enumerate(images):
        ref = _torch_run(reference, pixels)
        got = run_detection_graph(session, pixels)
        side = float(max(pixels.shape[:2]))
        tol = box_atol + box_rtol * side
        paired_ref, paired_got = set(), set()
        above_r = ref[1] >= score_threshold
        above_g = got[1] >= score_threshold
        tally.detections += int(above_r.sum())
        tally.counts_equal += int(above_r.sum() == above_g.sum())
        for i, j in _pair(ref, got, tol, score_atol):
            box = float(np.abs(got[0][j] - ref[0][i]).max())
            paired_ref.add(i)
            paired_got.add(j)
            tally.box = max(tally.box, box)
            tally.box_rel = max(tally.box_rel, box / side)
            tally.score = max(tally.score, abs(float(got[1][j] - ref[1][i])))
            tally.matched += int(above_r[i])
        for r in np.flatnonzero(above_r):
            tally.same_label += int(_strongest(ref, ref[0][r]) == _strongest(got, ref[0][r]))
        for name, own, other, paired, above in (
            ("PyTorch", ref, got, paired_ref, above_r),
            ("ONNX", got, ref, paired_got, above_g),
        ):
            for k in np.flatnonzero(above):
                if int(k) in paired:
                    continue
                if _excused(int(k), own, other[1], score_threshold, score_atol, nms_thresh, full):
                    tally.exempt += 1
                    continue
                problems.append(
                    f"image {n}: {name} detection {int(k)} (class {int(own[2][k])}, score "
                    f"{float(own[1][k]):.4f}, box {np.round(own[0][k], 2).tolist()}) has no "
                    "partner within tolerance"
                )
    parity = DetectionParity(
        images=len(images),
        probes=probes,
        score_threshold=float(score_threshold),
        detections=tally.detections,
        matched=tally.matched,
        max_box_diff=tally.box,
        max_box_diff_rel=tally.box_rel,
        max_score_diff=tally.score,
        label_agreement=tally.same_label / tally.detections if tally.detections else 1.0,
        count_agreement=tally.counts_equal / max(1, len(images)),
        exempt=tally.exempt,
        tolerances={"box_atol": box_atol, "box_rtol": box_rtol, "score_atol": score_atol},
    )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportError(
            f"the ONNX graph disagrees with PyTorch on {len(images)} images: "
            f"{'; '.join(problems[:3])}{more}; tolerances: boxes {box_atol:g} px + "
            f"{box_rtol:g} x side, scores {score_atol:g}; the export was not written"
        )
    return parity


def shape_probes(pixels: np.ndarray) -> list[np.ndarray]:
    """A tall strip, a wide strip and a quarter-size copy of one image: sizes a dataset of
    same-sized images would not exercise (see the module docstring)."""
    from PIL import Image

    h, w = pixels.shape[:2]
    small = Image.fromarray(pixels).resize(
        (max(8, w // 4), max(8, h // 4)), Image.Resampling.BILINEAR
    )
    return [
        np.ascontiguousarray(pixels[:, : max(8, w // 3)]),
        np.ascontiguousarray(pixels[: max(8, h // 3), :]),
        np.asarray(small, dtype=np.uint8),
    ]


# ----------------------------------------------------------------------------- bundle


def _held_out_images(
    index: Any, positions: Sequence[int], limit: int, seed: int
) -> list[tuple[Any, np.ndarray]]:
    """``(sample, uint8 pixels)`` of up to ``limit`` readable samples at ``positions``."""
    chosen = [p for p in positions if 0 <= p < len(index.samples)]
    if len(chosen) > limit:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(chosen, size=limit, replace=False).tolist())
    out = []
    for pos in chosen:
        sample = index.samples[pos]
        try:
            image = load_image(sample.path)
        except ImageDecodeError:
            continue  # the run's checks passed it; a file changed since is skipped
        out.append((sample, np.asarray(image, dtype=np.uint8)))
    return out


def _headline(run_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keys = ("map", "map_50", "map_75", "mar_100", "images", "gt_boxes")
    out: dict[str, dict[str, Any]] = {}
    for split in ("train", "val", "test"):
        m = run_metrics.get(split)
        if isinstance(m, dict):
            out[split] = {k: m[k] for k in keys if k in m}
    return out


def _fmt(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, int | float) else "n/a"


def detection_model_card(meta: dict[str, Any], files: dict[str, Path]) -> str:
    """The bundle's ``README.md``: what the detector is, how good, how to use it, its limits."""
    from visionflow.export.exporter import _size

    det = meta["detector"]
    parity = meta["graphs"]["fp32"]["parity"]
    lines = [
        f"# {meta['name']}",
        "",
        f"Object detector made by visionflow {meta['versions'].get('visionflow', '?')} on "
        f"{meta['created_at']}: `{det['name']}` on a `{meta['backbone']}` backbone, "
        f"{len(meta['classes'])} classes, trained on {', '.join(meta['trained_on'])}.",
        "",
        "## Classes",
        "",
        ", ".join(f"`{c}`" for c in meta["classes"]),
        "",
        "## Quality",
        "",
        "COCO metrics (percent): mAP averages IoU 0.5 to 0.95; mAP@.5 counts a box found when "
        "it overlaps the true one by half.",
        "",
        "| split | images | mAP | mAP@.5 | mAP@.75 | AR@100 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for split, m in meta.get("metrics", {}).items():
        note = " (seen in training)" if split in meta["trained_on"] else ""
        lines.append(
            f"| {split}{note} | {m.get('images', '')} | {_fmt(m.get('map'))} | "
            f"{_fmt(m.get('map_50'))} | {_fmt(m.get('map_75'))} | {_fmt(m.get('mar_100'))} |"
        )
    lines += [
        "",
        "## Graphs",
        "",
        "| graph | file | size | validation mAP@.5 | note |",
        "|---|---|---:|---:|---|",
    ]
    for kind, g in meta["graphs"].items():
        note = "default" if g["file"] == meta["default_graph"] else g.get("note", "")
        lines.append(
            f"| {kind} | `{g['file']}` | {_size(files[g['file']])} | {_fmt(g.get('val_map_50'))} "
            f"| {note} |"
        )
    lines += [
        "",
        f"The FP32 graph was checked against PyTorch on {parity['images']} images "
        f"({parity['probes']} of them reshaped copies testing other sizes): "
        f"{parity['matched']} of {parity['detections']} detections scoring at least "
        f"{parity['score_threshold']:g} found again, largest box difference "
        f"{parity['max_box_diff']:.2g} px, largest score difference "
        f"{parity['max_score_diff']:.2g}.",
        "",
        "## Input and output",
        "",
        "The graph takes one RGB image as `uint8` pixels `(height, width, 3)` of any size, and "
        "does everything else inside: scaling to [0, 1], normalisation "
        f"(mean {det['mean']}, std {det['std']}), resizing "
        + (
            f"to {det['img_size']} x {det['img_size']} px"
            if det["name"] == "ssdlite"
            else f"so that the longer side is {det['max_size']} px (aspect ratio kept)"
        )
        + ", box decoding and per-class non-maximum suppression (IoU "
        f"{det['nms_thresh']:g}). It returns `boxes` `(n, 4)` as `x1, y1, x2, y2` in the input "
        "image's pixels, `scores` `(n,)` strongest first, and `labels` `(n,)`: 0-based indices "
        f"into the class list above. It keeps up to {det['detections_per_img']} detections "
        f"scoring at least {det['score_thresh']:g}; the suggested display threshold is "
        f"{meta['score_threshold']:g}.",
        "",
        "## Use",
        "",
        "```",
        "visionflow predict model.vfb image.jpg --draw boxes/",
        "```",
        "",
        "```python",
        "import visionflow",
        'model = visionflow.load("model.vfb")',
        'for found in model.detect("image.jpg"):',
        "    print(found.to_json())",
        "```",
        "",
        "## Limits",
        "",
        "- It finds only the classes above, and only objects like those it was trained on.",
        "- Scores are not calibrated probabilities: tune the display threshold on your images.",
    ]
    int8 = meta["graphs"].get("int8")
    if int8 and not int8.get("accepted"):
        lines.append(f"- The INT8 graph is not the default: {int8['note']}.")
    return "\n".join(lines) + "\n"


def export_detection_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    int8: bool = False,
    fp16: bool = False,
    max_int8_drop: float = 0.01,
    calibration_images: int = 64,
    max_eval_images: int = 200,
    max_parity_images: int = 50,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the finished detection run in ``run_dir`` as a bundle.

    Args:
        run_dir: A detection run directory (``model.json`` with task ``"detect"``).
        out: ``*.vfb`` for a single file, anything else for a directory; default
            ``<run_dir>/model.vfb``.
        int8: Add a calibrated INT8 graph (the default graph if its held-out mAP@.5 is within
            ``max_int8_drop`` of FP32's).
        fp16: Refused for detectors: box decoding and NMS need float32.
        max_int8_drop: Largest validation mAP@.5 loss (a fraction) for the INT8 graph to
            become the default.
        calibration_images: Training images used to calibrate INT8.
        max_eval_images: Validation images used at most to measure INT8's mAP.
        max_parity_images: Validation images used at most for the parity check.
        threads: ONNX Runtime threads while exporting.
        overwrite: Replace an existing bundle at ``out``.
        progress: Called with a line per step.

    Returns:
        An :class:`~visionflow.export.exporter.ExportResult`.

    Raises:
        CheckpointError: ``run_dir`` holds no finished detection run, or its images are gone.
        ExportError: Export or parity failed, or an option detectors do not support.
    """
    from visionflow.data.detection import DetectionIndex
    from visionflow.data.index import Split
    from visionflow.export.exporter import (
        ExportResult,
        _versions,
        export_target,
        export_workdir,
        finish_bundle,
    )
    from visionflow.export.runtime import make_session

    say = progress or (lambda _line: None)
    run = Path(run_dir)
    target = export_target(run, out, overwrite=overwrite)
    if fp16:
        raise ExportError(
            "--fp16 is not offered for detectors: box decoding and NMS need float32 (an FP16 "
            "graph's boxes would differ by pixels); serve the FP32 graph on the GPU instead"
        )
    model, run_meta = load_detector_run(run)
    classes = [str(c) for c in run_meta["classes"]]
    info = run_meta["detector"]
    threshold = float(run_meta.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
    for name in ("index.json", "split.json"):
        if not (run / name).is_file():
            raise CheckpointError(f"{run / name} is missing; export needs the run's data split")
    try:
        index = DetectionIndex.from_json(read_json(run / "index.json"))
        split = Split.from_json(read_json(run / "split.json"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{run}: index.json / split.json cannot be read ({exc})") from None
    held_out = split.val or split.test
    wanted = max(max_parity_images, max_eval_images if int8 else 0)
    say(f"reading up to {min(len(held_out), wanted)} held-out images")
    eval_images = _held_out_images(index, held_out, wanted, 0)
    if not eval_images:
        first = index.samples[held_out[0]].path if held_out else "none in the split"
        raise CheckpointError(
            f"none of the run's validation images could be read (first: {first}); export "
            "checks the graph on them: restore the dataset at its original path"
        )
    parity_px = [px for _, px in eval_images[:max_parity_images]]
    probes = shape_probes(parity_px[0])

    with export_workdir(target) as work:
        files: dict[str, Path] = {}
        say(f"exporting the FP32 graph ({info['name']}, {info['backbone']})")
        started = time.perf_counter()
        fp32 = export_detector(model, work / "model.onnx")
        seconds = time.perf_counter() - started
        session = make_session(fp32, threads=threads)
        say(f"checking the graph against PyTorch on {len(parity_px) + len(probes)} images")
        parity = check_detection_parity(
            model, session, parity_px + probes, probes=len(probes), score_threshold=threshold
        )
        say(
            f"FP32 graph agrees with PyTorch ({parity.matched}/{parity.detections} detections, "
            f"max box diff {parity.max_box_diff:.2g} px)"
        )
        files["model.onnx"] = fp32
        graphs: dict[str, dict[str, Any]] = {
            "fp32": {
                "file": "model.onnx",
                "parity": parity.to_json(),
                "export_seconds": round(seconds, 2),
            }
        }
        default = "model.onnx"
        if int8:
            default = _int8_graph(
                fp32,
                work,
                session,
                index,
                split,
                eval_images,
                classes,
                graphs,
                files,
                max_int8_drop=max_int8_drop,
                calibration_images=calibration_images,
                threads=threads,
                say=say,
            )
        files["weights.safetensors"] = run / "model.safetensors"
        run_metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
        meta: dict[str, Any] = {
            "name": run.resolve().name,
            "task": "detect",
            "backbone": info["backbone"],
            "detector": info,
            "classes": classes,
            "score_threshold": threshold,
            "preprocessing": {
                "kind": "detect",
                "client": "decode to RGB uint8 (height, width, 3); nothing else",
                "in_graph": "scale to [0, 1], normalise, resize, pad to a multiple of 32",
                "mean": list(info["mean"]),
                "std": list(info["std"]),
                "resize": (
                    {"mode": "square", "size": int(info["img_size"])}
                    if info["name"] == "ssdlite"
                    else {
                        "mode": "keep_aspect",
                        "min_size": int(info["min_size"]),
                        "max_size": int(info["max_size"]),
                    }
                ),
                "interpolation": "bilinear",
            },
            "inputs": {INPUT_NAME: {"dtype": "uint8", "shape": ["height", "width", 3]}},
            "outputs": {
                "boxes": {"dtype": "float32", "shape": ["detections", 4], "format": "xyxy pixels"},
                "scores": {"dtype": "float32", "shape": ["detections"]},
                "labels": {"dtype": "int64", "shape": ["detections"], "base": 0},
            },
            "default_graph": default,
            "graphs": graphs,
            "trained_on": run_meta.get("trained_on", ["train"]),
            "weights_source": info.get("weights"),
            "metrics": _headline(run_metrics),
            "data_fingerprint": run_meta.get("data_fingerprint", ""),
            "versions": _versions(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "run": {"path": str(run.resolve()), "created_at": run_meta.get("created_at")},
        }
        card = detection_model_card(meta, files)
        path = finish_bundle(work, target, files, meta, card, overwrite=overwrite, say=say)
    return ExportResult(path=path, meta=meta)


# ----------------------------------------------------------------------------- INT8


class _ImageReader:
    """ONNX Runtime calibration reader over single images (the graph takes one at a time)."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self._images = iter(list(images))

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        return None if image is None else {INPUT_NAME: image}

    def rewind(self) -> None:  # part of the reader protocol; one pass is all we need
        pass


def quantize_detector_int8(
    source: str | Path, target: str | Path, images: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Write the static INT8 (QDQ) version of the detection graph ``source`` to ``target``.

    Only convolutions are quantised (weights int8 per channel in the 7-bit range, activations
    uint8 per tensor, min-max ranges from ``images``): the resize, box decoding and NMS around
    them stay float32, since 8-bit box arithmetic would move boxes by pixels. The same CPU
    reasoning as :mod:`visionflow.export.quantize` (``reduce_range`` for CPUs without VNNI)
    applies.

    Returns:
        The settings used, for the bundle's manifest.

    Raises:
        ExportError: No calibration image, or ONNX Runtime's quantiser failed.
    """
    import logging

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from visionflow.export.quantize import float_prefix, quantize_qdq

    if not images:
        raise ExportError("INT8 calibration needs at least one image")
    target = Path(target)
    level = logging.root.level  # the tool logs its advice through the root logger
    with tempfile.TemporaryDirectory(prefix="vf-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        out = target.with_name(target.name + ".tmp")
        try:
            logging.root.setLevel(logging.ERROR)
            ort.set_default_logger_severity(3)  # it warns about every initializer it drops
            # symbolic shape inference cannot follow NMS's data-dependent shapes: skipped
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_qdq(
                prepared,
                out,
                _ImageReader(images),
                op_types=["Conv"],
                nodes_to_exclude=float_prefix(onnx.load(str(prepared)).graph),
            )
            os.replace(out, target)
        except Exception as exc:
            out.unlink(missing_ok=True)
            raise ExportError(f"INT8 quantisation of {source} failed: {exc}") from exc
        finally:
            logging.root.setLevel(level)
            ort.set_default_logger_severity(2)
    return {
        "format": "QDQ",
        "quantised": "Conv only (resize, box decoding and NMS stay float32)",
        "weights": "int8 per-channel (7-bit range)",
        "activations": "uint8 per-tensor",
        "calibration": {"method": "minmax", "images": len(images)},
    }


def _graph_map_50(
    session: Any, images: Sequence[tuple[Any, np.ndarray]], classes: Sequence[str]
) -> float | None:
    """mAP@.5 of a graph on decoded held-out ``(sample, pixels)`` (every score kept)."""
    from visionflow.export.detect_runtime import evaluate_detector

    pixels = {str(sample.path): px for sample, px in images}

    def detect(path: Path) -> Detections:
        px = pixels[str(path)]
        boxes, scores, labels = run_detection_graph(session, px)
        size = (px.shape[1], px.shape[0])
        return detections_from_arrays(str(path), size, boxes, scores, labels, 0.0, classes)

    samples = [(s.path, list(s.boxes), list(s.labels), list(s.iscrowd)) for s, _ in images]
    value = evaluate_detector(detect, classes, samples, where="the held-out images")["map_50"]
    return None if value is None else float(value)


def _int8_graph(
    fp32: Path,
    work: Path,
    session: Any,
    index: Any,
    split: Any,
    eval_images: Sequence[tuple[Any, np.ndarray]],
    classes: Sequence[str],
    graphs: dict[str, dict[str, Any]],
    files: dict[str, Path],
    *,
    max_int8_drop: float,
    calibration_images: int,
    threads: int | None,
    say: Callable[[str], None],
) -> str:
    """Add the INT8 graph to ``graphs``/``files``; the default graph's file name.

    INT8 becomes the default only when its held-out mAP@.5 is within ``max_int8_drop`` of the
    FP32 graph's (both measured here on the same images).
    """
    from visionflow.export.runtime import make_session

    say(f"calibrating INT8 on {min(calibration_images, len(split.train))} training images")
    calibration = [px for _, px in _held_out_images(index, split.train, calibration_images, 1)]
    if not calibration:
        raise CheckpointError("no training image could be read to calibrate INT8")
    settings = quantize_detector_int8(fp32, work / "model.int8.onnx", calibration)
    say(f"measuring mAP@.5 of both graphs on {len(eval_images)} held-out images")
    fp32_map = _graph_map_50(session, eval_images, classes)
    int8_session = make_session(work / "model.int8.onnx", threads=threads)
    int8_map = _graph_map_50(int8_session, eval_images, classes)
    graphs["fp32"]["val_map_50"] = fp32_map
    drop = None if fp32_map is None or int8_map is None else fp32_map - int8_map
    accepted = drop is not None and drop <= max_int8_drop
    entry: dict[str, Any] = {
        "file": "model.int8.onnx",
        "val_map_50": int8_map,
        "drop": drop,
        "settings": settings,
        "accepted": accepted,
    }
    files["model.int8.onnx"] = work / "model.int8.onnx"
    graphs["int8"] = entry
    if accepted:
        say(f"INT8 accepted as default (mAP@.5 {_fmt(int8_map)} vs FP32 {_fmt(fp32_map)})")
        return "model.int8.onnx"
    entry["note"] = (
        "the held-out images have no boxes to measure it on"
        if drop is None
        else f"it loses {100 * drop:.1f} mAP@.5 points on held-out images (allowed "
        f"{100 * max_int8_drop:.1f})"
    )
    say(f"[warning] INT8 graph kept but NOT the default: {entry['note']}")
    return "model.onnx"
