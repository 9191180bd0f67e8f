"""A model version's monitoring record: how it does batch after batch, in MLflow.

One MLflow run per registered version, in the model's monitoring experiment (`<model>-monitor`),
found by its tags (model, version). Every batch job that scores with a registered version (one-shot,
each input of an inbox, the scheduled flow, `python -m serving`) adds one point to it: its metrics
logged with step = the batch's time in Unix seconds and the same timestamp, so the MLflow UI charts
each figure per version over time (x axis "Step" or "Time"), and runs of several versions overlay in
the experiment's chart view.

Why a run per version and not the job runs themselves: the job runs of an inbox are thousands of
one-point runs in the inference experiment; a chart of one figure over time per version is then a
search, not a chart. The job's run still holds its own figures, and its tag `mnistops.monitor.run_id`
names the record its point went to.

Idempotent when jobs race: a job looks the run up by its tags and creates it only when there is
none. It finishes its new run at once (a record never runs), lets its clock pass that end time, and
looks again, waiting for any run it sees unfinished (another job's, between its creation and its
finish); it writes to the run finished first (end time, then run id: one total order that every job
applies, over runs that no longer change). Jobs converge: a run created after a job's last look is
finished after it, so it sorts after every run that job chose from (to the millisecond: a run
finished in the very millisecond of that look could still tie, and run ids break the tie). By start
time, taken before a run is created, a run created later could sort first, and two racing jobs
chose apart. A run that lost the race is tagged `mnistops.monitor.duplicate_of` and ends empty.
Reading merges every run of the version, so even jobs that chose apart (hosts' clocks skewed; a job
killed between creating and finishing its run, waited for UNFINISHED_WAIT_S) lose no point.

Torch- and Prefect-free (the inference image has it); MLflow is imported by the caller's client.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from typing import Any

from common.experiments import ensure_experiment

EXPERIMENT_SUFFIX = "-monitor"
MODEL_TAG = "mnistops.monitor.model"
VERSION_TAG = "mnistops.monitor.version"
DUPLICATE_TAG = "mnistops.monitor.duplicate_of"
JOB_TAG = "mnistops.monitor.run_id"  # on a job's run: the record its point went to
UNFINISHED_WAIT_S = 10.0  # how long a job waits for a racing job to finish the run it created
PREFIX = "monitor/"  # a section of its own in the run's chart view
# A point's figures, in the order the table shows them; `alert` is the drift status as a number
# (1 alert, 0 ok; absent when the version has no reference), so that it charts too.
FIGURES = ("records", "exceed_fraction", "class_tv", "mean_confidence", "accuracy", "alert")
DESCRIPTION = ("Monitoring records: one run per registered version of the model, one point per batch job "
               "(step = the batch's time in Unix seconds): batch size, share of records above the reference's "
               "out-of-distribution threshold, predicted-class distance (total variation), mean confidence, "
               "accuracy when the batch came with labels, drift alert (1) or ok (0).")


@dataclass(frozen=True)
class Point:
    """One batch as the record keeps it. None: not measured (no labels, no drift reference)."""

    at: dt.datetime  # when the batch was scored (UTC)
    records: int  # the batch's size: records scored
    exceed_fraction: float | None  # share above the reference's out-of-distribution threshold
    class_tv: float | None  # predicted-class distance to the reference (total variation)
    mean_confidence: float | None  # mean top probability
    accuracy: float | None  # with labels only
    status: str  # ok | alert | unavailable (no reference to compare with)

    def metrics(self) -> dict[str, float]:
        values = {"records": float(self.records), "exceed_fraction": self.exceed_fraction,
                  "class_tv": self.class_tv, "mean_confidence": self.mean_confidence, "accuracy": self.accuracy,
                  "alert": None if self.status == "unavailable" else float(self.status == "alert")}
        return {PREFIX + k: v for k, v in values.items() if v is not None and math.isfinite(v)}

    @property
    def step(self) -> int:
        return int(self.at.timestamp())

    @property
    def timestamp_ms(self) -> int:
        return int(self.at.timestamp() * 1000)


def point_of(records: int, mean_confidence: float | None, accuracy: float | None, report: Any,
             at: dt.datetime | None = None) -> Point:
    """The point of a batch from the job's counts and its drift report (serving.drift.DriftReport)."""
    stats = report.statistics
    return Point(at=at or dt.datetime.now(dt.timezone.utc), records=records,
                 exceed_fraction=stats.get("exceed_fraction"), class_tv=stats.get("class_tv"),
                 mean_confidence=mean_confidence, accuracy=accuracy, status=report.status)


def experiment_name(model: str) -> str:
    return model + EXPERIMENT_SUFFIX


def _runs(client, model: str, version: str) -> list:
    """The version's monitoring runs in the order that picks the record (see the module doc): finished
    first (end time, then run id), runs not finished yet last; deleted ones excluded."""
    exp = client.get_experiment_by_name(experiment_name(model))
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id], max_results=100,
        filter_string=f"tags.`{MODEL_TAG}` = '{_quoted(model)}' and tags.`{VERSION_TAG}` = '{_quoted(version)}'")
    return sorted(runs, key=lambda r: (r.info.end_time is None, r.info.end_time or 0, r.info.run_id))


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def ensure_run(client, model: str, version: str) -> str:
    """The id of the version's monitoring run, created on first use; jobs racing converge on the
    run finished first (see the module's docstring)."""
    if runs := _runs(client, model, version):
        return runs[0].info.run_id
    exp_id = ensure_experiment(experiment_name(model), client, description=DESCRIPTION)
    mine = client.create_run(exp_id, run_name=f"{model} v{version}", tags={
        MODEL_TAG: model, VERSION_TAG: str(version),
        "mlflow.note.content": f"Monitoring record of {model} version {version}: one point per batch job "
                               f"(`mnistops monitor --model {model}` prints it)."})
    # A record, not a job: it never runs, so it is not left RUNNING (nor reaped as a killed job's).
    finished = int(time.time() * 1000)
    client.set_terminated(mine.info.run_id, "FINISHED", end_time=finished)
    while int(time.time() * 1000) <= finished:  # a run created after the look below ends strictly later
        time.sleep(0.001)
    deadline = time.monotonic() + UNFINISHED_WAIT_S
    while (runs := _runs(client, model, version)) and runs[-1].info.end_time is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)  # a racing job between creating its run and finishing it
    first = runs[0].info.run_id if runs else mine.info.run_id
    if first != mine.info.run_id:
        client.set_tag(mine.info.run_id, DUPLICATE_TAG, first)
    return first


def record(client, model: str, version: str, point: Point) -> str:
    """Add one point to the version's record; returns the record's run id."""
    from mlflow.entities import Metric

    run_id = ensure_run(client, model, str(version))
    client.log_batch(run_id, metrics=[Metric(k, v, point.timestamp_ms, point.step)
                                      for k, v in point.metrics().items()])
    return run_id


def history(client, model: str, version: str) -> list[Point]:
    """Every point of the version, oldest first, from all its monitoring runs."""
    points: list[Point] = []
    for run in _runs(client, model, str(version)):
        # One batch's figures share one timestamp (one log_batch): group them back by it.
        by_time: dict[tuple[int, int], dict[str, float]] = {}
        for name in FIGURES:
            for m in client.get_metric_history(run.info.run_id, PREFIX + name):
                by_time.setdefault((m.timestamp, m.step), {})[name] = m.value
        for (ms, _), v in by_time.items():
            alert = v.get("alert")
            points.append(Point(
                at=dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc), records=int(v.get("records", 0)),
                exceed_fraction=v.get("exceed_fraction"), class_tv=v.get("class_tv"),
                mean_confidence=v.get("mean_confidence"), accuracy=v.get("accuracy"),
                status="unavailable" if alert is None else ("alert" if alert >= 0.5 else "ok")))
    return sorted(points, key=lambda p: p.at)
