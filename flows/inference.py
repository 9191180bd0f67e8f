"""The batch inference flow: a thin wrapper over serving.job.run_job (one input) and
serving.inbox.run_inbox (every new input of a folder), with its own artifact and the drift status."""

from __future__ import annotations

import dataclasses
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
from serving.errors import DriftAlert, InputError
from serving.inbox import InboxResult, run_inbox
from serving.job import EXPERIMENT, JobConfig, JobResult, run_job
from serving.model_source import DEFAULT_MODEL_URI


@task(name="batch-job", cache_policy=NO_CACHE)
def batch_job(cfg: JobConfig) -> JobResult:
    return run_job(cfg)


@task(name="inbox", cache_policy=NO_CACHE)
def inbox_job(inbox: str, output: str, cfg: JobConfig, rescore: bool) -> InboxResult:
    return run_inbox(Path(inbox), Path(output), cfg, rescore=rescore)


def _output_path(output: str, fmt: str | None) -> Path:
    """A folder gets a new timestamped file per run, so a scheduled job never overwrites the last."""
    out = Path(output)
    if out.is_dir() or output.endswith(os.sep):
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return out / f"predictions-{stamp}.{fmt or 'parquet'}"
    return out


def _row(r: JobResult) -> str:
    accuracy = "n/a" if r.accuracy is None else f"{r.accuracy:.4%}"
    stats = r.drift.statistics
    detail = (f"{stats['exceed_fraction']:.1%} above t={r.drift.thresholds['score_threshold']:.2f} "
              f"(tolerated {r.drift.thresholds['tolerated_exceed_fraction']:.0%}), class TV {stats['class_tv']:.2f}"
              if stats else r.drift.reason)
    return (f"| `{r.input_path.name if r.input_path else ''}` | {r.records} / {r.predicted} / {len(r.skipped)} "
            f"| {accuracy} | **{r.drift.status}** | {detail} | `{r.output}` |")


def _artifact(title: str, model: str, results: list[JobResult], extra: str = "") -> None:
    create_markdown_artifact(
        key="batch-inference",
        description=title,
        markdown=(
            f"# {title}\n\nmodel `{model}`"
            + (f" (version {results[0].model.version or 'local file'}, {results[0].provider})" if results else "")
            + "\n\n| input | records / predicted / skipped | accuracy | drift | drift statistics | output |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(_row(r) for r in results) + "\n" + extra
        ),
    )


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    output: str,
    input: str | None = None,
    inbox: str | None = None,
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
    overwrite: bool = False,
    rescore: bool = False,
    fail_on_drift: bool = False,
    drift_reference: str | None = None,
) -> dict:
    """Predict every image of `input` (or every new input of the folder `inbox`) with `model`; write
    predictions and manifests atomically, with a drift check. With `fail_on_drift` an alert fails the
    flow run (after the outputs and the artifact are written).

    Args:
        output: Predictions file (.parquet or .csv) for `input`, or a folder: one timestamped file per run
            of `input`, one file per scored input of `inbox` (with the ledger that scores each once).
        input: Images to predict: a folder of image files, an IDX file (gzipped or not) or a .npy array.
        inbox: A folder whose inputs (IDX, .npy, image folders) are each scored once per content.
        model: MLflow model URI (models:/NAME@champion, models:/NAME/VERSION) or a local .onnx file.
        labels: Labels of `input` (IDX or .npy); with them the job reports accuracy.
        batch_size: Images per onnxruntime call; default: the job's own choice for the device.
        device: Where onnxruntime runs; auto takes CUDA when it is usable.
        on_error: A bad image fails the job, or is skipped and listed in the manifest.
        format: Output format: parquet or csv (default: from the output's suffix, else parquet).
        all_probabilities: Write all ten class probabilities, not only the top one.
        threads: onnxruntime intra-op threads per stream; default: the CPUs shared among the streams.
        streams: Batches inferred side by side; default: 1 on CUDA, else up to 4.
        track: Record each job as an MLflow run.
        overwrite: Replace an existing output file (never an input).
        rescore: Score the inbox's inputs again with the current model.
        fail_on_drift: Fail the flow run when an input drifted from the model's reference profile.
        drift_reference: A reference profile (JSON) to compare with, instead of the version's own.
    """
    if (input is None) == (inbox is None):
        raise ValueError("give exactly one of input and inbox")
    settings.configure()
    if track:
        tracking.ensure_experiment(EXPERIMENT, description=INFERENCE_DESCRIPTION)
    cfg = JobConfig(input=Path(input or inbox), output=Path(output), model=model,
                    labels=Path(labels) if labels else None, batch_size=batch_size, device=device,
                    on_error=on_error, format=format, all_probabilities=all_probabilities, threads=threads,
                    streams=streams, track=track, overwrite=overwrite, drift_reference=drift_reference)
    logger = get_run_logger()
    if inbox is not None:
        res = inbox_job(inbox, output, cfg, rescore)
        s = res.summary()
        extra = (f"\nalready scored: {len(res.already)}, in progress elsewhere: {len(res.busy)}, "
                 f"failed: {len(res.failed)}, ignored: {len(res.ignored)}\n"
                 + "".join(f"\n- failed `{f['input']}`: {f['error']}" for f in res.failed))
        _artifact(f"Inbox {inbox}: {len(res.scored)} new input(s) scored", model, res.scored, extra)
        alerts = [r for r in res.scored if r.drift.alert]
    else:
        out = _output_path(output, format)
        cfg = dataclasses.replace(cfg, output=out)
        result = batch_job(cfg)
        s = summary(result)
        _artifact(f"Batch inference: {result.predicted} predictions", model, [result])
        res, alerts = result, [result] if result.drift.alert else []
    for r in (res.scored if inbox is not None else [res]):
        if r.mlflow_run_id:
            _tag_job_run(r)
    logger.info("batch inference: %s", s)
    for r in alerts:
        logger.warning("drift alert on %s: %s", r.input_path, r.drift.reason)
    if fail_on_drift and alerts:
        raise DriftAlert(f"drift alert on {len(alerts)} input(s): "
                         + "; ".join(f"{r.input_path}: {r.drift.reason}" for r in alerts), res)
    if inbox is not None and res.failed:  # each bad input fails one run (it is not retried)
        raise InputError(f"{len(res.failed)} input(s) of {inbox} failed: "
                         + "; ".join(f["error"] for f in res.failed))
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
    """`mnistops run`'s last step: the champion over the test set, accuracy reported (each run's
    predictions replace the last's: the file is this pipeline's own)."""
    cfg = settings.configure()
    images, labels = export_test_split(dataset, data_dir, cfg.outputs_dir / "inputs")
    return batch_inference(input=str(images), output=str(cfg.outputs_dir / f"{dataset}-test-predictions.parquet"),
                           model=model, labels=str(labels), overwrite=True)
