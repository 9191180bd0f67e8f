"""The data stage: obtain a dataset's four IDX files, verify them, cache them, hand out tensors.

source -> verify (SHA-256, pinned) -> cache (one file of uint8/int64 tensors plus the digest).
A file that fails verification is never cached and never used; a verified cache is reused without
touching the source again.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import socket
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from nn_core.checkpoint import atomic_torch_save
from nn_core.config import DataConfig
from nn_core.datasets import IMAGES, DatasetSpec, FileSpec, get_spec, mirrors_for
from common import idx, settings
from common.storage import SOURCE_KINDS, STORE_SCHEMES  # torch-free: flows.options checks with them

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: per-file SHA-256 checked on every load
CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0


class DataError(Exception):
    """The data could not be obtained or is not what was expected; the message names the file."""


class IntegrityError(DataError):
    """A file or cache is corrupt, truncated or not the pinned one. Retrying will not help."""


class SourceUnavailableError(DataError):
    """The source could not be reached or read (network, a mirror down, a read error). May be retried."""


class SourceMissingError(DataError):
    """The source was reached but lacks the folder or a file: the source is named wrong or incomplete,
    which no retry fixes (a run on an empty folder failed after 22 s of retries before)."""


@dataclass(frozen=True)
class PreparedDataset:
    name: str
    digest: str
    cache_path: Path
    split_sizes: dict[str, int]
    reused_cache: bool


@dataclass(frozen=True)
class Splits:
    """The three splits as tensors: images uint8 (N, 28, 28), labels int64 (N,)."""

    name: str
    digest: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_labels), "val": len(self.val_labels), "test": len(self.test_labels)}

    def to(self, device: torch.device | str) -> "Splits":
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Splits(name=self.name, digest=self.digest, **moved)


def default_data_dir() -> Path:
    if data_dir := settings.env("MNISTOPS_DATA_DIR"):  # DataConfig.data_dir's variable (common.fields)
        return Path(data_dir)
    cache_home = settings.env("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "mnistops"


def cache_path(spec: DatasetSpec, data_dir: Path) -> Path:
    return Path(data_dir) / f"{spec.name}.pt"


def dataset_digest(file_shas: dict[str, str]) -> str:
    """One digest for the dataset: SHA-256 over the uncompressed files' SHA-256, in a fixed order."""
    lines = "".join(f"{role} {file_shas[role]}\n" for role in sorted(file_shas))
    return hashlib.sha256(lines.encode()).hexdigest()


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not sys.stderr.isatty(), leave=False)


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class VerifiedFile:
    spec: FileSpec
    path: Path
    sha256: str  # of the uncompressed content
    array: np.ndarray


def verify_file(path: Path, spec: FileSpec, dataset: str) -> VerifiedFile:
    """Read one IDX file (gzipped or not), check its structure and its pinned SHA-256."""
    magic = idx.IMAGES_MAGIC if spec.kind == IMAGES else idx.LABELS_MAGIC
    expected_bytes = 4 + 4 * (3 if spec.kind == IMAGES else 1) + spec.count * (784 if spec.kind == IMAGES else 1)
    gz = idx.is_gzip(path)
    content_sha = hashlib.sha256()
    buf = bytearray()
    try:
        with open(path, "rb") as raw, _progress(expected_bytes, f"verify {path.name}") as bar:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            while chunk := stream.read(CHUNK):
                content_sha.update(chunk)
                buf += chunk
                bar.update(len(chunk))
                if len(buf) > expected_bytes:
                    break  # longer than any valid file: no need to read the rest
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise IntegrityError(f"{path}: not a complete gzip file ({e}); expected the {dataset} file {spec.filename}") from e
    except OSError as e:
        raise SourceUnavailableError(f"{path}: cannot read ({e})") from e

    import io

    try:
        with io.BytesIO(bytes(buf)) as f:
            header = idx.read_header(f, path)
        idx.expect_header(header, path, magic=magic, count=spec.count)
    except idx.IdxFormatError as e:
        raise IntegrityError(f"{e} (the {dataset} file {spec.filename})") from None
    if len(buf) != expected_bytes:
        raise IntegrityError(
            f"{path}: {len(buf)} bytes uncompressed, expected {expected_bytes} for the {dataset} file "
            f"{spec.filename} (truncated or padded)"
        )
    sha = content_sha.hexdigest()
    if sha != spec.sha256:
        raise IntegrityError(
            f"{path}: SHA-256 of the uncompressed content is {sha}, expected {spec.sha256} "
            f"(the pinned {dataset} file {spec.filename}); the file is corrupt or a different file"
        )
    array = np.frombuffer(bytes(buf), dtype=np.uint8, offset=header.nbytes_header).reshape(header.shape)
    return VerifiedFile(spec=spec, path=path, sha256=sha, array=array)


# ---------------------------------------------------------------------------------------------
# Sources


def parse_source(source: str | None) -> tuple[str, str | Path | tuple[str, ...] | None]:
    """('mirrors', None) for the official mirrors, ('mirrors', (url,)) for an HTTP(S) mirror,
    ('local', path) for a folder or file:// URL holding the four files, ('store', url) for any other
    fsspec URL prefix holding them (s3://bucket/mnist/; credentials from the store's standard chain)."""
    if source in (None, "", "mirrors", "official"):
        return "mirrors", None
    parsed = urlparse(str(source))
    if parsed.scheme in ("http", "https"):
        return "mirrors", (str(source).rstrip("/") + "/",)
    if parsed.scheme == "file":
        return "local", Path(unquote(parsed.path))
    if parsed.scheme in STORE_SCHEMES:  # an object-store prefix, through fsspec
        return "store", str(source).rstrip("/")
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"data source {source!r}: {SOURCE_KINDS}")
    return "local", Path(source).expanduser()


def _find_in_store(prefix: str, spec: FileSpec, dest: Path) -> Path:
    """The file (or its .gz) under an fsspec URL prefix, copied into `dest` in blocks; the SHA-256
    check that follows is the same as for any source."""
    from common import storage

    try:
        for name in (spec.filename, spec.filename + ".gz"):
            url = storage.join(prefix, name)
            if storage.exists(url):
                return storage.fetch(url, dest / name)
    except storage.StoreError as e:
        raise SourceUnavailableError(f"data source: {e}") from e
    raise SourceMissingError(f"{storage.shown(prefix)}/{spec.filename}(.gz): missing; expected it under "
                             "the data source prefix")


def _find_local(folder: Path, spec: FileSpec) -> Path:
    if not folder.is_dir():
        raise SourceMissingError(f"{folder}: data source folder does not exist")
    for name in (spec.filename, spec.filename + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise SourceMissingError(f"{folder / spec.filename}(.gz): missing; expected it in the data source folder")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # torchvision's downloader opens URLs without a timeout; a stalled mirror would hang forever.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(spec: FileSpec, mirrors: tuple[str, ...], dest: Path) -> Path:
    from torchvision.datasets.utils import download_url

    filename = spec.filename + ".gz"
    errors = []
    for mirror in mirrors:
        url = f"{mirror}{filename}"
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                download_url(url, root=str(dest), filename=filename, md5=None)
            return dest / filename
        except (OSError, RuntimeError) as e:
            (dest / filename).unlink(missing_ok=True)
            errors.append(f"{url}: {e}")
    raise SourceUnavailableError(f"{filename}: could not download from any mirror: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------
# Cache


def _file_sha256(role: str, tensor: torch.Tensor) -> str:
    """SHA-256 of the IDX file that `tensor` was read from, rebuilt from the tensor: the pinned
    per-file checksum, so a cache is checked against the very values the source files were."""
    images = tensor.dim() == 3
    header = struct.pack(">I", idx.IMAGES_MAGIC if images else idx.LABELS_MAGIC)
    header += struct.pack(f">{tensor.dim()}I", *tensor.shape)
    data = tensor.contiguous().numpy()
    if not images:
        data = data.astype(np.uint8)  # labels are cached as int64; the file holds one byte each
    h = hashlib.sha256(header)
    h.update(memoryview(np.ascontiguousarray(data)).cast("B"))  # no copy of the images
    return h.hexdigest()


def write_cache(path: Path, spec: DatasetSpec, files: dict[str, VerifiedFile]) -> str:
    """Write the verified files as one cache file, atomically; return the dataset digest."""
    tensors = {
        role: torch.from_numpy(f.array.copy()) if f.spec.kind == IMAGES else torch.from_numpy(f.array.astype(np.int64))
        for role, f in files.items()
    }
    shas = {role: f.sha256 for role, f in files.items()}
    digest = dataset_digest(shas)
    payload = {
        "format": CACHE_FORMAT,
        "dataset": spec.name,
        "digest": digest,
        "file_sha256": shas,
        "train_size": spec.train_size,
        "tensors": tensors,
    }
    atomic_torch_save(payload, path)
    return digest


def read_cache(path: Path, spec: DatasetSpec | None = None) -> dict:
    """Load and check a cache file; IntegrityError names it when it is corrupt or not the pinned data.

    Every load hashes the cached content as the four IDX files it came from and compares with the
    per-file SHA-256 stored beside it (and, given `spec`, with the pinned ones): a cache edited and
    re-signed with a fresh checksum of its own is still refused."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise IntegrityError(f"{path}: cached dataset unreadable ({type(e).__name__}: {e})") from e
    try:
        if payload["format"] != CACHE_FORMAT:
            raise IntegrityError(f"{path}: cache format {payload['format']}, expected {CACHE_FORMAT}")
        tensors, stored = payload["tensors"], payload["file_sha256"]
        actual = {role: _file_sha256(role, tensors[role]) for role in sorted(tensors)}
        digest_ok = dataset_digest(stored) == payload["digest"]
    except (KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"{path}: not a mnistops dataset cache (missing {e})") from e
    changed = sorted(r for r in actual if actual[r] != stored.get(r))
    if changed or set(actual) != set(stored) or not digest_ok:
        raise IntegrityError(
            f"{path}: cached dataset fails its checksum ({', '.join(changed) or 'digest'} changed since it "
            "was written)"
        )
    if spec is not None:
        pinned = {f.role: f.sha256 for f in spec.files}
        if payload["dataset"] != spec.name or stored != pinned:
            raise IntegrityError(f"{path}: cache holds {payload['dataset']!r} data, not the pinned {spec.name} files")
    return payload


def load_splits(path: Path, device: torch.device | str = "cpu") -> Splits:
    """The train/val/test splits from a cache file, on `device`. Deterministic: no shuffling here."""
    try:
        payload = read_cache(path)
    except IntegrityError as e:  # what to do about it is said here; prepare() says what it does instead
        raise IntegrityError(f"{e}; `mnistops prepare-data` rebuilds it from the source") from e
    t = payload["tensors"]
    n = payload["train_size"]
    splits = Splits(
        name=payload["dataset"],
        digest=payload["digest"],
        train_images=t["train_images"][:n],
        train_labels=t["train_labels"][:n],
        val_images=t["train_images"][n:],
        val_labels=t["train_labels"][n:],
        test_images=t["test_images"],
        test_labels=t["test_labels"],
    )
    return splits if str(device) == "cpu" else splits.to(device)


# ---------------------------------------------------------------------------------------------
# The stage


def prepare(spec: DatasetSpec, source: str | None = None, data_dir: Path | None = None) -> PreparedDataset:
    """Obtain, verify and cache `spec`; reuse a verified cache without touching the source."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    target = cache_path(spec, data_dir)
    refused = None
    if target.exists():
        try:
            payload = read_cache(target, spec)
            return _prepared(spec, target, payload, reused=True)
        except IntegrityError as e:
            refused = e
            log.warning("%s; rebuilding it from the source", e)
    try:
        return _build(spec, source, data_dir, target)
    except DataError as e:
        if refused is None:
            raise
        raise type(e)(f"{refused}; rebuilding it from the source failed: {e}") from e


def prepare_dataset(cfg: DataConfig) -> PreparedDataset:
    """`prepare` for the dataset, source and cache folder a DataConfig names."""
    return prepare(get_spec(cfg.dataset), cfg.data_source, Path(cfg.data_dir) if cfg.data_dir else None)


def _build(spec: DatasetSpec, source: str | None, data_dir: Path, target: Path) -> PreparedDataset:
    kind, where = parse_source(source)
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
        if kind == "local":
            paths = {f.role: _find_local(Path(where), f) for f in spec.files}
        elif kind == "store":
            paths = {f.role: _find_in_store(str(where), f, Path(tmp)) for f in spec.files}
        else:
            mirrors = where or mirrors_for(spec)
            paths = {f.role: _download(f, mirrors, Path(tmp)) for f in spec.files}
        verified = {f.role: verify_file(paths[f.role], f, spec.name) for f in spec.files}
        write_cache(target, spec, verified)
    return _prepared(spec, target, read_cache(target, spec), reused=False)


def _prepared(spec: DatasetSpec, path: Path, payload: dict, reused: bool) -> PreparedDataset:
    n_train = payload["tensors"]["train_labels"].shape[0]
    sizes = {
        "train": payload["train_size"],
        "val": n_train - payload["train_size"],
        "test": payload["tensors"]["test_labels"].shape[0],
    }
    return PreparedDataset(name=spec.name, digest=payload["digest"], cache_path=path, split_sizes=sizes, reused_cache=reused)
