"""A one-GPU training replays its full-batch forward and backward from CUDA graphs (nn_core.captured),
plugged into the one training loop (nn_core.train.run_epoch) as its `full_batch` step.

On the CPU: the loop against a full-batch step that handles memory as a graphed one does (its inputs
copied into tensors of one shape, its outputs the same tensors every call, overwritten by the next),
which must train exactly as the eager loop. That checks the loop's side of the plug, not a CUDA graph.
A real graph needs a CUDA machine, and none has run one yet: the tests marked `cuda` below are skipped
without one, and `make gpu-check` (bench/gpu_check.py, which would train one GPU both ways and compare)
has not been run on a GPU either."""

from __future__ import annotations

import warnings

import pytest
import torch

from nn_core.captured import capture
from nn_core.distributed import DistEnv
from nn_core.model import BatchLoss, MLPConfig, build_model
from nn_core.config import TrainConfig
from nn_core.train import make_scheduler, run_epoch, shard_indices

N, BATCH = 1000, 64  # 15 full batches and a tail of 40 an epoch
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


class Reused(torch.autograd.Function):
    """`out` filled with `value`, returned as a new tensor on out's memory whose gradient goes to
    `value`: what a graphed callable returns (its static output, detached, as a new autograd output)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(value).detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ReusesItsMemory(BatchLoss):
    """A full-batch step with a graphed step's memory, as far as the loop sees it: a batch is copied
    into inputs of one shape (another shape raises, as copying into a graph's static input does), and
    the loss and predictions it returns live in the same memory every call."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
        super().__init__(model)
        self.x, self.y = x.clone(), y.clone()
        self.loss, self.preds = torch.zeros(()), torch.zeros(len(y), dtype=torch.int64)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, preds = super().forward(self.x.copy_(x), self.y.copy_(y))
        return Reused.apply(loss, self.loss), self.preds.copy_(preds)


def _data(device="cpu"):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=g)
    return images.to(device), torch.randint(0, 10, (N,), generator=g).to(device)


def _env(device="cpu") -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device(device), backend=None)


def _two_epochs(schedule: str, plug=None, device="cpu"):
    """Two epochs of run_epoch; `plug(model, images, labels)` makes its full-batch step (None: eager)."""
    images, labels = _data(device)
    model = build_model(MLPConfig(hidden=(32,), mean=33.0, std=78.0), seed=0).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4, fused=True)
    scheduler = make_scheduler(optimizer, TrainConfig(epochs=2, schedule=schedule), -(-N // BATCH))
    full_batch = plug(model, images, labels) if plug else None
    figures = [run_epoch(model, optimizer, scheduler, images, labels, shard_indices(N, epoch, 0, _env(device)),
                         BATCH, _env(device), full_batch=full_batch) for epoch in (1, 2)]
    return model, optimizer, figures


def _same(a, b, exact: bool = True) -> None:
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-6))
    (ma, oa, fa), (mb, ob, fb) = a, b
    for (la, acc_a), (lb, acc_b) in zip(fa, fb):
        assert len(la) == -(-N // BATCH) and check(la, lb)
        assert acc_a == acc_b if exact else abs(acc_a - acc_b) <= 2 / N
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert check(pa, pb), name
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        assert all(check(sa["state"][k][f], sb["state"][k][f]) for f in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])  # OneCycle moves Adam's betas every step
def test_a_full_batch_step_in_reused_memory_trains_exactly_as_the_eager_loop(schedule):
    plugged = _two_epochs(schedule, lambda m, x, y: ReusesItsMemory(m, x[:BATCH], y[:BATCH]))
    _same(plugged, _two_epochs(schedule))
    losses = plugged[2][0][0]
    assert len(set(losses.tolist())) == len(losses)  # each step's own loss, not the last one's 16 times


def test_a_cpu_training_is_not_captured():
    images, labels = _data()
    model = build_model(MLPConfig(hidden=(32,)), seed=0)
    assert capture(model, images, labels, BATCH, world_size=1) == (None, "eager (on the cpu: CUDA graphs are for a GPU)")


@cuda
@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_graphed_steps_train_as_the_eager_loop_on_a_gpu(schedule, monkeypatch):
    monkeypatch.delenv("MNISTOPS_CUDA_GRAPHS", raising=False)
    modes = []

    def graphed(model, images, labels):
        full_batch, mode = capture(model, images, labels, BATCH, world_size=1)
        modes.append(mode)
        return full_batch

    _same(_two_epochs(schedule, graphed, "cuda"), _two_epochs(schedule, None, "cuda"), exact=False)
    assert modes == ["cuda-graph"]


class SyncsEveryStep(torch.nn.Module):
    """A model whose forward reads a value back to the CPU: a sync no CUDA graph can capture."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits * float(logits.abs().max() > -1)  # 1.0, read on the CPU


@cuda
def test_a_failed_capture_leaves_an_eager_training_on_its_own_stream():
    images, labels = _data("cuda")
    model = SyncsEveryStep(build_model(MLPConfig(hidden=(32,)), seed=0).cuda())
    stream = torch.cuda.current_stream()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full_batch, mode = capture(model, images, labels, BATCH, world_size=1)
    assert full_batch is None and mode.startswith("eager (the CUDA graph capture failed: ")
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [mode[len("eager ("):-1] + "; training eagerly"]
    assert torch.cuda.current_stream() == stream
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    losses, _ = run_epoch(model, optimizer, None, images, labels, torch.arange(N, device="cuda"), BATCH, _env("cuda"))
    assert torch.isfinite(losses).all() and len(losses) == -(-N // BATCH)
