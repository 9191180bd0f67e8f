"""Fault injection with real processes: a killed DDP worker, the MLflow server going away during
training, a corrupted dataset cache. Each checks that nothing is lost."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from nn_core import metrics as M
from nn_core.launch import LaunchSpec, TrainingError, launch_training
from nn_core.train import TrackingConfig, TrainJob
from nn_core.worker import WORKER_MODULE

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
    workers = [p for p in psutil.Process(pid).children(recursive=True) if WORKER_MODULE in " ".join(p.cmdline())]
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


def _workers_of(pid: int) -> list[psutil.Process]:
    """The workers of `mnistops train` (which starts no other process), however torch's agent started
    them (a function under multiprocessing's spawn, or a binary): its children, less the resource
    tracker that multiprocessing adds."""
    workers = []
    for child in psutil.Process(pid).children():
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


def _living(procs) -> list[psutil.Process]:
    """Those still running (a zombie is dead, only waiting for whoever adopted it to reap it)."""
    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in procs if alive(p)]


def _carrying(mark: str) -> list[psutil.Process]:
    """Every process of this user whose environment carries `mark`: the command's descendants,
    wherever they were re-parented, started before or after the tree was read."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MNISTOPS_TEST_MARK") == mark:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_sigkill_while_workers_start_leaves_nothing(tmp_path, mnist, mnist_source):
    """SIGKILL of `mnistops train --nproc 2` right after it says it is launching, while its workers are
    still importing torch: none of its workers, no resource tracker, nothing it started is left."""
    mark = uuid.uuid4().hex
    env = _env(tmp_path, mnist, MNISTOPS_DATA_SOURCE=str(mnist_source), MNISTOPS_TEST_MARK=mark)
    proc = subprocess.Popen(_mnistops("train", "--nproc", "2", "--epochs", "30", "--device", "cpu"), env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()
    tree: list[psutil.Process] = []
    try:
        _wait_for(lambda: any("launching 2 cpu worker(s)" in line for line in lines), 240, proc, "the launching line")
        _wait_for(lambda: len(_workers_of(proc.pid)) == 2, 60, proc, "both workers started")
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not any("epoch 1/" in line for line in lines)  # killed during start-up, not training
        psutil.wait_procs(tree, timeout=15)
        left = _living(tree + _carrying(mark))
        assert not left, f"left running after the command was killed: {[(p.pid, p.cmdline()) for p in left]}"
    finally:
        proc.kill()
        for p in _living(tree + _carrying(mark)):
            p.kill()


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
