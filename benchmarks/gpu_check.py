"""GPU check: visionflow's CUDA path (Engine, loaders, autocast, ONNX features) measured for real.

Meant for a CUDA machine; it also runs on a CPU (slowly: use ``--quick`` for a smoke test).
Everything goes through visionflow's own code: :class:`~visionflow.train.engine.Engine` for the
training steps, ``create_backbone`` for the models, ``ImageDataset``/``make_loader`` for the
images, ``onnx_feature_extractor`` for ONNX Runtime and ``autocast_dtype`` for the precision.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out gpu_check.json   # about 3-5 min, H100
    .venv/bin/python benchmarks/gpu_check.py --quick --out /tmp/gpu_check.json   # CPU smoke test

Sections (each one's failure is recorded in the JSON and the run goes on; exit status 1 if any
section failed or a check did not pass):

1. ``train``: training images/s of ``tf_efficientnet_lite0`` (packaged weights when installed)
   and larger backbones (random init) on synthetic batches already on the device, for fp32 and
   bf16 autocast, NCHW and channels_last; Engine's loop against the same step with no per-step
   host synchronisation; cuDNN autotuning on and off.
2. ``converge``: ~30 Engine steps on the digits dataset (loaded through the pinned-memory
   loader) in fp32, bf16 and fp16 (+GradScaler): the loss must fall and stay finite.
3. ``loader``: images/s that ``ImageDataset`` + ``make_loader`` (pin_memory) deliver to the
   device from JPEG and PNG files, for several worker counts, then Engine end-to-end on those
   files against the synthetic rate: which one is the bottleneck.
4. ``onnx``: ONNX Runtime's providers, the frozen backbone's inference images/s on the best
   provider against PyTorch (CPU fp32 and device bf16), and the largest differences.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from visionflow.data.index import Sample
from visionflow.data.loading import DecodedImageCache, ImageDataset, make_loader
from visionflow.data.preprocess import Preprocessing
from visionflow.data.readers import read_dataset
from visionflow.data.transforms import eval_transform, train_transform
from visionflow.demo import write_digits
from visionflow.errors import WeightsError
from visionflow.models.backbones import create_backbone, feature_dim
from visionflow.models.heads import TaskModel
from visionflow.models.onnx_features import onnx_feature_extractor
from visionflow.models.tasks import ClassificationTask
from visionflow.models.weights import ResolvedWeights, resolve_weights
from visionflow.train.callbacks import Callback
from visionflow.train.device import autocast_dtype, configure_threads, cpu_count, select_device
from visionflow.train.engine import Engine, FitConfig

LITE0 = "tf_efficientnet_lite0"


# ----------------------------------------------------------------------------- helpers
class StepClock(Callback):
    """Time and loss of every step. Engine reads the loss with ``float()`` after each step,
    a host synchronisation, so these stamps are when the device finished the step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_batch_end(self, engine: Engine, step: int, loss: float) -> None:
        self.times.append(time.perf_counter())
        self.losses.append(loss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lite0_weights() -> ResolvedWeights:
    try:
        return resolve_weights(LITE0, "package", offline=True)
    except WeightsError:
        return resolve_weights(LITE0, "none")


def _weights(name: str) -> ResolvedWeights:
    return _lite0_weights() if name == LITE0 else resolve_weights(name, "none")


def _model(name: str, classes: Sequence[str], weights: ResolvedWeights | None = None) -> TaskModel:
    torch.manual_seed(0)
    backbone = create_backbone(name, weights=weights)
    task = ClassificationTask(classes)
    return TaskModel(backbone, task.build_head(feature_dim(backbone)))


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


# ----------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict[str, Any]:
    import timm

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timm": timm.__version__,
        "cpu_count": cpu_count(),
        "device": str(device),
    }
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(Exception):
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip()  # fmt: skip
    env["lite0_weights"] = _lite0_weights().source
    return env


# ----------------------------------------------------------------------------- 1. train
def _engine_rate(
    name: str,
    device: torch.device,
    *,
    batch: int,
    size: int,
    warmup: int,
    steps: int,
    amp: str,
    channels_last: bool,
) -> dict[str, Any]:
    """Engine.fit over ``warmup + steps`` copies of one synthetic batch already on the device."""
    classes = [str(i) for i in range(10)]
    model = _model(name, classes, _weights(name))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    targets = torch.randint(0, 10, (batch,), generator=g).to(device)
    batches = [(images, targets)] * (warmup + steps)
    clock = StepClock()
    cfg = FitConfig(epochs=1, lr=1e-4, backbone_lr=1e-4, warmup_epochs=0.0, patience=None,
                    amp=amp, channels_last=channels_last)  # fmt: skip
    _reset_peak(device)
    engine = Engine(model, ClassificationTask(classes), cfg, device=device, callbacks=[clock])
    engine.fit(batches)  # type: ignore[arg-type]  # any sized iterable of batches will do
    seconds = clock.times[-1] - clock.times[warmup - 1]
    return {
        "images_per_s": steps * batch / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "peak_gib": _peak_gib(device),
        "finite": all(math.isfinite(v) for v in clock.losses),
    }


def _raw_rate(
    name: str,
    device: torch.device,
    *,
    batch: int,
    size: int,
    warmup: int,
    steps: int,
    amp: str,
    channels_last: bool,
) -> float:
    """Engine's own step (its optimiser groups, autocast, layout, clipping) without reading the
    loss back after every step: the device may run ahead of the host."""
    classes = [str(i) for i in range(10)]
    model = _model(name, classes, _weights(name))
    task = ClassificationTask(classes)
    cfg = FitConfig(lr=1e-4, backbone_lr=1e-4, amp=amp, channels_last=channels_last)
    engine = Engine(model, task, cfg, device=device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(engine._param_groups(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    targets = torch.randint(0, 10, (batch,), generator=g).to(device)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with engine._autocast():
            out = model(engine._prepare(images))
        loss = task.loss(out, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def section_train(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    kw = {"size": args.size, "warmup": args.warmup, "steps": args.steps}
    variants = [("off", False), ("off", True), ("bf16", False), ("bf16", True)]
    for name in args.models:
        batch = args.batch
        for amp, cl in variants:
            r = _engine_rate(name, device, batch=batch, amp=amp, channels_last=cl, **kw)
            rows.append({"model": name, "batch": batch, "amp": amp, "channels_last": cl,
                         "cudnn_benchmark": False, **r})  # fmt: skip
            print(f"  train {name} amp={amp} cl={cl}: {r['images_per_s']:.0f} img/s", flush=True)
    extra: list[dict[str, Any]] = []
    for name in args.models:
        batch = args.batch
        for bench in (False, True):
            with _cudnn_benchmark(bench):
                eng = _engine_rate(name, device, batch=batch, amp="bf16", channels_last=True, **kw)
                raw = _raw_rate(name, device, batch=batch, amp="bf16", channels_last=True, **kw)
            extra.append({"model": name, "batch": batch, "cudnn_benchmark": bench,
                          "engine_images_per_s": eng["images_per_s"],
                          "no_sync_images_per_s": raw})  # fmt: skip
            print(f"  sync {name} bench={bench}: engine {eng['images_per_s']:.0f} "
                  f"no-sync {raw:.0f} img/s", flush=True)  # fmt: skip
    return {"rows": rows, "sync_and_cudnn": extra}


def table_train(res: dict[str, Any]) -> str:
    base = {r["model"]: r["images_per_s"] for r in res["rows"]
            if r["amp"] == "off" and not r["channels_last"]}  # fmt: skip
    rows = [
        [r["model"], r["batch"], "bf16 autocast" if r["amp"] == "bf16" else "fp32",
         "channels_last" if r["channels_last"] else "NCHW", _fmt(r["images_per_s"]),
         _fmt(r["ms_per_step"], 1), f"{r['images_per_s'] / base[r['model']]:.2f}x",
         _fmt(r["peak_gib"], 1)]
        for r in res["rows"]
    ]  # fmt: skip
    out = _table(["backbone", "batch", "precision", "layout", "images/s", "ms/step",
                  "vs fp32 NCHW", "peak GiB"], rows, [False, True, False, False, True, True,
                  True, True])  # fmt: skip
    rows2 = [
        [r["model"], "on" if r["cudnn_benchmark"] else "off", _fmt(r["engine_images_per_s"]),
         _fmt(r["no_sync_images_per_s"]),
         f"{r['engine_images_per_s'] / r['no_sync_images_per_s'] - 1:+.1%}"]
        for r in res["sync_and_cudnn"]
    ]  # fmt: skip
    out += "\n\nbf16 autocast + channels_last: Engine.fit against the same step with no per-step "
    out += "host sync\n\n"
    out += _table(["backbone", "cudnn.benchmark", "Engine images/s", "no-sync images/s",
                   "Engine vs no-sync"], rows2, [False, False, True, True, True])  # fmt: skip
    return out


# ----------------------------------------------------------------------------- 2. converge
def section_converge(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(args.tmp)
    index = read_dataset(write_digits(tmp / "digits"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(index.samples))
    bs = args.converge_batch
    train = [index.samples[i] for i in order[: bs * args.converge_steps]]
    val = [index.samples[i] for i in order[-400:]]
    weights = _lite0_weights()
    pre = weights.preprocessing.with_size(args.converge_size)
    results = []
    for amp in ("off", "bf16", "fp16"):
        train_ds = ImageDataset(train, index.class_to_idx, train_transform(pre, "light",
                                hflip=False), cache=DecodedImageCache())  # fmt: skip
        val_ds = ImageDataset(val, index.class_to_idx, eval_transform(pre))
        pin = device.type == "cuda"
        loader = make_loader(train_ds, batch_size=bs, shuffle=True, num_workers=args.workers_small,
                             drop_last=True, pin_memory=pin)  # fmt: skip
        val_loader = make_loader(val_ds, batch_size=100, pin_memory=pin)
        model = _model(LITE0, index.classes, weights)
        clock = StepClock()
        cfg = FitConfig(epochs=1, lr=1e-3, backbone_lr=3e-4, warmup_epochs=0.1, patience=None,
                        amp=amp, channels_last=True)  # fmt: skip
        engine = Engine(model, ClassificationTask(index.classes), cfg, device=device,
                        callbacks=[clock])  # fmt: skip
        before = engine.task.metrics(*engine.predict(val_loader))
        result = engine.fit(loader, val_loader)
        losses = clock.losses
        k = min(5, max(1, len(losses) // 3))
        first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
        scaler = engine._scaler
        rec = {
            "amp": amp,
            "autocast_dtype": str(autocast_dtype(device, amp)),
            "grad_scaler": scaler.is_enabled(),
            "scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
            "steps": len(losses),
            "loss_first": first,
            "loss_last": last,
            "finite": all(math.isfinite(v) for v in losses),
            "val_accuracy_before": before["accuracy"],
            "val_accuracy_after": result.best_metric,
            "param_dtype": str(next(model.parameters()).dtype),
            "seconds": result.seconds,
        }
        rec["ok"] = bool(rec["finite"] and last < 0.8 * first)
        results.append(rec)
        print(f"  converge amp={amp}: loss {first:.3f} -> {last:.3f}, val acc "
              f"{before['accuracy']:.3f} -> {result.best_metric:.3f}", flush=True)  # fmt: skip
    return {"rows": results, "train_images": len(train), "val_images": len(val),
            "size": pre.input_size, "batch": bs}  # fmt: skip


def table_converge(res: dict[str, Any]) -> str:
    rows = [
        [r["amp"], r["autocast_dtype"].replace("torch.", ""), "yes" if r["grad_scaler"] else "no",
         r["steps"], f"{r['loss_first']:.3f}", f"{r['loss_last']:.3f}",
         "yes" if r["finite"] else "NO", f"{r['val_accuracy_before']:.1%}",
         f"{r['val_accuracy_after']:.1%}", "pass" if r["ok"] else "FAIL"]
        for r in res["rows"]
    ]  # fmt: skip
    return _table(["amp", "autocast", "GradScaler", "steps", "loss, first 5", "loss, last 5",
                   "all finite", "val acc before", "val acc after", "check"], rows,
                  [False, False, False, True, True, True, False, True, True, False])  # fmt: skip


# ----------------------------------------------------------------------------- 3. loader
def _write_one(job: tuple[str, int, str]) -> None:
    path, seed, fmt = job
    rng = np.random.default_rng(seed)
    # a smooth picture with texture, closer to a photo than white noise (which JPEG and PNG
    # cannot compress, and which decodes unrealistically slowly)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (256, 256), Image.Resampling.BICUBIC
    )
    noise = rng.normal(0, 12, (256, 256, 3))
    pixels = np.clip(np.asarray(low, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if fmt == "jpeg":
        image.save(path, quality=90)
    else:
        image.save(path)


def _write_images(root: Path, n: int, fmt: str, classes: int = 10) -> list[Sample]:
    ext = "jpg" if fmt == "jpeg" else "png"
    jobs = []
    samples = []
    for i in range(n):
        label = str(i % classes)
        path = root / fmt / label / f"{i:05d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), i, fmt))
        samples.append(Sample(path=path.resolve(), label=label))
    with ProcessPoolExecutor(max_workers=max(1, min(8, cpu_count()))) as pool:
        list(pool.map(_write_one, jobs, chunksize=64))
    return samples


class _GpuNormalize(nn.Module):
    """uint8 images -> normalised floats, on the device (the variant that ships 4x fewer bytes)."""

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def _loader(
    samples: list[Sample],
    pre: Preprocessing,
    policy: str,
    workers: int,
    batch: int,
    pin: bool,
    uint8: bool = False,
) -> Any:
    classes = sorted({s.label for s in samples if s.label is not None})
    transform = train_transform(pre, policy)
    if uint8:  # the same augmentation, without ToDtype + Normalize (done on the device instead)
        ops = list(transform.transforms)  # type: ignore[attr-defined]
        assert isinstance(ops[-1], v2.Normalize) and isinstance(ops[-2], v2.ToDtype)
        transform = v2.Compose(ops[:-2])
    ds = ImageDataset(samples, {c: i for i, c in enumerate(classes)}, transform,
                      cache=DecodedImageCache(), max_side=2 * pre.input_size)  # fmt: skip
    return make_loader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                       pin_memory=pin)  # fmt: skip


def _delivered(
    loader: Any, device: torch.device, epochs: int, normalize: nn.Module | None = None
) -> list[float]:
    """Images/s per epoch that ``loader`` hands to ``device`` (host-to-device copy included)."""
    rates = []
    for _ in range(epochs):
        n = 0
        t0 = time.perf_counter()
        for images, targets in loader:
            x = images.to(device, non_blocking=True)
            if normalize is not None:
                normalize(x)
            torch.as_tensor(targets).to(device, non_blocking=True)
            n += len(images)
        _sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def section_loader(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(args.tmp)
    pre = _lite0_weights().preprocessing.with_size(args.size)
    normalize = _GpuNormalize(pre).to(device)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    sets = {fmt: _write_images(tmp / "files", args.images, fmt) for fmt in ("jpeg", "png")}
    written = time.perf_counter() - t0
    rows = []
    top = max(args.workers)
    many = sorted({w for w in args.workers if w >= 8} or {top})
    plan: list[tuple[str, str, int, bool, bool]] = [
        *[("jpeg", "light", w, cuda, False) for w in args.workers],
        *[("png", "light", w, cuda, False) for w in args.workers],
        ("jpeg", "medium", top, cuda, False),
        *[("jpeg", "light", w, False, False) for w in many if cuda],
        *[("jpeg", "light", w, cuda, True) for w in many],
    ]
    for fmt, policy, workers, pin, uint8 in plan:
        loader = _loader(sets[fmt], pre, policy, workers, args.batch, pin, uint8)
        rates = _delivered(loader, device, epochs=2, normalize=normalize if uint8 else None)
        del loader
        rows.append({"format": fmt, "policy": policy, "workers": workers, "pin_memory": pin,
                     "output": "uint8" if uint8 else "float32",
                     "epoch1_images_per_s": rates[0],
                     "epoch2_images_per_s": rates[1]})  # fmt: skip
        print(f"  loader {fmt} {policy} workers={workers} pin={pin} uint8={uint8}: "
              f"{rates[0]:.0f} / {rates[1]:.0f} img/s", flush=True)  # fmt: skip
    # end to end: Engine.fit on the files, bf16 + channels_last, against the synthetic rate
    e2e = []
    synthetic = _engine_rate(LITE0, device, batch=args.batch, size=args.size, warmup=args.warmup,
                             steps=args.steps, amp="bf16", channels_last=True)  # fmt: skip
    steps_per_epoch = args.images // args.batch
    classes = [str(i) for i in range(10)]
    runs = [(w, False) for w in sorted({top, *args.e2e_workers})] + [(w, True) for w in many[:1]]
    for workers, uint8 in runs:
        loader = _loader(sets["jpeg"], pre, "light", workers, args.batch, cuda, uint8)
        model = _model(LITE0, classes, _lite0_weights())
        if uint8:
            model = TaskModel(nn.Sequential(_GpuNormalize(pre), model.backbone), model.head)
        clock = StepClock()
        cfg = FitConfig(epochs=args.e2e_epochs, lr=1e-4, backbone_lr=1e-4, warmup_epochs=0.0,
                        patience=None, amp="bf16", channels_last=True)  # fmt: skip
        Engine(model, ClassificationTask(classes), cfg, device=device,
               callbacks=[clock]).fit(loader)  # fmt: skip
        # from the end of the first epoch: workers started, caches as warm as they get
        start = steps_per_epoch - 1
        seconds = clock.times[-1] - clock.times[start]
        rate = (len(clock.times) - 1 - start) * args.batch / seconds
        e2e.append({"workers": workers, "output": "uint8" if uint8 else "float32",
                    "images_per_s": rate, "synthetic_images_per_s": synthetic["images_per_s"],
                    "gpu_busy_fraction": rate / synthetic["images_per_s"]})  # fmt: skip
        print(f"  e2e workers={workers} uint8={uint8}: {rate:.0f} img/s "
              f"(synthetic {synthetic['images_per_s']:.0f})", flush=True)  # fmt: skip
        del loader
    return {"images": args.images, "size": args.size, "batch": args.batch,
            "write_seconds": written, "rows": rows, "end_to_end": e2e}  # fmt: skip


def table_loader(res: dict[str, Any]) -> str:
    rows = [
        [r["format"], r["policy"], r["workers"], "yes" if r["pin_memory"] else "no",
         "uint8, normalised on the device" if r["output"] == "uint8" else "float32, normalised",
         _fmt(r["epoch1_images_per_s"]), _fmt(r["epoch2_images_per_s"])]
        for r in res["rows"]
    ]  # fmt: skip
    out = _table(["files", "augment", "workers", "pin_memory", "batches of", "epoch 1 images/s",
                  "epoch 2 images/s"], rows,
                 [False, False, True, False, False, True, True])  # fmt: skip
    rows2 = [
        [r["workers"], r["output"], _fmt(r["images_per_s"]), _fmt(r["synthetic_images_per_s"]),
         f"{r['gpu_busy_fraction']:.0%}"]
        for r in res["end_to_end"]
    ]  # fmt: skip
    out += "\n\nEngine.fit end to end on the JPEG files (bf16 + channels_last, after epoch 1)\n\n"
    out += _table(["workers", "batches of", "images/s from files", "images/s synthetic",
                   "GPU kept busy"], rows2, [True, False, True, True, True])  # fmt: skip
    return out


# ----------------------------------------------------------------------------- 4. onnx
def _rate(fn: Callable[[], Any], n_images: int, repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def section_onnx(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    threads = cpu_count()
    configure_threads(threads)
    weights = _lite0_weights()
    backbone = create_backbone(LITE0, weights=weights).eval()
    size, batch = args.size, args.onnx_batch
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    path = Path(args.tmp) / "onnx" / f"{LITE0}-{size}.onnx"
    t0 = time.perf_counter()
    extractor = onnx_feature_extractor(backbone, size, path, threads=threads)
    export_s = time.perf_counter() - t0
    if extractor is None:
        raise RuntimeError("onnx_feature_extractor fell back to PyTorch (see the log)")
    cpu_model = backbone.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = cpu_model(images).float()
    rows: list[dict[str, Any]] = []

    def diff(x: torch.Tensor) -> float:
        return float((x.float().cpu() - reference).abs().max())

    def nothing() -> None:
        return None

    got = extractor(images)
    rows.append({"runtime": "ONNX Runtime (recipe's session)", "provider": "CPUExecutionProvider",
                 "threads": threads, "precision": "fp32",
                 "images_per_s": _rate(lambda: extractor(images), batch, args.repeats, nothing),
                 "max_abs_diff": diff(got)})  # fmt: skip

    def torch_cpu() -> torch.Tensor:
        with torch.inference_mode():
            return cpu_model(images.contiguous(memory_format=torch.channels_last))

    rows.append({"runtime": "PyTorch eager, channels_last", "provider": "cpu", "threads": threads,
                 "precision": "fp32",
                 "images_per_s": _rate(torch_cpu, batch, args.repeats, nothing),
                 "max_abs_diff": 0.0})  # fmt: skip
    if device.type == "cuda":
        gpu_model = create_backbone(LITE0, weights=weights).eval().to(device)
        gpu_model.to(memory_format=torch.channels_last)
        big = args.gpu_infer_batch
        gpu_images = torch.randn(big, 3, size, size, generator=g).to(device)
        gpu_images = gpu_images.contiguous(memory_format=torch.channels_last)
        check = images.to(device).contiguous(memory_format=torch.channels_last)
        for amp in ("off", "bf16"):
            dtype = autocast_dtype(device, amp)

            def run(x: torch.Tensor, dtype: torch.dtype | None = dtype) -> torch.Tensor:
                with torch.inference_mode():
                    ctx = (torch.autocast("cuda", dtype=dtype) if dtype is not None
                           else contextlib.nullcontext())  # fmt: skip
                    with ctx:
                        return gpu_model(x)

            with _cudnn_benchmark(True):
                rate = _rate(lambda run=run: run(gpu_images), big, args.repeats,
                             lambda: _sync(device))  # fmt: skip
                rows.append({"runtime": "PyTorch eager, channels_last", "provider": "cuda",
                             "threads": None, "precision": "bf16 autocast" if dtype else "fp32",
                             "batch": big, "images_per_s": rate,
                             "max_abs_diff": diff(run(check))})  # fmt: skip
    if "CUDAExecutionProvider" in providers and device.type == "cuda":
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        array = images.numpy()
        (out,) = session.run(None, {"images": array})
        rows.append({"runtime": "ONNX Runtime", "provider": "CUDAExecutionProvider",
                     "threads": None, "precision": "fp32",
                     "images_per_s": _rate(lambda: session.run(None, {"images": array}), batch,
                                           args.repeats, nothing),
                     "max_abs_diff": diff(torch.from_numpy(np.asarray(out)))})  # fmt: skip
    for r in rows:
        r.setdefault("batch", batch)
        print(f"  onnx {r['runtime']} {r['provider']} {r['precision']}: {r['images_per_s']:.0f} "
              f"img/s, diff {r['max_abs_diff']:.2g}", flush=True)  # fmt: skip
    return {"providers": providers, "export_and_check_seconds": export_s, "size": size,
            "recipe_check_max_abs_diff": extractor.max_abs_diff,
            "feature_max_abs": float(reference.abs().max()), "rows": rows}  # fmt: skip


def table_onnx(res: dict[str, Any]) -> str:
    rows = [
        [r["runtime"], r["provider"], r["threads"] or "-", r["precision"], r["batch"],
         _fmt(r["images_per_s"]), f"{r['max_abs_diff']:.2g}"]
        for r in res["rows"]
    ]  # fmt: skip
    return _table(["runtime", "provider / device", "threads", "precision", "batch", "images/s",
                   "max abs diff vs torch CPU fp32"], rows,
                  [False, False, True, False, True, True, True])  # fmt: skip


# ----------------------------------------------------------------------------- main
SECTIONS: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str], str]] = {
    "onnx": (section_onnx, table_onnx, "Frozen-backbone inference: ONNX Runtime and PyTorch"),
    "train": (section_train, table_train, "Training step on synthetic batches"),
    "converge": (section_converge, table_converge, "Does mixed precision train? (digits)"),
    "loader": (section_loader, table_loader, "Loading: ImageDataset + make_loader(pin_memory)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON results go")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--models", nargs="+", default=[LITE0, "convnext_tiny", "resnet50"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8, 16])
    parser.add_argument("--e2e-workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--e2e-epochs", type=int, default=3)
    parser.add_argument("--workers-small", type=int, default=4)
    parser.add_argument("--converge-steps", type=int, default=30)
    parser.add_argument("--converge-batch", type=int, default=32)
    parser.add_argument("--converge-size", type=int, default=128)
    parser.add_argument("--onnx-batch", type=int, default=64)
    parser.add_argument("--gpu-infer-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.size, args.warmup, args.steps = [LITE0], 4, 64, 1, 2
        args.images, args.workers, args.e2e_workers, args.e2e_epochs = 24, [0, 2], [2], 2
        args.workers_small, args.converge_steps, args.converge_batch = 0, 6, 8
        args.converge_size, args.onnx_batch, args.gpu_infer_batch, args.repeats = 64, 4, 8, 1
    device = select_device(args.device)
    print(f"device: {device}", flush=True)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "environment": environment(device)}
    results["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        args.tmp = tmp
        for name in args.sections:
            run, _, _ = SECTIONS[name]
            print(f"[{name}]", flush=True)
            t0 = time.perf_counter()
            try:
                results[name] = run(device, args)
            except Exception as exc:  # record and go on: one run should say as much as it can
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                failed.append(name)
            results[name]["section_seconds"] = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del args.tmp
    converge = results.get("converge", {}).get("rows", [])
    failed += [f"converge:{r['amp']}" for r in converge if not r["ok"]]
    results["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))

    env = results["environment"]
    print()
    print(f"Machine: {env.get('gpu', 'no GPU')}, driver {env.get('driver', '-')}, "
          f"torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}), "
          f"timm {env['timm']}, onnxruntime {env.get('onnxruntime')} "
          f"{env.get('ort_providers')}, {env['cpu_count']} CPUs, "
          f"lite0 weights: {env['lite0_weights']}")  # fmt: skip
    for name in args.sections:
        _, table, title = SECTIONS[name]
        print(f"\n### {title}\n")
        if "error" in results[name]:
            print(f"failed: {results[name]['error']}")
        else:
            print(table(results[name]))
    print(f"\nfailed: {failed or 'nothing'}; JSON in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
