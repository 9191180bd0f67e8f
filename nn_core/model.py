"""The MLP: 784 -> hidden... -> 10, ReLU. Callers feed raw pixels (0..255); the model normalises."""

from __future__ import annotations

import torch
from torch import nn

from nn_core.config import MNIST_MEAN, MNIST_STD, MLPConfig  # noqa: F401 (the model's config, torch-free)


def stats_from(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of uint8 images, computed in float64 so the figures do not depend on the device."""
    x = images.to(torch.float64)
    return float(x.mean()), float(x.std())


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
        x = pixels.reshape(pixels.shape[0], -1).to(torch.float32)  # (B, 784), raw 0..255
        return self.layers((x - self.mean) / self.std)  # (B, 10) logits


def build_model(config: MLPConfig, seed: int) -> MLP:
    """Initial weights depend only on the seed (not on the process or the device)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(config)
