"""The in-process path of a one-process CPU training: the same train() in a gloo group of one, with
rank-0 MLflow logging, checkpoints and resume, and worker errors reported as the launcher reports them;
everything else still goes through the elastic launcher."""

from __future__ import annotations

import logging

from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist

from idx_files import synthetic_dataset
from nn_core import metrics as M
from nn_core import tracking
from nn_core.data import prepare
from nn_core.launch import IN_PROCESS_ENV, LaunchSpec, TrainingError, in_process_eligible, launch_training, new_training_id
from nn_core.train import TrackingConfig, TrainConfig, TrainJob


@pytest.fixture
def synthetic_cache(tmp_path):
    spec = synthetic_dataset(tmp_path / "src", n_train=1200, n_test=200)
    return prepare(spec, str(tmp_path / "src"), tmp_path / "data").cache_path


def _job(cache, out: Path, epochs: int) -> TrainJob:
    tid = new_training_id()
    return TrainJob(data_path=str(cache), out_dir=str(out / tid), train=TrainConfig(epochs=epochs, batch_size=32),
                    tracking=TrackingConfig(training_id=tid, experiment="in-process"))


def test_only_a_one_process_cpu_training_without_restarts_runs_in_process(monkeypatch):
    assert in_process_eligible(LaunchSpec(), 1, "cpu")
    assert not in_process_eligible(LaunchSpec(nproc=2), 2, "cpu")
    assert not in_process_eligible(LaunchSpec(max_restarts=1), 1, "cpu")  # a restart needs a process
    assert not in_process_eligible(LaunchSpec(nnodes=2, rdzv_endpoint="h:1", rdzv_id="x"), 1, "cpu")
    assert not in_process_eligible(LaunchSpec(), 1, "cuda")
    monkeypatch.setenv(IN_PROCESS_ENV, "0")
    assert not in_process_eligible(LaunchSpec(), 1, "cpu")


@pytest.mark.slow
def test_in_process_training_logs_one_run_and_never_reopens_it(synthetic_cache, tmp_path, mlflow_store, caplog,
                                                                monkeypatch):
    # The training takes the threads set for it (one); this process's own count (three) comes back.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _in_process_training_logs_one_run(synthetic_cache, tmp_path, caplog)
    finally:
        torch.set_num_threads(before)


def _in_process_training_logs_one_run(synthetic_cache, tmp_path, caplog):
    threads = torch.get_num_threads()
    assert threads == 3
    job = _job(synthetic_cache, tmp_path / "runs", epochs=2)
    with caplog.at_level(logging.INFO, logger="nn_core.launch"):
        first = launch_training(job, LaunchSpec())
    assert any("in this process" in r.getMessage() for r in caplog.records)
    assert not dist.is_initialized() and torch.get_num_threads() == threads  # nothing left behind
    run = mlflow.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["backend"] == "gloo" and run.data.tags["world_size"] == "1"
    history = tracking.client().get_metric_history(first.run_id, M.VAL_ACCURACY)
    assert sorted(m.step for m in history) == [1, 2] and first.val_accuracy > 0.9

    # The same training id again: a finished training is never reopened, in-process as launched
    # (resuming a killed one in-process is tests/test_lifecycle.py's SIGKILL + --resume).
    with pytest.raises(TrainingError, match="is FINISHED and is never reopened"):
        launch_training(job, LaunchSpec())
    assert not dist.is_initialized() and torch.get_num_threads() == threads
    assert mlflow.get_run(first.run_id).info.status == "FINISHED"
    runs = mlflow.search_runs(experiment_names=["in-process"], output_format="list")
    assert [r.info.run_id for r in runs] == [first.run_id]


def test_an_in_process_worker_error_is_reported_like_a_launched_one(tmp_path, mlflow_store):
    threads = torch.get_num_threads()
    job = TrainJob(data_path=str(tmp_path / "missing.pt"), out_dir=str(tmp_path / "out"),
                   tracking=TrackingConfig(training_id="t", experiment="in-process"))
    with pytest.raises(TrainingError, match=r"(?s)training t failed \(in-process worker, rank 0\): .*missing\.pt.*Traceback"):
        launch_training(job, LaunchSpec())
    assert not dist.is_initialized() and torch.get_num_threads() == threads
