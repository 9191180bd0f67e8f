"""MLflow tracking through MlflowClient with explicit run ids: no hidden active-run state, so a
restarted worker can pick up the very run that its predecessor created."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from serving.experiments import ensure_experiment  # noqa: F401 (re-exported: one helper for both sides)

TRAINING_ID_TAG = "mnistops.training_id"
_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class ResumeError(ValueError):
    """A training id, checkpoint or MLflow run that this job must not resume: finished, or made by
    another job (the message names the differing fields)."""


def client() -> MlflowClient:
    return MlflowClient()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


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


def redact_url(url: str) -> str:
    """The URL without its user:password part: credentials never go into params, tags or artifacts."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


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
