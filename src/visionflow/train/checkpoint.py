"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, swapped atomically.

A checkpoint is a directory::

    checkpoint/
      model.safetensors      model weights
      optimizer.safetensors  optimiser tensors (moments, steps), flattened
      rng.safetensors        torch RNG state
      state.json             epoch, history, scheduler, optimiser groups, RNG of Python and NumPy,
                             and the sha256 of each tensor file (written last: the commit point)

It is written into a fresh sibling directory and swapped in with renames, so a kill at any
moment leaves either the previous or the new checkpoint loadable, never a mix.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from visionflow._io import atomic_write_json, read_json, sha256_file
from visionflow.errors import CheckpointError

__all__ = ["load_checkpoint", "load_weights", "save_checkpoint", "save_weights", "state_tensors"]

_STATE = "state.json"
_FORMAT = 1


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state as contiguous, unshared CPU tensors (what safetensors needs)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_weights(
    path: str | Path, module: nn.Module, metadata: Mapping[str, str] | None = None
) -> Path:
    """Atomically write ``module``'s weights as safetensors."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(state_tensors(module), str(tmp), metadata=dict(metadata or {}))
    tmp.replace(target)
    return target


def load_weights(path: str | Path, module: nn.Module, *, strict: bool = True) -> None:
    """Load safetensors weights into ``module``; a mismatch names the offending keys."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from exc
    try:
        result = module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not fit the model: {exc}") from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(
            f"{path}: weights do not fit the model; missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Any) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _rng_json() -> dict[str, Any]:
    py_state = random.getstate()
    np_state: Any = np.random.get_state()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [
            str(np_state[0]),
            np.asarray(np_state[1]).tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }


def _restore_rng(obj: Mapping[str, Any], torch_state: torch.Tensor | None) -> None:
    py = obj.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    npst = obj.get("numpy")
    if npst:
        np.random.set_state(
            (npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4])
        )
    if torch_state is not None:
        torch.set_rng_state(torch_state)


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see module docstring); returns its path."""
    target = Path(directory)
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files: dict[str, str] = {}
    save_file(state_tensors(model), str(staging / "model.safetensors"))
    files["model.safetensors"] = sha256_file(staging / "model.safetensors")
    payload: dict[str, Any] = {"format": _FORMAT, "state": dict(state or {})}
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        files["optimizer.safetensors"] = sha256_file(staging / "optimizer.safetensors")
        payload["optimizer"] = opt_meta
    if scheduler is not None:
        # LambdaLR stores None for plain functions: the lambda itself is rebuilt by the caller
        payload["scheduler"] = scheduler.state_dict()
    save_file({"torch": torch.get_rng_state()}, str(staging / "rng.safetensors"))
    files["rng.safetensors"] = sha256_file(staging / "rng.safetensors")
    payload["rng"] = _rng_json()
    payload["files"] = files
    atomic_write_json(staging / _STATE, payload)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _locate(directory: Path) -> Path:
    """The complete checkpoint: ``directory`` itself or, after a kill mid-swap, its ``.old``."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / _STATE).is_file():
            return candidate
    raise CheckpointError(f"no checkpoint in {directory} (state.json missing)")


def load_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Verify and load a checkpoint into the given objects; returns the saved ``state`` dict."""
    where = _locate(Path(directory))
    try:
        payload = read_json(where / _STATE)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where / _STATE}: unreadable ({exc})") from exc
    if payload.get("format") != _FORMAT:
        raise CheckpointError(f"{where}: checkpoint format {payload.get('format')} unsupported")
    for name, digest in payload.get("files", {}).items():
        path = where / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CheckpointError(f"{path}: missing or does not match its recorded sha256")
    if model is not None:
        load_weights(where / "model.safetensors", model)
    if optimizer is not None and "optimizer" in payload:
        tensors = load_file(str(where / "optimizer.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, payload["optimizer"]))
    if scheduler is not None and "scheduler" in payload:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        rng = load_file(str(where / "rng.safetensors")).get("torch")
        _restore_rng(payload.get("rng", {}), rng)
    state: dict[str, Any] = payload.get("state", {})
    return state
