"""Shared helpers for the serving tests: a contract-conforming ONNX MLP built with onnx.helper and
synthetic inputs of every kind. Imported explicitly (`from serving_fixtures import ...`)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import onnx
from PIL import Image
from onnx import TensorProto, helper, numpy_helper

MEAN, STD = 33.32, 78.57


def mlp_weights(hidden: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((784, hidden)) / 28.0).astype(np.float32),
        "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((hidden, 10)) / np.sqrt(hidden)).astype(np.float32),
        "b2": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }


def mlp_onnx(weights: dict[str, np.ndarray], mean: float = MEAN, std: float = STD) -> onnx.ModelProto:
    """The serving contract: input `pixels` uint8 [batch, 28, 28] (raw 0..255; the cast and the
    normalisation are inside the graph), outputs `logits` and `probabilities` float32 [batch, 10]."""
    inits = [numpy_helper.from_array(v, name) for name, v in weights.items()]
    inits += [
        numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(mean, dtype=np.float32), "mean"),
        numpy_helper.from_array(np.array(std, dtype=np.float32), "std"),
    ]
    nodes = [
        helper.make_node("Cast", ["pixels"], ["x_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x_f", "flat_shape"], ["x_flat"]),
        helper.make_node("Sub", ["x_flat", "mean"], ["x_c"]),
        helper.make_node("Div", ["x_c", "std"], ["x_n"]),
        helper.make_node("Gemm", ["x_n", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mnist_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 28, 28])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime reads IR 8 with opset 17 everywhere
    onnx.checker.check_model(model)
    return model


def reference_probabilities(weights: dict[str, np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """The same MLP in numpy, float64: what the ONNX model must agree with."""
    x = (pixels.reshape(len(pixels), -1).astype(np.float64) - MEAN) / STD
    h = np.maximum(x @ weights["w1"] + weights["b1"], 0.0)
    z = h @ weights["w2"] + weights["b2"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def save_model(path: Path, hidden: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    weights = mlp_weights(hidden, seed)
    onnx.save(mlp_onnx(weights), str(path))
    return weights


def digits(n: int, seed: int = 1) -> np.ndarray:
    """Random uint8 images (N, 28, 28): with the random MLP, predictions spread over several classes."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write an IDX uint8 file: images (N, 28, 28) or labels (N,)."""
    magic = 0x00000803 if array.ndim == 3 else 0x00000801
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return path


BAD_INPUTS = sorted([
    "shape", "shape1d", "dtype", "nan", "inf", "range", "empty", "not_npy", "idx_truncated",
    "idx_gz_truncated", "gz_stream_cut", "idx_labels_as_images", "idx_size", "idx_empty",
    "unknown_kind", "empty_file", "missing", "empty_folder", "folder_only_text", "folder_text_as_png",
    "folder_truncated", "folder_gif", "labels_csv_missing", "labels_csv_unknown_file", "labels_csv_bad_label",
])


def make_bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (input path, regex the error must match)."""
    cases: dict[str, tuple[Path, str]] = {}

    def npy(name: str, a: np.ndarray, pattern: str) -> None:
        np.save(tmp / f"{name}.npy", a)
        cases[name] = (tmp / f"{name}.npy", pattern)

    npy("shape", np.zeros((4, 32, 32), np.uint8), r"shape\.npy: array of shape \(4, 32, 32\), expected \(N, 28, 28\) or \(N, 784\)")
    npy("shape1d", np.zeros(784, np.uint8), r"shape \(784,\), expected")
    npy("dtype", np.zeros((4, 784), np.int64), r"dtype\.npy: dtype int64, expected uint8 or a float type")
    nan = np.zeros((9, 784), np.float32)
    nan[6, 100] = np.nan
    npy("nan", nan, r"nan\.npy: record 6 has NaN or infinite values")
    inf = np.zeros((9, 28, 28), np.float64)
    inf[2, 3, 4] = -np.inf
    npy("inf", inf, r"inf\.npy: record 2 has NaN or infinite values")
    neg = np.zeros((3, 784), np.float32)
    neg[1, 0] = -0.5
    npy("range", neg, r"range\.npy: record 1 has values outside 0\.\.255")
    npy("empty", np.zeros((0, 28, 28), np.uint8), r"empty\.npy: empty input \(0 images\)")
    (tmp / "junk.npy").write_bytes(b"not numpy at all")
    cases["not_npy"] = (tmp / "junk.npy", r"junk\.npy: not a readable \.npy array")

    x = digits(5)
    full = write_idx(tmp / "t.idx", x).read_bytes()
    (tmp / "trunc.idx").write_bytes(full[:-100])
    cases["idx_truncated"] = (tmp / "trunc.idx", r"trunc\.idx: \d+ bytes, expected 3936 .*truncated")
    (tmp / "trunc.idx.gz").write_bytes(gzip.compress(full[:-1000]))
    cases["idx_gz_truncated"] = (tmp / "trunc.idx.gz", r"trunc\.idx\.gz: file ends inside image 3")
    (tmp / "cut.idx.gz").write_bytes(gzip.compress(full)[:-20])
    cases["gz_stream_cut"] = (tmp / "cut.idx.gz", r"cut\.idx\.gz: unreadable from image \d+ on \(Compressed file ended")
    cases["idx_labels_as_images"] = (write_idx(tmp / "lab.idx", np.arange(5, dtype=np.uint8)), r"lab\.idx: magic number 0x00000801, expected 0x00000803")
    write_idx(tmp / "small.idx", np.zeros((2, 20, 20), np.uint8))
    cases["idx_size"] = (tmp / "small.idx", r"small\.idx: images of \(20, 20\) pixels, expected \(28, 28\)")
    write_idx(tmp / "zero.idx", np.zeros((0, 28, 28), np.uint8))
    cases["idx_empty"] = (tmp / "zero.idx", r"zero\.idx: empty input")
    (tmp / "notes.txt").write_text("hello")
    cases["unknown_kind"] = (tmp / "notes.txt", r"notes\.txt: not an input this job reads; expected an IDX")
    (tmp / "nothing.bin").write_bytes(b"")
    cases["empty_file"] = (tmp / "nothing.bin", r"nothing\.bin: empty file")
    cases["missing"] = (tmp / "absent.npy", r"absent\.npy: no such file or folder")
    (tmp / "emptydir").mkdir()
    cases["empty_folder"] = (tmp / "emptydir", r"emptydir: empty input \(no image files")

    def folder(name: str, bad_name: str, data: bytes, pattern: str) -> None:
        d = tmp / name
        d.mkdir()
        for i in range(3):
            Image.fromarray(x[i]).save(d / f"{i}.png")
        (d / bad_name).write_bytes(data)
        cases[name] = (d, pattern)

    (tmp / "folder_only_text").mkdir()
    (tmp / "folder_only_text" / "notes.txt").write_text("no image here")
    cases["folder_only_text"] = (tmp / "folder_only_text", r"folder_only_text: empty input \(no image files")
    folder("folder_text_as_png", "2b.png", b"a text file", r"2b\.png: not a PNG or JPEG image")
    png = (tmp / "folder_text_as_png" / "0.png").read_bytes()
    folder("folder_truncated", "1b.png", png[: len(png) // 2], r"1b\.png: unreadable image .*expected a PNG or JPEG")
    gif = tmp / "g.gif"
    Image.fromarray(x[0]).save(gif)
    folder("folder_gif", "9.gif", gif.read_bytes(), r"9\.gif: not a PNG or JPEG image")
    folder("labels_csv_missing", "labels.csv", b"file,label\n0.png,1\n1.png,2\n",
           r"labels\.csv: no label for 1 of the 3 images \(first: 2\.png\)")
    folder("labels_csv_unknown_file", "labels.csv", b"file,label\n0.png,1\n1.png,2\n2.png,3\n7.png,1\n",
           r"labels\.csv: line 5: '7\.png' is not an image file of the folder")
    folder("labels_csv_bad_label", "labels.csv", b"file,label\n0.png,1\n1.png,12\n2.png,3\n",
           r"labels\.csv: line 3: label '12' for 1\.png, expected 0\.\.9")
    return cases


def train_quickly(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """A 784-50-10 MLP trained with torch for one epoch (~3 s of CPU): ~94% test accuracy.

    On one torch thread: on a machine the test workers share, torch's default (a thread per core)
    spins against the other workers; measured under load, 19 s of CPU (72 s wall) instead of 3 (11)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        x = (torch.from_numpy(images.reshape(len(images), 784).copy()).float() - MEAN) / STD
        y = torch.from_numpy(labels.astype(np.int64))
        for batch in torch.randperm(len(x)).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return {"w1": net[0].weight.detach().numpy().T.copy(), "b1": net[0].bias.detach().numpy(),
            "w2": net[2].weight.detach().numpy().T.copy(), "b2": net[2].bias.detach().numpy()}
