"""The data stage: read a dataset from disk, check its health, split it, decode its images.

Everything imported here needs only numpy, Pillow and Rich; the PyTorch parts (transforms,
loaders) are imported from their modules, ``visionflow.data.transforms`` and
``visionflow.data.loading``, so that reading and checking data does not load torch.
"""

from __future__ import annotations

from visionflow.data.checks import BadFile, DataReport, check_dataset
from visionflow.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageInfo,
    inspect_image,
    inspect_image_bytes,
    load_image,
    load_image_bytes,
)
from visionflow.data.index import DatasetIndex, Sample, Split
from visionflow.data.readers import available_readers, read_dataset, register_reader
from visionflow.data.split import load_split, save_split, stratified_split
from visionflow.errors import DataError, ImageDecodeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "BadFile",
    "DataError",
    "DataReport",
    "DatasetIndex",
    "ImageDecodeError",
    "ImageInfo",
    "Sample",
    "Split",
    "available_readers",
    "check_dataset",
    "inspect_image",
    "inspect_image_bytes",
    "load_image",
    "load_image_bytes",
    "load_split",
    "read_dataset",
    "register_reader",
    "save_split",
    "stratified_split",
]
