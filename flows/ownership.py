"""Prefect flow runs that name the process running them, so that a killed command's flow run is
marked Crashed by the next command, and an interrupted one is marked Cancelled, not left Running.

A flow run started by a mnistops command carries the tag `mnistops-owner:host:pid:start-time`
(nn_core.reaping's owner id). Nothing here runs at import.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from nn_core.reaping import owner_alive, owner_id

log = logging.getLogger(__name__)

TAG_PREFIX = "mnistops-owner:"


def owner_tag() -> str:
    import os

    return TAG_PREFIX + owner_id(os.getpid())


@contextlib.contextmanager
def owned_flow_runs() -> Iterator[None]:
    """Flow runs started inside carry this process's owner tag; stale ones are reaped first."""
    from prefect import tags

    reap_flow_runs()
    with tags(owner_tag()):
        yield


@contextlib.contextmanager
def untagged_task_runs() -> Iterator[None]:
    """Inside a flow run: task runs created here do not inherit the owner tag, which only the flow
    run needs. Prefect takes every tag of a task run for a possible tag-based concurrency limit and
    asks its API for a slot before each task run starts: one more request per task for a limit that
    never exists, and when the API's SQLite database is busy, a 503 that its client retries 2 s later
    (seen in one `mnistops run` in four on 2 cores). Other tags are kept."""
    from prefect.context import TagsContext

    current = TagsContext.get().current_tags
    with TagsContext(current_tags={t for t in current if not t.startswith(TAG_PREFIX)}):
        yield


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def reap_flow_runs() -> list[str]:
    """Mark Running/Pending flow runs whose owner on this host is gone as Crashed."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    reaped = []
    with _client() as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
        for run in runs:
            owners = [t[len(TAG_PREFIX):] for t in run.tags if t.startswith(TAG_PREFIX)]
            if owners and owner_alive(owners[0]) is False:
                client.set_flow_run_state(run.id, Crashed(message=f"its owner process {owners[0]} ended "
                                                                  "without finishing the run"), force=True)
                log.warning("Prefect flow run %s (%s) marked Crashed: its owner %s is gone", run.name, run.id, owners[0])
                reaped.append(str(run.id))
    return reaped


def cancel_own_flow_runs(reason: str) -> list[str]:
    """After an interruption: this process's flow runs that did not complete become Cancelled
    (the engine records a SIGTERM as a crash, and a task stopped by a signal as failed)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    cancelled = []
    with _client() as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[owner_tag()])))
        for run in runs:
            if run.state is None or run.state.type not in (StateType.COMPLETED, StateType.CANCELLED):
                client.set_flow_run_state(run.id, Cancelled(message=reason), force=True)
                cancelled.append(str(run.id))
    return cancelled
