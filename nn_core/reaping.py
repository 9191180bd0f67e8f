"""Runs whose owner is gone: found and marked, so a killed command's run does not stay RUNNING forever.

Every run a mnistops command starts (training runs, batch jobs, a sweep's parent) carries the
process that owns it as the tag `mnistops.owner` (common.owner: host, pid, start time, boot id and
PID namespace). A later command marks RUNNING runs whose owner is certainly gone as KILLED, with a
tag saying why; runs whose owner it cannot judge (another machine or boot, another container's PID
namespace) are left alone. Torch-free: only MLflow and the standard library.
"""

from __future__ import annotations

import logging

from common.owner import KILLED_REASON_TAG, OWNER_PID_ENV, OWNER_TAG, owner_alive, owner_id  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def reap_runs(experiment_names: list[str] | None = None) -> list[str]:
    """Mark RUNNING runs whose owner is certainly gone as KILLED; return their ids."""
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
