"""The batch inference flow: a thin wrapper over serving.job.run_job, with its own artifact."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import settings
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
    device: str = "auto",
    on_error: str = "fail",
    format: str | None = None,
    all_probabilities: bool = False,
    threads: int | None = None,
    streams: int | None = None,
    track: bool = True,
) -> dict:
    """Predict every image of `input` with `model`; write predictions and a manifest atomically."""
    settings.configure()
    tracking.ensure_experiment(EXPERIMENT)
    cfg = JobConfig(input=Path(input), output=_output_path(output, format), model=model,
                    labels=Path(labels) if labels else None, batch_size=batch_size, device=device,
                    on_error=on_error, format=format, all_probabilities=all_probabilities, threads=threads,
                    streams=streams, track=track)
    result = batch_job(cfg)
    s = summary(result)
    accuracy = "n/a (no labels)" if result.accuracy is None else f"{result.accuracy:.4%}"
    create_markdown_artifact(
        key="batch-inference",
        description=f"{result.predicted} predictions with {result.model.uri}",
        markdown=(
            f"# Batch inference: {result.predicted} predictions\n\n| | |\n|---|---|\n"
            f"| model | `{result.model.uri}` (version {result.model.version or 'local file'}) |\n"
            f"| input | `{cfg.input}` |\n| records / predicted / skipped | {result.records} / {result.predicted} / {len(result.skipped)} |\n"
            f"| accuracy | {accuracy} |\n| throughput | {result.throughput:,.0f} images/s |\n"
            f"| provider | {result.provider} |\n| output | `{result.output}` |\n| manifest | `{result.manifest}` |\n"
        ),
    )
    get_run_logger().info("batch inference: %s", s)
    return s


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
