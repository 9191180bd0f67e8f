"""Runs whose owner is gone: found and marked, so a killed training does not stay RUNNING forever.

Every training run carries the process that owns it (the launcher, i.e. the mnistops command) as a
tag `host:pid:start-time`; the start time (Linux /proc) tells a live process from a later one that
reuses the pid. A later command on the same host marks RUNNING runs whose owner is gone as KILLED,
with a tag saying why. Runs owned on other hosts are left alone (nothing here can tell).
Torch-free: only MLflow and the standard library.
"""

from __future__ import annotations

import logging
import os
import socket

from common import settings

log = logging.getLogger(__name__)

OWNER_TAG = "mnistops.owner"
KILLED_REASON_TAG = "mnistops.killed_reason"
OWNER_PID_ENV = "MNISTOPS_OWNER_PID"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if
    there is no such process. Off Linux: "" for a live process (pid reuse not detected there)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
            return ""
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""


def owner_id(pid: int | None = None) -> str:
    """This training's owner: the launcher (which sets MNISTOPS_OWNER_PID for its workers), else
    this process."""
    if pid is None:
        pid = int(settings.env(OWNER_PID_ENV) or os.getpid())
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or ''}"


def owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None when it lives on another host (unknown)."""
    try:
        host, pid, start = owner.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    now = _start_time(pid)
    return now is not None and (now == start or not start or not now)


def reap_runs(experiment_names: list[str] | None = None) -> list[str]:
    """Mark RUNNING runs whose owner on this host is gone as KILLED; return their ids."""
    from common.settings import mlflow_client

    client = mlflow_client()
    if experiment_names is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        ids = [e.experiment_id for n in experiment_names if (e := client.get_experiment_by_name(n))]
    if not ids:
        return []
    reaped = []
    runs = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        owner = run.data.tags.get(OWNER_TAG)
        if not owner or owner_alive(owner) is not False:
            continue
        reason = f"its owner process {owner} ended without finishing the run (killed or crashed)"
        client.set_tag(run.info.run_id, KILLED_REASON_TAG, reason)
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("MLflow run %s marked KILLED: %s", run.info.run_id, reason)
        reaped.append(run.info.run_id)
    return reaped
