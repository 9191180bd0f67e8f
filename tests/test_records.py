"""Every run and flow run a command starts ends in a state that says what happened, with real
processes, a real MLflow store and a real Prefect server: a SIGKILLed batch job and sweep are marked
KILLED (MLflow) and Crashed (Prefect) by the next command; an owner in another container's PID
namespace is left alone; a drift-alert job's records are as complete as an `ok` one's,
and two jobs on files of one name are told apart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import sys
from pathlib import Path
from types import SimpleNamespace

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


def test_a_killed_owner_not_yet_reaped_is_dead():
    """A zombie (exited; its parent has not reaped it, as a container's init may never) owns nothing."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        owner = owner_id(proc.pid)
        assert owner_alive(owner) is True
        proc.kill()
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert start_time(proc.pid) is None and owner_alive(owner) is False
    finally:
        proc.kill()
        proc.wait()


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


# ---------------------------------------------------------------------------------------------
# Killed commands, owners elsewhere and a drift alert, in one home against a real Prefect server
#
# One chain of commands, each the next command of the one before: made-up owners' runs in the store,
# then a sweep SIGKILLed, then a batch job over an inbox (which reaps the sweep) SIGKILLed, then two
# one-shot jobs over files of one name (the first reaps the batch job), one of which alerts on drift.
# The tests below check what each left. The Prefect server is the session's: the records are found by
# the killed commands' pids and the runs' own flow run ids, whatever else runs there.


def _flow_runs(api_url: str, flow_name: str, running: bool = False) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    state = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     flow_run_filter=state if running else None)


def _read_flow_run(api_url: str, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


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


def _owned_by(tags: dict, pid: int) -> bool:
    """An MLflow run's tags or a flow run's labels name `pid` as the owner."""
    owner = Owner.parse(tags.get(OWNER_TAG, ""))
    return owner is not None and owner.pid == pid


def _running(tmp_path: Path, api_url: str, flow_name: str, pid: int, kind: str | None = None):
    """(the command's RUNNING MLflow runs, its RUNNING flow run), once both exist."""
    if not (tmp_path / "home" / "mlflow.db").exists():
        return None
    runs = [r for r in _all_runs(_mlflow(tmp_path)) if r.info.status == "RUNNING" and _owned_by(r.data.tags, pid)
            and (kind is None or r.data.tags.get("mnistops.kind") == kind)]
    flow_runs = [f for f in _flow_runs(api_url, flow_name, running=True) if _owned_by(f.labels, pid)]
    return (runs, flow_runs[0]) if runs and flow_runs else None


def _reaped(tmp_path: Path, api_url: str, runs: list, flow_run, pid: int) -> None:
    """The runs KILLED and the flow run Crashed, each saying that the owner `pid` was gone."""
    client = _mlflow(tmp_path)
    for run in runs:
        after = client.get_run(run.info.run_id)
        assert after.info.status == "KILLED", (run.info.run_name, after.info.status)
        assert f":{pid}:" in after.data.tags[KILLED_REASON_TAG]
    state = _read_flow_run(api_url, flow_run.id).state
    assert state.is_crashed() and f":{pid}:" in state.message, (flow_run.name, state)


def _owners_elsewhere(tmp_path: Path) -> dict[str, str]:
    """Records as runs of another container would carry them (only the identity string is made up),
    in this home's store: {what: run id}."""
    from stores import home_with_store

    home_with_store(tmp_path / "home")
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
    return {what: client.create_run(exp, run_name=what, tags={OWNER_TAG: o}).info.run_id for what, o in owners.items()}


def _killed_sweep(tmp_path: Path, api_url: str, data: dict) -> SimpleNamespace:
    proc = _start(tmp_path, "sweep", "--hidden", "50", "32", "--epochs", "50", "--nproc", "1", "--device", "cpu",
                  api_url=api_url, **data)
    try:
        wait_for(lambda: list((tmp_path / "home").glob("runs/*/checkpoint.pt")), 400, proc,
                 "the first trial's checkpoint")
        parents, flow_run = wait_for(lambda: _running(tmp_path, api_url, "hyperparameter-sweep", proc.pid, "sweep"),
                                     60, proc, "the sweep's runs")
        trials = [r for r in _all_runs(_mlflow(tmp_path)) if r.data.tags.get("mnistops.kind") == "training"]
        _sigkill(proc)
    finally:
        _sigkill(proc)
    return SimpleNamespace(pid=proc.pid, parents=parents, trials=trials, flow_run=flow_run)


def _killed_inbox_job(tmp_path: Path, api_url: str, model: Path) -> SimpleNamespace:
    from serving_fixtures import digits

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    np.save(inbox / "big.npy", digits(40_000))  # batches of one image: slow enough to be caught mid-way
    proc = _start(tmp_path, "infer", "--inbox", str(inbox), "--output", "scored", "--model", str(model),
                  "--batch-size", "1", api_url=api_url)
    try:
        runs, flow_run = wait_for(lambda: _running(tmp_path, api_url, "batch-inference", proc.pid), 300, proc,
                                  "the job's MLflow run and flow run")
        _sigkill(proc)
    finally:
        _sigkill(proc)
    return SimpleNamespace(pid=proc.pid, runs=runs, flow_run=flow_run)


def _test_images(source: Path, n: int) -> np.ndarray:
    from common import idx

    return idx.read_idx(source / "t10k-images-idx3-ubyte.gz", magic=idx.IMAGES_MAGIC)[:n]


def _mnist_model(root: Path, mnist_source: Path) -> tuple[Path, Path]:
    """An MNIST model (one quick epoch) and its drift reference."""
    import json

    import onnx

    from common import idx
    from serving import drift
    from serving_fixtures import mlp_onnx, train_quickly

    x = idx.read_idx(mnist_source / "train-images-idx3-ubyte.gz", magic=idx.IMAGES_MAGIC)
    y = idx.read_idx(mnist_source / "train-labels-idx1-ubyte.gz", magic=idx.LABELS_MAGIC)
    onnx.save(mlp_onnx(train_quickly(x[:50_000], y[:50_000])), str(root / "mnist.onnx"))
    ref = drift.compute_reference(root / "mnist.onnx", x[:50_000], x[50_000:])
    (root / "reference.json").write_text(json.dumps(ref.to_dict()))
    return root / "mnist.onnx", root / "reference.json"


DRIFT_INPUT = "t10k-images-idx3-ubyte.gz"  # the same file name in two folders


def _drift_jobs(tmp_path: Path, api_url: str, model: Path, reference: Path, sources: dict) -> dict:
    """A job over MNIST's test images, then one over Fashion-MNIST's, each in a file of the same name,
    with --fail-on-drift: {folder: (the finished process, its MLflow run)}."""
    from serving_fixtures import write_idx

    jobs = {}
    for folder, source in sources.items():
        (tmp_path / folder).mkdir()
        write_idx(tmp_path / folder / DRIFT_INPUT, _test_images(source, 2000), gz=True)
        r = _mnistops(tmp_path, "infer", "--input", f"{folder}/{DRIFT_INPUT}", "--output", f"{folder}.parquet",
                      "--model", str(model), "--drift-reference", str(reference), "--fail-on-drift", api_url=api_url)
        runs = [x for x in _all_runs(_mlflow(tmp_path)) if x.data.params.get("input", "").endswith(
            f"{folder}/{DRIFT_INPUT}")]
        jobs[folder] = (r, runs)
    return jobs


@pytest.fixture(scope="module")
def chain(tmp_path_factory, prefect_server_url, mnist, mnist_source, fashion_source):
    """The chain of commands above, in one home, run once; what each left."""
    tmp = tmp_path_factory.mktemp("records")
    api = prefect_server_url
    model, reference = _mnist_model(tmp, mnist_source)
    owners = _owners_elsewhere(tmp)
    data = {"MNISTOPS_DATA_DIR": str(mnist.cache_path.parent), "MNISTOPS_DATA_SOURCE": str(mnist_source)}
    sweep = _killed_sweep(tmp, api, data)
    job = _killed_inbox_job(tmp, api, model)
    drift_jobs = _drift_jobs(tmp, api, model, reference, {"mnist": mnist_source, "fashion": fashion_source})
    return SimpleNamespace(tmp=tmp, api=api, owners=owners, sweep=sweep, job=job, drift=drift_jobs)


@pytest.mark.slow
def test_an_owner_in_another_pid_namespace_is_not_reaped(chain):
    """The next commands mark KILLED only the runs whose owner is certainly gone."""
    client = _mlflow(chain.tmp)
    status = {what: client.get_run(run_id).info.status for what, run_id in chain.owners.items()}
    assert status == {"dead here": "KILLED", "dead here, older tag": "KILLED", "another container": "RUNNING",
                      "another boot": "RUNNING", "alive here": "RUNNING"}, status
    pid = Owner.parse(client.get_run(chain.owners["dead here"]).data.tags[OWNER_TAG]).pid
    assert str(pid) in client.get_run(chain.owners["dead here"]).data.tags[KILLED_REASON_TAG]


@pytest.mark.slow
@pytest.mark.e2e
def test_a_killed_sweep_is_reaped_by_the_next_command(chain):
    s = chain.sweep
    assert len(s.parents) == 1 and len(s.trials) == 1 and sorted(s.flow_run.tags) == ["mnistops", "sweep"]
    _reaped(chain.tmp, chain.api, s.parents + s.trials, s.flow_run, s.pid)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_killed_batch_job_is_reaped_by_the_next_one(chain):
    """An inbox job's run is made by the same job code as a one-shot job's (serving.job), with its
    owner, in the same `batch-inference` flow."""
    j = chain.job
    # A command's flow run looks like the deployment's: its tags, and the owner as a label.
    assert sorted(j.flow_run.tags) == ["inference", "mnistops"]
    assert [r.info.run_name for r in j.runs] == ["infer-inbox/big.npy"]
    _reaped(chain.tmp, chain.api, j.runs, j.flow_run, j.pid)
    r, (nxt,) = chain.drift["mnist"]  # the next job: it ran to its end
    assert r.returncode == 0, r.stdout + r.stderr
    assert _read_flow_run(chain.api, nxt.data.tags["prefect.flow_run_id"]).state.is_completed()


STANDARD_TAGS = {"mlflow.user", "mlflow.source.name", "mlflow.source.type", "prefect.flow_run_id"}


@pytest.mark.slow
@pytest.mark.e2e
def test_a_drift_alert_job_has_the_records_of_an_ok_one(chain):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (r_ok, (ok,)), (r_alert, (alert,)) = chain.drift["mnist"], chain.drift["fashion"]
    assert r_ok.returncode == 0, r_ok.stdout + r_ok.stderr
    assert r_alert.returncode == EXIT_DRIFT, r_alert.stdout + r_alert.stderr
    assert ok.info.run_name != alert.info.run_name and alert.info.run_name == f"infer-fashion/{DRIFT_INPUT}"
    assert ok.data.tags["drift.status"] == "ok" and alert.data.tags["drift.status"] == "alert"
    # The job ran to its end and alerted: FINISHED, as its outputs are complete; the alert is its tag.
    assert ok.info.status == alert.info.status == "FINISHED"
    assert STANDARD_TAGS <= alert.data.tags.keys() and STANDARD_TAGS <= ok.data.tags.keys()
    assert alert.data.tags["mlflow.source.name"] == ok.data.tags["mlflow.source.name"] == "mnistops infer"
    assert "alert" in alert.data.tags["mlflow.note.content"]
    with temporary_settings({PREFECT_API_URL: chain.api}), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(alert.data.tags["prefect.flow_run_id"])
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    assert flow_run.state.is_failed(), flow_run.state  # --fail-on-drift: the flow run says so
    (table,) = [a.data for a in artifacts if a.key == "batch-inference"]
    assert f"`{DRIFT_INPUT}`" in table and "**alert**" in table and "class TV" in table
