"""The Prefect flows in-process on real MNIST against a real local Prefect API, and the scheduled
deployments (`mnistops serve`) against a real Prefect server (the session's)."""

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

from nn_core import registry, tracking
from nn_core.config import DataConfig, GateConfig, TrainConfig
from nn_core.sweep import SweepSpec
from serving.config import JobConfig

pytestmark = [pytest.mark.e2e, pytest.mark.slow]



@pytest.fixture
def home(tmp_path, mlflow_store, mnist, monkeypatch):
    monkeypatch.setenv("MNISTOPS_DATA_DIR", str(mnist.cache_path.parent))
    return tmp_path / "home"


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert arts, f"no artifact {key!r}"
    return max(arts, key=lambda a: a.created).data


def test_training_pipeline_promotes_then_rejects(prefect_api, home, mnist_source):
    from flows.training import training_pipeline

    state = training_pipeline(data=DataConfig(data_source=str(mnist_source)), train=TrainConfig(epochs=4), return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result.promoted and result.version == "1" and registry.champion("mnist-mlp") == "1"
    assert result.metrics["val_accuracy"] >= 0.96 and result.metrics["onnx_val_accuracy"] == result.metrics["val_accuracy"]
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["promotion"] == "accepted" and run.info.status == "FINISHED"
    md = _artifact("training-pipeline")
    assert "PROMOTED to champion" in md and result.run_id in md and "val_accuracy" in md

    # A stricter gate: the candidate is registered and rejected, the run still completes.
    state = training_pipeline(data=DataConfig(data_source=str(mnist_source)), train=TrainConfig(epochs=1),
                              gate=GateConfig(threshold=0.999), return_state=True)
    assert state.is_completed()
    rejected = state.result()
    assert not rejected.promoted and rejected.version == "2" and "< threshold 0.9990" in rejected.reason
    assert registry.champion("mnist-mlp") == "1"
    assert "NOT PROMOTED" in _artifact("training-pipeline")


def test_cli_exit_codes(prefect_api, home, mnist_source, capsys):
    from flows.cli import EXIT_REJECTED, main

    code = main(["run", "--data-source", str(mnist_source), "--epochs", "1", "--threshold", "0.999", "--no-inference"])
    assert code == EXIT_REJECTED
    assert "NOT promoted" in capsys.readouterr().out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "rejected" in out and "version" in out
    assert main(["promote", "1", "--threshold", "0.999"]) == EXIT_REJECTED and registry.champion("mnist-mlp") is None
    assert main(["promote", "1", "--threshold", "0.999", "--force"]) == 0 and registry.champion("mnist-mlp") == "1"
    # each decision names who made it: the champion's history (nn_core.rollback) shows it
    from nn_core import rollback

    assert [d.command for d in rollback.decisions("mnist-mlp")] == [
        "gate of training-pipeline", "mnistops promote", "mnistops promote --force"]


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


def test_sweep_of_three_configs(prefect_api, home, mnist_source):
    from flows.sweep import hyperparameter_sweep

    grid = SweepSpec(hidden=[[50], [32]], lr=[2e-3], batch_size=[64, 128], epochs=[2], sample=3, seed=1)
    result = hyperparameter_sweep(grid=grid, data=DataConfig(data_source=str(mnist_source)))
    assert len(result.trials) == 3 and len({t["name"] for t in result.trials}) == 3
    children = mlflow.search_runs(experiment_names=["mnist-mlp"], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
                                  output_format="list")
    assert {r.info.run_id for r in children} == {t["run_id"] for t in result.trials}
    best = max(result.trials, key=lambda t: t["val_accuracy"])
    assert result.best == best and result.release.run_id == best["run_id"]
    assert result.release.promoted and registry.champion("mnist-mlp") == result.release.version
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.data.tags["best_run_id"] == best["run_id"] and parent.info.status == "FINISHED"
    table = tracking.client().load_table(parent.info.experiment_id, "trials.json", run_ids=[result.parent_run_id])
    assert sorted(table["run_id"]) == sorted(t["run_id"] for t in result.trials)
    assert {"sweep_comparison.png", "sweep_comparison.md", "trials.json"} <= {a.path for a in tracking.client().list_artifacts(result.parent_run_id)}
    assert best["name"] in _artifact("sweep-comparison")


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


def test_batch_inference_flow(prefect_api, home, mnist, tmp_path):
    from flows.inference import batch_inference, export_test_split
    from flows.training import training_pipeline

    assert training_pipeline(train=TrainConfig(epochs=4)).promoted
    images, labels = export_test_split("mnist", str(mnist.cache_path.parent), tmp_path / "in")
    out_dir = tmp_path / "scored" / "mnist"  # a deployment's folder that its first run makes
    s = batch_inference(JobConfig(input=images, output=out_dir, labels=labels))
    assert s["predicted"] == 10_000 and s["accuracy"] > 0.95 and s["model_version"] == "1"
    assert Path(s["output"]).parent == out_dir and Path(s["output"]).exists()
    assert Path(s["output"]).name.startswith("predictions-") and Path(s["output"]).suffix == ".parquet"
    md = _artifact("batch-inference")
    assert "10000 / 10000 / 0" in md and s["output"] in md


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

    env = {**os.environ, "PREFECT_API_URL": prefect_server_url, "MNISTOPS_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent),
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
