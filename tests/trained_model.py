"""One digit model per test process for the serving tests that need a real one (drift, the hourly
deployment, the real test set): serving_fixtures.train_quickly on MNIST's first 50,000 training images
(~94% on the test set), trained the first time a test asks and kept for the others."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from common import idx
from needs import missing


def read(src: Path, name: str, magic: int) -> np.ndarray:
    """An IDX file of the source folder, plain or gzipped."""
    for f in (src / name, src / f"{name}.gz"):
        if f.is_file():
            return idx.read_idx(f, magic=magic)
    missing(f"{src} has no {name}")


@functools.cache
def train_images(src: Path) -> np.ndarray:
    return read(src, "train-images-idx3-ubyte", idx.IMAGES_MAGIC)


@functools.cache
def _weights(src: Path) -> tuple[tuple[str, np.ndarray], ...]:
    from serving_fixtures import train_quickly

    y = read(src, "train-labels-idx1-ubyte", idx.LABELS_MAGIC)
    return tuple(train_quickly(train_images(src)[:50_000], y[:50_000]).items())


def digit_weights(src: Path) -> dict[str, np.ndarray]:
    """The trained MLP's weights (serving_fixtures.mlp_onnx makes the model); a copy each call."""
    return {name: w.copy() for name, w in _weights(Path(src).resolve())}
