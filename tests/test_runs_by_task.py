"""Records that tell tasks apart: a Fashion-MNIST training is logged in its own experiment under a name
that says so, `mnistops models` lists every registered model, `run --resume` continues a training of
the dataset it was (not the options' default), and a corrupt data cache is reported saying one thing.
Real `mnistops` processes on the real datasets."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import EXIT_OK, EXIT_REJECTED


EMBEDDED = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MNISTOPS_ARTIFACT_ROOT", "MNISTOPS_DEBUG")


def _env(tmp_path: Path, **extra) -> dict:
    """The embedded MLflow default (a store under the home), and `extra` (a PREFECT_API_URL: the
    session's server, where booting a command's temporary Prefect API is not what a test is about)."""
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED}
    return {**env, "MNISTOPS_HOME": str(tmp_path / "home"), "MNISTOPS_DATA_DIR": str(tmp_path / "data"), **extra}


def _store(tmp_path: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")


def test_models_lists_every_registered_model(tmp_path, monkeypatch, capsys):
    """Two registered models in the home's store: `models` lists both with their versions, `--dataset`
    and `--model-name` one of them. In this process (the command's own code, not its start-up, is
    what this is about)."""
    from flows.cli import main
    from stores import home_with_store

    home_with_store(tmp_path / "home")
    c = _store(tmp_path)
    exp = c.create_experiment("registered", artifact_location=(tmp_path / "artifacts").as_uri())
    for name, versions in (("mnist-mlp", 2), ("fashion-mnist-mlp", 1)):
        c.create_registered_model(name)
        for _ in range(versions):
            run = c.create_run(exp)
            c.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                   tags={"promotion": "rejected"})
    for key in EMBEDDED:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MNISTOPS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    def models(*args: str) -> str:
        assert main(["models", *args]) == EXIT_OK, capsys.readouterr().err
        return capsys.readouterr().out

    try:
        listed = models()
        assert "fashion-mnist-mlp: bound to" in listed and "mnist-mlp: bound to" in listed
        assert listed.index("fashion-mnist-mlp:") < listed.index("\nmnist-mlp:")  # by name
        rows = [line.split() for line in listed.splitlines() if line.strip()[:1].isdigit()]
        assert sorted(r[0] for r in rows) == ["1", "1", "2"], listed
        only = models("--dataset", "fashion-mnist")
        assert "fashion-mnist-mlp: bound to" in only and "\nmnist-mlp:" not in only and not only.startswith("mnist-mlp")
        assert models("--model-name", "mnist-mlp").startswith("mnist-mlp: bound to")
        assert "no registered model 'cifar-mlp'" in models("--model-name", "cifar-mlp")
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)  # the command set this home's store for the process


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, f"ended before {what}: {proc.stdout.read()}"
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_fashion_training_is_recorded_as_one_and_resumed_as_one(tmp_path, fashion_source, mnist_source, prefect_env):
    """A Fashion-MNIST `train` (3 epochs of 49 steps) killed after its first epoch: its run is in the
    experiment fashion-mnist-mlp, named after the dataset. `run --resume` with MNIST's source in the environment
    and no --dataset continues it as Fashion-MNIST (its own cache and source), into the same run, and
    registers it as fashion-mnist-mlp."""
    from stores import home_with_store

    home_with_store(tmp_path / "home")  # a new home's first store is not what this is about
    train = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "--dataset", "fashion-mnist", "--epochs", "3",
         "--batch-size", "1024"],
        env=_env(tmp_path, MNISTOPS_DATA_SOURCE=str(fashion_source)), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        ckpt = _wait_for(lambda: next((tmp_path / "home" / "runs").glob("*/checkpoint.pt"), None), 300, train,
                         "checkpoint")
    finally:
        os.killpg(train.pid, signal.SIGKILL)
        train.wait(30)
    assert not (ckpt.parent / "result.json").exists()
    (killed,) = _store(tmp_path).search_runs(
        [e.experiment_id for e in _store(tmp_path).search_experiments()])
    c = _store(tmp_path)
    assert c.get_experiment(killed.info.experiment_id).name == "fashion-mnist-mlp"
    assert killed.info.run_name.startswith("fashion-mnist-mlp50-")

    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--resume", "--no-inference", "--threshold", "0.5"],
                       env=_env(tmp_path, MNISTOPS_DATA_SOURCE=str(mnist_source), PREFECT_API_URL=prefect_env),
                       cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode in (EXIT_OK, EXIT_REJECTED), r.stdout + r.stderr
    assert f"resuming training {ckpt.parent.name} (fashion-mnist)" in r.stdout
    assert "fashion-mnist-mlp version 1" in r.stdout, r.stdout
    resumed = c.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.params["train.epochs"] == "3"
    assert {d.dataset.name for d in resumed.inputs.dataset_inputs} >= {"fashion-mnist-train"}
    assert [m.name for m in c.search_registered_models()] == ["fashion-mnist-mlp"]
    assert not (tmp_path / "data" / "mnist.pt").exists()  # MNIST was never prepared


def test_a_corrupt_cache_is_reported_saying_one_thing(tmp_path, caplog):
    """prepare() rebuilds a cache that fails its checksum and says so; a reader of the cache (a
    worker) says how to rebuild it. Neither says both."""
    import torch

    from idx_files import synthetic_dataset
    from nn_core.data import IntegrityError, load_splits, prepare

    spec = synthetic_dataset(tmp_path / "src", n_train=300, n_test=50)
    prepared = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    payload = torch.load(prepared.cache_path, weights_only=True)
    payload["tensors"]["train_images"][0, 0, 0] ^= 0xFF  # the content changed, its checksums did not
    torch.save(payload, prepared.cache_path)

    with pytest.raises(IntegrityError) as e:
        load_splits(prepared.cache_path)
    assert str(e.value) == (f"{prepared.cache_path}: cached dataset fails its checksum (train_images changed since "
                            "it was written); `mnistops prepare-data` rebuilds it from the source")
    with caplog.at_level(logging.WARNING, logger="nn_core.data"):
        again = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    assert not again.reused_cache and again.digest == prepared.digest
    (warning,) = [r.getMessage() for r in caplog.records if "checksum" in r.getMessage()]
    assert warning.endswith("(train_images changed since it was written); rebuilding it from the source")
    assert "delete" not in warning and "prepare-data" not in warning
