"""The training step's pieces that bench/bench_training.py made leaner must compute exactly what the
plain versions compute: the in-place normalisation, the pixel statistics, the two ways of gathering
a batch."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from nn_core.model import MLPConfig, build_model, stats_from


def _model():
    return build_model(MLPConfig(hidden=(16,), mean=30.0, std=70.0), seed=3)


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
            losses, acc = run_epoch(model, opt, None, images, labels, idx, 64, env, per_batch=per_batch)
            results.append((model.state_dict(), losses, acc))
    (a, la, acca), (b, lb, accb) = results
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(la, lb) and acca == accb
    assert len(la) == 8  # 450 samples in batches of 64: the last one short
