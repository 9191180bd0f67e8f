"""One image file to 28x28 MNIST pixels: decoding (PNG, JPEG) and the MNIST-way conversion, decided
per image from its content: already framed like MNIST -> resized; a raw digit -> cropped and centred."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common import digests
from common.digests import Algorithm
from common.errors import InputError

IMAGE_SHAPE = (28, 28)


def _grayscale(im: Image.Image) -> np.ndarray:
    """8-bit grayscale pixels (H, W) of any mode; transparency is laid over white (paper)."""
    if im.mode.startswith("I;16"):
        return (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return np.asarray(im if im.mode == "L" else im.convert("L"))


# An image is "framed like MNIST" when its ink's bounding box spans 50-85% of a square-ish canvas
# (MNIST digits: the longer side 20 of 28 pixels, 71%; measured on the test set resized to 56 and 100
# pixels: 71-75%) and its centre of mass lies within 8% of the canvas centre (MNIST resized: <= 3.6%;
# Fashion-MNIST items fill 93-100% of the frame). Such an image is only resized: re-cropping and
# re-centring an already framed digit changes its shape (measured: 95.0% instead of 97.4% accuracy
# on the test set upscaled to 56x56 RGB).
FRAMED_SIDE = (0.50, 0.85)
FRAMED_OFFSET = 0.08
FRAMED_ASPECT = 1.10


def _centre_of_mass(g: np.ndarray) -> tuple[float, float]:
    mass = float(g.sum())
    cy = float((g.sum(axis=1) * np.arange(g.shape[0])).sum() / mass)
    cx = float((g.sum(axis=0) * np.arange(g.shape[1])).sum() / mass)
    return cy, cx


def is_framed(g: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> bool:
    """Whether ink `g` (H, W), with ink pixels at (ys, xs), is already framed the MNIST way."""
    h, w = g.shape
    if max(h, w) > FRAMED_ASPECT * min(h, w):
        return False
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / max(h, w)
    cy, cx = _centre_of_mass(g)
    return (FRAMED_SIDE[0] <= side <= FRAMED_SIDE[1] and abs(cy - (h - 1) / 2) <= FRAMED_OFFSET * h
            and abs(cx - (w - 1) / 2) <= FRAMED_OFFSET * w)


def mnist_pixels(im: Image.Image) -> np.ndarray:
    """(28, 28) uint8, bright digit on black, the way MNIST was made.

    A 28x28 image is taken as is (only converted to 8-bit grayscale). Any other size:
    1. grayscale; transparency laid over white;
    2. polarity: MNIST is bright ink on black, so when the border is mostly light (dark ink on
       paper) the image is inverted; the background level (median of the border) is subtracted;
    3. decided per image from its content: an image already framed like MNIST (`is_framed`: the
       ink spans 50-85% of a square canvas around its centre, e.g. an MNIST digit resized, saved as
       RGB or JPEG) is only resized to 28x28 (Lanczos);
    4. any other image (a raw digit: off centre, small or large on its canvas, not square) is
       contrast-stretched so the strongest ink is 255, cropped to the bounding box of the ink (pixels
       above 20% of the strongest, ignoring faint noise) and resized, preserving the aspect ratio, so
       its longer side is 20 pixels (antialiased), then placed in a 28x28 black field so its centre
       of mass falls on the field's centre.
    A blank image (no ink) gives a black field.
    """
    if im.size == IMAGE_SHAPE:
        return np.ascontiguousarray(_grayscale(im))
    im = ImageOps.exif_transpose(im) or im  # photos from phones are often stored rotated
    g = _grayscale(im).astype(np.float32)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if np.median(border) > 127:
        g = 255.0 - g
        border = 255.0 - border
    g = np.clip(g - np.median(border), 0.0, None)
    top = float(g.max())
    if top <= 0.0:
        return np.zeros(IMAGE_SHAPE, dtype=np.uint8)
    ys, xs = np.nonzero(g > 0.2 * top)
    if is_framed(g, ys, xs):
        # Lanczos (antialiased when reducing) came closest to the IDX accuracy: within 0.01 points on
        # the test set resized to 56/100 pixels, PNG or JPEG (area averaging: within 0.2)
        small = Image.fromarray(np.clip(np.rint(g), 0, 255).astype(np.uint8)).resize(
            IMAGE_SHAPE, Image.Resampling.LANCZOS)
        return np.asarray(small, dtype=np.uint8).copy()
    return _centred(g * (255.0 / top), ys, xs)


def _centred(g: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A raw digit the MNIST way: its ink's bounding box (rows `ys`, columns `xs`) resized so the
    longer side is 20 pixels, placed with its centre of mass at the centre of a 28x28 field."""
    crop = g[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    s = 20.0 / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = Image.fromarray(crop.astype(np.uint8)).resize(
        size, Image.Resampling.LANCZOS, reducing_gap=3.0  # reduce() first: fast on big photos
    )
    d = np.asarray(small, dtype=np.float32)
    if d.sum() <= 0.0:
        return np.zeros(IMAGE_SHAPE, dtype=np.uint8)
    cy, cx = _centre_of_mass(d)
    top_y, left_x = round(13.5 - cy), round(13.5 - cx)  # 13.5: the centre of a 28-pixel field
    out = np.zeros(IMAGE_SHAPE, dtype=np.float32)
    y0, x0 = max(0, top_y), max(0, left_x)
    y1, x1 = min(28, top_y + d.shape[0]), min(28, left_x + d.shape[1])
    out[y0:y1, x0:x1] = d[y0 - top_y : y1 - top_y, x0 - left_x : x1 - left_x]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def open_nofollow(path: Path) -> BinaryIO:
    """`path` opened for reading, unbuffered, refusing a symbolic link (OSError ELOOP): a file of an
    inbox or an image folder is never read through a link, even one swapped in after the listing."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return open(fd, "rb", buffering=0)


def load_image(path: Path, algorithm: Algorithm = digests.DEFAULT) -> tuple[np.ndarray, str]:
    """(28x28 uint8 pixels, the file's digest) for one PNG or JPEG file; InputError otherwise (a
    symbolic link included: see open_nofollow)."""
    try:
        with open_nofollow(path) as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror or e})") from e
    digest = digests.of_bytes(data, algorithm)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as im:
            if im.size != IMAGE_SHAPE and im.format == "JPEG":
                im.draft("L", (160, 160))  # JPEG decodes at 1/2..1/8 scale: big photos cost little
            im.load()
            return mnist_pixels(im), digest
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not a PNG or JPEG image") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: unreadable image ({e}); expected a PNG or JPEG file") from e
