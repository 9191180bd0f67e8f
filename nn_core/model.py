"""The MLP: 784 -> hidden... -> 10, ReLU. Callers feed raw pixels (0..255); the model normalises.
BatchLoss: the MLP and its loss as one module, what a training step differentiates."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nn_core.config import MNIST_MEAN, MNIST_STD, MLPConfig  # noqa: F401 (the model's config, torch-free)


def stats_from(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (sample) std of uint8 images from the count of each of the 256 pixel values, in exact
    arithmetic (only the conversion to float and the square root round). The same figures on every
    device, and no float64 copy of the images (314 MB and 0.1 s for MNIST's training split)."""
    from fractions import Fraction

    if images.dtype != torch.uint8:
        raise TypeError(f"stats_from expects uint8 pixels, got {images.dtype}")
    counts = torch.bincount(images.flatten(), minlength=256).tolist()
    n = sum(counts)
    total = sum(v * c for v, c in enumerate(counts))
    squares = sum(v * v * c for v, c in enumerate(counts))
    variance = (Fraction(squares) - Fraction(total * total, n)) / (n - 1)
    return float(Fraction(total, n)), math.sqrt(variance)


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        # Buffers, not parameters: fixed, saved in the state dict, exported into the ONNX graph.
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32))
        sizes = [config.in_features, *config.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], config.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # (B, 784), raw 0..255, in a copy of its own (also when the input is float32 already), so
        # that it is normalised in place: two fewer (B, 784) temporaries a step, a tenth of an
        # epoch on the CPU (bench/bench_training.py). The exported graph is the same.
        x = pixels.reshape(pixels.shape[0], -1).to(torch.float32, copy=True)
        return self.layers(x.sub_(self.mean).div_(self.std))  # (B, 10) logits


class BatchLoss(nn.Module):
    """A training step's forward: (mean cross-entropy, predicted classes) of a batch of pixels and
    labels. One module, so that nn_core.captured can record the forward and backward of the whole
    step as CUDA graphs; run_epoch calls it eagerly otherwise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(pixels)  # (B, 10)
        return F.cross_entropy(logits, labels), logits.argmax(1)


def build_model(config: MLPConfig, seed: int) -> MLP:
    """Initial weights depend only on the seed (not on the process or the device)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(config)
