"""Resume only what matches: a checkpoint or MLflow run of another job is refused naming the fields
that differ, and a FINISHED run is never reopened (on synthetic data, real MLflow store, real DDP
workers where the launcher is involved)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from idx_files import synthetic_dataset
from nn_core import metrics as M
from nn_core import tracking
from nn_core.checkpoint import CHECKPOINT_NAME
from nn_core.data import prepare
from nn_core.distributed import ddp_context
from nn_core.launch import LaunchSpec, TrainingError, launch_training
from nn_core.model import MLPConfig
from nn_core.tracking import ResumeError
from nn_core.train import TrackingConfig, TrainConfig, TrainJob, train


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two datasets (different digests), made once for the module: the tests only read them."""
    root = tmp_path_factory.mktemp("resume-data")
    a = synthetic_dataset(root / "a", n_train=600, n_test=100, seed=0)
    b = synthetic_dataset(root / "b", n_train=600, n_test=100, seed=1)
    return (prepare(a, str(root / "a"), root / "data-a").cache_path,
            prepare(b, str(root / "b"), root / "data-b").cache_path)


def _job(cache, out: Path, tid: str, hidden=(8,), **train_cfg) -> TrainJob:
    return TrainJob(data_path=str(cache), out_dir=str(out), model=MLPConfig(hidden=hidden),
                    train=TrainConfig(**{"epochs": 2, "batch_size": 32, **train_cfg}),
                    tracking=TrackingConfig(training_id=tid, experiment="resume-test"))


def _train(job: TrainJob):
    with ddp_context("cpu") as env:
        return train(job, env)


def _run(tid: str):
    run_id = tracking.find_run("resume-test", tid)
    return tracking.client().get_run(run_id) if run_id else None


def test_a_checkpoint_of_another_job_is_refused_naming_the_fields(caches, tmp_path, mlflow_store):
    a, b = caches
    out = tmp_path / "out"
    job = _job(a, out, "t1", epochs=3)
    ckpt = out / CHECKPOINT_NAME
    # A training cut short after its first epoch: its checkpoint and an MLflow run that is not finished.
    _train(replace(job, train=replace(job.train, epochs=1)))
    tracking.client().set_terminated(_run("t1").info.run_id, "FAILED")
    before = ckpt.read_bytes()

    for other, named, not_named in [
        (_job(a, out, "t2", hidden=(16,), epochs=3, lr=1e-2),
         ["model.hidden (checkpoint [8], job [16])", "train.epochs (checkpoint 1, job 3)", "train.lr"], ["dataset_digest"]),
        (_job(a, out, "t3", epochs=5), ["train.epochs (checkpoint 1, job 5)"], ["model.", "train.lr", "dataset_digest"]),
        (_job(b, out, "t4", epochs=1), ["dataset_digest (checkpoint "], ["model.", "train."]),
    ]:
        with pytest.raises(ResumeError, match="checkpoint of another job") as e:
            _train(other)
        msg = str(e.value)
        assert str(ckpt) in msg and all(f in msg for f in named) and not any(f in msg for f in not_named), msg
        assert ckpt.read_bytes() == before and _run(other.tracking.training_id) is None  # nothing touched

    # The job that wrote it (one epoch) resumes it: nothing left to train, its run is finished.
    result = _train(_job(a, out, "t1", epochs=1))
    assert result["epochs"] == 1 and _run("t1").info.status == "FINISHED"


def test_an_mlflow_run_of_another_job_is_refused(caches, tmp_path, mlflow_store):
    a, _ = caches
    _train(_job(a, tmp_path / "first", "shared-id", epochs=1))
    tracking.client().set_terminated(_run("shared-id").info.run_id, "KILLED")  # as if it had died
    # No checkpoint where this job looks (another node, a fresh volume): the run still tells it apart.
    with pytest.raises(ResumeError, match="made by another job") as e:
        _train(_job(a, tmp_path / "second", "shared-id", hidden=(32,), epochs=1))
    assert "model.hidden (run 32" not in str(e.value) and "model.hidden (run 8, job 32)" in str(e.value)
    assert _run("shared-id").info.status == "KILLED"


def test_a_finished_run_is_never_reopened(caches, tmp_path, mlflow_store):
    a, _ = caches
    job = _job(a, tmp_path / "out", "done-id", epochs=1)
    _train(job)
    run = _run("done-id")
    assert run.info.status == "FINISHED"
    # The same id again (a resubmitted job with a fixed id), through the real launcher and workers.
    with pytest.raises(TrainingError, match="is FINISHED and is never reopened"):
        launch_training(job, LaunchSpec(nproc=1, device="cpu"))
    after = _run("done-id")
    assert after.info.status == "FINISHED" and after.info.end_time == run.info.end_time
    assert tracking.logged_steps(run.info.run_id, M.VAL_ACCURACY) == {1}
