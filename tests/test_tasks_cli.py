"""A registered model belongs to one task, through the installed command: Fashion-MNIST (Debian's
recompressed files) trains and is gated as fashion-mnist-mlp with MNIST's champion untouched, and a
cross-dataset candidate is refused by `run` and by `promote --force`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from nn_core import registry, tracking
from nn_core.distributed import ddp_context
from nn_core.launch import TrainResult
from nn_core.registry import GateConfig
from nn_core.release import export_and_check, gate_and_record, register
from nn_core.train import TrackingConfig, TrainConfig, TrainJob, train

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _mnistops(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def _versions(name: str) -> list[str]:
    return sorted(v.version for v in tracking.client().search_model_versions(f"name = '{name}'"))


def test_each_dataset_has_its_own_registered_model(prefect_env, tmp_path, mlflow_store, mnist, mnist_source, fashion_source,
                                                   monkeypatch, capsys):
    # An MNIST champion first (in-process, one epoch of 98 steps: val 0.938 over this test's threshold of 0.9).
    job = TrainJob(data_path=str(mnist.cache_path), out_dir=str(tmp_path / "mnist-run"),
                   train=TrainConfig(epochs=1, batch_size=512, lr=1e-2),
                   tracking=TrackingConfig(training_id="mnist-1", experiment="mnist-mlp"))
    with ddp_context("cpu") as env:
        train(job, env)
    result = TrainResult.read(tmp_path / "mnist-run")
    exported = export_and_check(result, mnist.cache_path)
    v1 = register(result, exported, mnist.cache_path, "mnist-mlp")
    assert gate_and_record(result, exported, v1, mnist.cache_path, "mnist-mlp", GateConfig(threshold=0.9)).accepted
    mnist_before = (registry.champion("mnist-mlp"), _versions("mnist-mlp"))

    env = {**os.environ, "MNISTOPS_DATA_DIR": str(tmp_path / "data"), "MNISTOPS_DATA_SOURCE": str(fashion_source)}

    # The command: Fashion-MNIST trains, the gate decides, under fashion-mnist-mlp.
    r = _mnistops("run", "--dataset", "fashion-mnist", "--epochs", "2", "--threshold", "0.8", env=env, cwd=tmp_path)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert "fashion-mnist-mlp version 1" in r.stdout
    c = tracking.client()
    rm = c.get_registered_model("fashion-mnist-mlp")
    assert rm.tags[registry.DATASET_TAG] == "fashion-mnist" and "fashion-mnist" in rm.description
    fashion_v = c.get_model_version("fashion-mnist-mlp", "1")
    # The version's task is its run's own record (registry.run_task), not a version tag.
    fashion_task = registry.run_task(c.get_run(fashion_v.run_id))
    assert fashion_task.dataset == "fashion-mnist"
    assert fashion_v.tags["promotion"] in ("accepted", "rejected")
    if r.returncode == 0:
        assert "batch inference over the test set with models:/fashion-mnist-mlp@champion" in r.stdout
    assert (registry.champion("mnist-mlp"), _versions("mnist-mlp")) == mnist_before

    # A Fashion-MNIST candidate for mnist-mlp: refused before training, one clear line, nothing registered.
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    r = _mnistops("run", "--dataset", "fashion-mnist", "--model-name", "mnist-mlp", "--epochs", "1", "--no-inference",
                  env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "registered model 'mnist-mlp' is bound to mnist" in r.stderr and "fashion-mnist-mlp" in r.stderr
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before  # no training
    assert (registry.champion("mnist-mlp"), _versions("mnist-mlp")) == mnist_before

    # A Fashion-MNIST version inside mnist-mlp (as registries held them before models were bound):
    # promote --force refuses it, on whatever dataset the user names.
    stray = c.create_model_version("mnist-mlp", fashion_v.source, run_id=fashion_v.run_id,
                                   tags={"dataset": "fashion-mnist", "dataset_digest": fashion_task.digest,
                                         "parity_passed": "true", "promotion": "pending"}).version
    env_mnist = {**env, "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent), "MNISTOPS_DATA_SOURCE": str(mnist_source)}
    r = _mnistops("promote", str(stray), "--model-name", "mnist-mlp", "--force", "--threshold", "0",
                  env=env_mnist, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "is bound to mnist" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # Left undecided by whoever made it, it was given its decision by the first promote: failed, never champion.
    assert c.get_model_version("mnist-mlp", stray).tags["promotion"] == "failed"
    # The same, naming the version's own dataset, and the models command listing each task's own
    # model: the commands' code in this process (the command's start-up was checked just above).
    from flows.cli import main

    for key in ("MNISTOPS_DATA_DIR", "MNISTOPS_DATA_SOURCE"):
        monkeypatch.setenv(key, env_mnist[key])
    capsys.readouterr()
    assert main(["promote", str(stray), "--model-name", "mnist-mlp", "--force", "--threshold", "0",
                 "--dataset", "fashion-mnist"]) == 1
    err = capsys.readouterr().err
    assert "is bound to mnist" in err and len(err.strip().splitlines()) == 1, err
    assert registry.champion("mnist-mlp") == mnist_before[0]
    assert main(["models", "--dataset", "fashion-mnist"]) == 0
    assert "fashion-mnist-mlp: bound to fashion-mnist" in capsys.readouterr().out
