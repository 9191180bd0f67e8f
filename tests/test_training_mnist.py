"""Real `mnistops train` processes on real MNIST: two nodes join one rendezvous on localhost, and the
training still reaches the gate. (A killed DDP worker restarted and resumed from its checkpoint is
tests/test_faults.py's, twice over, in a whole `mnistops run`.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from nn_core import metrics as M
from nn_core.launch import new_training_id
from stores import empty_store

# A training that passes the 96% gate in few steps (4 epochs of 49 steps at a global batch of 1024,
# one-cycle: val 0.970 in one process, where the defaults take 10 epochs of 196 steps): what is tested
# is the rendezvous, and that the training they produce is still a real one.
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


