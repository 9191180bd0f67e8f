"""Issue 24, points 1 and 2: the model version's monitoring record (one point per batch job, in
MLflow, stepped by time), `mnistops monitor`, the drift alert as a Prefect event and the training
deployment's trigger firing after K of them, on the real parts: a real MLflow store, real
onnxruntime on the tiny synthetic model, the session's real Prefect server."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest

from serving import drift, monitor
from serving.config import JobConfig
from serving.defaults import EXPERIMENT
from serving_fixtures import digits, mlp_onnx, mlp_weights, reference_probabilities

SEED = 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store (SQLite) for this module's tests, each on models of its own names: a new
    store's schema migrations take 5-9 s on this machine, paid once here instead of per test."""
    from stores import store_for_module

    root = tmp_path_factory.mktemp("monitor-store")
    with store_for_module(root, MNISTOPS_HOME=str(root / "home")) as uri:
        yield uri


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(tmp_path: Path, name: str) -> dict[str, np.ndarray]:
    """Version 1 of `name`: the synthetic MLP, logged and registered through the client (no
    mlflow.onnx flavour: the job needs only the .onnx among the version's artifacts), with a drift
    reference of random-pixel images stored the way registration stores it. Returns its weights."""
    from common.experiments import ensure_experiment
    from common.settings import mlflow_client

    weights = mlp_weights(seed=SEED)
    path = tmp_path / "model.onnx"
    onnx.save(mlp_onnx(weights), str(path))
    client = mlflow_client()
    run = client.create_run(ensure_experiment("training", client))
    client.log_artifact(run.info.run_id, str(path), "model")
    client.create_registered_model(name)
    client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    drift.store_reference(name, "1", run.info.run_id, path, digits(3000, seed=11), digits(2000, seed=12))
    return weights


def test_each_batch_adds_a_point_to_its_versions_record(tmp_path, store):
    """Two jobs on version 1: a labelled batch like the reference (ok, accuracy 0.75 by construction),
    then black images (alert). Both points in the version's one record, with the job's figures, stepped
    by time; each job's run names the record."""
    from common.settings import mlflow_client
    from serving.job import run_job

    weights = register(tmp_path, "mon-mlp")
    x = digits(400, seed=3)
    probs = reference_probabilities(weights, x)
    y = probs.argmax(axis=1)
    y[:100] = (y[:100] + 1) % 10  # a quarter wrong: accuracy 0.75
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "black.npy", np.zeros((200, 28, 28), np.uint8))
    model = "models:/mon-mlp/1"
    ok = run_job(JobConfig(input=tmp_path / "x.npy", labels=tmp_path / "y.npy", output=tmp_path / "x.parquet",
                           model=model, device="cpu"))
    alert = run_job(JobConfig(input=tmp_path / "black.npy", output=tmp_path / "b.parquet", model=model, device="cpu"))
    assert (ok.drift.status, alert.drift.status) == ("ok", "alert")
    assert ok.monitor_run_id == alert.monitor_run_id is not None

    client = mlflow_client()
    first, second = monitor.history(client, "mon-mlp", "1")
    assert (first.records, first.accuracy, first.status) == (400, 0.75, "ok")
    assert first.mean_confidence == pytest.approx(probs.max(axis=1).mean(), abs=1e-5)
    assert first.exceed_fraction == ok.drift.statistics["exceed_fraction"]
    assert first.class_tv == ok.drift.statistics["class_tv"]
    assert (second.records, second.accuracy, second.status, second.exceed_fraction) == (200, None, "alert", 1.0)
    assert first.at <= second.at <= dt.datetime.now(dt.timezone.utc)

    record = client.get_run(ok.monitor_run_id)
    assert client.get_experiment(record.info.experiment_id).name == "mon-mlp-monitor"
    steps = client.get_metric_history(record.info.run_id, "monitor/records")
    assert [m.step for m in steps] == [m.timestamp // 1000 for m in steps]  # stepped by time
    assert "monitor/accuracy" in record.data.metrics and record.data.metrics["monitor/alert"] == 1.0
    for job in (ok, alert):
        assert client.get_run(job.mlflow_run_id).data.tags[monitor.JOB_TAG] == ok.monitor_run_id


def test_two_jobs_racing_on_a_new_version_share_one_record(store, monkeypatch):
    """Both jobs look the record up before either has created it (held at a barrier after the real
    lookup), so both create one: they still write to one run, the oldest, and the other says so."""
    from common.settings import mlflow_client

    lookup, barrier, first_call = monitor._runs, threading.Barrier(2, timeout=30), threading.local()

    def racing_lookup(*args):
        runs = lookup(*args)
        if not getattr(first_call, "done", False):
            first_call.done = True
            barrier.wait()  # both have looked (and found nothing) before either creates
        return runs

    mlflow_client().search_experiments()  # the store is whole before the two threads open it
    monkeypatch.setattr(monitor, "_runs", racing_lookup)
    now = dt.datetime.now(dt.timezone.utc)
    points = [monitor.Point(now + dt.timedelta(seconds=i), 10 + i, 0.01, 0.02, 0.9, None, "ok") for i in range(2)]
    chosen: list[str] = [""] * 2

    def job(i: int) -> None:
        chosen[i] = monitor.record(mlflow_client(), "race-mlp", "1", points[i])

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(monitor, "_runs", lookup)
    client = mlflow_client()
    runs = lookup(client, "race-mlp", "1")
    assert len(runs) == 2  # the race happened: each job created a run
    assert chosen[0] == chosen[1] == runs[0].info.run_id
    assert runs[1].data.tags[monitor.DUPLICATE_TAG] == runs[0].info.run_id
    assert [p.records for p in monitor.history(client, "race-mlp", "1")] == [10, 11]
    assert not client.get_metric_history(runs[1].info.run_id, "monitor/records")


def test_a_run_stamped_before_another_was_made_does_not_split_the_record(store, monkeypatch):
    """Job B takes its new run's start time, then is held while job A creates its run, finishes it and
    picks it (the only one). B's run then starts earlier than A's but is finished later: both jobs
    write to A's run. (Ordered by start time, B picked its own, and their points went to two
    records.) B's delay is its clock reading 5 s early for that one start time."""
    from mlflow.tracking._tracking_service import client as tracking  # the clock create_run reads

    from common.settings import mlflow_client

    lookup, barrier, a_done = monitor._runs, threading.Barrier(2, timeout=30), threading.Event()
    looked, stamped = threading.local(), threading.local()

    def racing_lookup(*args):
        runs = lookup(*args)
        if not getattr(looked, "done", False):
            looked.done = True
            barrier.wait()  # both found nothing
            if threading.current_thread().name == "B":
                assert a_done.wait(30)
        return runs

    clock = tracking.get_current_time_millis

    def b_stamped_early() -> int:
        if threading.current_thread().name == "B" and not getattr(stamped, "done", False):
            stamped.done = True  # its run's start time, taken before A created anything
            return clock() - 5000
        return clock()

    mlflow_client().search_experiments()
    monkeypatch.setattr(monitor, "_runs", racing_lookup)
    monkeypatch.setattr(tracking, "get_current_time_millis", b_stamped_early)
    now = dt.datetime.now(dt.timezone.utc)
    chosen: dict[str, str] = {}

    def job(name: str, records: int) -> None:
        chosen[name] = monitor.record(mlflow_client(), "skew-mlp", "1",
                                      monitor.Point(now, records, 0.01, 0.02, 0.9, None, "ok"))
        if name == "A":
            a_done.set()

    threads = [threading.Thread(target=job, args=(n, r), name=n) for n, r in (("A", 10), ("B", 11))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(monitor, "_runs", lookup)
    runs = lookup(mlflow_client(), "skew-mlp", "1")
    assert len(runs) == 2 and min(runs, key=lambda r: r.info.start_time).info.run_id != chosen["A"]
    assert chosen["A"] == chosen["B"] == runs[0].info.run_id


def test_monitor_command_prints_each_versions_batches_and_trend(store, capsys):
    from common.settings import mlflow_client
    from flows.cli import main

    client = mlflow_client()
    client.create_registered_model("cmd-mlp")
    for _ in range(2):
        client.create_model_version("cmd-mlp", "file:///nowhere")  # the command reads only the registry
    client.set_registered_model_alias("cmd-mlp", "champion", "2")
    t0 = dt.datetime(2026, 12, 4, 10, 0, tzinfo=dt.timezone.utc)
    for i in range(4):  # drifting: more records above t, less confident, the last two alert
        status = "alert" if i >= 2 else "ok"
        monitor.record(client, "cmd-mlp", "2", monitor.Point(t0 + dt.timedelta(hours=i), 1000, 0.01 + 0.2 * i,
                                                             0.05 * i, 0.95 - 0.1 * i, 0.97 if i == 0 else None,
                                                             status))

    assert main(["monitor", "--model", "cmd-mlp", "--last", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "cmd-mlp version 2 (champion): 4 batch(es), 2 alert(s); the last 3:"
    header, *rows = out[1:5]
    assert header.split() == ["time", "(UTC)", "records", "above", "t", "class", "TV", "mean", "conf", "accuracy",
                              "drift"]
    assert rows[0].split() == ["2026-12-04", "11:00:00", "1000", "21.0%", "0.050", "0.850", "n/a", "ok"]
    assert rows[2].split()[-1] == "alert"
    for row in rows:  # aligned: figures end under their header, the status starts under "drift"
        assert row.index(" 1000 ") + 5 == header.index("records") + len("records")
        assert row.rstrip().rsplit(" ", 1)[1] in ("ok", "alert") and row.rindex(" ") + 1 == header.index("drift")
    assert out[5].strip().startswith("trend (last 1 vs the 2 before): above t 31.0% -> 61.0% (up)")
    assert "alerts 1 -> 1" in out[5] and "mean conf 0.800 -> 0.650 (down)" in out[5]
    assert out[-1] == "cmd-mlp: no batch recorded yet for version(s) 1"

    assert main(["monitor", "--model", "no-such-mlp"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("mnistops monitor: error: --model no-such-mlp: no registered model of that name "
                           "(registered: ") and "cmd-mlp" in line


def _events(resource_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(name=["mnistops.drift.alert"]),
                                              resource=EventResourceFilter(id=[resource_id])),
                                  limit=50)  # the client's default, 100, is above the server's limit
    return page.events


def _wait(what, predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _wait_or_none(predicate, timeout: float):
    """predicate()'s first truthy value within `timeout` s, else None."""
    try:
        return _wait("", predicate, timeout)
    except AssertionError:
        return None


@pytest.mark.slow
def test_an_alerting_flow_run_fails_with_its_artifact_record_and_event(tmp_path, store, prefect_api):
    """--fail-on-drift through the batch-inference flow on the session's Prefect server: the flow run
    fails, keeps its artifact (the alert and the monitoring record's link), the MLflow job run says
    alert, the version's record has the point, and the event reached the server with the figures."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.events.worker import EventsWorker

    from common.settings import mlflow_client
    from flows.inference import batch_inference

    name = unique("mon")  # the server is shared: this test's events only
    register(tmp_path, name)
    np.save(tmp_path / "black.npy", np.zeros((200, 28, 28), np.uint8))
    state = batch_inference(JobConfig(input=tmp_path / "black.npy", output=tmp_path / "b.parquet",
                                      model=f"models:/{name}/1", device="cpu", fail_on_drift=True),
                            return_state=True)
    assert state.is_failed() and "drift alert" in state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (table,) = [a.data for a in artifacts if a.key == "batch-inference"]
    (point,) = monitor.history(mlflow_client(), name, "1")
    assert point.status == "alert" and point.records == 200
    client = mlflow_client()
    (job_run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                    filter_string=f"tags.model_uri = 'models:/{name}/1'")
    assert job_run.data.tags["drift.status"] == "alert" and job_run.info.status == "FINISHED"
    record = job_run.data.tags[monitor.JOB_TAG]
    assert "**alert**" in table and f"monitoring record of {name} version 1: [MLflow run {record}]" in table

    EventsWorker.drain_all(timeout=30)
    (event,) = _wait("the alert event on the server", lambda: _events(f"mnistops.model.{name}.v1"))
    assert event.resource["mnistops.model.name"] == name and event.resource["mnistops.model.version"] == "1"
    assert event.payload["records"] == 200 and event.payload["exceed_fraction"] == 1.0
    assert event.payload["status"] == "alert" and event.payload["monitor_run_id"] == record
    assert str(state.state_details.flow_run_id) in {r.id.rsplit(".", 1)[-1] for r in event.related}


def test_without_a_prefect_api_emitting_is_a_no_op(tmp_path):
    """No Prefect API configured (none in the environment, Prefect's setting at its default; the
    session's may be set by `prefect_api`): nothing sent, no error, no temporary API started."""
    import psutil
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.drift_events import emit_alert
    from serving.job import JobResult
    from serving.model_source import ModelRef

    assert "PREFECT_API_URL" not in os.environ  # conftest removes it
    result = JobResult(output=tmp_path, manifest=tmp_path, model=ModelRef("models:/m/1", "m", "1", None, tmp_path),
                       provider="cpu", records=1, predicted=1, skipped=(), accuracy=None, seconds=1.0,
                       throughput=1.0, wall_seconds=1.0, input_digest="", labels_digest=None, mlflow_run_id=None,
                       drift=drift.DriftReport("alert", "test", 1))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert emit_alert(result) is None
    # no temporary API: it would be a server process of this one's (a wall-clock bound was flaky under load)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


@pytest.mark.slow
def test_k_alerts_within_the_window_run_the_training_deployment(prefect_api):
    """The training deployment exactly as `mnistops serve` declares it (its trigger with K = 2),
    applied to the session's server under a name of its own: one alert event runs nothing, the
    second runs the deployment (a flow run of it is created; no worker is needed for that)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    from flows.deployments import TRAINING_DEPLOYMENT, deployments
    from flows.drift_events import ALERT_EVENT, RetrainTrigger, resource, retrain_trigger

    name = unique("mon")
    trigger = retrain_trigger(name, RetrainTrigger(retrain_alerts=2, retrain_window=600))
    training = deployments("0 2 * * *", "0 * * * *", {}, {}, [trigger])[0]
    assert training.name == TRAINING_DEPLOYMENT and training.triggers == [trigger]
    training.name = f"{TRAINING_DEPLOYMENT}-{name}"  # the server is shared with other tests
    deployment_id = training.apply()

    def runs():  # those the trigger made (the schedule's own are auto-scheduled)
        with get_client(sync_client=True) as client:
            return [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[deployment_id]))) if not r.auto_scheduled]

    try:
        with get_client(sync_client=True) as client:
            (automation,) = client.read_automations_by_name(trigger.name)
        assert automation.trigger.threshold == 2 and automation.trigger.posture == "Reactive"
        # The server's trigger service loads a new automation on its change notice, a moment after it
        # is applied: the alerts go one at a time, each once the one before is stored on the server,
        # until the deployment runs. K = 2: never on the first (the second runs it, or a later one if
        # the automation was loaded after the first arrived).
        alerts, deadline, made = 0, time.monotonic() + 120, []
        while not made:
            assert time.monotonic() < deadline, f"no run of the training deployment after {alerts} alert(s)"
            alerts += 1
            emit_event(ALERT_EVENT, resource=resource(name, str(alerts)), payload={"records": 200})
            EventsWorker.drain_all(timeout=30)
            _wait(f"alert {alerts} on the server", lambda: _events(f"mnistops.model.{name}.v{alerts}"))
            made = runs() if alerts == 1 else _wait_or_none(runs, 20)
        assert alerts >= 2, f"the training deployment ran on alert {alerts}"
        (flow_run,) = made
        assert flow_run.deployment_id == deployment_id and flow_run.created_by.type == "AUTOMATION", flow_run
    finally:
        with get_client(sync_client=True) as client:
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
            client.delete_deployment(deployment_id)  # and its scheduled runs
