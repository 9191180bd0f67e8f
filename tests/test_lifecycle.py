"""Nothing left behind, with real processes: however a mnistops command ends (SIGTERM, SIGKILL),
no process it started outlives it for more than a few seconds; what it was doing is marked in MLflow
and Prefect (KILLED / Cancelled / Crashed), and a killed training resumes into the same MLflow run
with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.cli import EXIT_REJECTED, EXIT_SIGTERM
from nn_core import metrics as M
from common.owner import Owner
from nn_core.reaping import KILLED_REASON_TAG, OWNER_TAG
from import_probe import run_probed
from stores import migrated_prefect_home
from waiting import wait_for

pytestmark = [pytest.mark.slow]

LEFTOVER_S = 15  # "a few seconds", generous for a loaded 2-core machine


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "MNISTOPS_HOME": str(tmp_path / "home"), **extra}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MNISTOPS_ARTIFACT_ROOT"):
        env.pop(key, None)  # the embedded defaults: a store under the home, our temporary Prefect API
    return env


def _start(tmp_path: Path, *args: str, **env) -> subprocess.Popen:
    """A command in the home under `tmp_path`. Its temporary Prefect API finds the database migrated
    (tests/stores.py): the first boot of a new home is test_two_commands_booting_a_new_home_at_once's."""
    if args[0] != "ui" and not (tmp_path / "home" / "prefect.db").exists():
        migrated_prefect_home(tmp_path / "home")
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=_env(tmp_path, **env), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)



def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _leftovers(procs: list[psutil.Process]) -> list[tuple[int, str]]:
    """Those of `procs` still running LEFTOVER_S from now."""
    _, alive = psutil.wait_procs(procs, timeout=LEFTOVER_S)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return [(p.pid, " ".join(p.cmdline())[:120]) for p in alive]


def _assert_all_gone(procs: list[psutil.Process], what: str) -> None:
    left = _leftovers(procs)
    assert not left, f"{what}: still running: {left}"


def _cleanup(proc: subprocess.Popen) -> None:
    for p in _tree(proc.pid):
        p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _prefect_rows(home: Path, sql: str) -> list[tuple]:
    """Rows of this home's Prefect database, read directly: the temporary API that served it is
    gone with its command."""
    db = sqlite3.connect(home / "prefect.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _flow_runs(home: Path) -> list[tuple[str, str, list[str], dict]]:
    """(flow name, state, tags, labels) of every flow run in this home."""
    rows = _prefect_rows(home, "select f.name, r.state_type, r.tags, r.labels from flow_run r "
                               "join flow f on f.id = r.flow_id order by r.created")
    return [(name, state, json.loads(tags), json.loads(labels or "{}")) for name, state, tags, labels in rows]


def _owned_like_a_deployment_run(tags: list[str], labels: dict, pid: int | None) -> bool:
    """A command's flow run carries its deployment's tags, and its owner as a label, not a tag chip."""
    owner = Owner.parse(labels.get(OWNER_TAG, ""))
    return (sorted(tags) == ["mnistops", "training"] and owner is not None
            and (pid is None or owner.pid == pid) and not any(t.startswith("mnistops-owner:") for t in tags))


def _task_run_tags(home: Path) -> dict[str, list[str]]:
    return {name: json.loads(tags) for name, tags in _prefect_rows(home, "select name, tags from task_run")}


def _events(home: Path) -> dict[str, int]:
    return dict(_prefect_rows(home, "select event, count(*) from events group by event"))


def _mlflow(home: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def _runs(home: Path):
    c = _mlflow(home)
    return c.search_runs([e.experiment_id for e in c.search_experiments() if e.name == "mnist-mlp"])


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, mnist, mnist_source):
    """One training's life on the temporary Prefect API, run once for the tests below: `mnistops run`
    SIGKILLed after its first checkpoint; then the next command, `mnistops run --resume`, which reaps
    it, continues it into the same MLflow run and, as the first candidate of a new store held to
    --threshold 0.999, is rejected; and an uninterrupted `mnistops train` of the same settings in
    another home, for its weights. What each step left is recorded here and checked by the tests."""
    tmp = tmp_path_factory.mktemp("killed-and-resumed")
    home, data = tmp / "home", {"MNISTOPS_DATA_DIR": str(mnist.cache_path.parent),
                                "MNISTOPS_DATA_SOURCE": str(mnist_source)}
    args = ["--epochs", "4", "--seed", "3", "--nproc", "1", "--device", "cpu"]
    # A worker process even for one process (MNISTOPS_TRAIN_IN_PROCESS=0): the launcher's children must
    # go with it. The uninterrupted reference below trains in-process, the default: the same weights.
    proc = _start(tmp, "run", *args, "--no-inference", MNISTOPS_TRAIN_IN_PROCESS="0", **data)
    try:
        ckpt = wait_for(lambda: list(home.glob("runs/*/checkpoint.pt")), 300, proc, "the first checkpoint")[0]
        started = _tree(proc.pid)
        kinds = [" ".join(p.cmdline()) for p in started]
        proc.send_signal(signal.SIGKILL)  # an OOM kill, a closed laptop: no chance to clean up
        proc.wait(10)
        left = _leftovers(started)
        result_after_kill = (ckpt.parent / "result.json").exists()
    finally:
        _cleanup(proc)
    (killed,) = _runs(home)
    resume = _start(tmp, "run", "--resume", "--threshold", "0.999", **data)
    try:
        out, _ = resume.communicate(timeout=600)
    finally:
        _cleanup(resume)
    ref = tmp / "reference"
    ref.mkdir()
    trained, imported = run_probed(["train", *args], _env(ref, **data), ref, timeout=600)
    return SimpleNamespace(home=home, ckpt=ckpt, pid=proc.pid, started=kinds, left=left,
                           result_after_kill=result_after_kill, killed=killed, resume=resume, out=out,
                           trained=trained, imported=imported,
                           ref_ckpts=list((ref / "home").glob("runs/*/checkpoint.pt")))


@pytest.mark.e2e
def test_sigkill_of_run_leaves_nothing(killed_and_resumed):
    k = killed_and_resumed
    kinds = " ".join(k.started)
    assert "prefect.server.api.server" in kinds and "nn_core.worker" in kinds  # our API server, a DDP worker
    assert not k.left, f"after SIGKILL of `mnistops run`: still running: {k.left}"
    # What it was doing is left as it was: the run RUNNING, owned by the killed process, no result.
    assert k.killed.info.status == "RUNNING" and k.killed.data.tags[OWNER_TAG].split(":")[1] == str(k.pid)
    assert k.result_after_kill is False


@pytest.mark.e2e
def test_the_next_command_reaps_a_sigkilled_run_and_resume_finishes_it(killed_and_resumed):
    k = killed_and_resumed
    assert k.resume.returncode == EXIT_REJECTED, k.out
    # The next command marked it KILLED (its owner gone) before resuming it.
    assert f"MLflow run {k.killed.info.run_id} marked KILLED" in k.out, k.out
    assert f"resuming training {k.ckpt.parent.name}" in k.out
    assert "resuming from the checkpoint after epoch" in k.out  # the worker's line, in the logs
    (resumed,) = _runs(k.home)
    assert resumed.info.run_id == k.killed.info.run_id and resumed.info.status == "FINISHED"
    assert str(k.pid) in resumed.data.tags[KILLED_REASON_TAG]
    steps = [m.step for m in _mlflow(k.home).get_metric_history(resumed.info.run_id, M.VAL_ACCURACY)]
    assert sorted(steps) == [1, 2, 3, 4]  # each epoch once: the ones before the kill are not repeated
    states = [(name, state) for name, state, _, _ in _flow_runs(k.home)]
    assert states == [("training-pipeline", "CRASHED"), ("training-pipeline", "COMPLETED")]


@pytest.mark.e2e
def test_a_resumed_training_has_the_weights_of_an_uninterrupted_one(killed_and_resumed):
    k = killed_and_resumed
    assert k.trained.returncode == 0, k.trained.stderr
    (ref_ckpt,) = k.ref_ckpts
    a = torch.load(k.ckpt, weights_only=True)["model_state"]
    b = torch.load(ref_ckpt, weights_only=True)["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_bare_training_runs_without_prefect(killed_and_resumed):
    """`mnistops train` (the reference above) is nn_core only: it trains, logs and checkpoints
    without importing Prefect."""
    r, imported = killed_and_resumed.trained, killed_and_resumed.imported
    assert r.returncode == 0, r.stderr
    assert "validation accuracy" in r.stdout and killed_and_resumed.ref_ckpts
    assert "torch" in imported and "prefect" not in imported, imported


@pytest.mark.e2e
def test_rejected_first_candidate_exits_3_and_skips_the_batch_job(killed_and_resumed):
    k = killed_and_resumed
    assert k.resume.returncode == EXIT_REJECTED, k.out
    assert "NOT promoted" in k.out
    assert "no champion of 'mnist-mlp' yet: the batch inference over the test set is skipped" in k.out
    assert "Traceback" not in k.out
    assert not (k.home / "outputs").exists()


def test_a_run_on_the_temporary_api_keeps_only_the_bookkeeping_it_needs(killed_and_resumed):
    """The owner labels the flow run, and no task run carries it as a tag (a tagged task run asks the
    API for a concurrency slot before it starts), and nothing sends heartbeats to an API that ends with the
    command: the state changes are recorded, no heartbeat is."""
    k = killed_and_resumed
    (crashed, completed) = _flow_runs(k.home)
    assert completed[:2] == ("training-pipeline", "COMPLETED")
    assert _owned_like_a_deployment_run(*crashed[2:], k.pid), crashed
    assert _owned_like_a_deployment_run(*completed[2:], k.resume.pid), completed
    task_tags = _task_run_tags(k.home)
    # Task run names: "<task>-<3 hex>", or "train <run name>"
    tasks = {n.split(" ")[0] if " " in n else n.rsplit("-", 1)[0] for n in task_tags}
    assert {"prepare-data", "train", "export-and-parity", "register", "gate"} <= tasks, task_tags
    assert not any(t.startswith("mnistops-owner:") for tags in task_tags.values() for t in tags), task_tags
    events = _events(k.home)
    assert events.get("prefect.flow-run.Completed") == 1, events
    assert "prefect.flow-run.heartbeat" not in events, events


@pytest.mark.e2e
def test_sigterm_stops_run_cancels_its_flow_run_and_leaves_nothing(tmp_path, mnist, mnist_source):
    home = tmp_path / "home"
    proc = _start(tmp_path, "run", "--epochs", "50", "--no-inference", MNISTOPS_DATA_DIR=str(mnist.cache_path.parent),
                  MNISTOPS_DATA_SOURCE=str(mnist_source))
    try:
        wait_for(lambda: list(home.glob("runs/*/checkpoint.pt")), 300, proc, "the first checkpoint")
        started = _tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_SIGTERM, out
        assert out.splitlines()[-1] == "mnistops run: interrupted (SIGTERM), stopped cleanly"
        assert "Traceback" not in out
        _assert_all_gone(started, "after SIGTERM of `mnistops run`")
    finally:
        _cleanup(proc)
    (run,) = _runs(home)
    assert run.info.status == "KILLED"
    ((name, state, tags, labels),) = _flow_runs(home)
    assert state == "CANCELLED" and _owned_like_a_deployment_run(tags, labels, proc.pid), (tags, labels)
    # Only the flow run is the owner's: a tagged task run would ask the API for a concurrency slot.
    task_tags = _task_run_tags(home)
    assert task_tags and not any(t.startswith("mnistops-owner:") for tags in task_tags.values() for t in tags), task_tags


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("group", [False, True], ids=["SIGTERM", "SIGKILL-to-its-process-group"])
def test_ui_server_goes_with_the_command(tmp_path, group):
    """`mnistops ui` serves the home's store on localhost only; however the command ends, the server
    and the server's own children (mlflow ui starts uvicorn) go too, also when a SIGKILL reaches the
    command's whole process group at once (a terminal's group, `timeout -s KILL`, a CI job's cleanup):
    the lifeline that stops them is not in that group. (A SIGKILL of the command alone takes the same
    path, the lifeline's: test_sigkill_of_run_leaves_nothing checks it for the temporary API's server.)"""
    from servers import free_port

    port = free_port()
    proc = _start(tmp_path, "ui", "--port", str(port))
    try:
        first = proc.stdout.readline()
        assert f"MLflow UI on http://127.0.0.1:{port}" in first and "mlflow.db" in first, first
        wait_for(lambda: _health(port), 120, proc, "the MLflow UI")
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
        started = _tree(proc.pid)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in started)  # the server's own child
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        if not group:
            assert proc.returncode == EXIT_SIGTERM and "mnistops ui: interrupted (SIGTERM)" in out
        how = "SIGKILL of `mnistops ui` and its process group" if group else "SIGTERM of `mnistops ui`"
        _assert_all_gone(started, f"after {how}")
        assert not _health(port)
    finally:
        _cleanup(proc)


@pytest.mark.e2e
def test_sigterm_stops_serve_and_its_children(tmp_path, mnist, mnist_source):
    proc = _start(tmp_path, "serve", MNISTOPS_DATA_DIR=str(mnist.cache_path.parent), MNISTOPS_DATA_SOURCE=str(mnist_source))
    try:
        lines = []
        wait_for(lambda: lines.append(proc.stdout.readline()) or "serving deployments" in lines[-1], 300, proc,
                  "the deployments being served")
        started = _tree(proc.pid)
        assert any("prefect.server.api.server" in " ".join(p.cmdline()) for p in started)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_SIGTERM, out
        assert "mnistops serve: interrupted (SIGTERM)" in out and "Traceback" not in out
        _assert_all_gone(started, "after SIGTERM of `mnistops serve`")
    finally:
        _cleanup(proc)


@pytest.mark.e2e
def test_sigterm_stops_a_sweep_with_concurrent_trainings(tmp_path, mnist, mnist_source):
    home = tmp_path / "home"
    proc = _start(tmp_path, "sweep", "--hidden", "50", "32", "--epochs", "50", "--concurrency", "2",
                  MNISTOPS_DATA_DIR=str(mnist.cache_path.parent), MNISTOPS_DATA_SOURCE=str(mnist_source))
    try:
        wait_for(lambda: len(list(home.glob("runs/*/checkpoint.pt"))) == 2, 400, proc, "both trainings' checkpoints")
        started = _tree(proc.pid)
        # One trial trains in this process (one process group per process), the other in a worker.
        assert sum("nn_core.worker" in " ".join(p.cmdline()) for p in started) == 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == EXIT_SIGTERM, out
        assert "mnistops sweep: interrupted (SIGTERM)" in out
        _assert_all_gone(started, "after SIGTERM of `mnistops sweep`")
    finally:
        _cleanup(proc)
    assert all(state == "CANCELLED" for _, state, _, _ in _flow_runs(home))
    # Both trials stopped between epochs, the in-process one too, and are resumable (KILLED, not FAILED).
    trials = [r for r in _runs(home) if r.data.tags.get("mnistops.kind") == "training"]
    assert sorted(r.info.status for r in trials) == ["KILLED", "KILLED"]
    assert all(len(_mlflow(home).get_metric_history(r.info.run_id, M.VAL_ACCURACY)) < 50 for r in trials)
    # The sweep's own run says the same: stopped, not broken.
    (parent,) = [r for r in _runs(home) if r.data.tags.get("mnistops.kind") == "sweep"]
    assert parent.info.status == "KILLED" and "interrupted" in parent.data.tags[KILLED_REASON_TAG]


def test_two_commands_booting_a_new_home_at_once_both_get_an_api(tmp_path):
    """Two temporary Prefect APIs starting on the same new home together: one migrates its
    database, the other waits for that, and both answer (side by side, one of them failed)."""
    home = tmp_path / "home"
    code = ("import sys; from pathlib import Path; from flows import prefect_api\n"
            f"api = prefect_api.start(Path({str(home)!r})); prefect_api.wait_ready(); print(api.url)\n"
            "prefect_api.stop()\n")
    env = _env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(o.strip().splitlines()[-1].startswith("http://127.0.0.1:") for o in outs), outs
    assert (home / "prefect.db.migrated").exists()
