"""A held-out-style object-detection set, written in COCO, Pascal VOC and YOLO by visionflow's
writers, and the check that the three read back as the same records.

Issue 7's acceptance check asks for "a held-out detection set not in this repo (a few hundred
small images, three classes, labels provided in all three formats)". We cannot download one, so
this module composes one from pixels that ship inside packages visionflow already installs.

What is real and what is synthetic
----------------------------------
* **Backgrounds are real photographs**, randomly cropped, zoomed, flipped and colour-jittered:
  scikit-learn's ``china.jpg`` (a temple) and ``flower.jpg``; matplotlib's ``grace_hopper.jpg``;
  PyWavelets' ``camera`` (a man with a camera on a tripod, in a park), ``ascent`` (people on
  a staircase) and ``aero`` (an aerial photograph), grey images given a random tint; and the
  ``jacksboro_fault_dem`` elevation model from matplotlib rendered as shaded relief (real
  terrain, synthetic rendering). A third of the backgrounds blend two of them under a soft
  random mask for clutter. (PyWavelets comes with ImageHash, a visionflow dependency.)
* **``digit``: real handwriting.** One of scikit-learn's 1,797 scanned handwritten digits (8x8,
  16 grey levels), upsampled, smoothed and traced along its ridge into a pen stroke (of random
  width), slightly rotated, in an ink colour that contrasts with what lies under it. At 8x8
  the scans are coarse: large digits read as smooth marker strokes, not fine handwriting.
* **``coin``: synthetic shape, real texture.** An ellipse (a disc seen at a slant) filled with a
  crop of one of the photographs (any hue), shaded as a raised object lit from a random side,
  with a rim, a groove and a highlight; a soft drop shadow half of the time.
* **``card``: synthetic shape, real texture.** A rectangle (aspect 0.5-2, rotated up to 35
  degrees) showing a photograph crop inside a border (near-white or a random colour), with a
  soft drop shadow most of the time: a printed photo lying on the scene.
* **Distractors (not labelled)**, drawn under the objects or, now and then, over them:
  photograph-textured irregular polygons (silhouettes without a border, a rim or shading),
  hollow elliptical arcs (coin-like outlines), pen scribbles, and printed capital letters
  (Pillow's bundled font; letters that look like digits, such as O, I, S, Z and B, are left out).

Object colours come from random crops with random hue shifts, so no class can be told by its
colour: the cues are shape and structure (strokes, a shaded disc, a bordered rectangle).

Each image is 160-320 pixels on a side (aspect 0.6-1, portrait or landscape), holds 1-6 objects
(about 10 % hold none: negatives, with distractors), of COCO's sizes mostly medium (32-96 px)
with some small and some large. Objects may overlap: a later one may hide up to 40 % of an
earlier one and objects may run up to a quarter out of the frame; every box is the tight box of
the object's *visible* pixels (COCO's convention), in whole pixels. The finished image gets a
random exposure change, sometimes a slight blur, sensor noise and JPEG compression (quality
70-95).

Images are assigned train/val/test (70/15/15) by a shuffle, and the three formats keep that
split (COCO ``instances_<split>.json``, VOC ``ImageSets/Main``, YOLO ``images/<split>``).

Everything is a function of the seed: image ``i`` is drawn from ``numpy.random.default_rng((seed,
i))``, so the same seed gives byte-identical images and labels, and another seed gives a
different set (new crops, glyphs, layouts and sizes). "Held out" means that: the source photos
and the 1,797 glyphs are shared by every seed, so a model trained on one seed has seen the same
photographs (other crops of them) that another seed uses.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from visionflow.data.detection import (
    DetectionIndex,
    DetectionSample,
    read_detection,
    write_detection,
)
from visionflow.data.detection.checks import size_bucket
from visionflow.errors import ConfigError, DataError, MissingDependencyError

__all__ = [
    "CLASSES",
    "FORMATS",
    "YOLO_TOLERANCE",
    "GeneratedSet",
    "compare_records",
    "draw_preview",
    "generate_detection_set",
    "verify_detection_set",
]

#: The three object classes (sorted: the readers' class order).
CLASSES = ("card", "coin", "digit")
#: The formats written, one sub-folder each.
FORMATS = ("coco", "voc", "yolo")
#: YOLO stores normalised centres and sizes with 6 decimals: on a 320-pixel side a box edge read
#: back can be off by ~2e-4 px. COCO and VOC must match exactly.
YOLO_TOLERANCE = 1e-3

_SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
_OBJECTS_PER_IMAGE = (1, 2, 3, 4, 5, 6)
_OBJECTS_WEIGHTS = (0.20, 0.25, 0.20, 0.15, 0.12, 0.08)
_NEGATIVE_SHARE = 0.10
#: Share of small / medium / large objects (by the side of the area they are drawn for).
_SIZE_WEIGHTS = (0.15, 0.70, 0.15)
_MIN_VISIBLE = 0.60  # an object keeps at least this share of its pixels visible
_MIN_IN_FRAME = 0.75  # ... and of them inside the image
_MIN_BOX_SIDE = 6  # pixels, the visible box's narrower side
#: Capital letters that do not read as digits (no O, I, L, S, Z, B, G, Q, D, T).
_LETTERS = "ACEFHKMNPRUVWXY"


@dataclass
class GeneratedSet:
    """What :func:`generate_detection_set` wrote.

    Attributes:
        root: The set's folder: ``coco/``, ``voc/``, ``yolo/`` and ``manifest.json``.
        index: The records as generated (paths point into ``coco/``, where the images are).
        seconds: Wall time to draw, write and verify.
        manifest: The counts written to ``manifest.json``.
    """

    root: Path
    index: DetectionIndex
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)

    def dataset(self, format: str) -> Path:
        """The folder of one format (``"coco"``, ``"voc"`` or ``"yolo"``)."""
        return self.root / format


# ------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class _Sources:
    photos: tuple[tuple[str, Image.Image, bool], ...]  # (name, RGB image, is_grey)
    digits: np.ndarray  # (1797, 8, 8) in [0, 1]


@cache
def _sources() -> _Sources:
    """Load the photographs and digits once per process (all from installed packages)."""
    try:
        import matplotlib.cbook as cbook
        import pywt.data
        from matplotlib.colors import LightSource
        from sklearn.datasets import load_digits, load_sample_images
    except ImportError as exc:  # pragma: no cover - all are visionflow dependencies
        raise MissingDependencyError(
            f"the detection benchmark's images come from scikit-learn, matplotlib and "
            f"PyWavelets ({exc}); reinstall visionflow (`pip install -e .`)"
        ) from None
    photos: list[tuple[str, Image.Image, bool]] = []
    samples = load_sample_images()
    for path, pixels in zip(samples.filenames, samples.images, strict=True):
        photos.append((Path(path).name, Image.fromarray(pixels).convert("RGB"), False))
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        photos.append(("grace_hopper.jpg", im.convert("RGB"), False))
    for name in ("camera", "ascent", "aero"):
        grey = np.asarray(getattr(pywt.data, name)(), dtype=np.uint8)
        photos.append((f"pywt.{name}", Image.fromarray(grey).convert("RGB"), True))
    with np.load(cbook.get_sample_data("jacksboro_fault_dem.npz", asfileobj=False)) as dem:
        elevation = np.asarray(dem["elevation"], dtype=np.float64)
    import matplotlib

    relief = LightSource(azdeg=315, altdeg=45).shade(
        elevation, cmap=matplotlib.colormaps["gist_earth"], blend_mode="overlay", vert_exag=0.05
    )
    pixels = (np.clip(relief[..., :3], 0, 1) * 255).astype(np.uint8)
    photos.append(("jacksboro_fault_dem (shaded)", Image.fromarray(pixels), False))
    digits = np.asarray(load_digits().images, dtype=np.float32) / 16.0
    return _Sources(photos=tuple(photos), digits=digits)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# ------------------------------------------------------------------------------ pixels
def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _hue_rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate hue in YIQ space (keeps luminance)."""
    to_yiq = np.array(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
    )
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
    matrix = np.linalg.inv(to_yiq) @ rot @ to_yiq
    return rgb @ matrix.T.astype(np.float32)


def _jitter(rgb: np.ndarray, rng: np.random.Generator, *, grey: bool, hue: float) -> np.ndarray:
    """Tint grey sources, shift hue by up to ``hue`` degrees, vary saturation/contrast/exposure."""
    if grey:
        tint = rng.uniform(0.55, 1.0, size=3).astype(np.float32)
        rgb = rgb * (tint / tint.max())
    if hue:
        rgb = _hue_rotate(rgb, float(rng.uniform(-hue, hue)))
    mean = _luma(rgb)[..., None]
    rgb = mean + (rgb - mean) * rng.uniform(0.6, 1.4)
    rgb = (rgb - 0.5) * rng.uniform(0.75, 1.2) + 0.5
    rgb = rgb * rng.uniform(0.8, 1.2)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def _crop(
    rng: np.random.Generator, w: int, h: int, *, zoom: tuple[float, float], hue: float
) -> np.ndarray:
    """A ``h x w`` crop of a random photograph: crop size ``zoom`` x the output size (bounded
    by the photo), resized, maybe flipped, colour-jittered."""
    _, photo, grey = _sources().photos[int(rng.integers(len(_sources().photos)))]
    pw, ph = photo.size
    z = float(rng.uniform(*zoom))
    z = min(z, pw / w, ph / h)
    cw, ch = max(2, round(w * z)), max(2, round(h * z))
    x0 = int(rng.integers(0, pw - cw + 1))
    y0 = int(rng.integers(0, ph - ch + 1))
    patch = photo.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    rgb = np.asarray(patch, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    return _jitter(rgb, rng, grey=grey, hue=hue)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    zoom = (0.6 * 512 / max(w, h), 1.6 * 512 / max(w, h))
    rgb = _crop(rng, w, h, zoom=zoom, hue=25.0)
    if rng.random() < 0.33:  # clutter: a second photo under a soft, low-frequency mask
        other = _crop(rng, w, h, zoom=zoom, hue=25.0)
        noise = rng.random((max(2, h // 40), max(2, w // 40))).astype(np.float32)
        mask = np.asarray(Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC))
        mask = np.clip((mask - 0.5) * 3 + 0.5, 0, 1)[..., None]
        rgb = rgb * (1 - mask) + other * mask
    return rgb


def _rotate(rgb: np.ndarray, alpha: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a sprite (premultiplied, so edges do not darken), the canvas grown to fit."""
    if abs(degrees) < 0.5:
        return rgb, alpha
    stack = np.concatenate([rgb * alpha[..., None], alpha[..., None]], axis=2)
    out = ndimage.rotate(stack, degrees, axes=(1, 0), reshape=True, order=1, mode="constant")
    a = np.clip(out[..., 3], 0, 1)
    colour = out[..., :3] / np.maximum(a, 1e-4)[..., None]
    return np.clip(colour, 0, 1).astype(np.float32), a.astype(np.float32)


def _ellipse_alpha(w: int, h: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Antialiased ellipse filling ``w x h``; also the normalised coordinates (x, y in [-1, 1])."""
    ys = (np.arange(h + 2 * pad, dtype=np.float32) + 0.5 - pad - h / 2) / (h / 2)
    xs = (np.arange(w + 2 * pad, dtype=np.float32) + 0.5 - pad - w / 2) / (w / 2)
    x, y = np.meshgrid(xs, ys)
    r = np.sqrt(x * x + y * y)
    alpha = np.clip((1 - r) * min(w, h) / 2 + 0.5, 0, 1)
    return alpha.astype(np.float32), x, y


# ------------------------------------------------------------------------------ objects
@dataclass
class _Sprite:
    rgb: np.ndarray
    alpha: np.ndarray
    shadow: float = 0.0  # darkness of a drop shadow (0 = none)
    ink: bool = False  # colour is chosen at placement, to contrast with what lies beneath


def _coin(rng: np.random.Generator, side: float) -> _Sprite:
    aspect = float(rng.uniform(0.7, 1.0))
    d = side / math.sqrt(aspect)
    w, h = max(8, round(d * aspect)), max(8, round(d))
    alpha, x, y = _ellipse_alpha(w, h)
    r = np.sqrt(x * x + y * y)
    tex = _crop(rng, w, h, zoom=(0.5, 3.0), hue=180.0)
    angle = rng.uniform(0, 2 * math.pi)
    lx, ly = math.cos(angle), math.sin(angle)
    lambert = -(x * lx + y * ly)  # -1..1 across the face, bright towards the light
    face = tex * (0.8 + 0.25 * lambert)[..., None]
    rim_colour = tex.mean(axis=(0, 1)) * rng.uniform(0.8, 1.3)
    theta_light = np.clip((x * lx + y * ly) / np.maximum(r, 1e-3), -1, 1)
    rim = rim_colour * (0.9 - 0.45 * theta_light)[..., None]
    rim_width = float(rng.uniform(0.1, 0.2))
    in_rim = np.clip((r - (1 - rim_width)) * min(w, h) / 2, 0, 1)[..., None]
    rgb = face * (1 - in_rim) + rim * in_rim
    groove = np.exp(-(((r - (1 - rim_width)) * min(w, h) / 2) ** 2) / 0.8)[..., None]
    rgb = rgb * (1 - 0.45 * groove)
    hx, hy = -0.45 * lx, -0.45 * ly
    highlight = np.exp(-((x - hx) ** 2 + (y - hy) ** 2) / (2 * 0.18**2))
    rgb = rgb + 0.3 * highlight[..., None]
    rgb, alpha = _rotate(np.clip(rgb, 0, 1), alpha, float(rng.uniform(0, 180)))
    return _Sprite(rgb, alpha, shadow=float(rng.uniform(0.3, 0.5)) if rng.random() < 0.5 else 0)


def _card(rng: np.random.Generator, side: float) -> _Sprite:
    aspect = float(math.exp(rng.uniform(math.log(0.5), math.log(2.0))))
    angle = float(rng.uniform(-35, 35)) if rng.random() < 0.8 else 0.0
    # The rotated box is larger than the card: shrink so that the box is about `side`.
    grow = abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle)))
    w = max(8, round(side * math.sqrt(aspect) / grow))
    h = max(8, round(side / math.sqrt(aspect) / grow))
    border = max(1, round(min(w, h) * rng.uniform(0.05, 0.12)))
    if rng.random() < 0.5:
        frame = np.full(3, rng.uniform(0.85, 1.0), np.float32) * rng.uniform(0.9, 1.0, size=3)
    else:
        frame = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    rgb = np.empty((h, w, 3), np.float32)
    rgb[:] = frame
    inner_w, inner_h = max(1, w - 2 * border), max(1, h - 2 * border)
    rgb[border : border + inner_h, border : border + inner_w] = _crop(
        rng, inner_w, inner_h, zoom=(0.7, 4.0), hue=180.0
    )
    shade = np.linspace(rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), h, dtype=np.float32)
    rgb *= shade[:, None, None]
    alpha = np.ones((h, w), np.float32)
    rgb, alpha = _rotate(rgb, alpha, angle)
    return _Sprite(rgb, alpha, shadow=float(rng.uniform(0.3, 0.55)) if rng.random() < 0.75 else 0)


def _digit(rng: np.random.Generator, side: float) -> _Sprite:
    """A scanned 8x8 digit turned into a pen stroke.

    The grey levels are upsampled and smoothed into a field whose ridge follows the pen; the
    stroke is where the field is close to its local maximum (so weak and strong parts of the
    scan give the same width, and the loops of 0, 6, 8 and 9 stay open) and not faint. The
    closeness cut sets the stroke width, and is made at the final size for crisp edges.
    """
    glyph = _sources().digits[int(rng.integers(len(_sources().digits)))]
    glyph = np.pad(glyph, 2)  # the scans touch their frame: room for the strokes to end
    field = np.asarray(
        Image.fromarray(glyph).resize((96, 96), Image.Resampling.BICUBIC), dtype=np.float32
    )
    field = ndimage.gaussian_filter(field, 3.0)
    field /= max(float(field.max()), 1e-6)
    ridge = field / np.maximum(ndimage.maximum_filter(field, size=7), 1e-6)
    ridge = ndimage.gaussian_filter(ridge, 1.0)  # the square window leaves steps on the edges
    cut = float(rng.uniform(0.7, 0.82))  # lower: bolder strokes

    def stroke(ridge: np.ndarray, field: np.ndarray) -> np.ndarray:
        return np.clip(np.minimum((ridge - cut) / 0.05, (field - 0.25) / 0.05) + 0.5, 0, 1)

    parts, n = ndimage.label(stroke(ridge, field) > 0.5)
    sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
    specks = np.isin(parts, 1 + np.nonzero(sizes < 0.05 * sizes.max())[0])
    field[ndimage.binary_dilation(specks, iterations=3)] = 0.0
    ys, xs = np.nonzero(stroke(ridge, field) > 0.5)
    gh, gw = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    m = 4  # margin, so that the cut at the final size is not clipped
    crop = (
        slice(max(0, ys.min() - m), ys.max() + 1 + m),
        slice(max(0, xs.min() - m), xs.max() + 1 + m),
    )
    ridge, field = ridge[crop], field[crop]
    scale_y = side * math.sqrt(gh / gw) / gh  # the glyph's box is about side x side in area
    scale_x = scale_y * rng.uniform(0.85, 1.15)
    h = max(6, round(field.shape[0] * scale_y))
    w = max(4, round(field.shape[1] * scale_x))

    def scaled(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BICUBIC))

    alpha = stroke(scaled(ridge), scaled(field)).astype(np.float32)
    rgb = np.zeros((*alpha.shape, 3), np.float32)
    rgb, alpha = _rotate(rgb, alpha, float(rng.uniform(-15, 15)))
    return _Sprite(rgb, alpha, ink=True)


_MAKERS = {"card": _card, "coin": _coin, "digit": _digit}


# ------------------------------------------------------------------------------ distractors
def _polygon(rng: np.random.Generator, side: float) -> _Sprite:
    n = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = rng.uniform(0.45, 1.0, n)
    s = max(8, round(side))
    points = [
        (s + s * r * math.cos(a), s + s * r * math.sin(a))
        for r, a in zip(radii, angles, strict=True)
    ]
    mask = Image.new("L", (2 * s, 2 * s))
    ImageDraw.Draw(mask).polygon(points, fill=255)
    small = mask.resize((s, s), Image.Resampling.BOX)
    alpha = np.asarray(small, dtype=np.float32) / 255.0
    return _Sprite(_crop(rng, s, s, zoom=(0.5, 3.0), hue=180.0), alpha)


def _strokes(rng: np.random.Generator, side: float, kind: str) -> _Sprite:
    """Pen scribbles, an elliptical arc or a printed letter, drawn at 2x and downsampled."""
    s = max(10, round(side))
    mask = Image.new("L", (2 * s, 2 * s))
    draw = ImageDraw.Draw(mask)
    width = int(rng.integers(2, 8))
    if kind == "scribble":
        for _ in range(int(rng.integers(1, 4))):
            p = rng.uniform(0, 2 * s, size=(3, 2))
            t = np.linspace(0, 1, 24)[:, None]
            curve = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]
            draw.line([tuple(q) for q in curve], fill=255, width=width, joint="curve")
    elif kind == "arc":
        aspect = rng.uniform(0.6, 1.0)
        start = float(rng.uniform(0, 360))
        box = (width, width + s * (1 - aspect), 2 * s - width, 2 * s - width - s * (1 - aspect))
        draw.arc(box, start, start + float(rng.uniform(120, 330)), fill=255, width=width + 2)
    else:  # a letter
        letter = _LETTERS[int(rng.integers(len(_LETTERS)))]
        font = _font(int(1.6 * s))
        draw.text((s, s), letter, fill=255, font=font, anchor="mm")
    alpha = np.asarray(mask.resize((s, s), Image.Resampling.BOX), dtype=np.float32) / 255.0
    rgb, alpha = _rotate(np.zeros((s, s, 3), np.float32), alpha, float(rng.uniform(-20, 20)))
    return _Sprite(rgb, alpha, ink=True)


def _distractor(rng: np.random.Generator, side: float) -> _Sprite:
    kind = ("polygon", "scribble", "arc", "letter")[int(rng.integers(4))]
    return _polygon(rng, side) if kind == "polygon" else _strokes(rng, side, kind)


# ------------------------------------------------------------------------------ composing
@dataclass
class _Placed:
    label: str
    total: float  # alpha sum of the whole sprite
    visible: np.ndarray  # canvas-sized visible alpha


def _on_canvas(alpha: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """The sprite's ``alpha`` placed with its top-left at (x0, y0) on an ``h x w`` canvas."""
    out = np.zeros((h, w), np.float32)
    sh, sw = alpha.shape
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(w, x0 + sw), min(h, y0 + sh)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0:cy1, cx0:cx1] = alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return out


def _visible_box(visible: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(visible > 0.5)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _box_ok(visible: np.ndarray) -> bool:
    box = _visible_box(visible)
    return box is not None and min(box[2] - box[0], box[3] - box[1]) >= _MIN_BOX_SIDE


def _ink_colour(rng: np.random.Generator, under: float) -> np.ndarray:
    """A random hue whose luminance is far from the ``under`` luminance."""
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    target = float(rng.uniform(0.02, 0.25)) if under > 0.5 else float(rng.uniform(0.75, 0.98))
    colour = colour * (target / max(float(_luma(colour)), 1e-3))
    if colour.max() > 1:  # too bright a hue for the target: blend towards white
        colour = colour / colour.max()
        lum = float(_luma(colour))
        k = (target - lum) / max(1 - lum, 1e-3)
        colour = colour + (1 - colour) * np.clip(k, 0, 1)
    return np.clip(colour, 0, 1)


def _composite(
    canvas: np.ndarray, sprite: _Sprite, x0: int, y0: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``sprite`` onto ``canvas`` in place; returns its alpha on the canvas."""
    h, w = canvas.shape[:2]
    a = _on_canvas(sprite.alpha, x0, y0, w, h)
    if sprite.shadow:
        off = max(1, round(0.06 * max(sprite.alpha.shape)))
        blurred = ndimage.gaussian_filter(sprite.alpha, max(1.0, off / 1.5))
        shadow = _on_canvas(blurred, x0 + off, y0 + off, w, h)
        canvas *= (1 - sprite.shadow * shadow)[..., None]
    if sprite.ink:
        under = float((_luma(canvas) * a).sum() / max(float(a.sum()), 1e-6))
        rgb = np.broadcast_to(_ink_colour(rng, under), (h, w, 3))
        ramp = 1 + rng.uniform(-0.12, 0.12) * np.linspace(-1, 1, w, dtype=np.float32)
        rgb = rgb * ramp[None, :, None]  # uneven ink or light across the image
    else:
        rgb = np.zeros((h, w, 3), np.float32)
        sh, sw = sprite.alpha.shape
        cx0, cy0 = max(0, x0), max(0, y0)
        cx1, cy1 = min(w, x0 + sw), min(h, y0 + sh)
        if cx1 > cx0 and cy1 > cy0:
            rgb[cy0:cy1, cx0:cx1] = sprite.rgb[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    canvas *= (1 - a)[..., None]
    canvas += rgb * a[..., None]
    return a


def _try_place(
    rng: np.random.Generator,
    sprite: _Sprite,
    placed: list[_Placed],
    size: tuple[int, int],
    *,
    near: bool,
) -> tuple[int, int, np.ndarray] | None:
    """A position where the sprite is mostly in frame and hides no earlier object too much."""
    w, h = size
    sh, sw = sprite.alpha.shape
    total = float(sprite.alpha.sum())
    for _ in range(30):
        if near and placed:  # beside an earlier object, to make overlaps
            box = _visible_box(placed[int(rng.integers(len(placed)))].visible)
            if box is None:
                continue
            cx = (box[0] + box[2]) / 2 + rng.uniform(-1, 1) * (box[2] - box[0] + sw) / 2
            cy = (box[1] + box[3]) / 2 + rng.uniform(-1, 1) * (box[3] - box[1] + sh) / 2
            x0, y0 = round(cx - sw / 2), round(cy - sh / 2)
        else:
            x0 = int(rng.integers(-sw // 4, max(-sw // 4 + 1, w - 3 * sw // 4 + 1)))
            y0 = int(rng.integers(-sh // 4, max(-sh // 4 + 1, h - 3 * sh // 4 + 1)))
        a = _on_canvas(sprite.alpha, x0, y0, w, h)
        if a.sum() < _MIN_IN_FRAME * total or not _box_ok(a):
            continue
        if all(
            float((p.visible * (1 - a)).sum()) >= _MIN_VISIBLE * p.total
            and _box_ok(p.visible * (1 - a))
            for p in placed
        ):
            return x0, y0, a
    return None


def _side(rng: np.random.Generator, short: int) -> float:
    """The side of the area an object is drawn for: mostly COCO-medium (32-96 px)."""
    bucket = int(rng.choice(3, p=_SIZE_WEIGHTS))
    low, high = ((12.0, 31.0), (33.0, 94.0), (98.0, min(200.0, 0.75 * short)))[bucket]
    return float(math.exp(rng.uniform(math.log(low), math.log(max(low, high)))))


def _draw_image(seed: int, i: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[str]]:
    """Image ``i`` of the set of ``seed``: pixels (uint8), visible boxes and their labels."""
    rng = np.random.default_rng((seed, i))
    long_side = int(rng.integers(200, 321))
    short_side = min(long_side, max(160, round(long_side * rng.uniform(0.6, 1.0))))
    w, h = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
    canvas = _background(rng, w, h)
    n_objects = (
        0
        if rng.random() < _NEGATIVE_SHARE
        else int(rng.choice(_OBJECTS_PER_IMAGE, p=_OBJECTS_WEIGHTS))
    )
    n_distract = int(rng.integers(0, 5))
    over = [rng.random() < 0.15 for _ in range(n_distract)]
    placed: list[_Placed] = []
    for k in range(n_distract):  # under the objects
        if not over[k]:
            sprite = _distractor(rng, float(rng.uniform(14, 0.45 * min(w, h))))
            spot = _try_place(rng, sprite, [], (w, h), near=False)
            if spot is not None:
                _composite(canvas, sprite, spot[0], spot[1], rng)
    for _ in range(n_objects):
        label = CLASSES[int(rng.integers(len(CLASSES)))]
        sprite = _MAKERS[label](rng, _side(rng, min(w, h)))
        spot = _try_place(rng, sprite, placed, (w, h), near=rng.random() < 0.25)
        if spot is None:
            continue
        a = _composite(canvas, sprite, spot[0], spot[1], rng)
        for p in placed:
            p.visible = p.visible * (1 - a)
        placed.append(_Placed(label, float(sprite.alpha.sum()), a))
    for k in range(n_distract):  # over them, hiding a little at most
        if over[k]:
            sprite = _distractor(rng, float(rng.uniform(14, 0.3 * min(w, h))))
            spot = _try_place(rng, sprite, placed, (w, h), near=True)
            if spot is not None:
                a = _composite(canvas, sprite, spot[0], spot[1], rng)
                for p in placed:
                    p.visible = p.visible * (1 - a)
    # the camera: exposure, a little blur sometimes, noise (JPEG comes when saving)
    canvas = (canvas - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.06, 0.06)
    if rng.random() < 0.3:
        canvas = ndimage.gaussian_filter(canvas, (rng.uniform(0.3, 0.9),) * 2 + (0,))
    canvas = canvas + rng.normal(0, rng.uniform(0.0, 0.025), canvas.shape)
    pixels = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    boxes, labels = [], []
    for p in placed:
        box = _visible_box(p.visible)
        if box is not None and min(box[2] - box[0], box[3] - box[1]) >= _MIN_BOX_SIDE:
            boxes.append(box)
            labels.append(p.label)
    return pixels, boxes, labels


def _splits(seed: int, n: int) -> list[str]:
    order = np.random.default_rng((seed, 1 << 30)).permutation(n)
    out = [""] * n
    start = 0
    for k, (name, share) in enumerate(_SPLITS):
        stop = n if k == len(_SPLITS) - 1 else start + round(share * n)
        for position in order[start:stop]:
            out[int(position)] = name
        start = stop
    return out


# ------------------------------------------------------------------------------ public
def generate_detection_set(
    root: str | Path, *, images: int = 300, seed: int = 7, verify: bool = True
) -> GeneratedSet:
    """Draw ``images`` images and write them in COCO, VOC and YOLO under ``root``.

    The images are drawn into a staging folder, described as a
    :class:`~visionflow.data.detection.DetectionIndex` and written by
    :func:`~visionflow.data.detection.write_detection` once per format (hard links, so the
    pixels are stored once); the staging folder is then removed. ``manifest.json`` records the
    seed, the sources and the counts (per class, per COCO size, per split, negatives).

    Args:
        root: A new (or empty) folder.
        images: How many images (at least 3, one per split).
        seed: Different seeds give different sets; the same seed the same bytes.
        verify: Read the three formats back and check they equal the generated records
            (:func:`verify_detection_set`).

    Raises:
        ConfigError: ``images`` is below 3.
        DataError: ``root`` holds files, or the formats do not read back the same.
    """
    if images < 3:
        raise ConfigError(f"--images must be at least 3 (one per split), got {images}")
    root = Path(root).expanduser().resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} already exists and is not empty; give a new folder")
    start = time.monotonic()
    staging = root / ".staging"
    staging.mkdir(parents=True)
    splits = _splits(seed, images)
    samples = []
    for i in range(images):
        pixels, boxes, labels = _draw_image(seed, i)
        path = staging / f"img_{i:05d}.jpg"
        quality = int(np.random.default_rng((seed, i, 1)).integers(70, 96))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        path.write_bytes(buffer.getvalue())
        samples.append(
            DetectionSample(
                path=path,
                width=pixels.shape[1],
                height=pixels.shape[0],
                boxes=tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes),
                labels=tuple(labels),
                split=splits[i],
            )
        )
    generated = DetectionIndex(root=staging, samples=samples, classes=list(CLASSES), format="gen")
    for fmt in FORMATS:
        write_detection(generated, root / fmt, format=fmt)
    shutil.rmtree(staging)
    index = read_detection(root / "coco", format="coco")
    if verify:
        verify_detection_set(root, truth=generated)
    manifest = _manifest(index, seed)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return GeneratedSet(root=root, index=index, seconds=time.monotonic() - start, manifest=manifest)


def _manifest(index: DetectionIndex, seed: int) -> dict[str, Any]:
    sizes = Counter(size_bucket(b) for s in index.samples for b in s.boxes)
    per_image = Counter(len(s) for s in index.samples)
    return {
        "generator": "benchmarks/_detection_data.py",
        "seed": seed,
        "images": len(index.samples),
        "boxes": index.num_boxes,
        "classes": list(index.classes),
        "boxes_per_class": index.counts(),
        "boxes_per_size": {k: sizes.get(k, 0) for k in ("small", "medium", "large")},
        "images_per_box_count": {str(k): per_image[k] for k in sorted(per_image)},
        "negatives": per_image.get(0, 0),
        "images_per_split": dict(Counter(s.split for s in index.samples)),
        "image_sizes": {
            "min_side": min(min(s.width, s.height) for s in index.samples),
            "max_side": max(max(s.width, s.height) for s in index.samples),
        },
        "sources": [name for name, _, _ in _sources().photos]
        + ["sklearn digits (1,797 handwritten 8x8)", "Pillow's default font (distractors)"],
    }


def _by_name(index: DetectionIndex, where: str) -> dict[str, DetectionSample]:
    out = {s.path.name: replace(s, path=Path(s.path.name)) for s in index.samples}
    if len(out) != len(index.samples):
        raise DataError(f"{where}: two images share a file name; the records cannot be matched")
    return out


def compare_records(
    a: DetectionIndex, b: DetectionIndex, *, tol: float = 0.0, names: tuple[str, str] = ("a", "b")
) -> tuple[list[str], float]:
    """Differences between two readings of the same labels, matched by image file name.

    Everything (classes, sizes, labels, flags, splits, box order) must be equal; box
    coordinates may differ by up to ``tol`` pixels (0: exactly equal records).

    Returns:
        A list of differences for a person (empty when equal) and the largest box-coordinate
        difference seen, in pixels.
    """
    na, nb = names
    problems: list[str] = []
    if a.classes != b.classes:
        problems.append(f"classes differ: {na} {a.classes} vs {nb} {b.classes}")
    ra, rb = _by_name(a, na), _by_name(b, nb)
    for name in sorted(ra.keys() ^ rb.keys()):
        problems.append(f"{name}: only in {na if name in ra else nb}")
    worst = 0.0
    for name in sorted(ra.keys() & rb.keys()):
        sa, sb = ra[name], rb[name]
        before = len(problems)
        for attr in ("width", "height", "labels", "iscrowd", "difficult", "split"):
            if getattr(sa, attr) != getattr(sb, attr):
                problems.append(
                    f"{name}: {attr} {getattr(sa, attr)!r} ({na}) vs {getattr(sb, attr)!r} ({nb})"
                )
        if len(sa.boxes) != len(sb.boxes):
            continue  # already reported through labels
        for k, (box_a, box_b) in enumerate(zip(sa.boxes, sb.boxes, strict=True)):
            diff = max(abs(p - q) for p, q in zip(box_a, box_b, strict=True))
            worst = max(worst, diff)
            if diff > tol:
                problems.append(f"{name}: box {k + 1} {box_a} ({na}) vs {box_b} ({nb})")
        if tol == 0.0 and sa != sb and len(problems) == before:
            problems.append(f"{name}: records differ ({na} {sa} vs {nb} {sb})")
    return problems, worst


def verify_detection_set(
    root: str | Path, *, truth: DetectionIndex | None = None
) -> dict[str, Any]:
    """Read ``root/coco``, ``root/voc`` and ``root/yolo`` and check they are the same records.

    COCO and VOC must be equal exactly (to ``truth`` too, when given); YOLO within
    :data:`YOLO_TOLERANCE` pixels (its 6-decimal normalised numbers). Each format must also be
    recognised by ``format="auto"`` and read without issues.

    Returns:
        Per format: images, boxes, issues and the largest box difference from the reference
        (``truth``, else COCO), in pixels.

    Raises:
        DataError: A format is missing, is detected as another, reports issues, or differs.
    """
    root = Path(root)
    readings: dict[str, DetectionIndex] = {}
    for fmt in FORMATS:
        if not (root / fmt).is_dir():
            raise DataError(f"{root / fmt}: missing; expected the {fmt} version of the set here")
        readings[fmt] = read_detection(root / fmt, format="auto")
        if readings[fmt].format != fmt:
            raise DataError(
                f"{root / fmt}: detected as {readings[fmt].format!r}, not {fmt!r}; the layout "
                "written is not the one the readers expect"
            )
    reference_name = "generated" if truth is not None else "coco"
    reference = truth if truth is not None else readings["coco"]
    report: dict[str, Any] = {}
    problems: list[str] = []
    for fmt, index in readings.items():
        problems += [f"{fmt}: {i.kind} at {i.source}: {i.message}" for i in index.issues]
        tol = YOLO_TOLERANCE if fmt == "yolo" else 0.0
        diffs, worst = compare_records(reference, index, tol=tol, names=(reference_name, fmt))
        problems += diffs
        report[fmt] = {
            "images": len(index),
            "boxes": index.num_boxes,
            "issues": len(index.issues),
            "max_box_difference_px": worst,
        }
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{root}: the COCO, VOC and YOLO versions do not read back as the same records "
            f"({len(problems)} difference(s)):\n  {shown}{more}"
        )
    return report


#: Box colours of the previews, per class.
_PREVIEW_COLOURS = {"card": (255, 60, 60), "coin": (60, 220, 60), "digit": (60, 140, 255)}


def draw_preview(
    index: DetectionIndex, out: str | Path, *, count: int = 4, scale: int = 2
) -> list[Path]:
    """Save ``count`` images of ``index`` (the first ones with 2+ boxes, then a negative) with
    their boxes and labels drawn, ``scale`` x larger, as PNG files in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    busy = [s for s in index.samples if len(s) >= 2]
    negatives = [s for s in index.samples if len(s) == 0]
    chosen = busy[: max(0, count - 1)] + negatives[:1]
    chosen += [s for s in index.samples if s not in chosen][: count - len(chosen)]
    written = []
    for sample in chosen[:count]:
        with Image.open(sample.path) as im:
            image = im.convert("RGB").resize(
                (sample.width * scale, sample.height * scale), Image.Resampling.NEAREST
            )
        draw = ImageDraw.Draw(image)
        for box, label in zip(sample.boxes, sample.labels, strict=True):
            colour = _PREVIEW_COLOURS.get(label, (255, 255, 0))
            x1, y1, x2, y2 = (v * scale for v in box)
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=2)
            draw.text((x1 + 3, y1 + 2), label, fill=colour, font=_font(12))
        path = out / f"{sample.path.stem}_{len(sample)}boxes.png"
        image.save(path)
        written.append(path)
    return written
