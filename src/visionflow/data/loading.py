"""Streaming images from disk into batches, with a bounded in-memory cache.

Images are decoded lazily (through :func:`visionflow.data.images.load_image`, the one safe
decoder) and kept in a least-recently-used cache bounded in bytes, so a dataset larger than
memory streams from disk while a small one is decoded only once per worker.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from visionflow.data.images import DEFAULT_MAX_PIXELS, load_image
from visionflow.data.index import Sample

__all__ = ["DecodedImageCache", "ImageDataset", "balanced_sampler", "make_loader"]


class DecodedImageCache:
    """A thread-safe LRU of decoded RGB images, bounded by ``max_bytes`` of pixel data.

    Each DataLoader worker process holds its own copy, so the bound applies per process.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, Image.Image] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(image: Image.Image) -> int:
        return image.width * image.height * len(image.getbands())

    def get(self, key: Hashable) -> Image.Image | None:
        with self._lock:
            image = self._items.get(key)
            if image is not None:
                self._items.move_to_end(key)
            return image

    def put(self, key: Hashable, image: Image.Image) -> None:
        size = self._size(image)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples -> ``(tensor, class id)``; unlabelled samples get class id ``-1``.

    Args:
        samples: The records to serve, in order.
        class_to_idx: Class name to integer id.
        transform: Turns an RGB PIL image into a tensor.
        cache: Optional shared decoded-image cache.
        max_side: When set, images whose short side exceeds it are downscaled once before
            caching (training only: random crops at 2x the input size lose nothing visible).
        max_pixels: Decompression-bomb guard passed to the decoder.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_to_idx: dict[str, int],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        cache: DecodedImageCache | None = None,
        max_side: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.class_to_idx = dict(class_to_idx)
        self.transform = transform
        self.cache = cache
        self.max_side = max_side
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def targets(self) -> list[int]:
        return [self._target(s) for s in self.samples]

    def _target(self, sample: Sample) -> int:
        if sample.label is None:
            return -1
        return self.class_to_idx[sample.label]

    def load(self, i: int) -> Image.Image:
        """The decoded (possibly downscaled) RGB image of sample ``i``, from cache if there."""
        # Keyed by file and downscale so datasets over the same files can share one cache.
        key = (str(self.samples[i].path), self.max_side)
        image = self.cache.get(key) if self.cache is not None else None
        if image is None:
            image = load_image(self.samples[i].path, max_pixels=self.max_pixels)
            if self.max_side is not None and min(image.size) > self.max_side:
                scale = self.max_side / min(image.size)
                new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=2.0)
            if self.cache is not None:
                self.cache.put(key, image)
        return image

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.load(i)), self._target(self.samples[i])


def balanced_sampler(targets: Sequence[int], *, seed: int = 0) -> Sampler[int]:
    """A sampler drawing every class equally often (with replacement), one epoch = len(targets)."""
    labels = np.asarray(targets)
    counts = np.bincount(labels[labels >= 0])
    weights = np.where(labels >= 0, 1.0 / np.maximum(counts[np.maximum(labels, 0)], 1), 0.0)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        weights.tolist(), num_samples=len(labels), replacement=True, generator=generator
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def make_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    shuffle: bool = False,
    sampler: Sampler[int] | None = None,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A seeded DataLoader: the same seed gives the same batches, with or without workers."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
