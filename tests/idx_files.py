"""Writers of small synthetic IDX datasets (raw or gzipped) for the data-stage tests."""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np

from nn_core.datasets import IMAGES, DatasetSpec, FileSpec


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def synthetic_dataset(folder: Path, *, n_train: int = 120, n_test: int = 40, gz: bool = True, seed: int = 0) -> DatasetSpec:
    """Write four IDX files into `folder` and return a DatasetSpec that pins their checksums."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = rng.integers(0, 10, n_train, dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test, dtype=np.uint8)
    arrays = {
        "train_images": _images(rng, train_labels),
        "train_labels": train_labels,
        "test_images": _images(rng, test_labels),
        "test_labels": test_labels,
    }
    names = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
    files = []
    for role, arr in arrays.items():
        raw = idx_bytes(arr)
        path = folder / (names[role] + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)
        files.append(FileSpec(role, names[role], IMAGES if arr.ndim == 3 else "labels", len(arr),
                              sha256=hashlib.sha256(raw).hexdigest()))
    return DatasetSpec(name="mnist", files=tuple(files), mirrors=("http://unused/",),
                       classes=tuple(str(d) for d in range(10)), train_size=n_train - n_train // 6)


def _images(rng, labels: np.ndarray) -> np.ndarray:
    """Noise with a bright 4x4 block whose position encodes the label: learnable in a few steps."""
    images = rng.integers(0, 120, (len(labels), 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        r, c = 2 + 6 * (y // 4), 2 + 6 * (y % 4)
        images[i, r : r + 4, c : c + 4] = 255
    return images


def raw_content(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def rewrite(path: Path, content: bytes) -> None:
    """Replace a file's uncompressed content, keeping its wrapper (gzip or not)."""
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)


def with_train_size(spec: DatasetSpec, n: int) -> DatasetSpec:
    return replace(spec, train_size=n)
