"""Defaults of the batch job that its command line shows, without importing onnxruntime or pyarrow
(so `--help` and argument errors stay instant)."""

from __future__ import annotations

from typing import Literal

EXPERIMENT = "mnist-mlp-inference"
DEFAULT_MODEL_URI = "models:/mnist-mlp@champion"
# Measured on 2 CPU cores with the 784-50-10 MLP: 1024-2048 beat 8192 by ~1.3x (a batch's float
# intermediates stay in cache) and need a third of the memory; a GPU wants big batches to stay busy.
CPU_BATCH_SIZE = 1024
CUDA_BATCH_SIZE = 16384
Format = Literal["parquet", "csv"]
FORMATS: tuple[Format, ...] = ("parquet", "csv")
