"""What users read in the MLflow and Prefect UIs, read back through their APIs: a finished training
run (tags, params, sectioned metrics, dataset inputs, system metrics, note, plots), a pipeline's
registered version and logged model, a sweep's parent, a batch job's run, and the Prefect side
(flow-run logs with the workers' epoch lines, task-run names, link artifacts)."""

from __future__ import annotations

import json

import mlflow
import pytest

from idx_files import synthetic_dataset
from nn_core import metrics as M
from nn_core import tracking
from nn_core.checkpoint import load_checkpoint
from nn_core.config import DataConfig, GateConfig
from nn_core.sweep import SweepSpec
from serving.config import JobConfig
from nn_core.data import prepare
from nn_core.launch import LaunchSpec, launch_training, new_training_id
from nn_core.release import logged_model_id
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


# ---------------------------------------------------------------------------------------------
# The pipeline, a sweep and a batch job through Prefect, on real MNIST



def _prefect_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs, offset = [], 0
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=offset, limit=200)
            logs += [log.message for log in page]
            offset += len(page)
            if len(page) < 200:
                return logs


def _task_run_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r.name for r in runs]


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


@pytest.mark.e2e
@pytest.mark.slow
def test_pipeline_sweep_and_batch_job_read_back_through_mlflow_and_prefect(prefect_api, tmp_path, mlflow_store, mnist,
                                                                           mnist_source, monkeypatch):
    from flows.inference import batch_inference, export_test_split
    from flows.sweep import hyperparameter_sweep
    from flows.training import training_pipeline

    monkeypatch.setenv("MNISTOPS_DATA_DIR", str(mnist.cache_path.parent))
    # A worker process, as on a GPU or with --nproc 2: its output is followed into the task run's logs.
    monkeypatch.setenv("MNISTOPS_TRAIN_IN_PROCESS", "0")
    c = tracking.client()

    # --- the training pipeline
    state = training_pipeline(data=DataConfig(data_source=str(mnist_source)), train=TrainConfig(epochs=2),
                              gate=GateConfig(threshold=0.9), return_state=True)
    assert state.is_completed()
    outcome = state.result()
    flow_run_id = state.state_details.flow_run_id
    run = c.get_run(outcome.run_id)
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "training-pipeline" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["prefect.flow_run_id"] == str(flow_run_id)
    assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")  # the harness serves a UI URL
    note = tags["mlflow.note.content"]
    assert "Registered as mnist-mlp version 1: promoted to champion" in note and str(flow_run_id) in note
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.name == "mnist-mlp" and exp.tags["mlflow.note.content"].startswith("Training runs of the multilayer")
    assert outcome.run_url.endswith(f"/runs/{outcome.run_id}?workflowType=machine_learning")
    assert {M.PARITY_MAX_ABS_DIFF, M.PARITY_ARGMAX_AGREEMENT} <= set(run.data.metrics)

    # the registered version: a handful of tags, the model named after it, its metric, the named input
    mv = c.get_model_version("mnist-mlp", "1")
    assert {"promotion", "promotion.reason", "promotion.val_accuracy", "drift.reference"} <= set(mv.tags)
    assert not {"git_commit", "run_id", "parity_max_abs_diff_batch_1"} & set(mv.tags) and len(mv.tags) <= 7
    description = c.get_registered_model("mnist-mlp").description
    assert description.startswith("The mnist MLP as ONNX, bound to that task") and "`pixels`" in description
    logged = c.get_logged_model(logged_model_id("mnist-mlp", "1"))
    assert logged.name == "mnist-mlp"
    model_metrics = {m.key: m for m in logged.metrics}  # the model page's metrics: the trained model's
    assert model_metrics[M.VAL_ACCURACY].value == pytest.approx(outcome.metrics["val_accuracy"])
    assert model_metrics[M.VAL_ACCURACY].step == 2
    assert [m.step for m in c.get_metric_history(outcome.run_id, M.VAL_ACCURACY)] == [1, 2]  # no duplicate
    info = mlflow.models.get_model_info("models:/mnist-mlp/1")
    assert info.signature.inputs.input_names() == ["pixels"]
    assert info.signature.outputs.input_names() == ["logits", "probabilities", "pixel_sums"]

    # the Prefect side: the workers' epoch lines in the flow run's logs, named task runs, links
    logs = _prefect_logs(flow_run_id)
    assert any("epoch 1/2: train loss" in line and "[rank 0]" in line for line in logs), logs[:50]
    # every task run named by what it worked on, none by Prefect's default (a hash suffix)
    assert set(_task_run_names(flow_run_id)) == {
        "prepare-data mnist", "train mnist-mlp50-lr0.003-bs256-e2-s0", "export-and-parity mnist",
        "register mnist-mlp", "gate mnist-mlp version 1"}
    arts = _artifacts(flow_run_id)
    assert arts["mlflow-run"].data.strip("[]()").endswith(outcome.run_url) or outcome.run_url in arts["mlflow-run"].data
    md = arts["training-pipeline"].data
    parity_row = next(line for line in md.splitlines() if line.startswith("| parity_max_abs_diff"))
    assert "e-" in parity_row and "0.0000" not in parity_row, parity_row

    # --- a sweep: the grid as params, the trials as a table, the task runs named after their configs
    monkeypatch.delenv("MNISTOPS_TRAIN_IN_PROCESS")
    grid = SweepSpec(hidden=[[50], [32]], lr=[2e-3], batch_size=[128], epochs=[1])
    sweep_state = hyperparameter_sweep(grid=grid, data=DataConfig(data_source=str(mnist_source)),
                                       gate=GateConfig(threshold=0.5), return_state=True)
    assert sweep_state.is_completed()
    sweep = sweep_state.result()
    parent = c.get_run(sweep.parent_run_id)
    assert parent.data.params["grid.hidden"] == "50 | 32" and parent.data.params["grid.lr"] == "0.002"
    assert parent.data.params["grid.batch_size"] == "128" and parent.data.params["grid.epochs"] == "1"
    assert not any(k.startswith("trial") for k in parent.data.metrics) and M.SWEEP_BEST_VAL_ACCURACY in parent.data.metrics
    table = c.load_table(parent.info.experiment_id, "trials.json", run_ids=[sweep.parent_run_id])
    assert sorted(table["config"]) == sorted(t["name"] for t in sweep.trials)
    assert set(table["run_id"]) == {t["run_id"] for t in sweep.trials}
    assert parent.data.tags["mlflow.source.name"] == "hyperparameter-sweep" and "Best: " in parent.data.tags["mlflow.note.content"]
    sweep_flow_run = sweep_state.state_details.flow_run_id
    assert {"train mlp50-lr0.002-bs128-e1", "train mlp32-lr0.002-bs128-e1"} <= set(_task_run_names(sweep_flow_run))
    comparison = _artifacts(sweep_flow_run)["sweep-comparison"].data
    assert all(f"[{t['run_id']}](http" in comparison for t in sweep.trials)

    # --- a batch job's run
    images, labels = export_test_split("mnist", str(mnist.cache_path.parent), tmp_path / "in")
    job_state = batch_inference(JobConfig(input=images, output=tmp_path / "preds.parquet", labels=labels),
                                return_state=True)
    assert job_state.is_completed()
    job_run = c.get_run(job_state.result()["mlflow_run_id"])
    assert job_run.data.tags["mlflow.source.name"] == "batch-inference" and job_run.data.tags["mlflow.user"]
    assert "Batch inference of 10000 of 10000 records" in job_run.data.tags["mlflow.note.content"]
    inference_md = _artifacts(job_state.state_details.flow_run_id)["batch-inference"].data
    rows = [line for line in inference_md.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| input | records / predicted / skipped | accuracy | drift") and len(rows) == 3
    assert "10000 / 10000 / 0" in rows[2] and all(cell.strip() for cell in rows[2].strip("|").split("|")), rows
