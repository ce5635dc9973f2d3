"""Device choice and CPU thread settings."""

from __future__ import annotations

import contextlib
import os

import torch

from visionflow._cpu import cpu_count
from visionflow.errors import ConfigError

__all__ = ["autocast_dtype", "configure_threads", "cpu_count", "select_device"]


def configure_threads(num_threads: int | None = None) -> int:
    """One intra-op thread per usable core, one inter-op thread.

    PyTorch's default can oversubscribe small containers (it counts the host's cores); we use
    the affinity mask instead. An explicit ``OMP_NUM_THREADS`` wins.
    """
    if num_threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        num_threads = int(env) if env and env.isdigit() else cpu_count()
    torch.set_num_threads(max(1, num_threads))
    with contextlib.suppress(RuntimeError):  # already set once in this process; harmless
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit name is checked."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a valid torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here; use 'cpu'")
    return device


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``amp`` (``auto``/``bf16``/``fp16``/``off``) on ``device``.

    ``auto`` uses bf16 on CUDA GPUs with bf16 tensor cores (Ampere, sm_80, and newer; fp16
    otherwise) and nothing on CPU, where bf16 is only faster on CPUs with AMX/AVX512-BF16 and
    costs accuracy everywhere else.
    """
    amp = (amp or "auto").lower()
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp != "auto":
        raise ConfigError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")
    if device.type == "cuda":
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    return None


def _native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware.

    ``torch.cuda.is_bf16_supported()`` also answers yes for GPUs that only emulate bf16 (V100,
    T4 and other pre-Ampere cards), where fp16 with loss scaling is the fast choice.
    """
    if torch.version.hip:
        return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(device)[0] >= 8
