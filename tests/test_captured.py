"""A one-GPU training replays its full-batch steps from a CUDA graph (nn_core.captured). No GPU here, so
the loop around the graph runs on the CPU with a stand-in for the capture that keeps a graph's one
rule: a replay writes into the memory the capture made (the gradients, the loss buffer, the counts)
and changes nothing else, not even which tensor a parameter's .grad is. Against that stand-in the
captured epochs must train exactly as the eager loop does; a CUDA graph itself runs in
`make gpu-check` (bench/gpu_check.py), which reports the step mode and the epoch both ways."""

from __future__ import annotations

import torch

from nn_core.captured import ENV, CapturedSteps, refusal
from nn_core.data import Splits
from nn_core.distributed import DistEnv
from nn_core.model import MLPConfig, build_model
from nn_core.optim import FusedAdamStep
from nn_core.train import capture_steps, run_epoch, run_epoch_captured, shard_indices

CPU_ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
N, BATCH = 1000, 64  # 15 full batches and a tail of 40 an epoch


def replayed_eagerly(fn, params, reset):
    """CPU stand-in for cuda_graph: the capture runs `fn` once and keeps the gradient tensors it made;
    a replay runs it again, copies its gradients into those tensors and leaves every .grad pointing
    where it pointed before (a CUDA graph's replay writes into captured memory, nothing else)."""
    fn()
    reset()
    captured = [p.grad for p in params]

    def replay():
        held = [p.grad for p in params]
        fn()
        for c, p, h in zip(captured, params, held):
            c.copy_(p.grad)
            p.grad = h

    return replay


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (N,), generator=g))


def _training(schedule: str):
    model = build_model(MLPConfig(hidden=(32,), mean=33.0, std=78.0), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4, fused=True)
    steps = -(-N // BATCH) * 2
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if schedule == "cosine"
                 else torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps))
    return model, optimizer, scheduler, FusedAdamStep(optimizer)


def _two_epochs(captured: bool, schedule: str):
    images, labels = _data()
    model, optimizer, scheduler, step = _training(schedule)
    cap = CapturedSteps(model, images, labels, N, BATCH, capture=replayed_eagerly) if captured else None
    figures = []
    for epoch in (1, 2):
        idx = shard_indices(N, epoch, 0, CPU_ENV)
        if captured:
            figures.append(run_epoch_captured(cap, model, step, scheduler, images, labels, idx, BATCH, CPU_ENV))
        else:
            figures.append(run_epoch(model, step, scheduler, images, labels, idx, BATCH, CPU_ENV))
    return model, optimizer, figures


def _same(a, b) -> None:
    (ma, oa, fa), (mb, ob, fb) = a, b
    for (la, acc_a), (lb, acc_b) in zip(fa, fb):
        assert torch.equal(la, lb) and acc_a == acc_b
        assert len(la) == -(-N // BATCH)
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(pa, pb), name
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        assert all(torch.equal(sa["state"][k][f], sb["state"][k][f]) for f in ("step", "exp_avg", "exp_avg_sq"))


def test_captured_epochs_train_exactly_as_the_eager_loop():
    for schedule in ("cosine", "onecycle"):  # OneCycle moves Adam's betas every step: read outside the graph
        _same(_two_epochs(True, schedule), _two_epochs(False, schedule))


def test_the_stand_in_holds_a_graph_to_its_memory(monkeypatch):
    """Without pointing .grad back at the graph's gradients after the eager tail, the next epoch's
    Adam steps would read the tail's stale gradients: the stand-in must catch that, or it tests
    nothing about a real graph."""
    monkeypatch.setattr(CapturedSteps, "restore_grads", lambda self: None)
    stale = _two_epochs(True, "cosine")
    eager = _two_epochs(False, "cosine")
    assert not all(torch.equal(p, q) for p, q in zip(stale[0].parameters(), eager[0].parameters()))


def test_making_the_capture_changes_no_weight():
    images, labels = _data()
    model = _training("cosine")[0]
    before = [p.detach().clone() for p in model.parameters()]
    cap = CapturedSteps(model, images, labels, N, BATCH, capture=replayed_eagerly)
    assert cap.steps == N // BATCH
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is g for p, g in zip(cap.params, cap.grads))


def test_which_trainings_are_captured(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(ENV, raising=False)
    assert refusal(cuda, 1, 50_000, 256, fused_step=True) is None
    assert "cpu" in refusal(torch.device("cpu"), 1, 50_000, 256, True)
    assert "DDP" in refusal(cuda, 2, 25_000, 128, True)
    assert "no full batch" in refusal(cuda, 1, 100, 256, True)
    assert "fused" in refusal(cuda, 1, 50_000, 256, False)
    monkeypatch.setenv(ENV, "0")
    assert refusal(cuda, 1, 50_000, 256, True) == f"{ENV}=0"


def test_a_cpu_training_says_it_ran_eagerly_and_why():
    images, labels = _data()
    splits = Splits(name="mnist", digest="x", train_images=images, train_labels=labels, val_images=images[:10],
                    val_labels=labels[:10], test_images=images[:10], test_labels=labels[:10])
    model, _, _, step = _training("cosine")
    captured, mode = capture_steps(model, splits, CPU_ENV, BATCH, step)
    assert captured is None and mode == "eager (on the cpu: CUDA graphs are for a GPU)"
