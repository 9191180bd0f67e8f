"""Loading the prepared cache against torchvision's MNIST dataset with a per-sample DataLoader
(the usual way): the time to have the whole training split in hand, and the ratio."""

from __future__ import annotations

import shutil
import time

import torch

from harness import mnist, row, torchvision_root
from nn_core.data import load_splits


def cache_load(path) -> float:
    t = time.perf_counter()
    s = load_splits(path)
    _ = s.train_images.float()  # (50000, 28, 28): in hand, as a training process uses it
    return time.perf_counter() - t


def torchvision_epoch(root) -> float:
    from torchvision import datasets, transforms

    t = time.perf_counter()
    ds = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
    train = torch.utils.data.Subset(ds, range(50_000))
    n = 0
    for x, y in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True):
        n += len(y)
    assert n == 50_000
    return time.perf_counter() - t


def main() -> dict:
    prepared = mnist()
    root = torchvision_root()
    try:
        ours = min(cache_load(prepared.cache_path) for _ in range(3))
        ref = torchvision_epoch(root)
    finally:
        shutil.rmtree(root)
    print("data: the training split in hand")
    row("mnistops cache (torch.load + checksum)", ours, "s")
    row("torchvision MNIST + per-sample DataLoader, 1 pass", ref, "s")
    row("ratio (reference / mnistops)", ref / ours, "x")
    return {"cache_s": ours, "torchvision_s": ref, "ratio": ref / ours}


if __name__ == "__main__":
    main()
