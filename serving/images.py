"""One image file to 28x28 MNIST pixels: decoding (PNG, JPEG) and the MNIST-way conversion."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.errors import InputError

IMAGE_SHAPE = (28, 28)


def _grayscale(im: Image.Image) -> np.ndarray:
    """8-bit grayscale pixels (H, W) of any mode; transparency is laid over white (paper)."""
    if im.mode.startswith("I;16"):
        return (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return np.asarray(im if im.mode == "L" else im.convert("L"))


def mnist_pixels(im: Image.Image) -> np.ndarray:
    """(28, 28) uint8, bright digit on black, the way MNIST was made.

    A 28x28 image is taken as is (only converted to 8-bit grayscale). Any other size:
    1. grayscale; transparency laid over white;
    2. polarity: MNIST is bright ink on black, so when the border is mostly light (dark ink on
       paper) the image is inverted; the background level (median of the border) is subtracted and
       the contrast stretched so the strongest ink is 255;
    3. crop to the bounding box of the ink (pixels above 20% of the strongest, ignoring faint noise)
       and resize it, preserving the aspect ratio, so its longer side is 20 pixels (antialiased);
    4. place it in a 28x28 black field so its centre of mass falls on the field's centre.
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
    g *= 255.0 / top
    ys, xs = np.nonzero(g > 0.2 * 255.0)
    crop = g[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    s = 20.0 / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = Image.fromarray(crop.astype(np.uint8)).resize(
        size, Image.Resampling.LANCZOS, reducing_gap=3.0  # reduce() first: fast on big photos
    )
    d = np.asarray(small, dtype=np.float32)
    mass = d.sum()
    if mass <= 0.0:
        return np.zeros(IMAGE_SHAPE, dtype=np.uint8)
    cy = float((d.sum(axis=1) * np.arange(d.shape[0])).sum() / mass)
    cx = float((d.sum(axis=0) * np.arange(d.shape[1])).sum() / mass)
    top_y, left_x = round(13.5 - cy), round(13.5 - cx)  # 13.5: the centre of a 28-pixel field
    out = np.zeros(IMAGE_SHAPE, dtype=np.float32)
    y0, x0 = max(0, top_y), max(0, left_x)
    y1, x1 = min(28, top_y + d.shape[0]), min(28, left_x + d.shape[1])
    out[y0:y1, x0:x1] = d[y0 - top_y : y1 - top_y, x0 - left_x : x1 - left_x]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_image(path: Path) -> tuple[np.ndarray, str]:
    """(28x28 uint8 pixels, SHA-256 of the file) for one PNG or JPEG file; InputError otherwise."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror or e})") from e
    digest = hashlib.sha256(data).hexdigest()
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
