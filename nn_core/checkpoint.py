"""Checkpoints: written atomically by the main process, loaded with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch

from common.atomic import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_torch_save(obj, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # A file object, not the path: torch.save names the archive's inner folder after a path, so
        # the random temporary name would make two saves of the same data differ byte for byte.
        torch.save(obj, f)
    return Path(path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    # weights_only: a checkpoint is data, never code to run.
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(path: Path):
    """Rebuild the trained MLP from a checkpoint: MLP(MLPConfig(**ckpt['model_config']))."""
    from nn_core.model import MLP, MLPConfig

    ckpt = load_checkpoint(path)
    model = MLP(MLPConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), ckpt
