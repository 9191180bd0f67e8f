"""A one-GPU training's steps replayed from a CUDA graph.

On a GPU, a step of an MLP this small is bound by the CPU that launches it: eager PyTorch spends
several microseconds of Python, dispatcher and autograd on each of the ~20 kernels of a step, and
the GPU runs each of them in about as long or less. So the gather of one full batch by the epoch's
permutation, the forward, the loss and the backward are recorded once as a CUDA graph
(torch.cuda.graph) and replayed for every full batch of every epoch: one graph launch for ~16
kernels, then Adam's two.
Adam's fused kernel (nn_core.optim.FusedAdamStep) and the LR schedule stay outside the graph and read
the optimizer's hyperparameters every step, so the schedules, OneCycle's betas and checkpoints
behave exactly as in the eager loop (nn_core.train.run_epoch), which runs the same operations on the
same batches.

What changes from one replay to the next lives in device tensors that the graph reads: the epoch's
permutation (copied in when an epoch starts) and the step's position (advanced by the graph itself).
What a replay produces goes into tensors made during the capture: the gradients (each parameter's
.grad points at them), the step's loss (into a buffer of the epoch's losses, at that position) and
the count of correct predictions. The last, partial batch of an epoch runs eagerly.

Only for one process on one GPU: with DDP peers, the gradient all-reduce runs on backward hooks
and stays eager. MNISTOPS_CUDA_GRAPHS=0 turns it off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from common import settings

ENV = "MNISTOPS_CUDA_GRAPHS"  # "0": a GPU training's steps run eagerly too
WARMUP_STEPS = 3  # eager runs on a side stream before the capture: cuBLAS handles, autograd's lazy set-up

# capture(fn, params, reset) -> replay: records what fn does once and returns a function that does it
# again; `reset` puts back what a run of fn advanced (it runs between the warm-up runs).
Capture = Callable[[Callable[[], None], list[torch.Tensor], Callable[[], None]], Callable[[], None]]


def refusal(device: torch.device, world_size: int, shard: int, batch_size: int, fused_step: bool) -> str | None:
    """Why a training's steps are not replayed from a CUDA graph; None when they are."""
    if device.type != "cuda":
        return f"on the {device.type}: CUDA graphs are for a GPU"
    if settings.env(ENV, "1") == "0":
        return f"{ENV}=0"
    if world_size > 1:
        return f"{world_size} processes: DDP's gradient all-reduce runs eagerly"
    if shard < batch_size:
        return f"no full batch ({shard} samples, batch {batch_size})"
    if not fused_step:
        return "the optimizer step is not Adam's fused kernel"
    return None


def cuda_graph(fn: Callable[[], None], params: list[torch.Tensor], reset: Callable[[], None]) -> Callable[[], None]:
    """Warm up on a side stream, then record one run of `fn` as a CUDA graph; its replay.

    thread_local: only this thread's unsafe CUDA calls spoil the capture, not the NCCL watchdog's or
    another library thread's; the backward's kernels, launched by autograd's device thread onto the
    capturing stream, are recorded as well (capture follows the stream)."""
    device = params[0].device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            fn()
            reset()
    torch.cuda.current_stream(device).wait_stream(side)
    for p in params:
        p.grad = None  # the warm-up's gradients are freed before the capture, not during it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph.replay


class CapturedSteps:
    """The full-batch steps of a training over one split (on the device), captured once.

    `images`, `labels`: the whole training split; `shard`: the samples an epoch's permutation holds;
    `capture`: how the step is recorded (cuda_graph; tests pass a CPU stand-in with a graph's
    semantics). Making one changes no weight: its warm-up runs compute gradients and nothing steps."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, shard: int,
                 batch_size: int, capture: Capture = cuda_graph):
        device = images.device
        self.model, self.images, self.labels, self.batch_size = model, images, labels, batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps = shard // batch_size  # full batches an epoch: the replays
        self.perm = torch.zeros(shard, dtype=torch.int64, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.offsets = torch.arange(batch_size, device=device)
        self.losses = torch.zeros(self.steps, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.replay = capture(self._step, self.params, self.pos.zero_)
        self.grads = [p.grad for p in self.params]  # where the replays write the gradients

    def _step(self) -> None:
        """What is recorded: nothing in it may depend on a Python value that changes between steps."""
        for p in self.params:
            p.grad = None  # so the backward makes the gradients (in the graph's memory) instead of adding to them
        rows = self.perm.index_select(0, self.pos * self.batch_size + self.offsets)
        y = self.labels.index_select(0, rows)
        logits = self.model(self.images.index_select(0, rows))  # (B, 10)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self.losses.index_copy_(0, self.pos, loss.detach().view(1))
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.pos += 1

    def epoch(self, idx: torch.Tensor, step: Callable[[], None], scheduler) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay every full batch of the epoch's permutation `idx` (on the device, `shard` long),
        with Adam's step and the schedule's after each: (the steps' losses, correct predictions)."""
        self.perm.copy_(idx)
        self.pos.zero_()
        self.correct.zero_()
        for _ in range(self.steps):
            self.replay()
            step()
            if scheduler is not None:
                scheduler.step()
        return self.losses.clone(), self.correct.clone()

    def restore_grads(self) -> None:
        """Point each .grad at the graph's gradients again, after an eager step replaced them."""
        for p, g in zip(self.params, self.grads):
            p.grad = g
