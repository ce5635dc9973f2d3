import pytest
import torch
from PIL import Image

from visionflow.data.index import Sample
from visionflow.data.loading import DecodedImageCache, ImageDataset, balanced_sampler, make_loader
from visionflow.data.preprocess import Preprocessing
from visionflow.data.transforms import batch_mixer, eval_transform, train_transform
from visionflow.errors import ConfigError

PRE = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")


def test_eval_transform_is_deterministic_and_normalised():
    image = Image.new("RGB", (50, 40), (255, 0, 128))
    x = eval_transform(PRE)(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(32, 32))  # (1 - 0.5) / 0.5
    assert torch.allclose(x[1], -torch.ones(32, 32))
    assert torch.equal(x, eval_transform(PRE)(image))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("policy", ["none", "light", "medium", "heavy"])
def test_train_policies_give_input_size(policy, interpolation):
    pre = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=interpolation)
    transform = train_transform(pre, policy, hflip=False)
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    for seed in range(8):  # the auto-augment policies pick different ops per call
        torch.manual_seed(seed)
        assert transform(image).shape == (3, 32, 32)


def test_unknown_policy():
    with pytest.raises(ConfigError, match="augment policy"):
        train_transform(PRE, "wild")


def test_preprocessing_roundtrip_and_validation():
    assert Preprocessing.from_json(PRE.to_json()) == PRE
    assert Preprocessing(input_size=224, crop_pct=0.875).resize_size == 256
    with pytest.raises(ConfigError, match="interpolation"):
        Preprocessing(interpolation="lanczos9")
    with pytest.raises(ConfigError, match="unknown preprocessing keys"):
        Preprocessing.from_json({"input_size": 32, "colour": 1})


def test_mixer_gives_soft_labels():
    assert batch_mixer(3) is None
    mixer = batch_mixer(3, mixup=0.4)
    _images, labels = mixer(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert labels.shape == (4, 3)
    assert torch.allclose(labels.sum(1), torch.ones(4))


def test_cache_is_bounded_lru():
    cache = DecodedImageCache(max_bytes=3 * 10 * 10 * 2)
    images = [Image.new("RGB", (10, 10)) for _ in range(3)]
    cache.put("a", images[0])
    cache.put("b", images[1])
    assert cache.get("a") is images[0]  # a is now most recent
    cache.put("c", images[2])
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    assert cache.nbytes <= cache.max_bytes
    cache.put("huge", Image.new("RGB", (100, 100)))  # larger than the bound: not kept
    assert cache.get("huge") is None


def test_dataset_streams_and_caches(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (80, 60), colour).save(p)
        paths.append(p)
    samples = [Sample(paths[0], "r"), Sample(paths[1], "g"), Sample(paths[0], None)]
    cache = DecodedImageCache()
    ds = ImageDataset(samples, {"g": 0, "r": 1}, eval_transform(PRE), cache=cache, max_side=40)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 1
    assert ds[2][1] == -1
    assert ds.load(0).size == (53, 40)  # short side downscaled to max_side once
    assert len(cache) == 1  # sample 0 and 2 share the file
    batches = list(make_loader(ds, batch_size=2))
    assert [len(b[1]) for b in batches] == [2, 1]


def test_balanced_sampler_evens_classes():
    targets = [0] * 90 + [1] * 10
    drawn = torch.tensor(list(balanced_sampler(targets, seed=0)))
    share = (torch.tensor(targets)[drawn] == 1).float().mean().item()
    assert 0.35 < share < 0.65
    assert list(balanced_sampler(targets, seed=0)) == list(balanced_sampler(targets, seed=0))
