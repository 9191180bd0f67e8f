"""The Prefect flows in-process on real MNIST against a real Prefect API (the session's): one
training pipeline, read back through MLflow's and Prefect's APIs as users see them in the UIs, the
batch job and the `mnistops` commands on its champion, a sweep, the data tasks; and the scheduled
deployments (`mnistops serve`) against the same server."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from nn_core import metrics as M
from nn_core import registry, tracking
from nn_core.config import DataConfig, GateConfig, TrainConfig
from nn_core.release import logged_model_id
from nn_core.sweep import SweepSpec
from environ import restore
from serving.config import JobConfig
from waiting import finished_task_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(tmp_path_factory, mnist, prefect_api):
    """One MLflow store and home for this module's flows (made once: a pipeline's champion serves
    the batch job and the commands after it). The environment the flows fill in is put back after."""
    from stores import store_for_module

    root = tmp_path_factory.mktemp("flows")
    saved = dict(os.environ)
    try:
        with store_for_module(root, MNISTOPS_HOME=str(root / "home"),
                              MNISTOPS_DATA_DIR=str(mnist.cache_path.parent)), pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            yield root
    finally:
        restore(saved)


@pytest.fixture(scope="module")
def pipeline(store, mnist_source):
    """The training pipeline (4 epochs: over the gate) in a worker process, as on a GPU or with
    --nproc 2: its output is followed into the task run's logs. Its state; mnist-mlp version 1."""
    from flows.training import training_pipeline

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNISTOPS_TRAIN_IN_PROCESS", "0")
        state = training_pipeline(data=DataConfig(data_source=str(mnist_source)), train=TrainConfig(epochs=4),
                                  return_state=True)
    assert state.is_completed(), state
    return state


def _artifacts(flow_run_id) -> dict[str, object]:
    """A flow run's Prefect artifacts by key (the server is shared: never the latest of a key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


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


def test_training_pipeline_promotes(pipeline):
    result = pipeline.result()
    assert result.promoted and result.version == "1" and registry.champion("mnist-mlp") == "1"
    assert result.metrics["val_accuracy"] >= 0.96 and result.metrics["onnx_val_accuracy"] == result.metrics["val_accuracy"]
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["promotion"] == "accepted" and run.info.status == "FINISHED"
    md = _artifacts(pipeline.state_details.flow_run_id)["training-pipeline"].data
    assert "PROMOTED to champion" in md and result.run_id in md and "val_accuracy" in md


def test_the_pipeline_reads_back_through_mlflow(pipeline):
    c = tracking.client()
    outcome, flow_run_id = pipeline.result(), pipeline.state_details.flow_run_id
    run = c.get_run(outcome.run_id)
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "training-pipeline" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["prefect.flow_run_id"] == str(flow_run_id)
    assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")  # the server serves a UI URL
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
    assert model_metrics[M.VAL_ACCURACY].step == 4
    assert [m.step for m in c.get_metric_history(outcome.run_id, M.VAL_ACCURACY)] == [1, 2, 3, 4]  # no duplicate
    info = mlflow.models.get_model_info("models:/mnist-mlp/1")
    assert info.signature.inputs.input_names() == ["pixels"]
    assert info.signature.outputs.input_names() == ["logits", "probabilities", "pixel_sums"]


def test_the_pipeline_reads_back_through_prefect(pipeline):
    """The workers' epoch lines in the flow run's logs, named task runs, links."""
    outcome, flow_run_id = pipeline.result(), pipeline.state_details.flow_run_id
    logs = _prefect_logs(flow_run_id)
    assert any("epoch 1/4: train loss" in line and "[rank 0]" in line for line in logs), logs[:50]
    # every task run named by what it worked on, none by Prefect's default (a hash suffix)
    assert set(_task_run_names(flow_run_id)) == {
        "prepare-data mnist", "train mnist-mlp50-lr0.003-bs256-e4-s0", "export-and-parity mnist",
        "register mnist-mlp", "gate mnist-mlp version 1"}
    arts = _artifacts(flow_run_id)
    assert arts["mlflow-run"].data.strip("[]()").endswith(outcome.run_url) or outcome.run_url in arts["mlflow-run"].data
    md = arts["training-pipeline"].data
    parity_row = next(line for line in md.splitlines() if line.startswith("| parity_max_abs_diff"))
    assert "e-" in parity_row and "0.0000" not in parity_row, parity_row


def test_batch_inference_flow_scores_with_the_champion(pipeline, mnist, tmp_path):
    from flows.inference import batch_inference, export_test_split

    images, labels = export_test_split("mnist", str(mnist.cache_path.parent), tmp_path / "in")
    out_dir = tmp_path / "scored" / "mnist"  # a deployment's folder that its first run makes
    state = batch_inference(JobConfig(input=images, output=out_dir, labels=labels), return_state=True)
    assert state.is_completed(), state
    s = state.result()
    assert s["predicted"] == 10_000 and s["accuracy"] > 0.95 and s["model_version"] == "1"
    assert Path(s["output"]).parent == out_dir and Path(s["output"]).exists()
    assert Path(s["output"]).name.startswith("predictions-") and Path(s["output"]).suffix == ".parquet"
    job_run = tracking.client().get_run(s["mlflow_run_id"])
    assert job_run.data.tags["mlflow.source.name"] == "batch-inference" and job_run.data.tags["mlflow.user"]
    assert "Batch inference of 10000 of 10000 records" in job_run.data.tags["mlflow.note.content"]
    md = _artifacts(state.state_details.flow_run_id)["batch-inference"].data
    assert s["output"] in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| input | records / predicted / skipped | accuracy | drift") and len(rows) == 3
    assert "10000 / 10000 / 0" in rows[2] and all(cell.strip() for cell in rows[2].strip("|").split("|")), rows


def test_cli_exit_codes_and_decisions(pipeline, mnist_source, capsys):
    """After the champion: a stricter gate rejects the next candidate (registered, the run still
    completes, the champion stays); `promote` by hand rejects it again, `--force` promotes it."""
    from flows.cli import EXIT_REJECTED, main
    from nn_core import rollback

    code = main(["run", "--data-source", str(mnist_source), "--epochs", "1", "--threshold", "0.999", "--no-inference"])
    assert code == EXIT_REJECTED
    assert "NOT promoted" in capsys.readouterr().out
    c = tracking.client()
    rejected = c.get_model_version("mnist-mlp", "2")
    assert rejected.tags["promotion"] == "rejected" and "< threshold 0.9990" in rejected.tags["promotion.reason"]
    assert registry.champion("mnist-mlp") == "1" and c.get_run(rejected.run_id).info.status == "FINISHED"
    flow_run_id = c.get_run(rejected.run_id).data.tags["prefect.flow_run_id"]
    assert "NOT PROMOTED" in _artifacts(flow_run_id)["training-pipeline"].data
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "rejected" in out and "version" in out
    assert main(["promote", "2", "--threshold", "0.999"]) == EXIT_REJECTED and registry.champion("mnist-mlp") == "1"
    assert main(["promote", "2", "--threshold", "0.999", "--force"]) == 0 and registry.champion("mnist-mlp") == "2"
    # each decision names who made it: the champion's history (nn_core.rollback) shows it
    assert [d.command for d in rollback.decisions("mnist-mlp")] == [
        "gate of training-pipeline", "gate of training-pipeline", "mnistops promote", "mnistops promote --force"]


def test_sweep_of_three_configs(store, mnist_source):
    """A sweep for a registered model of its own (its one-epoch trials are no match for the
    pipeline's champion; threshold 0.5: which trial is best matters here, not the gate's accuracy):
    the grid as params, three configs drawn from four, the trials as a table, the task runs named
    after their configs, the best released."""
    from flows.sweep import hyperparameter_sweep

    grid = SweepSpec(hidden=[[50], [32]], lr=[2e-3], batch_size=[128, 256], epochs=[1], sample=3, seed=1)
    state = hyperparameter_sweep(grid=grid, data=DataConfig(data_source=str(mnist_source)),
                                 gate=GateConfig(threshold=0.5, model_name="sweep-mlp"), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert len(result.trials) == 3 and len({t["name"] for t in result.trials}) == 3
    children = mlflow.search_runs(experiment_names=["mnist-mlp"], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
                                  output_format="list")
    assert {r.info.run_id for r in children} == {t["run_id"] for t in result.trials}
    best = max(result.trials, key=lambda t: t["val_accuracy"])
    assert result.best == best and result.release.run_id == best["run_id"]
    assert result.release.promoted and registry.champion("sweep-mlp") == result.release.version
    c = tracking.client()
    parent = c.get_run(result.parent_run_id)
    assert parent.data.tags["best_run_id"] == best["run_id"] and parent.info.status == "FINISHED"
    assert parent.data.params["grid.hidden"] == "50 | 32" and parent.data.params["grid.lr"] == "0.002"
    assert parent.data.params["grid.batch_size"] == "128, 256" and parent.data.params["grid.epochs"] == "1"
    assert not any(k.startswith("trial") for k in parent.data.metrics) and M.SWEEP_BEST_VAL_ACCURACY in parent.data.metrics
    assert parent.data.tags["mlflow.source.name"] == "hyperparameter-sweep" and "Best: " in parent.data.tags["mlflow.note.content"]
    table = c.load_table(parent.info.experiment_id, "trials.json", run_ids=[result.parent_run_id])
    assert sorted(table["run_id"]) == sorted(t["run_id"] for t in result.trials)
    assert sorted(table["config"]) == sorted(t["name"] for t in result.trials)
    assert {"sweep_comparison.png", "sweep_comparison.md", "trials.json"} <= {a.path for a in c.list_artifacts(result.parent_run_id)}
    every = {f"mlp{h}-lr0.002-bs{b}-e1" for h in (50, 32) for b in (128, 256)}
    assert {t["name"] for t in result.trials} < every
    assert {f"train {t['name']}" for t in result.trials} <= set(_task_run_names(state.state_details.flow_run_id))
    comparison = _artifacts(state.state_details.flow_run_id)["sweep-comparison"].data
    assert best["name"] in comparison and all(f"[{t['run_id']}](http" in comparison for t in result.trials)


class _Flaky(http.server.SimpleHTTPRequestHandler):
    failures_left = 0
    served_errors = 0
    requested: list[str] = []

    def do_GET(self):
        type(self).requested.append(f"{self.command} {self.path}")
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            type(self).served_errors += 1
            self.send_error(503, "mirror overloaded")
            return
        super().do_GET()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_data_task_retries_a_flaky_source_and_is_cached(prefect_api, tmp_path, mnist_source, monkeypatch):
    from flows.training import obtain_data, prepare_data

    _Flaky.failures_left, _Flaky.served_errors = 2, 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Flaky, directory=str(mnist_source)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        data_dir = tmp_path / "fresh-cache"
        state = prepare_data(DataConfig("mnist", url, str(data_dir)), return_state=True)
        assert state.is_completed() and _Flaky.served_errors == 2
        prepared = state.result()
        assert prepared.split_sizes == {"train": 50_000, "val": 10_000, "test": 10_000} and not prepared.reused_cache
        # The next run verifies the cache file it finds and keeps its answer under that file's content
        # digest; the one after is answered from Prefect's cache: nothing re-verified or fetched.
        server.shutdown()
        assert prepare_data(DataConfig("mnist", url, str(data_dir))).reused_cache
        again = prepare_data(DataConfig("mnist", url, str(data_dir)), return_state=True)
        assert again.is_completed() and again.name == "Cached"
        assert dataclasses.replace(again.result(), reused_cache=False) == prepared
        # ... unless the cache file it points at is gone: then it is prepared again.
        prepared.cache_path.unlink()
        healed = obtain_data(DataConfig("mnist", str(mnist_source), str(data_dir)))
        assert healed.cache_path.exists() and healed.digest == prepared.digest
    finally:
        server.server_close()


def test_corrupt_source_is_not_retried(prefect_api, tmp_path):
    from idx_files import synthetic_dataset

    from flows.training import prepare_data

    synthetic_dataset(tmp_path / "src")  # right layout, but not the pinned MNIST files
    _Flaky.failures_left, _Flaky.requested = 0, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Flaky, directory=str(tmp_path / "src")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        state = prepare_data(DataConfig("mnist", url, str(tmp_path / "d")), return_state=True)
    finally:
        server.shutdown()
        server.server_close()
    assert state.is_failed() and "records, expected 60000" in str(state.message)
    # One attempt: the four files are fetched in order and the sequence never starts over, as each
    # of the 3 retries would (the downloader itself makes two requests per file).
    first, last = "GET /train-images-idx3-ubyte.gz", "GET /t10k-labels-idx1-ubyte.gz"
    assert last in _Flaky.requested
    assert max(i for i, r in enumerate(_Flaky.requested) if r == first) < _Flaky.requested.index(last)


def test_a_source_missing_its_files_is_not_retried(prefect_api, tmp_path):
    from prefect import get_client

    from flows.training import prepare_data

    (tmp_path / "empty").mkdir()
    for source, says in ((tmp_path / "empty", "missing; expected it in the data source folder"),
                         (tmp_path / "nowhere", "data source folder does not exist")):
        state = prepare_data(DataConfig("mnist", str(source), str(tmp_path / "d")), return_state=True)
        assert state.is_failed() and says in str(state.message)
        with get_client(sync_client=True) as client:  # one attempt, not the 3 retries of an unreachable source
            assert finished_task_run(client, state.state_details.task_run_id).run_count == 1


def test_a_flow_output_is_a_folder_unless_it_names_a_predictions_file(tmp_path):
    from flows.inference import output_path

    (tmp_path / "existing").mkdir()
    assert output_path(tmp_path / "existing", "csv").parent == tmp_path / "existing"
    assert output_path(tmp_path / "existing", "csv").suffix == ".csv"
    new = output_path(tmp_path / "new" / "folder", None)  # made by the job when it writes
    assert new.parent == tmp_path / "new" / "folder" and new.suffix == ".parquet" and not new.parent.exists()
    assert output_path(tmp_path / "p.parquet", None) == tmp_path / "p.parquet"
    assert output_path(tmp_path / "p.CSV", None) == tmp_path / "p.CSV"
    (tmp_path / "a-file").write_text("x")  # an existing file stays a file (the job refuses to clobber it)
    assert output_path(tmp_path / "a-file", None) == tmp_path / "a-file"


def test_an_inbox_flow_makes_its_missing_inbox_and_names_its_owner(prefect_api, tmp_path, mlflow_store):
    """A deployment's first run on a fresh home: the inbox is made, nothing to score, Completed (no
    model is loaded for nothing). The flow run carries its deployment's tags and its owner as a label."""
    from prefect.client.orchestration import get_client

    from common.owner import OWNER_TAG, Owner
    from flows.inference import batch_inference
    from serving_fixtures import save_model

    save_model(tmp_path / "m.onnx")
    inbox = tmp_path / "fresh-home" / "inbox"
    job = JobConfig(input=inbox, output=tmp_path / "fresh-home" / "scored", model=str(tmp_path / "m.onnx"))
    state = batch_inference(job, inbox=True, return_state=True)
    assert state.is_completed(), state
    assert inbox.is_dir() and state.result()["scored"] == []
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert sorted(flow_run.tags) == ["inference", "mnistops"]
    assert Owner.parse(flow_run.labels[OWNER_TAG]).pid == os.getpid()


# ---------------------------------------------------------------------------------------------
# `mnistops serve` against a real Prefect server (the session's): deployments, schedules, and cancellation


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _workers(pid: int) -> list[psutil.Process]:
    out = []
    for p in _tree(pid):
        try:
            if "nn_core.worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_serve_registers_schedules_and_cancel_stops_training(prefect_server_url, tmp_path, mnist, mnist_source):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from stores import empty_store

    uri = empty_store(tmp_path / "mlflow.db", tmp_path / "mlartifacts")  # made already: not what this is about
    env = {**os.environ, "PREFECT_API_URL": prefect_server_url, "MNISTOPS_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": uri, "MNISTOPS_ARTIFACT_ROOT": str(tmp_path / "mlartifacts"),
           "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent),
           "MNISTOPS_DATA_SOURCE": str(mnist_source),
           # worker processes even for one process: what is checked here is that they die on cancel
           "MNISTOPS_TRAIN_IN_PROCESS": "0"}
    since = datetime.datetime.now(datetime.timezone.utc)
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--training-cron", "15 3 * * *",
                              "--inference-cron", "*/30 * * * *", "--epochs", "200"],
                             env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        os.environ["PREFECT_API_URL"] = prefect_server_url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: prefect_server_url}), get_client(sync_client=True) as client:
            # The session's server may hold these deployments from an earlier `serve`: wait for this
            # one's (updated since it started, not paused).
            deadline = time.time() + 120
            deployments = {}
            while len(deployments) < 2:
                assert serve.poll() is None and time.time() < deadline, serve.stdout.read() if serve.poll() is not None else "timeout"
                deployments = {d.name: d for d in client.read_deployments()
                               if d.name in ("training-nightly", "inference-hourly") and d.updated >= since
                               and not d.paused}
                time.sleep(0.5)
            crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
            assert crons == {"training-nightly": ["15 3 * * *"], "inference-hourly": ["*/30 * * * *"]}
            assert all(s.active for d in deployments.values() for s in d.schedules)
            # One run at a time each, as in infra/prefect.yaml: schedules queue instead of piling up.
            assert {n: d.global_concurrency_limit.limit for n, d in deployments.items()} == \
                {"training-nightly": 1, "inference-hourly": 1}

            run = run_deployment("training-pipeline/training-nightly", timeout=0)
            deadline = time.time() + 180
            while not _workers(serve.pid):
                assert time.time() < deadline, "no training worker started"
                time.sleep(0.25)
            workers = _workers(serve.pid)
            client.set_flow_run_state(run.id, Cancelling(), force=True)
            deadline = time.time() + 90
            while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers) or _workers(serve.pid):
                assert time.time() < deadline, "training processes survived the cancellation"
                time.sleep(0.25)
            deadline = time.time() + 60
            while not client.read_flow_run(run.id).state.is_cancelled():
                assert time.time() < deadline, client.read_flow_run(run.id).state
                time.sleep(0.5)
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
    assert not _workers(serve.pid)
