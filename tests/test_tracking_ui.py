"""What users read in the MLflow UI, read back through its API: a finished training run of two DDP
workers (tags, params, sectioned metrics, dataset inputs, system metrics, note, plots). A pipeline's
registered version and logged model, a sweep's parent, a batch job's run and the Prefect side
(flow-run logs with the workers' epoch lines, task-run names, link artifacts) are read back from
the flows tests/test_flows.py runs once for all of its checks."""

from __future__ import annotations

import json

import pytest

from idx_files import synthetic_dataset
from nn_core import metrics as M
from nn_core import tracking
from nn_core.checkpoint import load_checkpoint
from nn_core.data import prepare
from nn_core.launch import LaunchSpec, launch_training, new_training_id
from nn_core.train import TrackingConfig, TrainConfig, TrainJob

LEGACY = {"val_accuracy", "final_val_accuracy", "test_accuracy", "train_loss_step", "train_loss", "lr",
          "epoch_seconds", "train_seconds", "seconds_to_target", "parity_max_abs_diff", "trial_val_accuracy"}


def _summary_and_series(run_id: str, run) -> tuple[set[str], set[str]]:
    c = tracking.client()
    once, series = set(), set()
    for key in run.data.metrics:
        steps = [m.step for m in c.get_metric_history(run_id, key)]
        (once if len(steps) == 1 and steps == [0] else series).add(key)
    return once, series


@pytest.mark.slow
def test_a_training_run_reads_at_a_glance(tmp_path, mlflow_store, monkeypatch, capfd):
    monkeypatch.setenv("MNISTOPS_GIT_COMMIT", "0123abcdef")  # the workers are fresh processes: they read it
    spec = synthetic_dataset(tmp_path / "src", n_train=1200, n_test=200)
    prepared = prepare(spec, str(tmp_path / "src"), tmp_path / "data")
    tid = new_training_id()
    job = TrainJob(data_path=str(prepared.cache_path), out_dir=str(tmp_path / "runs" / tid),
                   train=TrainConfig(epochs=3, batch_size=32),
                   tracking=TrackingConfig(training_id=tid, experiment="ui-exp", run_name="mlp50-test"),
                   data_source=str(tmp_path / "src"))
    result = launch_training(job, LaunchSpec(nproc=2))
    c = tracking.client()
    run = c.get_run(result.run_id)
    tags, params = run.data.tags, run.data.params

    # "Created by", "Source", the commit, the name and the description
    assert tags["mlflow.user"] and tags["mlflow.source.name"] == "mnistops train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == "0123abcdef" and "git_commit" not in tags
    assert tags["mlflow.runName"] == run.info.run_name == "mlp50-test"
    note = tags["mlflow.note.content"]
    assert "MLP 784-50-10" in note and f"validation accuracy {result.val_accuracy:.2%}" in note and "lr 0.003" in note
    assert c.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    # params are what the model was built with: the training split's statistics, not the defaults
    built = load_checkpoint(result.checkpoint)["model_config"]
    assert float(params["model.mean"]) == built["mean"] and float(params["model.std"]) == built["std"]
    assert built["mean"] != 33.32 and params["train.batch_size"] == "32" and params["world_size"] == "2"

    # sectioned metrics: series on their steps, final figures once at step 0, nothing under old names
    assert all("/" in k for k in run.data.metrics) and not LEGACY & set(run.data.metrics)
    once, series = _summary_and_series(result.run_id, run)
    assert {M.TEST_ACCURACY, M.TEST_LOSS, M.TRAIN_SECONDS} <= once
    for key in (M.TRAIN_LOSS, M.TRAIN_ACCURACY, M.VAL_LOSS, M.VAL_ACCURACY, M.LR, M.EPOCH_SECONDS):
        assert sorted(m.step for m in c.get_metric_history(result.run_id, key)) == [1, 2, 3], key
    assert run.data.metrics[M.VAL_ACCURACY] == pytest.approx(result.val_accuracy)
    assert len(c.get_metric_history(result.run_id, M.TRAIN_LOSS_STEP)) == 3 * (1000 // 32 + 1)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in run.data.metrics)

    # three dataset inputs, one per split, with a local source, a schema and a profile
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    for context, split, n in (("train", "train", 1000), ("validation", "val", 200), ("test", "test", 200)):
        ds = inputs[context]
        assert ds.name == f"{spec.name}-{split}" and ds.source_type == "local"
        assert json.loads(ds.source)["uri"] == (tmp_path / "src").resolve().as_uri()
        profile = json.loads(ds.profile)
        assert profile["num_images"] == n and sum(profile["label_counts"].values()) == n
        assert profile["dataset_sha256"] == prepared.digest and ds.digest == prepared.digest[:36]
        assert "pixels" in ds.schema and "label" in ds.schema

    plots = {a.path for a in c.list_artifacts(result.run_id, "plots")}
    assert {"plots/loss_curve.png", "plots/confusion_matrix_val.png", "plots/per_class_accuracy.png"} <= plots
    assert capfd.readouterr().out.count("epoch 3/3") == 1
