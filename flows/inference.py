"""The batch inference flow: a thin wrapper over serving.job.run_job (one input) and
serving.inbox.run_inbox (every new input of a folder), with its own artifact and the drift status."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import settings
from flows.drift_events import emit_alert
from flows.fanout import FanOut, local_worker_config, share_config, task_runner, usage_problem
from flows.options import UsageError
from flows.observability import link_mlflow_run, mlflow_context_tags, prefect_note
from flows.ownership import untagged_task_runs
from nn_core import tracking
from common.atomic import atomic_path
from serving.cli import summary
from common.errors import DriftAlert, InputError
from common.storage import is_url
from serving.config import JobConfig
from serving.inbox import InboxResult, merged, run_inbox
from serving.job import JobResult, run_job


@task(name="batch-job", cache_policy=NO_CACHE, task_run_name="batch-job {cfg.input.name}")
def batch_job(cfg: JobConfig) -> JobResult:
    return run_job(cfg)


@task(name="inbox", cache_policy=NO_CACHE, task_run_name="inbox {inbox}")
def inbox_job(inbox: Path | str, output: Path | str, cfg: JobConfig, rescore: bool) -> InboxResult:
    return run_inbox(inbox, output, cfg, rescore=rescore)  # a URL stays text (Path folds its '//')


@task(name="inbox-worker", cache_policy=NO_CACHE, task_run_name="inbox worker {worker}")
def inbox_worker(inbox: Path | str, output: Path | str, cfg: JobConfig, rescore: bool, worker: int,
                 workers: int) -> InboxResult:
    """One of the fan-out's workers, in a Dask worker process: the batch job's own inbox loop, which
    claims each input through the ledger (so the workers share the inbox out between them), starting
    at its own share of the inbox."""
    return run_inbox(inbox, output, cfg, rescore=rescore, worker=(worker, workers))


@flow(name="inbox-fan-out")
def inbox_fan_out(job: JobConfig, rescore: bool, workers: int) -> InboxResult:
    """`workers` inbox workers side by side on the task runner given with `with_options` (Dask);
    their results merged, every input once."""
    futures = [inbox_worker.submit(job.input, job.output, job, rescore, w, workers) for w in range(workers)]
    return merged([f.result() for f in futures])


PREDICTION_SUFFIXES = (".parquet", ".csv")


def output_path(out: Path, fmt: str | None) -> Path:
    """Where one run's predictions go. A folder gets a new timestamped file per run, so a scheduled
    job never overwrites the last: an existing folder, or a path that does not exist yet and does
    not end in .parquet or .csv (a deployment's `output: /data/scored`, made on the first run,
    instead of a file named `scored` that the next run would refuse to overwrite)."""
    if out.is_dir() or (not out.exists() and out.suffix.lower() not in PREDICTION_SUFFIXES):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return out / f"predictions-{stamp}.{fmt or 'parquet'}"
    return out


def _row(r: JobResult) -> str:
    accuracy = "n/a" if r.accuracy is None else f"{r.accuracy:.4%}"
    stats = r.drift.statistics
    detail = (f"{stats['exceed_fraction']:.1%} above t={r.drift.thresholds['score_threshold']:.2f} "
              f"(tolerated {r.drift.thresholds['tolerated_exceed_fraction']:.0%}), class TV {stats['class_tv']:.2f}"
              if stats else r.drift.reason)
    return (f"| `{Path(str(r.input_path)).name if r.input_path else ''}` | {r.records} / {r.predicted} / {len(r.skipped)} "
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
            + _monitor_links(results)
        ),
    )


def _monitor_links(results: list[JobResult]) -> str:
    """Where each version's monitoring record is (one point per batch above): `mnistops monitor`
    prints it, the MLflow UI charts it."""
    runs = {(r.model.name, r.model.version): r.monitor_run_id for r in results if r.monitor_run_id}
    if not runs:
        return ""
    client = tracking.client()
    return "\n" + "".join(
        f"\nmonitoring record of {name} version {version}: "
        f"[MLflow run {run_id}]({settings.run_url(client.get_run(run_id).info.experiment_id, run_id)})"
        for (name, version), run_id in sorted(runs.items()))


def _score_inbox(job: JobConfig, rescore: bool, fan: FanOut) -> tuple[dict, list[JobResult], InboxResult]:
    if fan.workers > 1:  # a subflow of its own: its task runner is Dask, this flow's stays the default
        with local_worker_config(fan):  # the runner starts a local cluster as the subflow begins
            res = inbox_fan_out.with_options(task_runner=task_runner(fan))(share_config(job, fan), rescore,
                                                                           fan.workers)
    else:
        res = inbox_job(job.input, job.output, job, rescore)
    extra = (f"\nalready scored: {len(res.already)}, in progress elsewhere: {len(res.busy)}, "
             f"failed: {len(res.failed)}, ignored: {len(res.ignored)}\n"
             + "".join(f"\n- failed `{f['input']}`: {f['error']}" for f in res.failed))
    _artifact(f"Inbox {job.input}: {len(res.scored)} new input(s) scored", job.model, res.scored, extra)
    return res.summary(), res.scored, res


def _score_one(job: JobConfig) -> tuple[dict, list[JobResult], JobResult]:
    result = batch_job(dataclasses.replace(job, output=output_path(job.output, job.format)))
    _artifact(f"Batch inference: {result.predicted} predictions", job.model, [result])
    return summary(result), [result], result


def _inbox_folder(inbox: Path | str) -> None:
    """A deployment's inbox (relative to MNISTOPS_HOME on its worker) is made by its first run: a
    fresh home has none, and an hourly run failing until someone makes it by hand helps nobody. An
    object-store prefix needs no folder (a prefix exists once something is put under it)."""
    if is_url(str(inbox)):
        return
    inbox = Path(inbox)
    if not inbox.exists():
        inbox.mkdir(parents=True, exist_ok=True)
        get_run_logger().warning("inbox %s did not exist: made it (empty); inputs put there are scored by "
                                 "the next run", inbox.resolve())


@flow(name="batch-inference", log_prints=True)
def batch_inference(job: JobConfig, inbox: bool = False, rescore: bool = False, fan_out: FanOut = FanOut()) -> dict:
    """Predict every image of `job.input` with `job.model` (or, with `inbox`, every new input of the
    folder `job.input`); write predictions and manifests atomically, with a drift check. With
    `job.fail_on_drift` an alert fails the flow run (after the outputs, the MLflow runs and the
    artifact with the drift table are written).

    Args:
        job: What to score (input, labels), with which model, where to (output: a .parquet or .csv
            file, or a folder, made if need be, that gets one timestamped file per run), and how
            (batching, device, drift check, tracking).
        inbox: `job.input` is an inbox folder (made when missing): each input in it (IDX, .npy, image
            folder) is scored once per content, one predictions file each in the folder `job.output`
            (with the ledger).
        rescore: With `inbox`: score inputs again that were scored before, with the current model.
        fan_out: With `inbox`: how many workers score it side by side, on a local Dask cluster or an
            existing one (flows.fanout).
    """
    settings.configure()
    if problem := usage_problem(fan_out, inbox):
        raise UsageError(problem)
    with untagged_task_runs():
        if job.track:
            tracking.ensure_experiment(job.experiment, description=INFERENCE_DESCRIPTION)
        if inbox:
            _inbox_folder(job.input)
        # The tasks never raise on drift: the flow does, once every record of the alert is written.
        scoring = dataclasses.replace(job, fail_on_drift=False)
        s, scored, res = _score_inbox(scoring, rescore, fan_out) if inbox else _score_one(scoring)
        for r in scored:
            if r.mlflow_run_id:
                _tag_job_run(r)
    logger = get_run_logger()
    logger.info("batch inference: %s", s)
    alerts = [r for r in scored if r.drift.alert]
    for r in alerts:
        logger.warning("drift alert on %s: %s", r.input_path, r.drift.reason)
        emit_alert(r)  # counted by the training deployment's trigger (flows.drift_events)
    if job.fail_on_drift and alerts:
        raise DriftAlert(f"drift alert on {len(alerts)} input(s): "
                         + "; ".join(f"{r.input_path}: {r.drift.reason}" for r in alerts)
                         + " (the drift table is the flow run's batch-inference artifact)", res)
    if inbox and res.failed:  # each bad input fails one run (it is not retried)
        raise InputError(f"{len(res.failed)} input(s) of {job.input} failed: "
                         + "; ".join(f["error"] for f in res.failed))
    return s


def _tag_job_run(result: JobResult) -> None:
    """The batch job's MLflow run as the UI expects it: who and what started it, and a description."""
    run_id = result.mlflow_run_id
    tracking.log_tags(run_id, mlflow_context_tags("batch-inference"))
    accuracy = "" if result.accuracy is None else f", accuracy {result.accuracy:.2%}"
    drift = f" Drift: **{result.drift.status}** ({result.drift.reason})." if result.drift.alert else ""
    tracking.set_note(run_id, f"Batch inference of {result.predicted} of {result.records} records with "
                              f"{result.model.uri} (version {result.model.version or 'local file'}) on {result.provider}"
                              f"{accuracy}; {len(result.skipped)} skipped.{drift} {prefect_note()}".strip())
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
    # The test split measures the champion; it is never feedback (it would train and gate later versions).
    return batch_inference(JobConfig(input=images, output=cfg.outputs_dir / f"{dataset}-test-predictions.parquet",
                                     model=model, labels=labels, overwrite=True, feedback=False))
