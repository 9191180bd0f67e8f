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


@pytest.fixture
def synthetic_cache(tmp_path):
    spec = synthetic_dataset(tmp_path / "src", n_train=1200, n_test=200)
    return prepare(spec, str(tmp_path / "src"), tmp_path / "data").cache_path


def _job(cache, out: Path, **train) -> TrainJob:
    tid = new_training_id()
    return TrainJob(data_path=str(cache), out_dir=str(out / tid), train=TrainConfig(**{"epochs": 3, "batch_size": 32, **train}),
                    tracking=TrackingConfig(training_id=tid, experiment="test-exp"))


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
    """Real gloo groups of 2 and 3 processes over a split that does not divide evenly (200 samples,
    batches of 7): every sample counted exactly once, the same figures as one process."""
    one = _evaluate_in_this_process(synthetic_cache)
    assert one["total"] == 200 == sum(map(sum, one["confusion"])) and one["world_size"] == 1
    for world in (2, 3):
        ranks = _evaluate_with(world, synthetic_cache)
        assert sorted(ranks) == list(range(world)) and all(r["world_size"] == world for r in ranks.values())
        for r in ranks.values():  # all-reduced: every rank holds the whole split's figures
            assert r["confusion"] == one["confusion"] and r["correct"] == one["correct"] and r["total"] == 200
            # per-batch sums are float32 (batches differ by world size), their total float64
            assert r["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_training_logs_exactly_one_run_from_rank_zero(synthetic_cache, tmp_path, mlflow_store, nproc, capfd):
    job = replace(_job(synthetic_cache, tmp_path / "runs"), data_source="https://user:s3cret@127.0.0.1:9/mnist/")
    result = launch_training(job, LaunchSpec(nproc=nproc))
    assert result.val_accuracy > 0.9  # the synthetic classes are easy
    runs = mlflow.search_runs(experiment_names=["test-exp"], output_format="list")
    assert [r.info.run_id for r in runs] == [result.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == str(nproc) and run.data.tags["backend"] == "gloo"
    assert run.data.tags["dataset_digest"] == load_splits(synthetic_cache).digest
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
    out = capfd.readouterr().out
    assert out.count("epoch 1/3") == 1, out  # prints are gated on rank 0 too


@pytest.mark.slow
def test_same_seed_config_and_world_size_give_bit_identical_weights(synthetic_cache, tmp_path, mlflow_store):
    # Weights only: no MLflow run (its plots and artifacts are rank 0's, after the last step).
    def job(seed: int) -> TrainJob:
        j = _job(synthetic_cache, tmp_path / "runs", seed=seed)
        return replace(j, tracking=replace(j.tracking, enabled=False))

    states = []
    for _ in range(2):
        r = launch_training(job(3), LaunchSpec(nproc=2))
        states.append(load_checkpoint(r.checkpoint)["model_state"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = launch_training(job(4), LaunchSpec(nproc=2))
    assert not torch.equal(load_checkpoint(other.checkpoint)["model_state"]["layers.0.weight"], states[0]["layers.0.weight"])


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
