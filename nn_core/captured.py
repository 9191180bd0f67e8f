"""A one-GPU training's full-batch forward and backward, replayed from CUDA graphs.

Why: on a GPU a step of this MLP is bound by the CPU that launches it. Eagerly, the forward, loss and
backward of one batch are 31 ATen operators (88 with those they call; counted with torch.profiler on
the CPU, 2026-12-03: a GPU step goes through the same dispatch), each some microseconds of Python,
dispatcher and autograd, while the GPU runs each kernel in about as long or less. `torch.cuda.make_graphed_callables`, torch's partial-network
capture, records them once and replays the forward and the backward as one launch each; Adam's step
(`optimizer.step()`, fused) and the LR schedule stay eager, as in its documented recipe, so the
schedules, OneCycle's betas and checkpoints work on the optimizer as usual. The training loop
(nn_core.train.run_epoch) is the same either way: a graphed step is what it calls for a full batch.

Figure: not measured yet. No GPU has run `make gpu-check`, which trains one GPU both ways and prints
"epoch eager / epoch one GPU": that ratio is what this module must earn (STYLE item 19); if it stays
below ~1.2x, remove the module and its plug (`full_batch` in run_epoch).

Only for one process on one GPU: with DDP peers, the gradient all-reduce runs on backward hooks,
which a graph would skip. MNISTOPS_CUDA_GRAPHS=0 turns it off. A capture that fails (an operator
that cannot be captured, an old driver) leaves the training eager, with one warning and the reason in
the result's step_mode.
"""

from __future__ import annotations

import warnings

import torch

from nn_core.model import BatchLoss

from common import settings

ENV = "MNISTOPS_CUDA_GRAPHS"  # "0": a GPU training's steps run eagerly too


def refusal(device: torch.device, world_size: int, shard: int, batch_size: int) -> str | None:
    """Why a training's steps are not replayed from a CUDA graph; None when they are."""
    if device.type != "cuda":
        return f"on the {device.type}: CUDA graphs are for a GPU"
    if settings.env(ENV, "1") == "0":
        return f"{ENV}=0"
    if world_size > 1:
        return f"{world_size} processes: DDP's gradient all-reduce runs eagerly"
    if shard < batch_size:
        return f"no full batch ({shard} samples, batch {batch_size})"
    return None


def graphed_batch_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       batch_size: int) -> BatchLoss:
    """BatchLoss(model) with its forward and backward for batches of `batch_size` replayed from CUDA
    graphs (torch.cuda.make_graphed_callables). Its outputs and the gradients it produces live in the
    graphs' memory and are overwritten by the next call. Capturing runs three warm-up forwards and
    backwards with torch.autograd.grad, which leaves every .grad and weight as it was."""
    # Inputs of their own: a graphed call copies each batch into them, so they must not be views of
    # the training split.
    sample = (images[:batch_size].clone(), labels[:batch_size].clone())
    with torch.cuda.device(images.device):  # its warm-up and capture streams are the current device's
        return torch.cuda.make_graphed_callables(BatchLoss(model), sample)


def capture(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
            world_size: int) -> tuple[BatchLoss | None, str]:
    """The full-batch step for run_epoch's `full_batch`: (the graphed BatchLoss, "cuda-graph"), or
    (None, "eager (why)") where there is none. `images`, `labels`: the training split on the
    training's device, of which each of `world_size` ranks takes len(labels) // world_size an epoch."""
    reason = refusal(images.device, world_size, len(labels) // world_size, batch_size)
    if reason is not None:
        return None, f"eager ({reason})"
    stream = torch.cuda.current_stream(images.device)
    try:
        return graphed_batch_loss(model, images, labels, batch_size), "cuda-graph"
    except RuntimeError as e:
        # torch.cuda.graph's __exit__ ends the capture before it leaves the capture stream, so a
        # capture_end that raises leaves this thread on that stream: put the training back on its own.
        torch.cuda.set_stream(stream)
        reason = f"the CUDA graph capture failed: {type(e).__name__}: {e}"
        warnings.warn(f"{reason}; training eagerly", RuntimeWarning, stacklevel=2)
        return None, f"eager ({reason})"
