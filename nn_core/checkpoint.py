"""Checkpoints: written atomically by the main process, loaded with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_torch_save(obj, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
