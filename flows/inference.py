"""The batch inference flow: a thin wrapper over serving.job.run_job, with its own artifact."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import settings
from flows.observability import link_mlflow_run, mlflow_context_tags, prefect_note
from nn_core import tracking
from serving.atomic import atomic_path
from serving.cli import summary
from serving.job import EXPERIMENT, JobConfig, JobResult, run_job
from serving.model_source import DEFAULT_MODEL_URI


@task(name="batch-job", cache_policy=NO_CACHE)
def batch_job(cfg: JobConfig) -> JobResult:
    return run_job(cfg)


def _output_path(output: str, fmt: str | None) -> Path:
    """A folder gets a new timestamped file per run, so a scheduled job never overwrites the last."""
    out = Path(output)
    if out.is_dir() or output.endswith(os.sep):
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return out / f"predictions-{stamp}.{fmt or 'parquet'}"
    return out


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    input: str,
    output: str,
    model: str = DEFAULT_MODEL_URI,
    labels: str | None = None,
    batch_size: int | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    on_error: Literal["fail", "skip"] = "fail",
    format: str | None = None,
    all_probabilities: bool = False,
    threads: int | None = None,
    streams: int | None = None,
    track: bool = True,
) -> dict:
    """Predict every image of `input` with `model`; write predictions and a manifest atomically.

    Args:
        input: Images to predict: a folder of image files, an IDX file (gzipped or not) or a .npy array.
        output: Predictions file (.parquet or .csv), or a folder ending in / for one timestamped file per run.
        model: MLflow model URI (models:/NAME@champion, models:/NAME/VERSION) or a local .onnx file.
        labels: Labels of the inputs (IDX, .npy or CSV); with them the job reports accuracy.
        batch_size: Images per onnxruntime call; default: the job's own choice for the device.
        device: Where onnxruntime runs; auto takes CUDA when it is usable.
        on_error: A bad image fails the job, or is skipped and listed in the manifest.
        format: Output format when output is a folder: parquet or csv.
        all_probabilities: Write all ten class probabilities, not only the top one.
        threads: onnxruntime intra-op threads per stream; default: the CPUs shared among the streams.
        streams: Batches inferred side by side; default: 1 on CUDA, else up to 4.
        track: Record the job as an MLflow run.
    """
    settings.configure()
    tracking.ensure_experiment(EXPERIMENT, description=INFERENCE_DESCRIPTION)
    cfg = JobConfig(input=Path(input), output=_output_path(output, format), model=model,
                    labels=Path(labels) if labels else None, batch_size=batch_size, device=device,
                    on_error=on_error, format=format, all_probabilities=all_probabilities, threads=threads,
                    streams=streams, track=track)
    result = batch_job(cfg)
    s = summary(result)
    if result.mlflow_run_id:
        _tag_job_run(result)
    accuracy = "n/a (no labels)" if result.accuracy is None else f"{result.accuracy:.4%}"
    create_markdown_artifact(
        key="batch-inference",
        description=f"{result.predicted} predictions with {result.model.uri}",
        markdown=(
            f"# Batch inference: {result.predicted} predictions\n\n| field | value |\n|---|---|\n"
            f"| model | `{result.model.uri}` (version {result.model.version or 'local file'}) |\n"
            f"| input | `{cfg.input}` |\n| records / predicted / skipped | {result.records} / {result.predicted} / {len(result.skipped)} |\n"
            f"| accuracy | {accuracy} |\n| throughput | {result.throughput:,.0f} images/s |\n"
            f"| provider | {result.provider} |\n| output | `{result.output}` |\n| manifest | `{result.manifest}` |\n"
        ),
    )
    get_run_logger().info("batch inference: %s", s)
    return s


def _tag_job_run(result: JobResult) -> None:
    """The batch job's MLflow run as the UI expects it: who and what started it, and a description."""
    run_id = result.mlflow_run_id
    tracking.log_tags(run_id, mlflow_context_tags("batch-inference"))
    accuracy = "" if result.accuracy is None else f", accuracy {result.accuracy:.2%}"
    tracking.set_note(run_id, f"Batch inference of {result.predicted} of {result.records} records with "
                              f"{result.model.uri} (version {result.model.version or 'local file'}) on {result.provider}"
                              f"{accuracy}; {len(result.skipped)} skipped. {prefect_note()}".strip())
    url = settings.run_url(tracking.client().get_run(run_id).info.experiment_id, run_id)
    link_mlflow_run(url, "mlflow-batch-run", f"MLflow run {run_id} (batch inference)")


INFERENCE_DESCRIPTION = ("Batch inference jobs: one run per job with the model version it used, its input and "
                         "labels digests, throughput and (with labels) accuracy; the manifest is its artifact.")


def export_test_split(dataset: str, data_dir: str | None, dest: Path) -> tuple[Path, Path]:
    """The test split as .npy files for the batch job (written once, atomically)."""
    import numpy as np

    from nn_core.data import cache_path, default_data_dir, load_splits
    from nn_core.datasets import get_spec

    images, labels = dest / f"{dataset}-test-images.npy", dest / f"{dataset}-test-labels.npy"
    if not (images.exists() and labels.exists()):
        s = load_splits(cache_path(get_spec(dataset), Path(data_dir) if data_dir else default_data_dir()))
        dest.mkdir(parents=True, exist_ok=True)
        for path, array in ((images, s.test_images.numpy()), (labels, s.test_labels.numpy())):
            with atomic_path(path, suffix=".npy") as tmp:
                np.save(tmp, array)
    return images, labels


def score_test_split(dataset: str, data_dir: str | None, model: str) -> dict:
    """`mnistops run`'s last step: the champion over the test set, accuracy reported."""
    cfg = settings.configure()
    images, labels = export_test_split(dataset, data_dir, cfg.outputs_dir / "inputs")
    return batch_inference(input=str(images), output=str(cfg.outputs_dir / f"{dataset}-test-predictions.parquet"),
                           model=model, labels=str(labels))
