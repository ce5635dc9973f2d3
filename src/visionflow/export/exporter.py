"""``visionflow export``: a finished run becomes a verified, self-describing bundle.

Steps, each one recorded in the bundle's ``model.json``:

1. Load the run's model (PyTorch) and the images of its splits (``index.json``, ``split.json``).
2. Export the FP32 graph (:mod:`visionflow.export.onnx`) and check it against PyTorch on the
   validation images: logits within ``1e-4``, top-1 agreement 100 %; otherwise nothing is
   written.
3. Optionally INT8 (calibrated on training images) and FP16 graphs. The INT8 graph's validation
   accuracy is measured; it becomes the default graph only when it loses at most
   ``max_int8_drop`` against FP32 (and agrees with it on at least 95 % of images); if the
   min-max calibration loses more, percentile calibration is tried once before giving up.
4. Reference statistics of the validation images for drift monitoring: a PCA projection of the
   embeddings with the projected reference points, class priors, predicted-class and
   confidence distributions, and simple image statistics.
5. Weights (safetensors), model card, manifest with sha256 of every file; a directory, or a
   single ``.vfb`` file.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from visionflow._io import read_json, run_task
from visionflow.data.images import load_image
from visionflow.data.index import DatasetIndex, Split
from visionflow.data.preprocess import Preprocessing
from visionflow.errors import CheckpointError, ExportError, ImageDecodeError
from visionflow.export.bundle import ARCHIVE_SUFFIX, pack, write_bundle
from visionflow.export.runtime import softmax

__all__ = ["ExportResult", "export_run"]

#: Components of the embedding projection stored for drift tests.
PROJECTION_DIM = 8
#: Reference points (projected embeddings, confidences...) stored at most.
MAX_REFERENCE = 1000


@dataclass(frozen=True)
class ExportResult:
    """Where the bundle went and what it holds (``meta`` is its manifest)."""

    path: Path
    meta: dict[str, Any]

    @property
    def default_graph(self) -> str:
        return str(self.meta["default_graph"])


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("visionflow", "torch", "timm", "onnx", "onnxruntime", "numpy", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _split_images(
    index: DatasetIndex, positions: Sequence[int], pre: Preprocessing, limit: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Pixels, class ids and raw image statistics of up to ``limit`` readable images."""
    chosen = list(positions)
    if len(chosen) > limit:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(chosen, size=limit, replace=False).tolist())
    mapping = index.class_to_idx
    images, targets, stats = [], [], []
    for pos in chosen:
        sample = index.samples[pos]
        try:
            image = load_image(sample.path)
        except ImageDecodeError:
            continue  # the run's checks passed it; a file changed since is skipped
        arr = np.asarray(image, dtype=np.float32)
        stats.append(
            {
                "width": float(image.width),
                "height": float(image.height),
                "brightness": float(arr.mean() / 255.0),
                "contrast": float(arr.std() / 255.0),
            }
        )
        images.append(image)
        targets.append(mapping.get(sample.label or "", -1))
    return pre.pixels(images), np.asarray(targets, dtype=np.int64), stats


def _run_graph(session: Any, pixels: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    logits, feats = [], []
    for start in range(0, len(pixels), batch):
        out = session.run(["logits", "features"], {"images": pixels[start : start + batch]})
        logits.append(np.asarray(out[0], dtype=np.float32))
        feats.append(np.asarray(out[1], dtype=np.float32))
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(feats)


def _accuracy(logits: np.ndarray, targets: np.ndarray) -> float | None:
    known = targets >= 0
    if not known.any():
        return None
    return float((logits[known].argmax(1) == targets[known]).mean())


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    qs = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    return {f"q{int(q * 100):02d}": float(np.quantile(arr, q)) for q in qs} | {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
    }


def reference_statistics(
    features: np.ndarray,
    logits: np.ndarray,
    image_stats: list[dict[str, float]],
    class_counts: dict[str, int],
    classes: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """What live traffic is compared with: see the module docstring, step 4.

    The projection is ``(features - mean) @ components.T``; ``points`` are the reference images
    in that space (at most :data:`MAX_REFERENCE`), for two-sample tests per component.
    """
    n, dim = features.shape
    mean = features.mean(axis=0)
    centred = features - mean
    k = max(1, min(PROJECTION_DIM, n - 1, dim)) if n > 1 else 1
    if n > 1:
        _, sing, vt = np.linalg.svd(centred, full_matrices=False)
        components = vt[:k]
        explained = (sing[:k] ** 2) / max(float((sing**2).sum()), 1e-12)
    else:
        components = np.eye(1, dim, dtype=np.float32)
        explained = np.ones(1)
    points = centred @ components.T
    probs = softmax(logits)
    predicted = probs.argmax(1)
    confidence = probs.max(1)
    keep = np.arange(n)
    if n > MAX_REFERENCE:
        keep = np.sort(np.random.default_rng(seed).choice(n, MAX_REFERENCE, replace=False))
    total = max(1, sum(class_counts.values()))
    return {
        "images": int(n),
        "embedding": {
            "dim": int(dim),
            "mean": [round(float(v), 6) for v in mean],
            "norm": _quantiles(np.linalg.norm(features, axis=1).tolist()),
            "components": [[round(float(v), 6) for v in row] for row in components],
            "explained_variance": [round(float(v), 6) for v in explained],
            "points": [[round(float(v), 5) for v in row] for row in points[keep]],
        },
        "class_priors": {c: class_counts.get(c, 0) / total for c in classes},
        "predicted": {
            c: float((predicted == i).mean()) if n else 0.0 for i, c in enumerate(classes)
        },
        "confidence": {
            "summary": _quantiles(confidence.tolist()),
            "points": [round(float(v), 5) for v in confidence[keep]],
        },
        "image": {
            key: _quantiles([s[key] for s in image_stats])
            for key in ("width", "height", "brightness", "contrast")
        }
        if image_stats
        else {},
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"


def model_card(meta: dict[str, Any], files: dict[str, Path]) -> str:
    """The bundle's ``README.md``: what the model is, how good, how to use it, its limits."""
    pre = meta["preprocessing"]
    metrics = meta.get("metrics", {})
    lines = [
        f"# {meta['name']}",
        "",
        f"Image classifier made by visionflow {meta['versions'].get('visionflow', '?')} on "
        f"{meta['created_at']}: `{meta['backbone']}` backbone, "
        f"{len(meta['classes'])} classes, trained on {', '.join(meta['trained_on'])}.",
        "",
        "## Classes",
        "",
        ", ".join(f"`{c}`" for c in meta["classes"]),
        "",
        "## Quality",
        "",
        "| split | images | accuracy | macro F1 |",
        "|---|---:|---:|---:|",
    ]
    for split in ("train", "val", "test"):
        m = metrics.get(split)
        if m:
            note = " (seen in training)" if split in meta["trained_on"] else ""
            lines.append(
                f"| {split}{note} | {m.get('n', '')} | {_pct(m.get('accuracy'))} | "
                f"{_pct(m.get('macro_f1'))} |"
            )
    lines += [
        "",
        "## Graphs",
        "",
        "| graph | file | size | validation accuracy | note |",
        "|---|---|---:|---:|---|",
    ]
    for kind, g in meta["graphs"].items():
        note = "default" if g["file"] == meta["default_graph"] else g.get("note", "")
        lines.append(
            f"| {kind} | `{g['file']}` | {_size(files[g['file']])} | "
            f"{_pct(g.get('val_accuracy'))} | {note} |"
        )
    parity = meta["graphs"]["fp32"]["parity"]
    lines += [
        "",
        f"The FP32 graph was checked against PyTorch on {parity['images']} validation images: "
        f"largest logit difference {parity['max_abs_diff']:.2g}, top-1 agreement "
        f"{100 * parity['top1_agreement']:.0f} %.",
        "",
        "## Input",
        "",
        f"RGB images; the short side is resized to {Preprocessing.from_json(pre).resize_size} px "
        f"({pre['interpolation']}) "
        f"and the centre {pre['input_size']} x {pre['input_size']} px cropped. The graphs take "
        f"these pixels as `uint8` `(batch, {pre['input_size']}, {pre['input_size']}, 3)` and "
        f"normalise inside (mean {pre['mean']}, std {pre['std']}); they return `logits` and the "
        "`features` embedding.",
        "",
        "## Use",
        "",
        "```",
        "visionflow predict model.vfb image.jpg",
        "```",
        "",
        "```python",
        "import visionflow",
        'model = visionflow.load("model.vfb")',
        'print(model.predict("image.jpg")[0].label)',
        "```",
        "",
        "## Limits",
        "",
        "- It knows only the classes above: every image gets one of them, however unrelated.",
        f"- Data fingerprint `{meta['data_fingerprint'][:16]}`: accuracy holds for images like "
        "the training data; the bundle's reference statistics let a server watch for drift.",
    ]
    int8 = meta["graphs"].get("int8")
    if int8 and not int8.get("accepted"):
        lines.append(f"- The INT8 graph is not the default: {int8['note']}.")
    qat = (int8 or {}).get("settings", {}).get("weights_from")
    if isinstance(qat, dict):
        q = qat["quantisation_aware_fine_tune"]
        lines.append(
            f"- The INT8 graph quantises a copy of the model fine-tuned for {q['epochs']} "
            f"epoch(s) on {q['images']} training images with INT8 rounding simulated; the FP32 "
            "graph and the weights are the model's own."
        )
    return "\n".join(lines) + "\n"


def export_target(run: Path, out: str | Path | None, *, overwrite: bool) -> Path:
    """Where a run's bundle goes (``out``, default ``<run>/model.vfb``); refused if it exists
    and ``overwrite`` is not given."""
    target = Path(out) if out is not None else run / f"model{ARCHIVE_SUFFIX}"
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; pass --overwrite to replace it")
    return target


@contextlib.contextmanager
def export_workdir(target: Path) -> Iterator[Path]:
    """A temporary folder for the graphs being built, next to ``target`` when its folder
    exists (the final move stays on one file system); removed afterwards."""
    work = Path(
        tempfile.mkdtemp(prefix="vf-export-", dir=target.parent if target.parent.exists() else None)
    )
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finish_bundle(
    work: Path,
    target: Path,
    files: dict[str, Path],
    meta: dict[str, Any],
    card: str,
    *,
    overwrite: bool,
    say: Callable[[str], None],
) -> Path:
    """Add the model card to ``files`` and write the bundle at ``target``: a directory, or a
    ``.vfb`` archive packed from one built in ``work``."""
    (work / "README.md").write_text(card, encoding="utf-8")
    files["README.md"] = work / "README.md"
    say("writing the bundle")
    if target.suffix == ARCHIVE_SUFFIX:
        return pack(write_bundle(work / "bundle", files, meta), target, overwrite=overwrite)
    return write_bundle(target, files, meta, overwrite=overwrite)


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    int8: bool = False,
    fp16: bool = False,
    max_int8_drop: float = 0.01,
    calibration_images: int = 256,
    qat: bool = True,
    qat_images: int = 512,
    qat_epochs: int = 2,
    max_eval_images: int = 2000,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the finished run in ``run_dir`` as a bundle.

    A detection run (``model.json`` task ``"detect"``) is exported by
    :func:`visionflow.export.detection.export_detection_run` with the same options.

    Args:
        run_dir: A run directory made by ``visionflow train``.
        out: ``*.vfb`` for a single file, anything else for a directory; default
            ``<run_dir>/model.vfb``.
        int8: Add a calibrated INT8 graph (the default graph if accurate enough).
        fp16: Add an FP16 graph for GPU serving.
        max_int8_drop: Largest accuracy loss (a fraction: 0.01 = 1 point) on the run's
            validation + test images for the INT8 graph to become the default.
        calibration_images: Training images used to calibrate INT8.
        qat: Classifiers: quantise a copy fine-tuned with the INT8 graph's rounding simulated
            (:mod:`visionflow.export.qat`) before trying plain post-training quantisation; the
            first INT8 graph that passes the check is kept.
        qat_images: Training images for that fine-tune (at most).
        qat_epochs: Its passes over them.
        max_eval_images: Validation images used at most for parity, accuracy and reference.
        threads: ONNX Runtime threads while exporting.
        overwrite: Replace an existing bundle at ``out``.
        progress: Called with a line per step.

    Raises:
        CheckpointError: ``run_dir`` holds no finished model, or its images are gone.
        ExportError: export, parity or quantisation failed.
    """
    run = Path(run_dir)
    if qat and (qat_images < 1 or qat_epochs < 1):
        raise ExportError(
            f"qat_images and qat_epochs must be at least 1, got {qat_images}, {qat_epochs}"
        )
    if run_task(run) == "detect":
        from visionflow.export.detection import export_detection_run

        return export_detection_run(
            run,
            out,
            int8=int8,
            fp16=fp16,
            max_int8_drop=max_int8_drop,
            calibration_images=calibration_images,
            max_eval_images=max_eval_images,
            threads=threads,
            overwrite=overwrite,
            progress=progress,
        )
    from visionflow.api import ClassifierModel
    from visionflow.export.onnx import check_parity, export_classifier, make_session
    from visionflow.export.quantize import convert_fp16

    say = progress or (lambda _line: None)
    target = export_target(run, out, overwrite=overwrite)
    clf = ClassifierModel.from_run(run, device="cpu")
    pre = clf.preprocessing
    for name in ("index.json", "split.json"):
        if not (run / name).is_file():
            raise CheckpointError(f"{run / name} is missing; export needs the run's data split")
    index = DatasetIndex.from_json(read_json(run / "index.json"))
    split = Split.from_json(read_json(run / "split.json"))
    held_out = split.val or split.test
    say(f"reading {min(len(held_out), max_eval_images)} validation images")
    val_px, val_y, val_stats = _split_images(index, held_out, pre, max_eval_images, seed=0)
    if len(val_px) == 0:
        raise CheckpointError(
            f"none of the run's validation images could be read (first: "
            f"{index.samples[held_out[0]].path if held_out else 'none in the split'}); export "
            "checks the graph on them: restore the dataset at its original path"
        )
    counts = {c: 0 for c in index.classes}
    for pos in split.train:
        label = index.samples[pos].label
        if label in counts:
            counts[label] += 1

    with export_workdir(target) as work:
        files: dict[str, Path] = {}
        graphs: dict[str, dict[str, Any]] = {}
        say("exporting the FP32 graph")
        fp32 = export_classifier(clf.model, pre, work / "model.onnx")
        session = make_session(fp32, threads=threads)
        logits, feats = _run_graph(session, val_px)
        parity = check_parity(clf.model, pre, session, val_px, logits=logits)
        fp32_acc = _accuracy(logits, val_y)
        files["model.onnx"] = fp32
        graphs["fp32"] = {
            "file": "model.onnx",
            "val_accuracy": fp32_acc,
            "parity": parity.to_json(),
        }
        default = "model.onnx"
        say(f"FP32 graph agrees with PyTorch (max |diff| {parity.max_abs_diff:.2g})")

        if int8:
            # the check runs on validation and test: validation alone is small and picked the
            # model's epoch, which flatters FP32 against any other weights (BENCHMARKS.md)
            check_px, check_y, check_logits = val_px, val_y, logits
            splits = ["val" if split.val else "test"]
            if split.val and split.test:
                test_px, test_y, _ = _split_images(index, split.test, pre, max_eval_images, seed=0)
                if len(test_px):
                    check_px = np.concatenate([val_px, test_px])
                    check_y = np.concatenate([val_y, test_y])
                    check_logits = np.concatenate([logits, _run_graph(session, test_px)[0]])
                    splits.append("test")
            entry = _int8_graph(
                clf,
                fp32,
                work,
                index,
                split.train,
                _Check(check_px, check_y, check_logits, len(val_px), splits),
                calibration_images=calibration_images,
                qat=qat,
                qat_images=qat_images,
                qat_epochs=qat_epochs,
                max_int8_drop=max_int8_drop,
                threads=threads,
                say=say,
            )
            if entry["accepted"]:
                default = "model.int8.onnx"
            files["model.int8.onnx"] = work / "model.int8.onnx"
            graphs["int8"] = entry

        if fp16:
            say("converting the FP16 graph")
            settings = convert_fp16(fp32, work / "model.fp16.onnx")
            files["model.fp16.onnx"] = work / "model.fp16.onnx"
            graphs["fp16"] = {
                "file": "model.fp16.onnx",
                "settings": settings,
                "note": "for GPU serving",
            }

        files["weights.safetensors"] = run / "model.safetensors"
        run_metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
        info = clf.info
        meta: dict[str, Any] = {
            "name": run.resolve().name,
            "task": "classify",
            "backbone": info["backbone"],
            "classes": list(clf.classes),
            "preprocessing": pre.to_json(),
            "feature_dim": int(info["feature_dim"]),
            "head": info.get("head", "linear"),
            "inputs": {
                "images": {"dtype": "uint8", "shape": ["batch", pre.input_size, pre.input_size, 3]}
            },
            "outputs": {
                "logits": ["batch", len(clf.classes)],
                "features": ["batch", int(info["feature_dim"])],
            },
            "default_graph": default,
            "graphs": graphs,
            "chosen": info.get("chosen"),
            "trained_on": info.get("trained_on", ["train"]),
            "weights_source": info.get("weights"),
            "metrics": _headline_metrics(run_metrics),
            "data_fingerprint": info.get("data_fingerprint", ""),
            "reference": reference_statistics(feats, logits, val_stats, counts, clf.classes),
            "versions": _versions(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "run": {"path": str(run.resolve()), "created_at": info.get("created_at")},
        }
        card = model_card(meta, files)
        path = finish_bundle(work, target, files, meta, card, overwrite=overwrite, say=say)
    return ExportResult(path=path, meta=meta)


@dataclass(frozen=True)
class _Check:
    """Held-out images the INT8 candidates are checked on: ``n_val`` validation images first,
    then the test split's; FP32's logits on them."""

    pixels: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    n_val: int
    splits: list[str]


def _int8_graph(
    clf: Any,
    fp32: Path,
    work: Path,
    index: DatasetIndex,
    train: Sequence[int],
    check: _Check,
    *,
    calibration_images: int,
    qat: bool,
    qat_images: int,
    qat_epochs: int,
    max_int8_drop: float,
    threads: int | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Write ``work/model.int8.onnx`` and return its manifest entry.

    Candidates in order, the first that passes the check wins: the quantisation-aware copy
    (``qat``), then post-training quantisation of the model itself with min-max, then
    percentile ranges. Passing: at most ``max_int8_drop`` below FP32's accuracy on the
    ``check`` images and the same top-1 class as FP32 on at least 95 % of them. When none
    passes, the candidate that lost least is kept, not as the default.
    """
    from visionflow.export.onnx import export_classifier, make_session
    from visionflow.export.quantize import quantize_int8

    pre = clf.preprocessing
    fp32_acc = _accuracy(check.logits, check.targets)
    say(f"calibrating INT8 on {min(calibration_images, len(train))} training images")
    calib_px, _, _ = _split_images(index, train, pre, calibration_images, seed=1)
    if len(calib_px) == 0:
        raise CheckpointError("no training image could be read to calibrate INT8")
    candidates: list[tuple[str, str, Path]] = []
    qat_info: dict[str, Any] | None = None
    if qat:
        from visionflow.export.qat import quantization_aware_finetune

        train_px, train_y, _ = _split_images(index, train, pre, qat_images, seed=2)
        if len(train_px):
            say(
                f"quantisation-aware fine-tune on {len(train_px)} training images "
                f"({qat_epochs} epoch{'s' if qat_epochs != 1 else ''})"
            )
            tuned = quantization_aware_finetune(
                clf.model, pre, train_px, train_y, calib_px, epochs=qat_epochs, progress=say
            )
            qat_info = tuned.to_json()
            candidates.append(
                ("qat", "minmax", export_classifier(tuned.model, pre, work / "qat.fp32.onnx"))
            )
    candidates += [("ptq", "minmax", fp32), ("ptq", "percentile", fp32)]
    target = work / "model.int8.onnx"
    best: dict[str, Any] | None = None
    tried: list[dict[str, Any]] = []
    try:
        for kind, method, source in candidates:
            weights = "quantisation-aware" if kind == "qat" else "post-training"
            out = work / f"int8.{kind}.{method}.onnx"
            settings = quantize_int8(source, out, calib_px, method=method)
            settings["weights_from"] = (
                {"quantisation_aware_fine_tune": qat_info} if kind == "qat" else "the model"
            )
            q_logits, _ = _run_graph(make_session(out, threads=threads), check.pixels)
            q_acc = _accuracy(q_logits, check.targets)
            entry: dict[str, Any] = {
                "file": "model.int8.onnx",
                "val_accuracy": _accuracy(q_logits[: check.n_val], check.targets[: check.n_val]),
                "drop": (fp32_acc or 0.0) - (q_acc or 0.0),
                "top1_agreement_with_fp32": float(
                    (q_logits.argmax(1) == check.logits.argmax(1)).mean()
                ),
                "checked_on": {
                    "splits": check.splits,
                    "images": len(check.pixels),
                    "fp32_accuracy": fp32_acc,
                    "accuracy": q_acc,
                },
                "settings": settings,
            }
            entry["accepted"] = (
                entry["drop"] <= max_int8_drop and entry["top1_agreement_with_fp32"] >= 0.95
            )
            tried.append(
                {
                    "weights": weights,
                    "calibration": method,
                    "accuracy": q_acc,
                    **{k: entry[k] for k in ("val_accuracy", "top1_agreement_with_fp32")},
                }
            )
            if best is None or entry["accepted"] or entry["drop"] < best["drop"]:
                best = entry
                out.replace(target)
            if entry["accepted"]:
                break
            say(
                f"INT8 ({weights}, {method}) loses {100 * entry['drop']:.1f} points; trying the "
                "next way"
            )
    finally:
        for path in work.glob("int8.*.onnx"):
            path.unlink()
        (work / "qat.fp32.onnx").unlink(missing_ok=True)
    assert best is not None
    best["tried"] = tried
    if best["accepted"]:
        say(
            f"INT8 accepted as default (accuracy {_pct(best['checked_on']['accuracy'])} vs "
            f"FP32 {_pct(fp32_acc)} on {len(check.pixels)} {' + '.join(check.splits)} images)"
        )
    else:
        best["note"] = (
            f"it loses {100 * best['drop']:.1f} accuracy points on {len(check.pixels)} "
            f"{' + '.join(check.splits)} images (allowed "
            f"{100 * max_int8_drop:.1f}) and agrees with FP32 on "
            f"{100 * best['top1_agreement_with_fp32']:.0f} % of images"
        )
        say(f"[warning] INT8 graph kept but NOT the default: {best['note']}")
    return best


def _headline_metrics(run_metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for split, m in (run_metrics.get("splits") or {}).items():
        out[split] = {
            k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece") if k in m
        }
    return out
