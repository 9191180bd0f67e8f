"""Chunked readers of images and labels with bounded memory, whatever the input size.

Inputs: an IDX images file (gzipped or not), a `.npy` array (uint8 or float, `(N, 28, 28)` or
`(N, 784)`), or a folder of PNG/JPEG images. Every reader yields `Chunk`s of at most `batch_size`
uint8 `(B, 28, 28)` images and hashes the bytes it reads as they pass, so the input digest costs no
second read of the file. The digest is BLAKE3 unless the caller asks for another (common.digests).

Files are read with `readinto` into per-chunk buffers rather than through a memory map: the pages
of a map count in the process's RSS as they are touched, so a 1,000,000-image `.npy` would show
784 MB of RSS at the end of a memory-mapped pass. `np.load(mmap_mode="r")` is only used to parse the
`.npy` header (and to read Fortran-ordered arrays, whose records are not contiguous).

Float arrays: a first pass checks every record (NaN/inf, values outside 0..255) and finds the
largest value; when it is <= 1.0 the array is taken as 0..1 intensities and scaled by 255, otherwise
as 0..255 pixel values. Values are rounded to the nearest integer.

Folder images are converted "the MNIST way" (see `serving.images.mnist_pixels`).

Inputs are untrusted: inside an image folder a symbolic link (to a file or a folder) is never
followed; it is not a record and is listed in the manifest's `links` (a link could point anywhere:
/etc/shadow, another user's folder). Every file of a folder is opened with O_NOFOLLOW, so a file
swapped for a link after the listing is refused as unreadable rather than followed. A path the user
names (`--input`, `--labels`) may itself be a link: the user chose it.

With `on_error="skip"`, bad images in a folder and bad records of a float array (NaN/inf or out of
range) are skipped and listed in `reader.skipped`; everything else (wrong shape or dtype, truncated
files, an empty input) always fails, because no record of such an input can be trusted.
"""

from __future__ import annotations

import gzip
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from common import digests, idx
from common.digests import Algorithm
from serving.config import OnError
from common.errors import InputError
from serving.images import IMAGE_SHAPE, load_image, open_nofollow

PIXELS = 28 * 28
_BLOCK = 1 << 20  # bytes per read when hashing a whole file
_DECODE_TASK = 256  # files per thread-pool task: fewer, larger tasks keep the GIL hand-offs rare
_SMALL_IMAGE_BYTES = 16 << 10  # a 28x28 PNG is ~0.3-1 kB, a photo hundreds of kB


@dataclass(frozen=True)
class Skipped:
    index: int  # position of the record in the input (folder: in the sorted file list)
    id: str  # file name, or the index as text
    reason: str


@dataclass
class Chunk:
    """Records [start, stop) of the input, less any skipped ones."""

    start: int
    stop: int
    pixels: np.ndarray  # (B, 28, 28) uint8, B <= stop - start
    keep: np.ndarray | None = None  # positions in [start, stop) that `pixels` holds; None: all
    names: list[str] | None = None  # folder input: the file names of the kept records

    def positions(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64) if self.keep is None else self.keep


class ImageReader(ABC):
    """One input. `count` is the number of records before skipping; `digest()` is the hex digest of
    the input file(s) (`algorithm`'s, BLAKE3 by default: common.digests) and is complete once
    `chunks()` has run to the end. A file opened with `hashed=False` is read without hashing (its
    caller knows the digest and that the file did not change; see serving.inbox): `digest()` is then
    None."""

    kind: str = ""
    id_kind: Literal["index", "file"] = "index"
    labels_csv: Path | None = None  # a folder's own labels file
    labels: np.ndarray | None = None  # its labels, one per record

    def __init__(self, path: Path, count: int, on_error: OnError, hashed: bool = True,
                 algorithm: Algorithm = digests.DEFAULT):
        if count == 0:
            raise InputError(f"{path}: empty input (0 images)")
        self.path = path
        self.count = count
        self.on_error = on_error
        self.skipped: list[Skipped] = []
        self.details: dict[str, object] = {}
        self.algorithm = algorithm
        self._hash = digests.hasher(algorithm) if hashed else None
        self._done = False

    @abstractmethod
    def chunks(self, batch_size: int) -> Iterator[Chunk]: ...

    def digest(self) -> str | None:
        if not self._done:
            raise RuntimeError(f"{self.path}: digest asked for before the whole input was read")
        return self._hash.hexdigest() if self._hash is not None else None


class _HashingReader(io.RawIOBase):
    """A raw file that feeds every byte read through a hash; gzip reads its compressed bytes via this."""

    def __init__(self, raw: BinaryIO, h: digests.Hasher):
        self._raw, self._h = raw, h

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._raw.readinto(b)
        if n:
            self._h.update(memoryview(b)[:n])
        return n

    def drain(self) -> None:
        """Hash the rest of the file (e.g. what follows the gzip stream), so the digest is the file's."""
        while self.read(_BLOCK):  # through readinto, which hashes
            pass

    def close(self) -> None:
        self._raw.close()
        super().close()


def _read_into(f: BinaryIO, buf: memoryview) -> int:
    """Fill buf as far as the stream allows; return the number of bytes read."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _open_hashed(path: Path, h: digests.Hasher | None) -> tuple[BinaryIO, _HashingReader | None]:
    """The file to read (gunzipped if need be) and its hashing layer; with h None, the plain file."""
    raw = open_nofollow(path) if h is None else _HashingReader(open_nofollow(path), h)
    f = gzip.GzipFile(fileobj=raw, mode="rb") if idx.is_gzip(path) else raw
    return f, raw if h is not None else None  # type: ignore[return-value]


def _check_pixels(x: np.ndarray, start: int, path: Path, on_error: OnError) -> np.ndarray:
    """Per-record validity of float pixels (B, 784): finite and within 0..255."""
    finite = np.isfinite(x).all(axis=1)
    with np.errstate(invalid="ignore"):
        in_range = ((x >= 0) & (x <= 255)).all(axis=1)
    ok = finite & in_range
    if on_error == "fail" and not ok.all():
        i = int(np.argmin(ok))
        what = "NaN or infinite values" if not finite[i] else "values outside 0..255"
        raise InputError(
            f"{path}: record {start + i} has {what}; expected finite pixel values in 0..255 (or 0..1)"
        )
    return ok


# --- IDX --------------------------------------------------------------------------------------------


class IdxReader(ImageReader):
    kind = "idx"

    def __init__(self, path: Path, on_error: OnError = "fail", hashed: bool = True,
                 algorithm: Algorithm = digests.DEFAULT):
        self.gzipped = idx.is_gzip(path)
        opener = gzip.open if self.gzipped else open
        try:
            with opener(path, "rb") as f:
                header = idx.read_header(f, path)
            idx.expect_header(header, path, magic=idx.IMAGES_MAGIC)
        except idx.IdxFormatError as e:
            raise InputError(str(e)) from e
        except (OSError, EOFError) as e:  # a corrupt gzip stream
            raise InputError(f"{path}: not a readable IDX file ({e})") from e
        self._header = header
        if not self.gzipped:
            # The size of an uncompressed file says up front whether it is truncated or padded.
            expected = header.nbytes_header + header.nbytes_data
            size = path.stat().st_size
            if size != expected:
                raise InputError(
                    f"{path}: {size} bytes, expected {expected} for {header.count} images of 28x28 "
                    f"(file {'truncated' if size < expected else 'padded'})"
                )
        super().__init__(path, header.count, on_error, hashed, algorithm)
        self.kind = "idx.gz" if self.gzipped else "idx"

    def chunks(self, batch_size: int) -> Iterator[Chunk]:
        f, raw = _open_hashed(self.path, self._hash)
        with f:
            f.read(self._header.nbytes_header)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                pixels = np.empty((n, *IMAGE_SHAPE), dtype=np.uint8)
                try:
                    got = _read_into(f, memoryview(pixels).cast("B"))
                except (OSError, EOFError, gzip.BadGzipFile) as e:
                    raise InputError(
                        f"{self.path}: unreadable from image {start} on ({e}); file cut short or corrupt"
                    ) from e
                if got != pixels.nbytes:
                    raise InputError(
                        f"{self.path}: file ends inside image {start + got // PIXELS}; the header "
                        f"promises {self.count} images (file truncated)"
                    )
                yield Chunk(start, start + n, pixels)
            if f.read(1):
                raise InputError(f"{self.path}: data after the {self.count} images the header promises")
            if raw is not None:
                raw.drain()
        self._done = True


# --- .npy -------------------------------------------------------------------------------------------


class NpyReader(ImageReader):
    kind = "npy"

    def __init__(self, path: Path, on_error: OnError = "fail", hashed: bool = True,
                 algorithm: Algorithm = digests.DEFAULT):
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from e
        if not isinstance(mm, np.memmap):
            raise InputError(f"{path}: not a .npy array")
        shape, dtype = tuple(mm.shape), mm.dtype
        if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
            raise InputError(f"{path}: dtype {dtype}, expected uint8 or a float type")
        if not (
            (len(shape) == 3 and shape[1:] == IMAGE_SHAPE) or (len(shape) == 2 and shape[1] == PIXELS)
        ):
            raise InputError(f"{path}: array of shape {shape}, expected (N, 28, 28) or (N, 784)")
        self.dtype = dtype
        self.offset = int(mm.offset)
        # Fortran order: a record's bytes are not contiguous, so read it through the map instead.
        # Otherwise only the header was needed: the map is dropped (and unmapped) here.
        self._mm = mm if (mm.flags.f_contiguous and not mm.flags.c_contiguous) else None
        del mm
        super().__init__(path, shape[0], on_error, hashed, algorithm)
        self.details["dtype"] = str(dtype)
        self._bad = np.empty(0, dtype=np.int64)
        self._scale = 1.0

    def _records(self, batch_size: int, hashed: bool) -> Iterator[tuple[int, np.ndarray]]:
        """(start, (B, 784) array of the file's dtype), in order."""
        if self._mm is not None:
            for start in range(0, self.count, batch_size):
                yield start, np.ascontiguousarray(self._mm[start : start + batch_size]).reshape(-1, PIXELS)
            if hashed and self._hash is not None:
                self._hash_file()
            return
        h = self._hash if hashed else None
        with open_nofollow(self.path) as f:
            head = f.read(self.offset)
            if h is not None:
                h.update(head)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                x = np.empty((n, PIXELS), dtype=self.dtype)
                got = _read_into(f, memoryview(x).cast("B"))  # type: ignore[arg-type]
                if h is not None:
                    h.update(memoryview(x).cast("B")[:got])  # type: ignore[arg-type]
                if got != x.nbytes:
                    raise InputError(f"{self.path}: file ends inside record {start + got // (x.nbytes // n)}")
                yield start, x
            while h is not None and (block := f.read(_BLOCK)):
                h.update(block)

    def _hash_file(self) -> None:
        with open_nofollow(self.path) as f:
            while block := f.read(_BLOCK):
                self._hash.update(block)

    def _scan_floats(self, batch_size: int) -> None:
        """First pass over a float array: bad records, the scale (0..1 or 0..255), and the digest."""
        bad: list[np.ndarray] = []
        top = 0.0
        for start, x in self._records(batch_size, hashed=True):
            ok = _check_pixels(x, start, self.path, self.on_error)
            if not ok.all():
                bad.append(start + np.flatnonzero(~ok))
            if ok.any():
                top = max(top, float(x[ok].max()))
        self._bad = np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)
        self._scale = 255.0 if top <= 1.0 else 1.0
        self.details["float_scale"] = "0..1" if self._scale == 255.0 else "0..255"
        why = "NaN/inf or values outside 0..255"
        self.skipped = [Skipped(int(i), str(int(i)), why) for i in self._bad]
        if len(self._bad) == self.count:
            raise InputError(f"{self.path}: every one of the {self.count} records is bad ({why})")

    def chunks(self, batch_size: int) -> Iterator[Chunk]:
        if self.dtype == np.uint8:
            for start, x in self._records(batch_size, hashed=True):
                yield Chunk(start, start + len(x), x.reshape(-1, *IMAGE_SHAPE))
            self._done = True
            return
        self._scan_floats(batch_size)
        for start, x in self._records(batch_size, hashed=False):
            stop = start + len(x)
            keep = None
            bad = self._bad[(self._bad >= start) & (self._bad < stop)]
            if len(bad):
                mask = np.ones(len(x), dtype=bool)
                mask[bad - start] = False
                keep, x = np.flatnonzero(mask) + start, x[mask]
            pixels = np.rint(x * np.float32(self._scale)).astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
            yield Chunk(start, stop, pixels, keep)
        self._done = True


# --- a folder of PNG/JPEG -----------------------------------------------------------------------


def _load_many(paths: list[Path], algorithm: Algorithm) -> list[tuple[np.ndarray, str] | InputError]:
    out: list[tuple[np.ndarray, str] | InputError] = []
    for p in paths:
        try:
            out.append(load_image(p, algorithm))
        except InputError as e:
            out.append(e)
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
LABELS_CSV = "labels.csv"


def _is_image_file(path: Path, name: str) -> bool:
    """A record of a folder: an image by its name (a GIF is then refused as 'not a PNG or JPEG'), or a
    PNG/JPEG by its first bytes whatever its name. Anything else (notes, CSV, JSON) is not a record."""
    if name.lower().endswith(IMAGE_SUFFIXES):
        return True
    try:
        with open_nofollow(path) as f:
            head = f.read(8)
    except OSError:
        return True  # unreadable: reported as a bad record, not silently ignored
    return head.startswith(_IMAGE_MAGIC)


def _walk(root: Path, links: list[str] | None = None) -> list[tuple[str, int]]:
    """(path relative to root with '/', size) of every non-hidden file under root, sorted by path.
    Hidden files and folders (a leading dot: .DS_Store, .git, upload temp files) are not inputs.
    Symbolic links are not followed: their relative paths go to `links` (sorted), nothing else."""
    out: list[tuple[str, int]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_symlink():
                    if links is not None:
                        links.append(r)
                elif e.is_dir(follow_symlinks=False):
                    stack.append(r)
                elif e.is_file(follow_symlinks=False):
                    out.append((r, e.stat(follow_symlinks=False).st_size))
    if links is not None:
        links.sort()
    return sorted(out)


def _file_digest_or_dash(path: Path, algorithm: Algorithm) -> str:
    try:
        return file_digest(path, algorithm)
    except OSError:
        return "-"


def _listing_digest(hexes: dict[str, str], algorithm: Algorithm) -> str:
    return digests.of_bytes("".join(f"{hexes[n]}  {n}\n" for n in sorted(hexes)).encode(), algorithm)


def folder_digest(path: Path, algorithm: Algorithm = digests.DEFAULT) -> str:
    """The digest a FolderReader of `path` reports, without decoding any image."""
    return _listing_digest({n: _file_digest_or_dash(path / n, algorithm) for n, _ in _walk(path)}, algorithm)


def content_digest(path: Path, algorithm: Algorithm = digests.DEFAULT) -> str:
    """The digest of an input: of the file's bytes, or of a folder's listing (see FolderReader)."""
    if path.is_dir() and not path.is_symlink():
        return folder_digest(path, algorithm)
    return file_digest(path, algorithm)


def _read_labels_csv(path: Path, names: list[str]) -> np.ndarray:
    """Labels of `names` (in that order) from a `file,label` CSV; every record must have one."""
    import csv

    index = {n: i for i, n in enumerate(names)}
    y = np.full(len(names), -1, dtype=np.int64)
    first: dict[str, int] = {}  # name -> the line that labelled it
    try:
        with io.TextIOWrapper(io.BufferedReader(open_nofollow(path)), newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: unreadable labels file ({e})") from e
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["file", "label"]:
        raise InputError(f"{path}: expected a header line 'file,label'")
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise InputError(f"{path}: line {line} has {len(row)} fields, expected 2 (file,label)")
        name, label = row[0].strip(), row[1].strip()
        if name not in index:
            raise InputError(f"{path}: line {line}: {name!r} is not an image file of the folder")
        if not (label.isdigit() and 0 <= int(label) <= 9):
            raise InputError(f"{path}: line {line}: label {label!r} for {name}, expected 0..9")
        if name in first:  # which of two labels is true cannot be told: neither is taken
            raise InputError(f"{path}: line {line}: {name!r} is named again (first on line {first[name]}); "
                             "expected one line per image")
        first[name] = line
        y[index[name]] = int(label)
    missing = np.flatnonzero(y < 0)
    if len(missing):
        raise InputError(
            f"{path}: no label for {len(missing)} of the {len(names)} images "
            f"(first: {names[missing[0]]}); expected one line per image"
        )
    return y


class FolderReader(ImageReader):
    """Every non-hidden image file in the folder and its subfolders, in path order, is one record; its
    id is its path relative to the folder. A file is an image by its name (.png, .jpg, ...) or by a
    PNG/JPEG signature; other files (notes, a labels.csv) are not records: they are listed in
    `ignored`. A `labels.csv` (`file,label` lines) at the top gives the true labels. The digest is
    the digest of the `b3sum`-style listing (`<hex>  <path>` lines, in path order; `sha256sum`'s
    with SHA-256) of every non-hidden file, labels.csv and ignored files included: `folder_digest`
    computes the same without decoding anything (the inbox's key).

    Decoded on a thread pool. Its size depends on the images: Pillow releases the GIL while it
    decodes and resizes a big image, so photos decode ~1.3x faster on 2 threads than on one; a small
    (MNIST-sized) PNG is mostly Python-level work under the GIL, and 2 threads then run at half the
    speed of one (measured: 20,000 vs 10,500 images/s on 2 cores), so small images get one thread.
    """

    kind = "folder"
    id_kind = "file"

    def __init__(self, path: Path, on_error: OnError = "fail", workers: int | None = None,
                 algorithm: Algorithm = digests.DEFAULT):
        self.links: list[str] = []
        try:
            files = _walk(path, self.links)
        except OSError as e:
            raise InputError(f"{path}: unreadable folder ({e.strerror or e})") from e
        records: list[tuple[str, int]] = []
        self.ignored: list[str] = []
        for n, size in files:
            if n == LABELS_CSV:
                continue
            if _is_image_file(path / n, n):
                records.append((n, size))
            else:
                self.ignored.append(n)
        self.names = [n for n, _ in records]
        if not self.names:
            raise InputError(f"{path}: empty input (no image files in the folder)")
        super().__init__(path, len(self.names), on_error, algorithm=algorithm)
        if self.ignored:
            self.details["ignored"] = self.ignored
        if self.links:
            self.details["links"] = self.links  # not followed (see the module doc)
        if LABELS_CSV in self.links:
            raise InputError(f"{path / LABELS_CSV}: a symbolic link; the labels must be a file in the folder")
        self._hexes: dict[str, str] = {}
        self.labels_csv = path / LABELS_CSV if (path / LABELS_CSV).is_file() else None
        self.labels: np.ndarray | None = (
            _read_labels_csv(self.labels_csv, self.names) if self.labels_csv else None
        )
        if workers is None:
            sample = [size for _, size in records[:: max(1, len(records) // 64)]]
            small = float(np.median(sample)) < _SMALL_IMAGE_BYTES
            workers = 1 if small else min(4, len(os.sched_getaffinity(0)))
        self.workers = workers

    def chunks(self, batch_size: int) -> Iterator[Chunk]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            for start in range(0, self.count, batch_size):
                names = self.names[start : start + batch_size]
                tasks = [
                    [self.path / n for n in names[i : i + _DECODE_TASK]]
                    for i in range(0, len(names), _DECODE_TASK)
                ]
                results = [r for part in pool.map(_load_many, tasks, [self.algorithm] * len(tasks)) for r in part]
                yield self._chunk(start, names, results)
        self._done = True

    def digest(self) -> str:
        if not self._done:
            raise RuntimeError(f"{self.path}: digest asked for before the whole input was read")
        extra = self.ignored + ([LABELS_CSV] if self.labels_csv else [])
        hexes = {**self._hexes, **{n: _file_digest_or_dash(self.path / n, self.algorithm) for n in extra}}
        return _listing_digest(hexes, self.algorithm)

    def _chunk(self, start: int, names: list[str], results: list) -> Chunk:
        pixels = np.empty((len(names), *IMAGE_SHAPE), dtype=np.uint8)
        keep: list[int] = []
        for i, (name, r) in enumerate(zip(names, results)):
            if isinstance(r, InputError):
                if self.on_error == "fail":
                    raise r
                self.skipped.append(Skipped(start + i, name, str(r)))
                self._hexes[name] = _file_digest_or_dash(self.path / name, self.algorithm)
                continue
            pixels[len(keep)] = r[0]
            keep.append(i)
            self._hexes[name] = r[1]
        if len(self.skipped) == self.count:
            raise InputError(f"{self.path}: none of the {self.count} files is a readable image")
        kept_names = [names[i] for i in keep]
        full = len(keep) == len(names)
        return Chunk(
            start,
            start + len(names),
            pixels[: len(keep)],
            None if full else np.asarray(keep, dtype=np.int64) + start,
            kept_names,
        )


# --- opening ------------------------------------------------------------------------------------


def open_images(path: Path, *, on_error: OnError = "fail", workers: int | None = None,
                hashed: bool = True, algorithm: Algorithm = digests.DEFAULT) -> ImageReader:
    """The reader for an input path: a folder, a `.npy` file, or an IDX file (gzipped or not).
    `hashed=False`: a file is read without hashing (ImageReader); a folder is always hashed (its
    digest lists its files' digests). `algorithm`: the digest's (common.digests)."""
    path = Path(path)
    if path.is_dir():
        return FolderReader(path, on_error, workers, algorithm)
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".npy":
        return NpyReader(path, on_error, hashed, algorithm)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror or e})") from e
    if head[:2] == idx.GZIP_MAGIC or head[:2] == b"\x00\x00":
        return IdxReader(path, on_error, hashed, algorithm)
    if not head:
        raise InputError(f"{path}: empty file")
    raise InputError(
        f"{path}: not an input this job reads; expected an IDX images file (gzipped or not), "
        "a .npy array or a folder of PNG/JPEG images"
    )


# --- labels -------------------------------------------------------------------------------------


@dataclass
class LabelReader:
    """Labels 0..9 read sequentially, chunk by chunk, beside the images."""

    path: Path
    count: int
    digest: str
    _stream: BinaryIO | None = None
    _mm: np.ndarray | None = None
    _pos: int = field(default=0)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Labels of records [start, stop) as int64; calls must follow one another."""
        if start != self._pos:
            raise RuntimeError(f"labels read out of order: at {self._pos}, asked for {start}")
        if self._mm is not None:
            y = np.asarray(self._mm[start:stop]).astype(np.int64)
        else:
            assert self._stream is not None
            buf = bytearray(stop - start)
            if _read_into(self._stream, memoryview(buf)) != len(buf):
                raise InputError(f"{self.path}: file ends before label {stop - 1} (file truncated)")
            y = np.frombuffer(buf, dtype=np.uint8).astype(np.int64)
        self._pos = stop
        bad = (y < 0) | (y > 9)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(f"{self.path}: label {y[i]} at record {start + i}, expected 0..9")
        return y

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


def file_digest(path: Path, algorithm: Algorithm = digests.DEFAULT) -> str:
    """The digest of a file's bytes, read in blocks (never through a symbolic link)."""
    h = digests.hasher(algorithm)
    with open_nofollow(path) as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def open_labels(path: Path, expected: int, images: Path | None = None,
                algorithm: Algorithm = digests.DEFAULT) -> LabelReader:
    """Labels from an IDX labels file (gzipped or not) or a 1-D integer `.npy`; their count must be
    the number of input records (`expected`). Their digest is `algorithm`'s."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such labels file")
    of = f", but {images} has {expected} records" if images else f", expected {expected}"
    if path.suffix.lower() == ".npy":
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from e
        if mm.ndim != 1 or not np.issubdtype(mm.dtype, np.integer):
            raise InputError(
                f"{path}: labels of shape {mm.shape} and dtype {mm.dtype}, expected a 1-D integer array"
            )
        if len(mm) != expected:
            raise InputError(f"{path}: {len(mm)} labels{of}")
        return LabelReader(path, expected, file_digest(path, algorithm), _mm=mm)
    try:
        f = gzip.open(path, "rb") if idx.is_gzip(path) else open(path, "rb")
        header = idx.read_header(f, path)
        idx.expect_header(header, path, magic=idx.LABELS_MAGIC)
    except idx.IdxFormatError as e:
        f.close()
        raise InputError(str(e)) from e
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable IDX labels file ({e})") from e
    if header.count != expected:
        f.close()
        raise InputError(f"{path}: {header.count} labels{of}")
    return LabelReader(path, expected, file_digest(path, algorithm), _stream=f)
