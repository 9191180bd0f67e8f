"""The training step's pieces that bench/bench_training.py made leaner must compute exactly what the
plain versions compute: Adam's direct kernel call, the in-place normalisation, the pixel statistics."""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from nn_core.model import MLPConfig, build_model, stats_from
from nn_core.optim import FusedAdamStep, supported


def _model():
    return build_model(MLPConfig(hidden=(16,), mean=30.0, std=70.0), seed=3)


def _batches(n=12, b=32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (b, 28, 28), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def _train(model, optimizer, scheduler, step, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        for p in model.parameters():
            p.grad = None
        loss.backward()
        step()
        if scheduler is not None:
            scheduler.step()


SCHEDULES = {
    "none": lambda opt: None,
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=12),  # moves beta1 too
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_direct_fused_step_is_bit_identical_to_adam_step(schedule, weight_decay):
    runs = []
    for direct in (False, True):
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=weight_decay, fused=True)
        sched = SCHEDULES[schedule](opt)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. the scheduler's "lr_scheduler.step() before optimizer.step()"
            _train(model, opt, sched, FusedAdamStep(opt) if direct else opt.step, _batches())
        runs.append((model.state_dict(), opt.state_dict()))
    (ref_model, ref_opt), (model, opt) = runs
    assert all(torch.equal(ref_model[k], model[k]) for k in ref_model)
    for i, state in ref_opt["state"].items():
        assert all(torch.equal(state[k], opt["state"][i][k]) for k in state), i
    assert ref_opt["param_groups"] == opt["param_groups"]


def test_direct_step_resumes_from_a_loaded_state_like_adam():
    batches = _batches()
    results = []
    for direct in (False, True):
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
        _train(model, opt, None, opt.step, batches[:6])
        saved_model, saved_opt = model.state_dict(), opt.state_dict()
        model = _model()  # a new process: the checkpoint is loaded, then the step is made
        model.load_state_dict(saved_model)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
        opt.load_state_dict(saved_opt)
        _train(model, opt, None, FusedAdamStep(opt) if direct else opt.step, batches[6:])
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_what_the_direct_call_does_not_cover_goes_through_optimizer_step():
    model = _model()
    assert not supported(torch.optim.Adam(model.parameters(), amsgrad=True, fused=True))
    assert not supported(torch.optim.Adam(model.parameters()))  # not fused
    assert not supported(torch.optim.SGD(model.parameters(), lr=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    opt.register_step_post_hook(lambda *_: None)
    assert not supported(opt)

    # A parameter without a gradient (left out of the loss) is skipped, as Adam skips it.
    results = []
    for direct in (False, True):
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
        model.layers[2].weight.sum().backward()
        (FusedAdamStep(opt) if direct else opt.step)()
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert torch.equal(results[1]["layers.0.weight"], _model().state_dict()["layers.0.weight"])
    assert not torch.equal(results[1]["layers.2.weight"], _model().state_dict()["layers.2.weight"])


def test_the_model_normalises_a_copy_of_its_input():
    model = _model()
    x = torch.rand(4, 28, 28) * 255  # float32 already: .to(float32) alone would return the same tensor
    before = x.clone()
    out = model(x)
    assert torch.equal(x, before)
    expected = model.layers((before.reshape(4, -1) - model.mean) / model.std)
    assert torch.equal(out, expected)


def test_pixel_statistics_are_exact():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=g)
    values = images.flatten().tolist()
    n = len(values)
    mean = Fraction(sum(values), n)
    variance = sum((Fraction(v) - mean) ** 2 for v in values) / (n - 1)
    got_mean, got_std = stats_from(images)
    assert got_mean == float(mean)
    assert got_std == pytest.approx(float(variance) ** 0.5, rel=1e-15)
    ref = images.to(torch.float64)
    assert (got_mean, got_std) == pytest.approx((float(ref.mean()), float(ref.std())), rel=1e-12)
    with pytest.raises(TypeError, match="uint8"):
        stats_from(images.float())


def test_both_ways_of_gathering_batches_train_the_same_weights():
    from nn_core.distributed import ddp_context
    from nn_core.train import run_epoch

    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (500, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (500,), generator=g)
    idx = torch.randperm(500, generator=g)[:450]
    results = []
    with ddp_context("cpu") as env:
        for per_batch in (True, False):  # the CPU's way and the GPU's
            model = _model()
            opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
            losses, acc = run_epoch(model, FusedAdamStep(opt), None, images, labels, idx, 64, env, per_batch=per_batch)
            results.append((model.state_dict(), losses, acc))
    (a, la, acca), (b, lb, accb) = results
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(la, lb) and acca == accb
    assert len(la) == 8  # 450 samples in batches of 64: the last one short
