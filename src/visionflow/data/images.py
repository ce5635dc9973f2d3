"""Safe image decoding: the one place where bytes from a user become pixels.

Every stage that reads an image (checks, training, prediction, serving) goes through
:func:`load_image` or :func:`load_image_bytes`, so they all agree on what a file means: EXIF
orientation applied, the first frame of an animation, transparency composited on white, 16-bit and
float data scaled by their real range, CMYK converted the way Pillow understands Adobe JPEGs. A
file that cannot be used raises :class:`~visionflow.errors.ImageDecodeError` with a short reason a
person can act on; no other exception escapes for bad input.

Images are bounded before they are decoded (see ``DEFAULT_MAX_PIXELS``): the header's width and
height are checked against a per-call limit, so a small file that would expand to gigabytes of
pixels is rejected without allocating them.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionflow.errors import ImageDecodeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageInfo",
    "inspect_image",
    "inspect_image_bytes",
    "load_image",
    "load_image_bytes",
]

#: File name suffixes (lower case, with the dot) that visionflow treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".gif",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
    }
)

#: Largest width * height decoded by default (64 megapixels, about 190 MB as RGB). A limit per
#: call rather than Pillow's global ``MAX_IMAGE_PIXELS`` so that serving can be stricter than
#: training without one changing the other.
DEFAULT_MAX_PIXELS = 64_000_000

# EXIF orientation tag and the transpose that undoes each value (same table as
# PIL.ImageOps.exif_transpose, applied after the colour conversion so it works for every mode).
_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pillow announces a possible decompression bomb with a process-wide warning while it parses the
# header. We silence that one warning category around Image.open only (and apply our own,
# per-call limit right after). ``warnings.catch_warnings`` swaps process-global state, so all of
# our own uses are serialised by this lock; the window is header parsing only, not decoding, so
# threads still decode in parallel.
_OPEN_LOCK = threading.Lock()

_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageInfo:
    """What a decoded file looked like before conversion to RGB.

    Attributes:
        width: Width in pixels after the EXIF orientation is applied (what the model sees).
        height: Height in pixels after the EXIF orientation is applied.
        mode: The file's original Pillow mode (``"RGB"``, ``"L"``, ``"CMYK"``, ``"I;16"``...).
        format: The file format Pillow recognised (``"JPEG"``, ``"PNG"``...), if any.
    """

    width: int
    height: int
    mode: str
    format: str | None


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an image file completely into an RGB image.

    Args:
        path: The image file.
        max_pixels: Largest ``width * height`` accepted; larger images are refused before their
            pixels are decoded (decompression-bomb guard).

    Returns:
        A fully loaded RGB image, independent of the file (which is closed).

    Raises:
        ImageDecodeError: The file is missing, empty, truncated, too large, not an image or in a
            colour mode that cannot be converted; ``reason`` says which.
    """
    return inspect_image(path, max_pixels=max_pixels)[0]


def load_image_bytes(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "<upload>"
) -> Image.Image:
    """Decode an in-memory image (an upload) with exactly the rules of :func:`load_image`.

    Args:
        data: The encoded image file.
        max_pixels: Largest ``width * height`` accepted.
        name: What to call the image in error messages.

    Raises:
        ImageDecodeError: As for :func:`load_image`.
    """
    return inspect_image_bytes(data, max_pixels=max_pixels, name=name)[0]


def inspect_image(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, ImageInfo]:
    """Decode an image file and describe the original (mode, format, oriented size).

    The data checks use this: a file is only declared readable after a full decode, and the
    original mode and format go into the data report.

    Raises:
        ImageDecodeError: As for :func:`load_image`.
    """
    name = os.fspath(path)
    try:
        # stat first: opening a FIFO or a device would block or read forever.
        info = os.stat(name)
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError(name, "is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(name, "not a regular file")
        fh = open(name, "rb")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(name, "permission denied") from None
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(name, f"cannot read file ({_describe(exc)})") from None
    try:
        try:
            size = os.fstat(fh.fileno()).st_size
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot read file ({_describe(exc)})") from None
        if size == 0:
            raise ImageDecodeError(name, "empty file")
        return _decode(fh, name, max_pixels)
    finally:
        fh.close()


def inspect_image_bytes(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "<upload>"
) -> tuple[Image.Image, ImageInfo]:
    """Like :func:`inspect_image`, for an encoded image held in memory."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError(name, f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(name, "empty file")
    with io.BytesIO(data) as fh:
        return _decode(fh, name, max_pixels)


# --------------------------------------------------------------------------------- internals
def _decode(fh: IO[bytes], name: str, max_pixels: int) -> tuple[Image.Image, ImageInfo]:
    """Open, bound, fully decode and convert one image; every failure becomes a reason."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            name, f"image exceeds Pillow's decompression-bomb limit ({exc})"
        ) from None
    except Exception as exc:
        raise ImageDecodeError(name, _reason_for(exc)) from None
    try:
        _check_pixels(name, im.size, max_pixels)
        mode, fmt = im.mode, im.format
        try:
            im.load()  # the first frame of an animation: Image.open leaves us on frame 0
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(
                name, f"image exceeds Pillow's decompression-bomb limit ({exc})"
            ) from None
        _check_pixels(name, im.size, max_pixels)  # a GIF frame may grow the canvas while loading
        orientation = _orientation(im)
        rgb = _to_rgb(im, name)
        method = _ORIENTATION_TRANSPOSE.get(orientation)
        if method is not None:
            rgb = rgb.transpose(method)
        elif rgb is im:
            rgb = im.copy()  # detach from the file object and drop per-file state
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(name, _reason_for(exc)) from None
    finally:
        im.close()
    return rgb, ImageInfo(width=rgb.width, height=rgb.height, mode=mode, format=fmt)


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(name, f"image has an invalid size {width}x{height}")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            name,
            f"image has {pixels} pixels, more than the limit of {max_pixels} "
            "(decompression bomb guard)",
        )


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable: a broken EXIF block is not fatal)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value)
    except Exception:
        return 1


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, preserving what the pixels mean."""
    mode = im.mode
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        # A transparent palette entry or colour key (PNG tRNS, GIF): composite like alpha.
        return _on_white(im.convert("RGBA"))
    if mode == "RGB":
        return im
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        # CMYK: Pillow already undid Adobe's inverted JPEG CMYK while decoding.
        return im.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "PA"):
        return _on_white(im if mode == "RGBA" else im.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_rgb(im)
    try:
        return im.convert("RGB")
    except Exception:
        raise ImageDecodeError(name, f"unsupported colour mode {mode}") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite on white: a transparent background becomes white, not its hidden colour."""
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _scale_to_rgb(im: Image.Image) -> Image.Image:
    """Map high-bit-depth greyscale to 8 bits by its real range instead of clipping at 255.

    ``I;16*`` is 16-bit by definition (0-65535). ``I`` (32-bit int, used for 16-bit PGM/TIFF) is
    read as 16-bit when its values fit in 0-65535, else stretched from its min to its max. ``F``
    (float) is read as 0-1 when it fits, then 0-255, then 0-65535, else stretched.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) / 257.0
    else:
        data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo = float(data.min()) if data.size else 0.0
        hi = float(data.max()) if data.size else 0.0
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = data * 255.0
        elif im.mode == "F" and lo >= 0.0 and hi <= 255.0:
            scaled = data
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = data / 257.0
        elif hi > lo:
            scaled = (data - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(data)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _reason_for(exc: BaseException) -> str:
    """A short, human reason for a decoder exception."""
    lowered = str(exc).lower()
    if isinstance(exc, MemoryError):
        return "not enough memory to decode the image"
    if "truncat" in lowered or isinstance(exc, EOFError):
        return "truncated image data"
    if isinstance(exc, OSError | SyntaxError | ValueError):
        return f"corrupt image data ({_describe(exc)})"
    return f"cannot decode image ({_describe(exc)})"


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text if len(text) <= 160 else text[:157] + "..."
