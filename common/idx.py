"""The IDX file format (the four MNIST files): header parsing and whole-file reads.

Pure numpy, no torch: `serving` streams IDX inputs with the same header parser.
IDX layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08
IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions: count, rows, cols
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension: count


class IdxFormatError(ValueError):
    """An IDX file that is not what was expected; the message names the file."""


@dataclass(frozen=True)
class IdxHeader:
    magic: int
    shape: tuple[int, ...]

    @property
    def nbytes_header(self) -> int:
        return 4 + 4 * len(self.shape)

    @property
    def nbytes_data(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def count(self) -> int:
        return self.shape[0]


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_idx(path: Path) -> BinaryIO:
    """Open an IDX file for reading, decompressing on the fly when it is gzipped."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def read_header(f: BinaryIO, name: str | Path) -> IdxHeader:
    head = f.read(4)
    if len(head) < 4:
        raise IdxFormatError(f"{name}: file too short for an IDX header ({len(head)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", head)
    magic = struct.unpack(">I", head)[0]
    if zero != 0 or dtype != UBYTE or ndim not in (1, 3):
        raise IdxFormatError(
            f"{name}: magic number {magic:#010x} is not an IDX uint8 file "
            f"(expected {IMAGES_MAGIC:#010x} for images or {LABELS_MAGIC:#010x} for labels)"
        )
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise IdxFormatError(f"{name}: IDX header truncated (expected {ndim} dimensions)")
    return IdxHeader(magic=magic, shape=tuple(struct.unpack(f">{ndim}I", dims)))


def expect_header(
    header: IdxHeader, name: str | Path, *, magic: int, count: int | None = None
) -> None:
    """Raise IdxFormatError unless the header is an images (28x28) or labels file as expected."""
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    if header.magic != magic:
        raise IdxFormatError(
            f"{name}: magic number {header.magic:#010x}, expected {magic:#010x} (IDX {kind} file)"
        )
    if magic == IMAGES_MAGIC and header.shape[1:] != (28, 28):
        raise IdxFormatError(f"{name}: images of {header.shape[1:]} pixels, expected (28, 28)")
    if count is not None and header.count != count:
        raise IdxFormatError(f"{name}: header says {header.count} records, expected {count}")


def read_idx(path: Path, *, magic: int, count: int | None = None) -> np.ndarray:
    """Read a whole IDX file (gzipped or not) into a uint8 array of its header's shape."""
    with open_idx(path) as f:
        header = read_header(f, path)
        expect_header(header, path, magic=magic, count=count)
        data = f.read(header.nbytes_data + 1)
    if len(data) != header.nbytes_data:
        raise IdxFormatError(
            f"{path}: {len(data)} data bytes after the header, expected {header.nbytes_data} "
            f"for shape {header.shape} (file truncated or padded)"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(header.shape)
