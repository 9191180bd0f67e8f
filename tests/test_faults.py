"""Fault injection with real processes: a killed DDP worker, the MLflow server going away during
training, a corrupted dataset cache. Each checks that nothing is lost."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from nn_core import metrics as M
from nn_core.launch import LaunchSpec, TrainingError, launch_training
from nn_core.train import TrackingConfig, TrainJob

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _env(tmp_path: Path, mnist, tracking_uri: str | None = None, **extra) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{tmp_path}/mlflow.db",
            "MNISTOPS_HOME": str(tmp_path / "home"), "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent), **extra}


def _mnistops(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended while waiting for {what}:\n{proc.stdout.read()}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _worker_of_rank(pid: int, rank: int) -> psutil.Process:
    """The DDP worker with global rank `rank` (one node: its local rank), found by the log files torch
    redirected its output to (<log_dir>/<run>/attempt_<n>/<rank>/stdout.log), not by child order."""
    workers = [p for p in psutil.Process(pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2, workers
    (worker,) = [p for p in workers if any(Path(f.path).parent.name == str(rank) and Path(f.path).name == "stdout.log"
                                            for f in p.open_files())]
    return worker


@pytest.mark.parametrize("rank", [0, 1])  # 0: the rank that logs and checkpoints
def test_killed_worker_restarts_resumes_and_the_model_is_promoted(prefect_env, tmp_path, mnist, mnist_source, rank):
    env = _env(tmp_path, mnist, MNISTOPS_DATA_SOURCE=str(mnist_source))
    proc = subprocess.Popen(_mnistops("run", "--nproc", "2", "--max-restarts", "1", "--epochs", "6", "--no-inference"),
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: list((tmp_path / "home" / "runs").glob("*/checkpoint.pt")), 180, proc, "a checkpoint")
        _worker_of_rank(proc.pid, rank).send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out  # 0 = promoted
    assert "resuming from the checkpoint after epoch" in out
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        runs = mlflow.search_runs(experiment_names=["mnist-mlp"], output_format="list")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        steps = [m.step for m in MlflowClient().get_metric_history(runs[0].info.run_id, M.VAL_ACCURACY)]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6]
        assert MlflowClient().get_model_version_by_alias("mnist-mlp", "champion").run_id == runs[0].info.run_id
    finally:
        mlflow.set_tracking_uri(None)


def _checkpoint_epoch(home: Path) -> int:
    import torch

    try:
        (ckpt,) = home.glob("runs/*/checkpoint.pt")
        return torch.load(ckpt, weights_only=True)["epoch"]
    except (ValueError, OSError, RuntimeError):  # not written yet, or replaced while being read
        return 0


def test_mlflow_server_stopped_during_training_loses_nothing(tmp_path, mnist, mnist_source):
    from servers import free_port, mlflow_server

    backend, artifacts, port = f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts", free_port()
    proc = None
    try:
        with mlflow_server(backend, artifacts, port=port) as url:
            env = _env(tmp_path, mnist, tracking_uri=url, MNISTOPS_DATA_SOURCE=str(mnist_source),
                       # a client that gives up quickly: the outage outlasts its retries
                       MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
                       MLFLOW_HTTP_REQUEST_TIMEOUT="5")
            proc = subprocess.Popen(_mnistops("train", "--epochs", "30"), env=env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            client = MlflowClient(url)

            def first_epoch_logged():
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
                return runs and client.get_metric_history(runs[0].info.run_id, M.VAL_ACCURACY)

            _wait_for(first_epoch_logged, 120, proc, "the first epoch in MLflow")
            logged = max(m.step for m in first_epoch_logged())
        # The server is down now, mid-training; the run keeps training through two more epochs.
        _wait_for(lambda: _checkpoint_epoch(tmp_path / "home") >= logged + 2, 120, proc, "two epochs without MLflow")
        with mlflow_server(backend, artifacts, port=port) as url:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
            assert "MLflow unreachable" in out  # reported clearly while it was down
            client = MlflowClient(url)
            (run,) = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == "mnist-mlp"])
            assert run.info.status == "FINISHED"
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY))
            assert steps == list(range(1, 31))  # every epoch logged exactly once, the missed ones late
            assert run.data.metrics[M.VAL_ACCURACY] >= 0.96
    finally:
        if proc is not None:
            proc.kill()


def test_corrupted_dataset_cache_is_refused_before_training(tmp_path, mnist, mnist_source):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cache = data_dir / mnist.cache_path.name
    shutil.copy(mnist.cache_path, cache)
    with open(cache, "r+b") as f:
        f.seek(cache.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    empty = tmp_path / "no-source"
    empty.mkdir()
    env = {**_env(tmp_path, mnist, MNISTOPS_DATA_SOURCE=str(empty)), "MNISTOPS_DATA_DIR": str(data_dir)}
    r = subprocess.run(_mnistops("train", "--epochs", "1"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert str(cache) in r.stderr and "fails its checksum" in r.stderr and "rebuilding it from the source failed" in r.stderr
    assert not (tmp_path / "home" / "runs").exists()  # refused before any training started

    # With the source at hand the corrupt cache is replaced by a verified one, then training runs.
    env["MNISTOPS_DATA_SOURCE"] = str(mnist_source)
    r = subprocess.run(_mnistops("train", "--epochs", "1"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "rebuilding it from the source" in r.stderr
    assert cache.read_bytes() == mnist.cache_path.read_bytes()


def test_workers_refuse_a_cache_corrupted_after_preparation(tmp_path, mnist, mlflow_store):
    bad = tmp_path / "mnist.pt"
    data = bytearray(mnist.cache_path.read_bytes())
    data[len(data) // 3] ^= 0x01
    bad.write_bytes(bytes(data))
    job = TrainJob(data_path=str(bad), out_dir=str(tmp_path / "out"), tracking=TrackingConfig(training_id="t"))
    with pytest.raises(TrainingError, match="fails its checksum|unreadable"):
        launch_training(job, LaunchSpec(nproc=1))
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
