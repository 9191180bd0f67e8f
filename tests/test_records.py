"""Every run and flow run a command starts ends in a state that says what happened, with real
processes, a real MLflow store and a real Prefect server: a SIGKILLed batch job (one-shot and inbox)
and sweep are marked KILLED (MLflow) and Crashed (Prefect) by the next command; an owner in another
container's PID namespace is left alone; a drift-alert job's records are as complete as an `ok` one's,
and two jobs on files of one name are told apart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from common.errors import EXIT_DRIFT
from common.owner import KILLED_REASON_TAG, OWNER_TAG, Owner, boot_id, owner_alive, owner_id, pid_namespace, start_time
from waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Owner identity


def _dead_process() -> tuple[int, str]:
    """A real process's pid and start time, taken while it lived; it has ended on return."""
    proc = subprocess.Popen(["sleep", "60"])
    start = start_time(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def test_owner_names_boot_and_pid_namespace_and_judges_only_what_it_can():
    me = Owner.parse(owner_id(os.getpid()))
    assert me is not None and me.pid == os.getpid() and me.host == socket.gethostname()
    assert me.boot == boot_id() != "" and me.pidns == pid_namespace() != ""
    assert owner_alive(str(me)) is True
    pid, start = _dead_process()
    dead = Owner(socket.gethostname(), pid, start, boot_id(), pid_namespace())
    assert owner_alive(str(dead)) is False
    # Another container on this kernel sharing our host name, whose pid may be anything here.
    assert owner_alive(str(Owner(dead.host, pid, start, dead.boot, "4026500001"))) is None
    assert owner_alive(str(Owner(dead.host, os.getpid(), me.start, dead.boot, "4026500001"))) is None
    # Another boot: another machine with our host name, or before a reboot; nothing tells which.
    assert owner_alive(str(Owner(dead.host, pid, start, "00000000-0000-0000-0000-000000000000", dead.pidns))) is None
    # The same kernel and namespace: the host name does not matter (one kernel, one set of pids).
    assert owner_alive(str(Owner("another-name", pid, start, dead.boot, dead.pidns))) is False
    # Older owners (host:pid:start) still parse and are judged as before, on the same host name.
    assert owner_alive(f"{dead.host}:{pid}:{start}") is False
    assert owner_alive(f"{dead.host}:{os.getpid()}:{me.start}") is True
    assert owner_alive(f"elsewhere:{pid}:{start}") is None
    assert owner_alive("not an owner") is None


def _env(tmp_path: Path, api_url: str | None = None, **extra) -> dict:
    env = {**os.environ, "MNISTOPS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), **extra}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MNISTOPS_ARTIFACT_ROOT"):
        env.pop(key, None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _mnistops(tmp_path: Path, *args: str, api_url: str | None = None, timeout: float = 600, **env):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=_env(tmp_path, api_url, **env),
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def _mlflow(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")


def _all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
def test_an_owner_in_another_pid_namespace_is_not_reaped(tmp_path):
    """Records as runs of another container would carry them (only the identity string is made up):
    the next command marks KILLED only the runs whose owner is certainly gone."""
    from common.settings import create_sqlite_store

    home = tmp_path / "home"
    create_sqlite_store(f"sqlite:///{home / 'mlflow.db'}", str(home / "mlartifacts"))
    client = _mlflow(tmp_path)
    exp = client.create_experiment("owners")
    pid, start = _dead_process()
    host, boot, ns = socket.gethostname(), boot_id(), pid_namespace()
    owners = {
        "dead here": str(Owner(host, pid, start, boot, ns)),
        "dead here, older tag": f"{host}:{pid}:{start}",
        "another container": str(Owner(host, pid, start, boot, "4026500001")),
        "another boot": str(Owner(host, pid, start, "00000000-0000-0000-0000-000000000000", ns)),
        "alive here": owner_id(os.getpid()),
    }
    runs = {what: client.create_run(exp, run_name=what, tags={OWNER_TAG: o}).info.run_id for what, o in owners.items()}
    r = _mnistops(tmp_path, "models", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    status = {what: client.get_run(run_id).info.status for what, run_id in runs.items()}
    assert status == {"dead here": "KILLED", "dead here, older tag": "KILLED", "another container": "RUNNING",
                      "another boot": "RUNNING", "alive here": "RUNNING"}, status
    assert str(pid) in client.get_run(runs["dead here"]).data.tags[KILLED_REASON_TAG]


# ---------------------------------------------------------------------------------------------
# Killed batch jobs and sweeps, against a real Prefect server


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    from servers import prefect_server

    root = tmp_path_factory.mktemp("prefect-server")
    with prefect_server(f"sqlite+aiosqlite:///{root}/prefect.db", home=root / "home") as url:
        yield url


def _flow_runs(api_url: str, flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def _start(tmp_path: Path, *args: str, api_url: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=_env(tmp_path, api_url, **env),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)



def _sigkill(proc: subprocess.Popen) -> None:
    """An OOM kill of the command and everything in its session: no chance to clean up."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def _running(tmp_path: Path, api_url: str, flow_name: str, pid: int, kind: str | None = None):
    """(the command's RUNNING MLflow runs, its RUNNING flow run), once both exist."""
    if not (tmp_path / "home" / "mlflow.db").exists():
        return None
    runs = [r for r in _all_runs(_mlflow(tmp_path)) if r.info.status == "RUNNING"
            and (kind is None or r.data.tags.get("mnistops.kind") == kind)]
    flow_runs = [f for f in _flow_runs(api_url, flow_name) if f.state.is_running()
                 and Owner.parse(f.labels.get(OWNER_TAG, "")) and Owner.parse(f.labels[OWNER_TAG]).pid == pid]
    return (runs, flow_runs[0]) if runs and flow_runs else None


def _assert_reaped(tmp_path: Path, api_url: str, flow_name: str, runs: list, flow_run, pid: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    client = _mlflow(tmp_path)
    for run in runs:
        after = client.get_run(run.info.run_id)
        assert after.info.status == "KILLED", (run.info.run_name, after.info.status)
        assert f":{pid}:" in after.data.tags[KILLED_REASON_TAG]
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(flow_run.id).state
    assert state.is_crashed() and f":{pid}:" in state.message, (flow_name, state)


@pytest.fixture
def model(tmp_path) -> Path:
    from serving_fixtures import save_model

    save_model(tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["one-shot", "inbox"])
def test_a_killed_batch_job_is_reaped_by_the_next_one(tmp_path, api_url, model, mode):
    from serving_fixtures import digits

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # Batches of one image: slow enough (~2,000 images/s here) to be caught mid-way.
    np.save(inbox / "big.npy", digits(40_000))
    np.save(tmp_path / "small.npy", digits(100))
    where = ["--inbox", str(inbox), "--output", "scored"] if mode == "inbox" else \
            ["--input", str(inbox / "big.npy"), "--output", "big.parquet"]
    proc = _start(tmp_path, "infer", *where, "--model", str(model), "--batch-size", "1", api_url=api_url)
    try:
        runs, flow_run = wait_for(lambda: _running(tmp_path, api_url, "batch-inference", proc.pid), 300, proc,
                                   "the job's MLflow run and flow run")
        # A command's flow run looks like the deployment's: its tags, and the owner as a label.
        assert sorted(flow_run.tags) == ["inference", "mnistops"]
        assert [Owner.parse(r.data.tags[OWNER_TAG]).pid for r in runs] == [proc.pid]
        _sigkill(proc)
    finally:
        _sigkill(proc)
    assert runs[0].info.run_name == "infer-inbox/big.npy"
    r = _mnistops(tmp_path, "infer", "--input", "small.npy", "--output", "small.parquet", "--model", str(model),
                  api_url=api_url)
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_reaped(tmp_path, api_url, "batch-inference", runs, flow_run, proc.pid)
    later = [f for f in _flow_runs(api_url, "batch-inference") if f.created > flow_run.created]
    assert later and all(f.state.is_completed() for f in later), [f.state for f in later]


@pytest.mark.slow
@pytest.mark.e2e
def test_a_killed_sweep_is_reaped_by_the_next_command(tmp_path, api_url, model, mnist, mnist_source):
    from serving_fixtures import digits

    data = {"MNISTOPS_DATA_DIR": str(mnist.cache_path.parent), "MNISTOPS_DATA_SOURCE": str(mnist_source)}
    proc = _start(tmp_path, "sweep", "--hidden", "50", "32", "--epochs", "50", "--nproc", "1", "--device", "cpu",
                  api_url=api_url, **data)
    home = tmp_path / "home"
    try:
        wait_for(lambda: list(home.glob("runs/*/checkpoint.pt")), 400, proc, "the first trial's checkpoint")
        parents, flow_run = wait_for(lambda: _running(tmp_path, api_url, "hyperparameter-sweep", proc.pid, "sweep"),
                                      60, proc, "the sweep's runs")
        trials = [r for r in _all_runs(_mlflow(tmp_path)) if r.data.tags.get("mnistops.kind") == "training"]
        assert len(parents) == 1 and len(trials) == 1 and sorted(flow_run.tags) == ["mnistops", "sweep"]
        _sigkill(proc)
    finally:
        _sigkill(proc)
    np.save(tmp_path / "small.npy", digits(100))
    r = _mnistops(tmp_path, "infer", "--input", "small.npy", "--output", "small.parquet", "--model", str(model),
                  api_url=api_url)
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_reaped(tmp_path, api_url, "hyperparameter-sweep", parents + trials, flow_run, proc.pid)


# ---------------------------------------------------------------------------------------------
# A drift alert's records


def _test_images(source: Path, n: int) -> np.ndarray:
    from common import idx

    return idx.read_idx(source / "t10k-images-idx3-ubyte.gz", magic=idx.IMAGES_MAGIC)[:n]


@pytest.fixture
def mnist_model(tmp_path, mnist_source) -> tuple[Path, Path]:
    """An MNIST model (one quick epoch) and its drift reference."""
    import json

    import onnx

    from common import idx
    from serving import drift
    from serving_fixtures import mlp_onnx, train_quickly

    x = idx.read_idx(mnist_source / "train-images-idx3-ubyte.gz", magic=idx.IMAGES_MAGIC)
    y = idx.read_idx(mnist_source / "train-labels-idx1-ubyte.gz", magic=idx.LABELS_MAGIC)
    onnx.save(mlp_onnx(train_quickly(x[:50_000], y[:50_000])), str(tmp_path / "mnist.onnx"))
    ref = drift.compute_reference(tmp_path / "mnist.onnx", x[:50_000], x[50_000:])
    (tmp_path / "reference.json").write_text(json.dumps(ref.to_dict()))
    return tmp_path / "mnist.onnx", tmp_path / "reference.json"


STANDARD_TAGS = {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "prefect.flow_run_id"}


@pytest.mark.slow
@pytest.mark.e2e
def test_a_drift_alert_job_has_the_records_of_an_ok_one(tmp_path, api_url, mnist_model, mnist_source, fashion_source):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from serving_fixtures import write_idx

    model, reference = mnist_model
    name = "t10k-images-idx3-ubyte.gz"  # the same file name in two folders
    for folder, source in (("mnist", mnist_source), ("fashion", fashion_source)):
        (tmp_path / folder).mkdir()
        write_idx(tmp_path / folder / name, _test_images(source, 2000), gz=True)
    runs = {}
    for folder, code in (("mnist", 0), ("fashion", EXIT_DRIFT)):
        r = _mnistops(tmp_path, "infer", "--input", f"{folder}/{name}", "--output", f"{folder}.parquet", "--model",
                      str(model), "--drift-reference", str(reference), "--fail-on-drift", api_url=api_url)
        assert r.returncode == code, r.stdout + r.stderr
        (runs[folder],) = [x for x in _all_runs(_mlflow(tmp_path)) if x.data.params.get("input", "").endswith(
            f"{folder}/{name}")]
    ok, alert = runs["mnist"], runs["fashion"]
    assert ok.info.run_name != alert.info.run_name and alert.info.run_name == f"infer-fashion/{name}"
    assert ok.data.tags["drift.status"] == "ok" and alert.data.tags["drift.status"] == "alert"
    # The job ran to its end and alerted: FINISHED, as its outputs are complete; the alert is its tag.
    assert ok.info.status == alert.info.status == "FINISHED"
    assert STANDARD_TAGS <= alert.data.tags.keys() and STANDARD_TAGS <= ok.data.tags.keys()
    assert alert.data.tags["mlflow.source.name"] == ok.data.tags["mlflow.source.name"] == "mnistops infer"
    assert "alert" in alert.data.tags["mlflow.note.content"]
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(alert.data.tags["prefect.flow_run_id"])
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    assert flow_run.state.is_failed(), flow_run.state  # --fail-on-drift: the flow run says so
    (table,) = [a.data for a in artifacts if a.key == "batch-inference"]
    assert f"`{name}`" in table and "**alert**" in table and "class TV" in table
