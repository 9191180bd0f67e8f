"""Functions that run in real DDP worker processes started by torch's elastic launcher from a test
(module level, so the spawned workers can import them)."""

from __future__ import annotations


def evaluate_in_group(cache: str, seed: int) -> dict:
    """The validation split evaluated by this worker's share of a gloo process group (nn_core's own
    set-up from torchrun's environment); every rank returns the all-reduced figures."""
    from nn_core.distributed import ddp_context

    with ddp_context("cpu") as env:
        return evaluate_split(cache, seed, env)


def evaluate_split(cache: str, seed: int, env) -> dict:
    """The validation split evaluated by this process's share of `env`'s group, in batches of 7."""
    from nn_core.data import load_splits
    from nn_core.model import MLPConfig, build_model
    from nn_core.train import evaluate

    s = load_splits(cache)
    model = build_model(MLPConfig(), seed)
    r = evaluate(model, s.val_images, s.val_labels, env, batch_size=7)
    return {"loss": r.loss, "correct": r.correct, "total": r.total, "confusion": r.confusion.tolist(),
            "world_size": env.world_size}
