"""`mnistops infer --inbox --workers N`: the inbox scored by N Prefect tasks on a real Dask cluster
(local worker processes), on a folder and in the loopback S3 bucket (tests/s3_server.py); the ledger
makes the workers share it out. Real processes throughout: the command, the Dask scheduler and
workers, and the Prefect API: the session's server where the inbox is scored to the end (a command
with PREFECT_API_URL set takes the same path as one that starts its temporary API), the command's
temporary API where the command is killed (it must go with the command)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from s3_server import S3Server, s3  # noqa: F401 (the fixture)
from serving_fixtures import digits, save_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    save_model(path)
    return path


def infer(model: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "infer", "--model", str(model), "--no-track", "--device", "cpu", *args]


def env_for(tmp_path: Path, base: dict | None = None) -> dict[str, str]:
    return {**(base or os.environ), "PYTHONPATH": str(REPO), "MNISTOPS_HOME": str(tmp_path / "home")}


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def check_exactly_once(summary: dict, records: list[dict], names: list[str], stderr: str) -> None:
    scored = [x["input"].rstrip("/").rsplit("/", 1)[-1] for x in summary["scored"]]
    assert sorted(scored) == names  # each input scored once, by one of the workers
    assert summary["already_scored"] == [] and summary["in_progress_elsewhere"] == []
    assert sorted(r["input"] for r in records) == names
    assert all(r["status"] == "scored" and len(r["history"]) == 1 for r in records)
    # two Prefect tasks ran on the Dask task runner (each a worker of the inbox)
    assert "inbox worker 0" in stderr and "inbox worker 1" in stderr, stderr[-3000:]


def test_two_workers_score_a_local_inbox_exactly_once(model: Path, tmp_path: Path, prefect_env) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    names = [f"in{i}.npy" for i in range(6)]
    for i, n in enumerate(names):
        np.save(inbox / n, digits(2000, seed=i))
    r = subprocess.run(infer(model, "--inbox", str(inbox), "--output", str(out), "--workers", "2"), cwd=tmp_path,
                       env=env_for(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (out / "ledger").glob("*.json")]
    check_exactly_once(json.loads(r.stdout), records, names, r.stderr)
    assert len(list(out.glob("*.parquet"))) == len(names)
    # the local cluster's start and stop (~30 INFO lines) and Prefect's drain progress are not shown
    assert "INFO distributed." not in r.stderr and "Still processing items" not in r.stderr, r.stderr[-3000:]


def test_two_workers_score_a_bucket_inbox_exactly_once(s3: S3Server, model: Path, tmp_path: Path, prefect_env) -> None:
    bucket = s3.bucket()
    names = [f"in{i}.npy" for i in range(6)]
    for i, n in enumerate(names):
        s3.client().put_object(Bucket=bucket, Key=f"inbox/{n}", Body=npy_bytes(digits(2000, seed=10 + i)))
    r = subprocess.run(infer(model, "--inbox", f"s3://{bucket}/inbox", "--output", f"s3://{bucket}/out",
                             "--workers", "2"),
                       cwd=tmp_path, env=env_for(tmp_path, s3.env()), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(s3.client().get_object(Bucket=bucket, Key=k)["Body"].read())
               for k in s3.records(bucket, "out")]
    check_exactly_once(json.loads(r.stdout), records, names, r.stderr)
    assert len([k for k in s3.keys(bucket, "out/") if k.endswith(".parquet")]) == len(names)


def _wait_for(predicate, timeout: float, what: str):
    """Poll until `predicate()` is truthy (a bound on a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_sigkill_of_the_command_leaves_no_dask_worker(model: Path, tmp_path: Path) -> None:
    """The command is SIGKILLed while its Dask workers score: every process it started (the Dask
    workers, their resource tracker, the temporary Prefect API and its lifeline) goes with it."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(8):
        np.save(inbox / f"in{i}.npy", digits(20000, seed=i))
    proc = subprocess.Popen(infer(model, "--inbox", str(inbox), "--output", str(out), "--workers", "2",
                                  "--batch-size", "16"),
                            cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        me = psutil.Process(proc.pid)

        def dask_workers() -> list[psutil.Process]:
            kids = []
            for p in me.children(recursive=True):
                try:
                    if "multiprocessing.spawn" in " ".join(p.cmdline()):
                        kids.append(p)
                except psutil.Error:  # gone since the listing
                    continue
            return kids if len(kids) >= 2 else []

        _wait_for(lambda: list((out / "ledger").glob("*.claim-*")), 600, "a worker to claim an input")
        workers = _wait_for(dask_workers, 60, "two Dask worker processes")
        started = me.children(recursive=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert len(workers) == 2 and all(w in started for w in workers)
    _wait_for(lambda: not _alive(started), 60, f"the command's processes to go: {_alive(started)}")
    assert len(list((out / "ledger").glob("*.json"))) < 8  # killed mid-way: a rerun has work left


def test_workers_are_bounded_and_only_with_an_inbox(model: Path, tmp_path: Path) -> None:
    from flows.fanout import local_limit

    (tmp_path / "inbox").mkdir()
    np.save(tmp_path / "x.npy", digits(3))
    too_many = str(local_limit() + 1)
    cases = [(("--inbox", "inbox", "--output", "out", "--workers", too_many),
              f"mnistops infer: error: --workers {too_many}: this machine runs at most {local_limit()} local "
              "scoring worker(s)"),
             (("--input", "x.npy", "--output", "p.parquet", "--workers", "2"),
              "mnistops infer: error: --workers 2: only with --inbox"),
             (("--inbox", "inbox", "--output", "out", "--workers", "0"),
              "mnistops infer: error: argument --workers: 0: expected an integer >= 1")]
    for args, expected in cases:
        r = subprocess.run(infer(model, *args), cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(expected), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inbox", "x.npy"]  # nothing made, no home either


def test_a_local_cluster_s_workers_skip_the_trim_threshold_and_leave_this_process_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster `infer --workers 2` starts, under flows.fanout.local_worker_config: its worker
    processes run without MALLOC_TRIM_THRESHOLD_ (glibc's adaptive mmap threshold stays on) and with
    Dask's one OpenMP thread, and this process's environment is as it was once the cluster is gone
    (Dask's nanny writes its pre-spawn variables into its own process's environment)."""
    from distributed import Client, LocalCluster

    from flows.fanout import LOCAL_CLUSTER, FanOut, local_worker_config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    names = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    with local_worker_config(FanOut(workers=2)):
        with LocalCluster(n_workers=1, **LOCAL_CLUSTER) as cluster, Client(cluster) as client:
            seen = next(iter(client.run(lambda: {k: os.environ.get(k) for k in names}).values()))
    # Dask's one thread where this process had none set; a value of the user's own is kept
    assert seen == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3"}
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "3"
