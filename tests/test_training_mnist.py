"""Real `mnistops train` processes on real MNIST: a killed DDP worker is restarted and resumes from its
checkpoint, and two nodes join one rendezvous on localhost; each training still reaches the gate.
(Split from tests/test_training.py so that a test worker can run it beside the synthetic tests.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from nn_core import metrics as M
from nn_core import tracking
from nn_core.launch import new_training_id
from stores import empty_store

# A training that passes the 96% gate in few steps (4 epochs of 49 steps at a global batch of 1024,
# one-cycle: val 0.970 in one process, where the defaults take 10 epochs of 196 steps): what is tested
# is the restart and the rendezvous, and that the training they produce is still a real one.
FAST = ("--batch-size", "1024", "--lr", "0.03", "--schedule", "onecycle")


def _cli(*args: str, env: dict) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def _cli_env(tmp_path: Path, mnist) -> dict:
    """The commands' environment, its MLflow store made already: not what is tested here, and each
    command (both nodes of a rendezvous at once) would otherwise run MLflow's migrations for it."""
    store = empty_store(tmp_path / "mlflow.db", tmp_path / "mlartifacts")
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "MNISTOPS_ARTIFACT_ROOT": str(tmp_path / "mlartifacts"),
        "MNISTOPS_HOME": str(tmp_path / "home"),
        "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }


def _runs(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        return mlflow.search_runs(experiment_names=["mnist-mlp"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_resumes_from_its_checkpoint(tmp_path, mnist):
    env = _cli_env(tmp_path, mnist)
    proc = subprocess.Popen(_cli("train", "--epochs", "4", *FAST, "--max-restarts", "1", "--nproc", "2", env=env),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300  # a guard against a hang: on a loaded 2-core machine 120 s ran out
        while not list((tmp_path / "home" / "runs").glob("*/checkpoint.pt")):
            assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.05)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "nn_core.worker" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].send_signal(signal.SIGKILL)  # rank 1, mid-epoch
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "resuming from the checkpoint after epoch" in out
    runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        history = tracking.client().get_metric_history(runs[0].info.run_id, M.VAL_ACCURACY)
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert runs[0].data.metrics[M.VAL_ACCURACY] >= 0.96, runs[0].data.metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_two_nodes_join_one_rendezvous_on_localhost(tmp_path, mnist):
    env = _cli_env(tmp_path, mnist)
    endpoint, rid = f"127.0.0.1:{_free_port()}", "two-nodes-" + new_training_id()
    nodes = [
        subprocess.Popen(_cli("train", "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", rid,
                              "--epochs", "4", *FAST, env=env),
                         # One MNISTOPS_HOME for both, as on a shared (ReadWriteMany) volume: both
                         # see the result.json rank 0 writes; only the node that hosted rank 0 reports it.
                         env={**env, "MNISTOPS_HOME": str(tmp_path / "shared-home")},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        outs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
            n.wait(10)
    assert [n.returncode for n in nodes] == [0, 0], outs
    # exactly one of the two launchers hosted global rank 0; the other's workers joined it
    assert sum("validation accuracy" in o for o in outs) == 1
    assert sum("rank 0 (on another node) holds the result" in o for o in outs) == 1
    runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    assert runs[0].data.tags["mnistops.training_id"] == rid
    assert runs[0].data.metrics[M.VAL_ACCURACY] >= 0.96, runs[0].data.metrics


