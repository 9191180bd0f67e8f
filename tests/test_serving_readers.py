"""Readers of the batch job: every input kind, chunking, digests, the MNIST-way image conversion and
every bad-input case at the reader level."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3
import numpy as np
import pytest
from PIL import Image

from common.errors import InputError
from serving.images import mnist_pixels
from serving.readers import (
    FolderReader,
    IdxReader,
    NpyReader,
    content_digest,
    open_images,
    open_labels,
)
from serving_fixtures import BAD_INPUTS as BAD
from serving_fixtures import digits, make_bad_inputs, write_idx


def b3(path: Path) -> str:
    """The file's BLAKE3, as `b3sum` prints it: the readers' digest."""
    return blake3.blake3(path.read_bytes()).hexdigest()


def read_all(reader, batch_size: int = 7) -> tuple[np.ndarray, list]:
    chunks = list(reader.chunks(batch_size))
    assert all(len(c.pixels) <= batch_size for c in chunks)  # bounded: never more than a batch
    assert all(c.pixels.dtype == np.uint8 and c.pixels.shape[1:] == (28, 28) for c in chunks)
    return np.concatenate([c.pixels for c in chunks]), chunks


# --- every input kind -------------------------------------------------------------------------------


@pytest.mark.parametrize("flat", [False, True])
def test_npy_uint8(tmp_path: Path, flat: bool) -> None:
    x = digits(30)
    f = tmp_path / "x.npy"
    np.save(f, x.reshape(30, 784) if flat else x)
    r = open_images(f)
    assert isinstance(r, NpyReader) and r.count == 30
    pixels, chunks = read_all(r)
    np.testing.assert_array_equal(pixels, x)
    assert [(c.start, c.stop) for c in chunks][:2] == [(0, 7), (7, 14)]
    np.testing.assert_array_equal(np.concatenate([c.positions() for c in chunks]), np.arange(30))
    assert r.digest() == b3(f)


def test_npy_fortran_order(tmp_path: Path) -> None:
    x = digits(10).reshape(10, 784)
    f = tmp_path / "x.npy"
    np.save(f, np.asfortranarray(x))
    r = open_images(f)
    pixels, _ = read_all(r, 4)
    np.testing.assert_array_equal(pixels.reshape(10, 784), x)
    assert r.digest() == b3(f)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("scale", ["0..1", "0..255"])
def test_npy_float(tmp_path: Path, dtype, scale: str) -> None:
    x = digits(20)
    values = x / 255.0 if scale == "0..1" else x.astype(np.float64)
    f = tmp_path / "x.npy"
    np.save(f, values.astype(dtype))
    r = open_images(f)
    pixels, _ = read_all(r)
    # float16 holds 0..255 exactly but not k/255: allow one grey level
    tol = 1 if dtype == np.float16 else 0
    assert np.abs(pixels.astype(int) - x.astype(int)).max() <= tol
    assert r.details["float_scale"] == scale
    assert r.digest() == b3(f)


@pytest.mark.parametrize("gz", [False, True])
def test_idx(tmp_path: Path, gz: bool) -> None:
    x = digits(25)
    f = write_idx(tmp_path / ("x.idx.gz" if gz else "x.idx"), x, gz=gz)
    r = open_images(f)
    assert isinstance(r, IdxReader) and r.count == 25 and r.kind == ("idx.gz" if gz else "idx")
    pixels, _ = read_all(r)
    np.testing.assert_array_equal(pixels, x)
    assert r.digest() == b3(f)  # of the file as stored (compressed bytes for .gz)


def test_folder_png_and_jpeg(tmp_path: Path) -> None:
    x = digits(5)
    d = tmp_path / "imgs"
    d.mkdir()
    for i, a in enumerate(x[:3]):
        Image.fromarray(a).save(d / f"{i}.png")
    Image.fromarray(x[3]).convert("RGB").save(d / "3.png")  # RGB 28x28: converted to grey
    Image.fromarray(x[4]).save(d / "4.jpg", quality=100)
    (d / ".DS_Store").write_bytes(b"hidden files are not inputs")
    (d / "sub").mkdir()  # nor are subfolders
    r = open_images(d)
    assert isinstance(r, FolderReader) and r.count == 5 and r.id_kind == "file"
    pixels, chunks = read_all(r, 2)
    np.testing.assert_array_equal(pixels[:4], x[:4])
    assert np.abs(pixels[4].astype(int) - x[4].astype(int)).mean() < 4  # JPEG is lossy
    assert [n for c in chunks for n in c.names] == ["0.png", "1.png", "2.png", "3.png", "4.jpg"]
    listing = "".join(f"{b3(d / n)}  {n}\n" for n in r.names)
    assert r.digest() == blake3.blake3(listing.encode()).hexdigest()


def _digit_photo(w: int, h: int, dark_on_light: bool = True, mode: str = "L") -> Image.Image:
    """A big 'photo' of a bar-shaped digit off-centre: dark ink on light paper by default."""
    a = np.full((h, w), 230 if dark_on_light else 10, dtype=np.uint8)
    a[h // 5 : h // 5 + h // 2, w // 6 : w // 6 + w // 10] = 20 if dark_on_light else 240
    im = Image.fromarray(a)
    return im.convert(mode) if mode != "L" else im


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
@pytest.mark.parametrize("dark_on_light", [True, False])
def test_mnist_way(mode: str, dark_on_light: bool) -> None:
    out = mnist_pixels(_digit_photo(300, 200, dark_on_light, mode))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[:, 0].max() == 0  # black background, whatever the polarity
    ys, xs = np.nonzero(out > 0)
    assert ys.max() - ys.min() + 1 <= 21 and xs.max() - xs.min() + 1 <= 21  # fits the 20x20 box
    assert ys.max() - ys.min() + 1 >= 19  # the longer side (the bar's height) is scaled to 20
    w = out.astype(float)
    cy = (w.sum(axis=1) * np.arange(28)).sum() / w.sum()
    cx = (w.sum(axis=0) * np.arange(28)).sum() / w.sum()
    assert abs(cy - 13.5) <= 0.6 and abs(cx - 13.5) <= 0.6  # centred by centre of mass


def test_mnist_way_blank_and_16_bit() -> None:
    assert mnist_pixels(Image.new("L", (50, 40), 200)).max() == 0
    a = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80).astype(np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    out = mnist_pixels(im)
    np.testing.assert_array_equal(out, (a >> 8).astype(np.uint8))  # 28x28: as is, 16 -> 8 bits


def test_folder_big_jpeg_photo(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    _digit_photo(2000, 1500).convert("RGB").save(d / "photo.jpg", quality=90)
    pixels, _ = read_all(open_images(d))
    assert pixels.shape == (1, 28, 28) and pixels.max() > 200 and pixels[0, 0].max() == 0


# --- labels -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["npy", "idx.gz", "folder"])
def test_sha256_is_still_read_for_a_ledger_begun_with_it(tmp_path: Path, kind: str) -> None:
    """An inbox whose ledger began before BLAKE3 keys by SHA-256 (serving.inbox): the readers give
    `sha256sum`'s digest, of the file or of the folder's listing, when asked for it."""
    x = digits(9)
    if kind == "folder":
        f = tmp_path / "imgs"
        f.mkdir()
        for i, a in enumerate(x):
            Image.fromarray(a).save(f / f"{i}.png")
        names = sorted(p.name for p in f.iterdir())
        listing = "".join(f"{hashlib.sha256((f / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
        expected = hashlib.sha256(listing.encode()).hexdigest()
    else:
        f = tmp_path / "x.npy" if kind == "npy" else write_idx(tmp_path / "x.idx.gz", x, gz=True)
        if kind == "npy":
            np.save(f, x)
        expected = hashlib.sha256(f.read_bytes()).hexdigest()
    r = open_images(f, algorithm="sha256")
    read_all(r, 4)
    assert r.digest() == expected == content_digest(f, "sha256")
    assert content_digest(f) != expected  # BLAKE3 by default


@pytest.mark.parametrize("kind", ["idx", "idx.gz", "npy"])
def test_labels(tmp_path: Path, kind: str) -> None:
    y = np.arange(23) % 10
    if kind == "npy":
        f = tmp_path / "y.npy"
        np.save(f, y.astype(np.int64))
    else:
        f = write_idx(tmp_path / f"y.{kind}", y.astype(np.uint8), gz=kind == "idx.gz")
    lr = open_labels(f, 23)
    got = np.concatenate([lr.read(s, min(s + 5, 23)) for s in range(0, 23, 5)])
    lr.close()
    np.testing.assert_array_equal(got, y)
    assert lr.digest == b3(f)


def test_labels_bad(tmp_path: Path) -> None:
    f = write_idx(tmp_path / "y.idx", np.array([1, 2, 3], dtype=np.uint8))
    with pytest.raises(InputError, match=r"y\.idx: 3 labels, but x\.npy has 4 records"):
        open_labels(f, 4, Path("x.npy"))
    np.save(tmp_path / "y.npy", np.array([1, 12, 3]))
    lr = open_labels(tmp_path / "y.npy", 3)
    with pytest.raises(InputError, match=r"y\.npy: label 12 at record 1, expected 0\.\.9"):
        lr.read(0, 3)
    np.save(tmp_path / "yf.npy", np.array([1.0, 2.0]))
    with pytest.raises(InputError, match=r"yf\.npy: labels of shape \(2,\) and dtype float64, expected a 1-D integer"):
        open_labels(tmp_path / "yf.npy", 2)
    with pytest.raises(InputError, match=r"img\.idx: magic number 0x00000803, expected 0x00000801"):
        open_labels(write_idx(tmp_path / "img.idx", digits(2)), 2)


# --- bad input ------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", BAD)
def test_bad_input_reader(bad_inputs: dict[str, tuple[Path, str]], name: str) -> None:
    path, pattern = bad_inputs[name]
    with pytest.raises(InputError, match=pattern):
        read_all(open_images(path), 2)


def test_bad_cases_all_listed(bad_inputs: dict[str, tuple[Path, str]]) -> None:
    assert sorted(bad_inputs) == BAD


# --- skipping -----------------------------------------------------------------------------------------


def test_skip_bad_images(tmp_path: Path) -> None:
    x = digits(6)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        Image.fromarray(x[i]).save(d / f"{i}.png")
    (d / "1.png").write_bytes(b"garbage")
    (d / "4.png").write_bytes((d / "5.png").read_bytes()[:40])
    r = open_images(d, on_error="skip")
    pixels, chunks = read_all(r, 4)
    np.testing.assert_array_equal(pixels, x[[0, 2, 3, 5]])
    assert [(s.index, s.id) for s in r.skipped] == [(1, "1.png"), (4, "4.png")]
    assert "not a PNG or JPEG image" in r.skipped[0].reason
    np.testing.assert_array_equal(np.concatenate([c.positions() for c in chunks]), [0, 2, 3, 5])
    assert [n for c in chunks for n in c.names] == ["0.png", "2.png", "3.png", "5.png"]
    r.digest()  # complete despite the skips


def test_skip_bad_float_records(tmp_path: Path) -> None:
    x = digits(10).reshape(10, 784).astype(np.float32)
    x[3, 5] = np.nan
    x[7, 0] = np.inf
    x[8, 1] = 300.0
    np.save(tmp_path / "x.npy", x)
    r = open_images(tmp_path / "x.npy", on_error="skip")
    pixels, chunks = read_all(r, 4)
    keep = [0, 1, 2, 4, 5, 6, 9]
    np.testing.assert_array_equal(pixels.reshape(-1, 784), x[keep].astype(np.uint8))
    assert [s.index for s in r.skipped] == [3, 7, 8]
    np.testing.assert_array_equal(np.concatenate([c.positions() for c in chunks]), keep)


def test_skip_everything_bad_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match="none of the 1 files is a readable image"):
        read_all(open_images(d, on_error="skip"))
