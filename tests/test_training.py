"""DDP training on synthetic data: sharding, exact metrics, one MLflow run per training,
reproducibility. Restarts and multi-node rendezvous on real MNIST: tests/test_training_mnist.py;
the default config reaching the gate: tests/test_default_config.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch

from idx_files import synthetic_dataset
from nn_core import metrics as M
from nn_core import tracking
from nn_core.checkpoint import load_checkpoint
from nn_core.data import load_splits, prepare
from nn_core.distributed import DistEnv
from nn_core.launch import LaunchSpec, launch_training, new_training_id
from nn_core.train import TrackingConfig, TrainConfig, TrainJob, shard_indices, train


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    spec = synthetic_dataset(root / "src", n_train=1200, n_test=200)
    return prepare(spec, str(root / "src"), root / "data").cache_path


def _job(cache, out: Path, **train) -> TrainJob:
    tid = new_training_id()
    return TrainJob(data_path=str(cache), out_dir=str(out / tid), train=TrainConfig(**{"epochs": 3, "batch_size": 32, **train}),
                    tracking=TrackingConfig(training_id=tid, experiment="test-exp"))


def _untracked(job: TrainJob) -> TrainJob:
    """Weights only: no MLflow run (its plots and artifacts are rank 0's, after the last step)."""
    return replace(job, tracking=replace(job.tracking, enabled=False))


def _weights(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.checkpoint)["model_state"]


def _env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"), backend=None)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_equal_and_seeded(world):
    shards = [shard_indices(1000, epoch=2, seed=7, env=_env(r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    together = torch.cat(shards)
    assert len(together.unique()) == len(together) == (1000 // world) * world
    assert torch.equal(shards[0], shard_indices(1000, epoch=2, seed=7, env=_env(0, world)))
    assert not torch.equal(shards[0], shard_indices(1000, epoch=3, seed=7, env=_env(0, world)))
    assert not torch.equal(shards[0], shard_indices(1000, epoch=2, seed=8, env=_env(0, world)))


def _evaluate_with(world: int, cache: Path) -> dict[int, dict]:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from dist_workers import evaluate_in_group

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=new_training_id(),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, start_method="spawn")
    return elastic_launch(config, evaluate_in_group)(str(cache), 5)


def _evaluate_in_this_process(cache: Path) -> dict:
    """The one-process figures: the same worker function in a gloo group of one in this process
    (collectives included, as train_in_process runs a one-process training), no launcher to start."""
    from dist_workers import evaluate_split
    from nn_core.distributed import single_process_group

    with single_process_group("cpu") as env:
        return evaluate_split(str(cache), 5, env)


@pytest.mark.slow
def test_evaluation_at_any_world_size_equals_one_process(synthetic_cache):
    """A real gloo group of 3 processes over a split that does not divide evenly (200 samples: shards
    of 67, 67, 66, batches of 7 with a tail): every sample counted exactly once, the same figures as
    one process. (A group of 2 was run too: an even split of the same code path, 2 more workers.)"""
    one = _evaluate_in_this_process(synthetic_cache)
    assert one["total"] == 200 == sum(map(sum, one["confusion"])) and one["world_size"] == 1
    ranks = _evaluate_with(3, synthetic_cache)
    assert sorted(ranks) == [0, 1, 2] and all(r["world_size"] == 3 for r in ranks.values())
    for r in ranks.values():  # all-reduced: every rank holds the whole split's figures
        assert r["confusion"] == one["confusion"] and r["correct"] == one["correct"] and r["total"] == 200
        # per-batch sums are float32 (batches differ by world size), their total float64
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-6)


def _check_one_run(result, nproc: int, cache: Path) -> None:
    """The training's one MLflow run in experiment test-exp, logged by rank 0 alone."""
    assert result.val_accuracy > 0.9  # the synthetic classes are easy
    runs = mlflow.search_runs(experiment_names=["test-exp"], output_format="list")
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == str(nproc) and run.data.tags["backend"] == "gloo"
    assert run.data.tags["dataset_digest"] == load_splits(cache).digest
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.hidden"] == "50"
    c = tracking.client()
    # rank > 0 logs nothing: every epoch and every step appears exactly once
    assert sorted(m.step for m in c.get_metric_history(result.run_id, M.VAL_ACCURACY)) == [1, 2, 3]
    steps = [m.step for m in c.get_metric_history(result.run_id, M.TRAIN_LOSS_STEP)]
    assert sorted(steps) == list(range(3 * (1000 // 32 + 1)))
    assert {M.TEST_ACCURACY, M.TRAIN_ACCURACY, M.VAL_LOSS, M.TRAIN_LOSS} <= set(run.data.metrics)
    artifacts = {a.path for a in c.list_artifacts(result.run_id, "plots")} | {a.path for a in c.list_artifacts(result.run_id, "checkpoint")}
    assert {"plots/loss_curve.png", "plots/confusion_matrix_val.png", "plots/confusion_matrix_test.png", "checkpoint/checkpoint.pt"} <= artifacts
    inputs = c.get_run(result.run_id).inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"mnist-train", "mnist-val", "mnist-test"}
    assert all("s3cret" not in i.dataset.source and "127.0.0.1:9/mnist" in i.dataset.source for i in inputs)


def _with_secret_source(job: TrainJob) -> TrainJob:
    return replace(job, data_source="https://user:s3cret@127.0.0.1:9/mnist/")


def test_a_one_process_training_logs_exactly_one_run(synthetic_cache, tmp_path, mlflow_store):
    result = launch_training(_with_secret_source(_job(synthetic_cache, tmp_path / "runs")), LaunchSpec(nproc=1))
    _check_one_run(result, 1, synthetic_cache)


@pytest.mark.slow
def test_two_workers_log_one_run_from_rank_zero_and_train_reproducibly(synthetic_cache, tmp_path, mlflow_store, capfd):
    """Two DDP worker processes: one MLflow run, from rank 0 only; the same seed, config and world size
    again (without MLflow this time: tracking must not touch the training) gives bit-identical weights."""
    job = _with_secret_source(_job(synthetic_cache, tmp_path / "runs", seed=3))
    result = launch_training(job, LaunchSpec(nproc=2))
    _check_one_run(result, 2, synthetic_cache)
    out = capfd.readouterr().out
    assert out.count("epoch 1/3") == 1, out  # prints are gated on rank 0 too

    again = launch_training(_untracked(_job(synthetic_cache, tmp_path / "runs", seed=3)), LaunchSpec(nproc=2))
    first, second = _weights(result), _weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_seed_decides_the_weights(synthetic_cache, tmp_path):
    """In one process (the same worker code, no launch): the same seed twice gives the same weights,
    another seed other weights."""
    def weights(seed: int) -> dict[str, torch.Tensor]:
        job = _untracked(_job(synthetic_cache, tmp_path / "runs", seed=seed))
        return _weights(launch_training(job, LaunchSpec(nproc=1)))

    three, four = weights(3), weights(4)
    assert all(torch.equal(three[k], t) for k, t in weights(3).items())
    assert not torch.equal(four["layers.0.weight"], three["layers.0.weight"])


def test_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": _NotAllowed()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_checkpoint(path)


class _NotAllowed:
    pass


def test_batch_size_must_divide_across_ranks(synthetic_cache, tmp_path):
    job = _job(synthetic_cache, tmp_path, batch_size=33)
    with pytest.raises(ValueError, match="not divisible by world size 2"):
        train(job, _env(0, 2))
