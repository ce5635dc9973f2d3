import io

import numpy as np
import pytest
from PIL import Image

from visionflow.data.images import inspect_image, load_image, load_image_bytes
from visionflow.errors import ImageDecodeError


def _pixels(image):
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, but...
    rgba[:4, :, 3] = 255  # ...only the top half is opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    px = _pixels(load_image(tmp_path / "a.png"))
    assert (px[:4] == (255, 0, 0)).all()
    assert (px[4:] == (255, 255, 255)).all()  # not the hidden red


def test_palette_with_transparency_and_la(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert (_pixels(load_image(tmp_path / "p.png")) == (0, 128, 255)).all()
    pal.save(tmp_path / "pt.png", transparency=1)
    assert (_pixels(load_image(tmp_path / "pt.png")) == 255).all()
    Image.new("LA", (4, 4), (10, 0)).save(tmp_path / "la.png")
    assert (_pixels(load_image(tmp_path / "la.png")) == 255).all()


def test_16_bit_is_scaled_not_clipped(tmp_path):
    deep = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    image, info = inspect_image(tmp_path / "d.png")
    assert info.mode.startswith("I")
    assert _pixels(image)[0, :, 0].tolist() == [0, 128, 255, 4]


def test_cmyk_jpeg_and_greyscale(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    image, info = inspect_image(tmp_path / "c.jpg")
    assert info.mode == "CMYK" and info.format == "JPEG"
    r, g, b = _pixels(image).mean(axis=(0, 1))
    assert r > 240 and g < 15 and b < 15  # red, not its inverse
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert (_pixels(load_image(tmp_path / "l.png")) == 77).all()


def test_exif_rotation_swaps_width_and_height(tmp_path):
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:, :24] = (255, 0, 0)  # left half red, right half black
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image, info = inspect_image(tmp_path / "r.jpg")
    assert image.size == (32, 48) and (info.width, info.height) == (32, 48)
    px = _pixels(image)
    assert px[:20, :, 0].mean() > 230  # the left half is now on top
    assert px[28:, :, 0].mean() < 25


def test_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(tmp_path / "a.gif") as check:
        assert check.n_frames == 2
    assert (_pixels(load_image(tmp_path / "a.gif")) == (255, 0, 0)).all()


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP"])
def test_other_formats(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (10, 6), (0, 200, 0)).save(
        path, fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    image, info = inspect_image(path)
    assert image.size == (10, 6) and info.format == fmt
    assert (_pixels(image) == (0, 200, 0)).all()


def test_pixel_limit_refuses_before_decoding(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match="limit of 1000") as err:
        load_image(tmp_path / "big.png", max_pixels=1000)
    assert err.value.path == str(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=1024).size == (32, 32)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty file"),
        ("junk.jpg", b"\x00\x01 definitely not an image" * 20, "not an image"),
        ("notes.txt", b"hello\n", "not an image"),
    ],
)
def test_bad_files_raise_decode_error_naming_the_path(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason) as err:
        load_image(path)
    assert err.value.path == str(path) and str(path) in str(err.value)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated") as err:
        load_image(tmp_path / "t.jpg")
    assert str(tmp_path / "t.jpg") in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(tmp_path)


def test_bytes_follow_the_same_rules():
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, "PNG")
    assert (_pixels(load_image_bytes(buf.getvalue())) == 255).all()
    with pytest.raises(ImageDecodeError, match="<upload>: empty file"):
        load_image_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"up\.bin"):
        load_image_bytes(b"garbage", name="up.bin")
