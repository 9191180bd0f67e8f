"""Shared by the benchmarks: where the data comes from, and how figures are printed."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from nn_core.data import PreparedDataset, prepare

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from nn_core.datasets import MNIST


def mnist(data_dir: Path | None = None) -> PreparedDataset:
    """Real MNIST from MNISTOPS_DATA_SOURCE (or the mirrors), cached as the pipeline caches it."""
    return prepare(MNIST, os.environ.get("MNISTOPS_DATA_SOURCE"), data_dir)


def torchvision_root(source: str | None = None) -> Path:
    """A folder laid out as torchvision's MNIST(root, download=False) expects: root/MNIST/raw/ with
    the four uncompressed files (torchvision cannot read the .gz files alone offline)."""
    source = Path(source or os.environ["MNISTOPS_DATA_SOURCE"])
    root = Path(tempfile.mkdtemp(prefix="bench-torchvision-"))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNIST.files:
        gz, plain = source / (f.filename + ".gz"), source / f.filename
        if plain.exists():
            shutil.copy(plain, raw / f.filename)
        else:
            (raw / f.filename).write_bytes(gzip.decompress(gz.read_bytes()))
    return root


def row(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"  {name:52s} {value:12.3f} {unit:10s} {note}")
