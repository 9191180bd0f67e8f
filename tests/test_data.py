"""The data stage: sources, verification, cache, splits — on small synthetic IDX files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from idx_files import raw_content, rewrite, synthetic_dataset
from nn_core.data import (
    IntegrityError,
    SourceMissingError,
    SourceUnavailableError,
    dataset_digest,
    load_splits,
    prepare,
    read_cache,
)
from nn_core.datasets import FASHION_MNIST, MNIST

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_prepare_verifies_caches_and_splits(tmp_path, gz):
    spec = synthetic_dataset(tmp_path / "src", gz=gz)
    p = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    assert p.split_sizes == {"train": 100, "val": 20, "test": 40}
    assert p.digest == dataset_digest({f.role: f.sha256 for f in spec.files})
    assert p.cache_path == tmp_path / "data" / "mnist.pt" and not p.reused_cache
    s = load_splits(p.cache_path)
    assert s.train_images.dtype == torch.uint8 and s.train_images.shape == (100, 28, 28)
    assert s.train_labels.dtype == torch.int64 and s.val_labels.shape == (20,)
    # train = the first official training samples, validation = the rest, test = the official test set
    official = np.frombuffer(raw_content(tmp_path / "src" / (FILES[0] + (".gz" if gz else ""))), np.uint8, offset=16)
    official = official.reshape(120, 28, 28)
    assert np.array_equal(s.train_images.numpy(), official[:100])
    assert np.array_equal(s.val_images.numpy(), official[100:])
    assert s.digest == p.digest and s.sizes() == p.split_sizes


def test_verified_cache_is_reused_without_touching_the_source(tmp_path):
    spec = synthetic_dataset(tmp_path / "src")
    first = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    for f in (tmp_path / "src").iterdir():
        f.unlink()
    again = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    assert again.reused_cache and again.digest == first.digest


def test_file_url_source(tmp_path):
    spec = synthetic_dataset(tmp_path / "src dir")
    p = prepare(spec, (tmp_path / "src dir").as_uri(), tmp_path / "data")
    assert p.split_sizes["test"] == 40


def _cache_state(path: Path):
    return (path.read_bytes(), path.stat().st_mtime_ns) if path.exists() else None


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_a_corrupted_byte_is_refused_naming_the_file_and_cache_unchanged(tmp_path, name, gz):
    spec = synthetic_dataset(tmp_path / "src", gz=gz)
    good = synthetic_dataset(tmp_path / "good", gz=gz)
    prepare(good, str(tmp_path / "good"), tmp_path / "data")  # a cache exists already
    before = _cache_state(tmp_path / "data" / "mnist.pt")
    path = tmp_path / "src" / (name + (".gz" if gz else ""))
    content = bytearray(raw_content(path))
    content[-3] ^= 0xFF  # a data byte, not the header
    rewrite(path, bytes(content))
    with pytest.raises(IntegrityError, match="SHA-256") as e:
        # a fresh data dir: nothing may be cached
        prepare(spec, str(tmp_path / "src"), tmp_path / "data2")
    assert str(path) in str(e.value) and name in str(e.value)
    assert not (tmp_path / "data2" / "mnist.pt").exists()
    assert not list((tmp_path / "data2").glob("*.tmp")) and not list((tmp_path / "data2").glob(".download-*"))
    assert _cache_state(tmp_path / "data" / "mnist.pt") == before


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: c[:-100], "truncated"),
        (lambda c: c + b"\0" * 5, "truncated or padded"),
        (lambda c: b"\x00\x00\x08\x02" + c[4:], "magic number"),
        (lambda c: b"\xde\xad\xbe\xef" + c[4:], "magic number"),
        (lambda c: c[:4] + (121).to_bytes(4, "big") + c[8:], "121 records, expected 120"),
        (lambda c: c[:8] + (27).to_bytes(4, "big") + c[12:], "expected \\(28, 28\\)"),
        (lambda c: b"", "too short"),
    ],
    ids=["truncated", "padded", "labels-magic", "bad-magic", "wrong-count", "wrong-size", "empty"],
)
def test_structural_errors_name_the_file(tmp_path, damage, message):
    spec = synthetic_dataset(tmp_path / "src", gz=False)
    path = tmp_path / "src" / FILES[0]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IntegrityError, match=message) as e:
        prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    assert str(path) in str(e.value)
    assert not (tmp_path / "data" / "mnist.pt").exists()


def test_truncated_gzip_is_refused(tmp_path):
    spec = synthetic_dataset(tmp_path / "src", gz=True)
    path = tmp_path / "src" / (FILES[1] + ".gz")
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(IntegrityError, match="not a complete gzip file") as e:
        prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    assert str(path) in str(e.value)


def test_missing_file_and_missing_folder(tmp_path):
    spec = synthetic_dataset(tmp_path / "src")
    (tmp_path / "src" / (FILES[3] + ".gz")).unlink()
    with pytest.raises(SourceMissingError, match=FILES[3]):
        prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    with pytest.raises(SourceMissingError, match="does not exist"):
        prepare(spec, str(tmp_path / "nowhere"), tmp_path / "data")


def test_unsupported_source_scheme(tmp_path):
    spec = synthetic_dataset(tmp_path / "src")
    with pytest.raises(ValueError, match="expected a folder, a file:// URL or an http"):
        prepare(spec, "ftp://example.invalid/mnist", tmp_path / "data")


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path):
    spec = synthetic_dataset(tmp_path / "src")
    p = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    data = bytearray(p.cache_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.cache_path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=str(p.cache_path)):
        load_splits(p.cache_path)
    rebuilt = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    assert not rebuilt.reused_cache and load_splits(rebuilt.cache_path).digest == p.digest


def test_cache_of_other_data_is_refused(tmp_path):
    spec = synthetic_dataset(tmp_path / "src")
    p = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    with pytest.raises(IntegrityError, match="not the pinned mnist files"):
        read_cache(p.cache_path, MNIST)


# ---------------------------------------------------------------------------------------------
# The mirror path: torchvision's downloader against a local HTTP server


@pytest.fixture
def http_mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_a_mirror(tmp_path, http_mirror):
    root, url = http_mirror
    spec = synthetic_dataset(root)
    # As a configured source URL ...
    p = prepare(spec, url, tmp_path / "data")
    assert p.split_sizes == {"train": 100, "val": 20, "test": 40}
    # ... and as the spec's own mirror list (the official mirrors' code path), second mirror live.
    mirrored = replace(spec, mirrors=("http://127.0.0.1:9/", url))
    q = prepare(mirrored, None, tmp_path / "data2")
    assert q.digest == p.digest
    assert not list((tmp_path / "data2").glob(".download-*"))


def test_mirror_serving_a_corrupt_file_is_refused(tmp_path, http_mirror):
    root, url = http_mirror
    spec = synthetic_dataset(root)
    path = root / (FILES[2] + ".gz")
    content = bytearray(raw_content(path))
    content[100] ^= 1
    rewrite(path, bytes(content))
    with pytest.raises(IntegrityError, match=FILES[2]):
        prepare(spec, url, tmp_path / "data")
    assert not (tmp_path / "data" / "mnist.pt").exists()
    assert not list((tmp_path / "data").glob(".download-*"))


def test_unreachable_mirror_is_a_retryable_error(tmp_path):
    spec = replace(synthetic_dataset(tmp_path / "src"), mirrors=("http://127.0.0.1:9/",))
    with pytest.raises(SourceUnavailableError, match="could not download"):
        prepare(spec, None, tmp_path / "data")


# ---------------------------------------------------------------------------------------------
# Every file pinned by its uncompressed content (that the pins are the real files' is what
# test_real_mnist and test_real_fashion_mnist_recompressed_or_plain check)


def test_a_self_consistent_but_altered_cache_is_refused(tmp_path):
    """Someone edits the cached tensors and saves a well-formed cache: the content no longer hashes
    to the per-file SHA-256, so loading refuses it."""
    from nn_core.checkpoint import atomic_torch_save

    spec = synthetic_dataset(tmp_path / "src")
    p = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    payload = torch.load(p.cache_path, weights_only=True)
    payload["tensors"]["train_labels"][0] = (payload["tensors"]["train_labels"][0] + 1) % 10
    atomic_torch_save(payload, p.cache_path)
    with pytest.raises(IntegrityError, match="train_labels changed") as e:
        load_splits(p.cache_path)
    assert str(p.cache_path) in str(e.value)
    # ... and when the forger also rewrites the per-file SHA-256 to the altered content's, the pins refuse it
    from nn_core.data import _file_sha256

    payload["file_sha256"]["train_labels"] = _file_sha256("train_labels", payload["tensors"]["train_labels"])
    payload["digest"] = dataset_digest(payload["file_sha256"])
    atomic_torch_save(payload, p.cache_path)
    with pytest.raises(IntegrityError, match="not the pinned mnist files"):
        read_cache(p.cache_path, spec)
    rebuilt = prepare(spec, str(tmp_path / "src"), tmp_path / "data")  # prepare rebuilds it from the source
    assert not rebuilt.reused_cache and rebuilt.digest == p.digest


def test_the_cache_checksum_is_the_pinned_file_checksum(tmp_path):
    spec = synthetic_dataset(tmp_path / "src", gz=False)
    p = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    payload = read_cache(p.cache_path, spec)
    assert payload["file_sha256"] == {f.role: f.sha256 for f in spec.files}
    assert {f.role: hashlib.sha256((tmp_path / "src" / f.filename).read_bytes()).hexdigest() for f in spec.files} \
        == payload["file_sha256"]


# ---------------------------------------------------------------------------------------------
# Real Fashion-MNIST: Debian's recompressed copy, the same files uncompressed, and a damaged one


@pytest.mark.e2e
def test_real_fashion_mnist_recompressed_or_plain(fashion_source, tmp_path):
    from nn_core.datasets import fingerprint

    recompressed = prepare(FASHION_MNIST, str(fashion_source), tmp_path / "a")
    assert recompressed.digest == dataset_digest({f.role: f.sha256 for f in FASHION_MNIST.files})
    assert recompressed.split_sizes == {"train": 50_000, "val": 10_000, "test": 10_000}
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in FILES:
        gz = fashion_source / (name + ".gz")
        (plain / name).write_bytes(gzip.decompress(gz.read_bytes()) if gz.exists() else (fashion_source / name).read_bytes())
    assert prepare(FASHION_MNIST, str(plain), tmp_path / "b").digest == recompressed.digest
    s = load_splits(recompressed.cache_path)
    assert torch.bincount(s.test_labels, minlength=10).tolist() == [1000] * 10
    # One byte of one file changed: refused by name, nothing cached.
    content = bytearray((plain / FILES[2]).read_bytes())
    content[5000] ^= 0x01
    (plain / FILES[2]).write_bytes(bytes(content))
    with pytest.raises(IntegrityError, match="SHA-256") as e:
        prepare(FASHION_MNIST, str(plain), tmp_path / "c")
    assert FILES[2] in str(e.value) and "fashion-mnist" in str(e.value)
    assert not (tmp_path / "c" / "fashion-mnist.pt").exists()
    assert fingerprint(FASHION_MNIST) != fingerprint(MNIST)


# ---------------------------------------------------------------------------------------------
# Real MNIST


@pytest.mark.e2e
def test_real_mnist(mnist, mnist_source):
    pinned = dataset_digest({f.role: f.sha256 for f in MNIST.files})
    assert mnist.digest == pinned
    assert mnist.split_sizes == {"train": 50_000, "val": 10_000, "test": 10_000}
    s = load_splits(mnist.cache_path)
    assert torch.bincount(s.test_labels, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert s.train_images.float().mean().item() == pytest.approx(33.3, abs=0.2)
