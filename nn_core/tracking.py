"""MLflow tracking through MlflowClient with explicit run ids: no hidden active-run state, so a
restarted worker can pick up the very run that its predecessor created."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow  # noqa: F401 (tracking.mlflow: the configured client library, for callers)
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from common.experiments import NOTE_TAG, ensure_experiment  # noqa: F401 (re-exported: one helper for both sides)
from common.settings import mlflow_client
from common.storage import redact_url  # noqa: F401 (moved to common: serving redacts URLs too)

TRAINING_ID_TAG = "mnistops.training_id"
# One experiment per task, named after it (mnist-mlp, fashion-mnist-mlp: nn_core.config.default_experiment),
# so the description names no dataset: the experiment's name and each run's dataset inputs do.
TRAINING_EXPERIMENT_DESCRIPTION = (
    "Training runs of the multilayer perceptron of the task this experiment is named after (raw 28x28 pixels "
    "in, 10 classes out), one run per training; a sweep's trials are nested under its parent run. Metrics by section: train/ and val/ per "
    "epoch, train_step/ per optimizer step, test/, parity/ (ONNX vs PyTorch) and time/ once per run, system/ "
    "from MLflow's monitor. The registered ONNX model and its gate decision are on the run's Models tab.")
_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class ResumeError(ValueError):
    """A training id, checkpoint or MLflow run that this job must not resume: finished, or made by
    another job (the message names the differing fields)."""


def client() -> MlflowClient:
    return mlflow_client()


def find_run(experiment: str, training_id: str) -> str | None:
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client().search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TRAINING_ID_TAG}` = '{training_id}'", max_results=2
    )
    return runs[0].info.run_id if runs else None


def find_or_create_run(
    experiment: str, training_id: str, run_name: str, tags: dict[str, str],
    params: dict | None = None, ignore: frozenset[str] = frozenset(),
) -> tuple[str, bool]:
    """(run_id, created). One run per training id: a restarted worker finds the existing one, and
    resumes it only when it was made by the same job (`params`, but for the keys in `ignore`).
    A FINISHED run is never reopened: ResumeError."""
    existing = find_run(experiment, training_id)
    if existing is not None:
        run = client().get_run(existing)
        if run.info.status == "FINISHED":
            raise ResumeError(
                f"training id {training_id!r}: its MLflow run {existing} is FINISHED and is never reopened; "
                "start a new training under a new id")
        if params:
            stored = run.data.params
            diffs = [f"{k} (run {stored[k]}, job {v})" for k, v in sorted(params.items())
                     if k not in ignore and k in stored and stored[k] != str(v)]
            if diffs:
                raise ResumeError(
                    f"training id {training_id!r}: MLflow run {existing} was made by another job; it differs in "
                    f"{', '.join(diffs)}; start a new training under a new id")
        client().update_run(existing, status="RUNNING")
        return existing, False
    run = client().create_run(
        ensure_experiment(experiment), run_name=run_name, tags={**tags, TRAINING_ID_TAG: training_id}
    )
    return run.info.run_id, True


def log_params(run_id: str, params: dict) -> None:
    items = [Param(k, str(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client().log_batch(run_id, params=items[i : i + 100])


def log_tags(run_id: str, tags: dict) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_series(run_id: str, key: str, values: list[float], first_step: int) -> None:
    now = int(time.time() * 1000)
    items = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
    for i in range(0, len(items), _BATCH):
        client().log_batch(run_id, metrics=items[i : i + _BATCH])


def logged_steps(run_id: str, key: str) -> set[int]:
    return {m.step for m in client().get_metric_history(run_id, key)}


def end_run(run_id: str, status: str = "FINISHED") -> None:
    status = RunStatus.to_string(RunStatus.from_string(status))
    # A finished training stands: a later failure (e.g. a refused attempt to reopen it) never marks it failed.
    if status != "FINISHED" and client().get_run(run_id).info.status == "FINISHED":
        return
    client().set_terminated(run_id, status=status)


def flatten(prefix: str, d: dict) -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(key, v))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v)) or "[]"
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# What the MLflow UI shows beyond params and metrics: the note, dataset inputs, system metrics


def set_note(run_id: str, text: str) -> None:
    """The run's description (`mlflow.note.content`, Markdown), shown at the top of its page."""
    client().set_tag(run_id, NOTE_TAG, text)


def append_note(run_id: str, text: str) -> None:
    """Add a sentence to the run's description (e.g. the gate's decision, known after training)."""
    current = client().get_run(run_id).data.tags.get(NOTE_TAG, "").rstrip()
    if text.strip() and text.strip() not in current:
        set_note(run_id, f"{current} {text.strip()}".strip())


def dataset_source(uri: str) -> tuple[str, str]:
    """(source type, source JSON) as MLflow shows a dataset's source: a URL is `http`, a local
    folder or file:// URL `local` (what MLflow's LocalArtifactDatasetSource records)."""
    import json

    if uri.startswith(("http://", "https://")):
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        source = HTTPDatasetSource(uri)
        return source._get_source_type(), source.to_json()
    return "local", json.dumps({"uri": uri if "://" in uri else Path(uri).resolve().as_uri()})


def split_profile(splits, split: str) -> dict:
    """A small profile of one split: size, labels per class, and the dataset's full SHA-256 (MLflow's
    digest column holds 36 characters)."""
    import torch

    labels = getattr(splits, f"{split}_labels")
    counts = torch.bincount(labels.cpu(), minlength=10).tolist()
    return {"split": split, "num_images": len(labels), "image_shape": [28, 28], "pixel_dtype": "uint8",
            "label_counts": {str(i): c for i, c in enumerate(counts)}, "dataset_sha256": splits.digest}


def log_dataset_splits(run_id: str, splits, source_uri: str) -> None:
    """Train, validation and test as three dataset inputs with their contexts. Each gets its own name:
    MLflow keeps one context per (name, digest) on a run, so three contexts of one dataset would show
    as the first only."""
    import json

    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    source_type, source = dataset_source(source_uri)
    schema = TensorDatasetSchema(features=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28), "pixels")]),
                                 targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]))
    inputs = []
    for split, context in (("train", "train"), ("val", "validation"), ("test", "test")):
        entity = Dataset(name=f"{splits.name}-{split}", digest=splits.digest[:36], source_type=source_type,
                         source=source, schema=json.dumps(schema.to_dict()),
                         profile=json.dumps(split_profile(splits, split)))
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
    client().log_inputs(run_id, datasets=inputs)


def log_feedback_inputs(run_id: str, dataset: str, parts: tuple[str, ...]) -> None:
    """The feedback sets a training also trained on, as dataset inputs with context `feedback`, each
    under the set's own name and digest (registry.run_task tells them from the task's splits)."""
    import numpy as np

    from serving import feedback

    inputs = []
    for path in parts:
        with np.load(path, allow_pickle=False) as z:
            digest, labels = str(z["digest"]), z["labels"]
        found = feedback.find(digest, client())
        uri = feedback.artifact_uri(found[0]) if found else Path(path).resolve().as_uri()
        inputs.append(feedback.dataset_input(dataset, digest, feedback.profile(labels, part="training"), uri))
    client().log_inputs(run_id, datasets=inputs)


def start_system_metrics(run_id: str, resume: bool = False):
    """CPU, memory, disk and network (and GPU where pynvml sees one) as `system/...` metrics of the
    run, sampled by MLflow's own monitor in a thread of this process; None if it cannot start."""
    import logging

    # Its start/stop INFO lines would fill the worker's log (and the Prefect task run's) with noise.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Every 2 s rather than MLflow's 10: a training here takes tens of seconds.
        monitor = SystemMetricsMonitor(run_id, sampling_interval=2, samples_before_logging=1, resume_logging=resume)
        monitor.start()
        return monitor
    except Exception as e:  # a missing monitor costs a chart, never the training
        logging.getLogger(__name__).warning("system metrics are not recorded: %s", e)
        return None


def stop_system_metrics(monitor) -> None:
    """Stop the monitor and log one last sample: MLflow's loop drops the samples of its last
    interval when the run ends, so a training shorter than one interval would have none at all."""
    if monitor is None:
        return
    monitor.finish()  # joins the sampling thread
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # a missing sample costs a chart point, never the training
        import logging

        logging.getLogger(__name__).warning("last system metrics sample not logged: %s", e)
