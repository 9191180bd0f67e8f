"""The batch inference flow: a thin wrapper over serving.job.run_job (one input) and
serving.inbox.run_inbox (every new input of a folder), with its own artifact and the drift status."""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import settings
from serving.atomic import atomic_path
from serving.cli import summary
from serving.errors import DriftAlert, InputError
from serving.inbox import InboxResult, run_inbox
from serving.job import JobConfig, JobResult, run_job
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
    device: str = "auto",
    on_error: str = "fail",
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
    flow run (after the outputs and the artifact are written)."""
    if (input is None) == (inbox is None):
        raise ValueError("give exactly one of input and inbox")
    settings.configure()
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
