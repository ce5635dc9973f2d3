"""Latency and throughput of a bundle's graphs (and of PyTorch eager, for comparison).

``visionflow benchmark BUNDLE`` and ``benchmarks/inference.py`` call :func:`benchmark_bundle`.
Inputs are random ``uint8`` pixels of the bundle's input size (speed does not depend on the
content for these networks); accuracy comes from the bundle's validation measurement or, with
``data``, is measured on a labelled folder through the full prediction path.
"""

from __future__ import annotations

import collections
import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionflow._cpu import cpu_count
from visionflow.errors import BundleError
from visionflow.export.runtime import GRAPHS, BundleModel, load_bundle, make_session

__all__ = ["BenchRow", "benchmark_bundle", "cpu_info", "markdown_table", "op_profile"]


@dataclass
class BenchRow:
    """One engine's figures (times in milliseconds, throughput in images per second)."""

    engine: str
    file: str
    size_mb: float
    p50_ms: float
    p99_ms: float
    throughput: float
    batch: int
    accuracy: float | None
    accuracy_on: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cpu_info() -> dict[str, Any]:
    """Model name, cores this process may use and the SIMD flags that matter for INT8."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c")
    return {"cpu": name, "cores": cpu_count(), "flags": [f for f in wanted if f in flags]}


def _time(call: Callable[[], object], repeats: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        call()
    out = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        call()
        out[i] = time.perf_counter() - start
    return out


def _measure(
    run: Callable[[np.ndarray], object], side: int, batch: int, repeats: int, seed: int
) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    one = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    many = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    lat = _time(lambda: run(one), repeats, warmup=max(3, repeats // 10))
    big = _time(lambda: run(many), max(3, repeats // 10), warmup=1)
    return (
        float(np.percentile(lat, 50) * 1e3),
        float(np.percentile(lat, 99) * 1e3),
        float(batch / np.median(big)),
    )


def _torch_runner(bundle_dir: Path, meta: dict[str, Any], threads: int | None) -> Any:
    """PyTorch eager on the bundle's weights: uint8 pixels normalised, then the model."""
    import torch

    from visionflow.data.preprocess import Preprocessing
    from visionflow.models.backbones import create_backbone
    from visionflow.models.heads import LinearHead, TaskModel
    from visionflow.train.checkpoint import load_weights

    if threads:
        torch.set_num_threads(threads)
    model = TaskModel(
        create_backbone(meta["backbone"], weights=None),
        LinearHead(int(meta["feature_dim"]), len(meta["classes"])),
    )
    load_weights(bundle_dir / "weights.safetensors", model)
    model.eval()
    pre = Preprocessing.from_json(meta["preprocessing"])

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> object:
        return model(torch.from_numpy(pre.normalize(pixels)))

    return run


def _classifier(model: Any, path: str | Path) -> BundleModel:
    """``model`` if it is a classifier: the timings here feed classifier batches."""
    if not isinstance(model, BundleModel):
        raise BundleError(
            f"{path} is a {getattr(model, 'task', '?')} bundle; benchmark measures classifier "
            "bundles only"
        )
    return model


def benchmark_bundle(
    path: str | Path,
    *,
    graphs: Sequence[str] = ("fp32", "int8"),
    torch_eager: bool = True,
    batch: int = 32,
    repeats: int = 100,
    threads: int | None = None,
    data: str | Path | None = None,
    seed: int = 0,
) -> list[BenchRow]:
    """Measure each of ``graphs`` the bundle holds (and PyTorch eager when asked).

    Args:
        path: Bundle (directory or ``.vfb``).
        graphs: Graph kinds to try (``fp32``, ``int8``, ``fp16``); missing ones are skipped.
        torch_eager: Also time PyTorch eager on the bundle's weights (needs torch and timm).
        batch: Batch size of the throughput measurement.
        repeats: Batch-1 calls timed (after a warm-up); the large batch runs a tenth as often.
        threads: Intra-op threads for every engine (default: all CPUs this process may use).
        data: A labelled folder: accuracy is measured on it instead of read from the bundle.
        seed: Seed of the random input pixels.
    """
    default = _classifier(load_bundle(path, threads=threads), path)
    meta, side = default.meta, default.preprocessing.input_size
    rows: list[BenchRow] = []

    def accuracy(model: Any, kind: str) -> tuple[float | None, str]:
        if data is not None:
            return float(model.evaluate(data)["accuracy"]), Path(data).name
        value = meta["graphs"].get(kind, {}).get("val_accuracy")
        return (None if value is None else float(value)), "validation (at export)"

    if torch_eager:
        run = _torch_runner(default.bundle.path, meta, threads)
        p50, p99, tput = _measure(run, side, batch, repeats, seed)
        size = (default.bundle.path / "weights.safetensors").stat().st_size / 1e6
        acc = meta["graphs"]["fp32"].get("val_accuracy") if data is None else None
        rows.append(
            BenchRow(
                "PyTorch eager",
                "weights.safetensors",
                size,
                p50,
                p99,
                tput,
                batch,
                acc,
                "validation (= FP32 graph, checked at export)",
            )
        )
    for kind in graphs:
        file = GRAPHS[kind]
        if not default.bundle.has(file):
            continue
        # the bundle was verified once above; only a session per graph is new
        model = BundleModel(
            default.bundle, make_session(default.bundle.file(file), threads=threads), file
        )
        p50, p99, tput = _measure(model.run, side, batch, repeats, seed)
        acc, on = accuracy(model, kind)
        size = default.bundle.file(file).stat().st_size / 1e6
        engine = f"ONNX Runtime {kind.upper()}" + (" (default)" if file == default.graph else "")
        rows.append(BenchRow(engine, file, size, p50, p99, tput, batch, acc, on))
    return rows


def op_profile(
    path: str | Path, *, graph: str = "default", batch: int = 32, runs: int = 3
) -> list[tuple[str, float, int]]:
    """Where the time goes: ``(op type, milliseconds per run, nodes)``, slowest first, from
    ONNX Runtime's profiler on a ``batch`` of random pixels."""
    import onnxruntime as ort

    model = _classifier(load_bundle(path, graph=graph), path)
    side = model.preprocessing.input_size
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = model.session.get_session_options().intra_op_num_threads
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="vf-prof-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            str(model.bundle.file(model.graph)), options, providers=["CPUExecutionProvider"]
        )
        pixels = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), np.uint8)
        for _ in range(runs + 1):  # the first run warms up; all are in the profile
            session.run(None, {"images": pixels})
        events = json.loads(Path(session.end_profiling()).read_text())
    total: collections.Counter[str] = collections.Counter()
    nodes: dict[str, set[str]] = collections.defaultdict(set)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name", "?")
        total[op] += event.get("dur", 0)
        nodes[op].add(event["name"])
    warm = runs + 1
    return [(op, us / warm / 1e3, len(nodes[op])) for op, us in total.most_common()]


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """The BENCHMARKS.md table of :func:`benchmark_bundle`'s rows."""
    batch = rows[0].batch if rows else 32
    lines = [
        f"| engine | file | size (MB) | batch 1 p50 (ms) | batch 1 p99 (ms) | "
        f"batch {batch} (images/s) | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = "n/a" if r.accuracy is None else f"{100 * r.accuracy:.1f} %"
        lines.append(
            f"| {r.engine} | `{r.file}` | {r.size_mb:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
            f"{r.throughput:.0f} | {acc} |"
        )
    return "\n".join(lines)
