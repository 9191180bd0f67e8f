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
from stores import home_with_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _env(tmp_path: Path, mnist, tracking_uri: str | None = None, **extra) -> dict:
    """The command's environment: a home whose embedded store exists already (copied, not migrated
    again: tests/stores.py) unless a tracking server is given, and the session's verified MNIST cache."""
    home = tmp_path / "home"
    if tracking_uri is None:
        home_with_store(home)
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{home}/mlflow.db",
            "MNISTOPS_HOME": str(home), "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent), **extra}


def _mnistops(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.time() + timeout
    while not (value := predicate()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended while waiting for {what}:\n{proc.stdout.read()}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _worker_of_rank(pid: int, rank: int, attempt: int) -> psutil.Process | None:
    """The DDP worker of restart round `attempt` with global rank `rank` (one node: its local rank),
    found by the log file torch redirected its output to (<log_dir>/<run>/attempt_<n>/<rank>/stdout.log),
    not by child order; None while that round's two workers are not both up."""
    def log_of(p: psutil.Process) -> Path | None:
        try:
            logs = [Path(f.path) for f in p.open_files() if Path(f.path).name == "stdout.log"]
        except psutil.NoSuchProcess:
            return None
        return logs[0] if logs else None

    workers = {}
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if WORKER_MODULE in " ".join(p.cmdline()) and (log := log_of(p)) is not None:
                workers[(log.parent.parent.name, log.parent.name)] = p
        except psutil.NoSuchProcess:
            pass
    both = all((f"attempt_{attempt}", str(r)) in workers for r in (0, 1))
    return workers[(f"attempt_{attempt}", str(rank))] if both else None


def test_killed_workers_restart_resume_and_the_model_is_promoted(prefect_env, tmp_path, mnist, mnist_source):
    """One `mnistops run --nproc 2`, two kills: rank 1 in the first round of workers, then rank 0 (the
    rank that logs and checkpoints) in the round that resumed. Each round resumes from the checkpoint;
    the one MLflow run has every epoch once and its model is promoted."""
    env = _env(tmp_path, mnist, MNISTOPS_DATA_SOURCE=str(mnist_source))
    proc = subprocess.Popen(_mnistops("run", "--nproc", "2", "--max-restarts", "2", "--epochs", "6", "--no-inference"),
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    home = tmp_path / "home"
    try:
        _wait_for(lambda: _checkpoint_epoch(home) >= 1, 600, proc, "a checkpoint")  # deadlines for a loaded machine
        _wait_for(lambda: _worker_of_rank(proc.pid, 1, 0), 60, proc, "round 0's workers").send_signal(signal.SIGKILL)
        # The next round is up once its two workers are: what they resumed from is the checkpoint now.
        _wait_for(lambda: _worker_of_rank(proc.pid, 0, 1), 300, proc, "round 1's workers")
        resumed = _checkpoint_epoch(home)
        _wait_for(lambda: _checkpoint_epoch(home) > resumed, 300, proc, "a checkpoint of round 1")
        _wait_for(lambda: _worker_of_rank(proc.pid, 0, 1), 10, proc, "round 1's rank 0").send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out  # 0 = promoted
    assert out.count("resuming from the checkpoint after epoch") == 2, out
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


def _corrupt_copy(mnist, data_dir: Path) -> Path:
    """A copy of the verified cache in `data_dir` with one byte flipped."""
    data_dir.mkdir()
    cache = data_dir / mnist.cache_path.name
    shutil.copy(mnist.cache_path, cache)
    with open(cache, "r+b") as f:
        f.seek(cache.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return cache


def test_mlflow_unreachable_during_training_loses_nothing(tmp_path, mnist, mnist_source):
    """`mnistops train` on a real MLflow server that goes away after the first logged epoch (every
    connection to it cut, its port refusing: tests/cut_relay.py) and answers again two epochs later:
    the run trains on, says so, and logs the missed epochs late, each once. Its dataset cache starts
    corrupt, with the source at hand: it is rebuilt from the source before training (the other half
    of test_a_corrupted_dataset_cache_without_its_source_is_refused)."""
    from cut_relay import Relay
    from servers import mlflow_server
    from stores import empty_store

    backend = empty_store(tmp_path / "server.db", tmp_path / "artifacts")  # migrated already: a faster boot
    cache = _corrupt_copy(mnist, tmp_path / "data")
    proc = None
    with mlflow_server(backend, tmp_path / "artifacts") as url, Relay(int(url.rsplit(":", 1)[1])) as relay:
        env = _env(tmp_path, mnist, tracking_uri=relay.url, MNISTOPS_DATA_SOURCE=str(mnist_source),
                   MNISTOPS_DATA_DIR=str(cache.parent),
                   # a client that gives up quickly: the outage outlasts its retries
                   MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
                   MLFLOW_HTTP_REQUEST_TIMEOUT="5")
        try:
            proc = subprocess.Popen(_mnistops("train", "--epochs", "8"), env=env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            client = MlflowClient(url)  # the test's own view: the server itself, never cut

            def first_epoch_logged():
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
                return runs and client.get_metric_history(runs[0].info.run_id, M.VAL_ACCURACY)

            logged = max(m.step for m in _wait_for(first_epoch_logged, 300, proc, "the first epoch in MLflow"))
            relay.cut()  # the server is gone for the command now, mid-training; it trains two more epochs
            home = tmp_path / "home"
            _wait_for(lambda: _checkpoint_epoch(home) >= logged + 2, 300, proc, "two epochs without MLflow")
            relay.restore()
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc is not None:
                proc.kill()
        assert proc.returncode == 0, out
        assert "MLflow unreachable" in out  # reported clearly while it was down
        assert "rebuilding it from the source" in out and cache.read_bytes() == mnist.cache_path.read_bytes()
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == "mnist-mlp"])
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, M.VAL_ACCURACY))
        assert steps == list(range(1, 9))  # every epoch logged exactly once, the missed ones late
        assert run.data.metrics[M.VAL_ACCURACY] >= 0.96


def test_a_corrupted_dataset_cache_without_its_source_is_refused(tmp_path, mnist, monkeypatch, capsys):
    """Refused before training, one line naming the cache; run in this process (flows.cli.main: the
    installed command's exit code and line). With the source at hand the cache is rebuilt: see
    test_mlflow_unreachable_during_training_loses_nothing."""
    from flows.cli import main

    cache = _corrupt_copy(mnist, tmp_path / "data")
    empty = tmp_path / "no-source"
    empty.mkdir()
    env = _env(tmp_path, mnist, MNISTOPS_DATA_SOURCE=str(empty), MNISTOPS_DATA_DIR=str(cache.parent))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert str(cache) in err and "fails its checksum" in err and "rebuilding it from the source failed" in err
    assert not (tmp_path / "home" / "runs").exists()  # refused before any training started


def test_workers_refuse_a_cache_corrupted_after_preparation(tmp_path, mnist, mlflow_store):
    bad = tmp_path / "mnist.pt"
    data = bytearray(mnist.cache_path.read_bytes())
    data[len(data) // 3] ^= 0x01
    bad.write_bytes(bytes(data))
    job = TrainJob(data_path=str(bad), out_dir=str(tmp_path / "out"), tracking=TrackingConfig(training_id="t"))
    with pytest.raises(TrainingError, match="fails its checksum|unreadable"):
        launch_training(job, LaunchSpec(nproc=1))
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
