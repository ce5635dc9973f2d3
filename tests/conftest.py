"""Tiny datasets written to ``tmp_path``: a clean, learnable one and a deliberately broken one."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Classes of :func:`image_folder` and their dominant colour.
COLOURS = {"blue": (30, 40, 220), "green": (40, 200, 50), "red": (220, 40, 30)}
PER_CLASS = 12
SIZE = 32


def noisy_rgb(rng: np.random.Generator, colour: tuple[int, int, int], size=(SIZE, SIZE)):
    """An RGB image of ``size`` (width, height): ``colour`` plus uniform noise of +-40."""
    width, height = size
    noise = rng.integers(-40, 41, size=(height, width, 3))
    pixels = np.clip(np.asarray(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_class_folder(
    root: Path, colours: dict[str, tuple[int, int, int]], per_class: int, seed=0
):
    """``root/<class>/<class>_NN.{png,jpg}``: every third image a JPEG, the rest PNG."""
    rng = np.random.default_rng(seed)
    for name, colour in colours.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = noisy_rgb(rng, colour)
            if i % 3 == 2:
                image.save(folder / f"{name}_{i:02d}.jpg", quality=95)
            else:
                image.save(folder / f"{name}_{i:02d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``tmp_path/data``: 3 classes (blue, green, red) x 12 images of 32x32 px, 8 PNG + 4 JPEG
    each; every class is its colour plus noise, so a tiny model learns it in a few epochs."""
    return write_class_folder(tmp_path / "data", COLOURS, PER_CLASS, seed=0)


# ------------------------------------------------------------------------------ salted
def _jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture
def salted_folder(tmp_path: Path) -> Path:
    """``tmp_path/salted``: a folder-per-class dataset (cats, dogs) with every kind of trouble.

    * 6 good 32x32 images per class (``<class>_NN.png|jpg``);
    * unreadable: ``cats/corrupt.jpg`` (random bytes), ``cats/empty.png`` (0 bytes),
      ``dogs/truncated.jpg`` (first half of a valid JPEG), ``cats/notes.txt`` (text);
    * odd but valid: ``cats/cmyk.jpg`` (CMYK JPEG), ``dogs/deep16.png`` (16-bit greyscale, values
      up to 65535), ``dogs/alpha.png`` (RGBA with transparent pixels), ``cats/rotated.jpg``
      (stored 48x32 with EXIF orientation 6, so it loads as 32x48), ``dogs/anim.gif`` (2
      frames), ``cats/image.bmp``, ``dogs/image.webp``, ``cats/image.tiff``;
    * ``cats/copy_of_00.png``: byte copy of ``cats/cats_00.png`` (duplicate, same label);
    * ``dogs/from_cats_01.png``: byte copy of ``cats/cats_01.png`` (label conflict);
    * ``dogs/tiny.png``: a valid 4x4 image.

    After the checks: 4 unreadable, cats keeps 9 usable images and dogs 11.
    """
    root = tmp_path / "salted"
    write_class_folder(root, {"cats": (200, 120, 40), "dogs": (40, 120, 200)}, 6, seed=1)
    rng = np.random.default_rng(2)
    cats, dogs = root / "cats", root / "dogs"

    (cats / "corrupt.jpg").write_bytes(b"\x00\x01garbage" + rng.bytes(500))
    (cats / "empty.png").write_bytes(b"")
    full = _jpeg_bytes(noisy_rgb(rng, (60, 60, 60), (64, 64)), quality=90)
    (dogs / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (cats / "notes.txt").write_text("these are not the images you are looking for\n")

    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(cats / "cmyk.jpg", quality=95)
    deep = np.zeros((32, 32), dtype=np.uint16)
    deep[:, 16:] = 65535
    deep[0, 0] = 257 * 128
    Image.fromarray(deep).save(dogs / "deep16.png")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # hidden red under full transparency
    rgba[:16, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(dogs / "alpha.png")
    rotated = noisy_rgb(rng, (90, 90, 90), (48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(cats / "rotated.jpg", exif=exif, quality=95)
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(dogs / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    noisy_rgb(rng, (200, 100, 40)).save(cats / "image.bmp")
    noisy_rgb(rng, (40, 100, 200)).save(dogs / "image.webp", quality=90)
    noisy_rgb(rng, (210, 110, 50)).save(cats / "image.tiff")

    shutil.copyfile(cats / "cats_00.png", cats / "copy_of_00.png")
    shutil.copyfile(cats / "cats_01.png", dogs / "from_cats_01.png")
    noisy_rgb(rng, (50, 110, 190), (4, 4)).save(dogs / "tiny.png")
    return root


# ------------------------------------------------------------------------------ a trained run
TINY_TRAIN = {"backbone": "test_efficientnet", "weights": "none", "img_size": 32, "budget": None,
              "epochs": 3, "batch_size": 8, "patience": None, "num_workers": 0}  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (``test_efficientnet``, 32 px) on the 3-colour dataset, shared by the
    session: export and serving tests read it, none may change it."""
    from visionflow.config import load_train_config
    from visionflow.train.recipe import train_classifier

    root = tmp_path_factory.mktemp("trained")
    data = write_class_folder(root / "data", COLOURS, PER_CLASS, seed=0)
    run_dir = root / "runs" / "tiny"
    train_classifier(data, load_train_config(overrides=TINY_TRAIN), run_dir=run_dir)
    return run_dir
