"""Prefect flow runs that name the process running them, so that a killed command's flow run is
marked Crashed by the next command, and an interrupted one is marked Cancelled, not left Running.

A flow run's owner (common.owner's id) is its label `mnistops.owner`: machine-readable, and not one
of the tag chips the UI shows. Prefect's engine creates a flow run with the tags of its context and
no labels, so a command's flow run is created with the owner as a tag (`mnistops-owner:...`, the
only way to name it from the instant it exists); its first step (`untagged_task_runs`) moves the
owner into the label and leaves the tags that a deployment's run of the same flow has (`mnistops`
and `training`, `inference` or `sweep`). Runs of deployments are labelled by the same step, with the
process that runs them. Nothing here runs at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from common.owner import OWNER_TAG, owner_alive, owner_id

log = logging.getLogger(__name__)

TAG_PREFIX = "mnistops-owner:"  # the owner until the flow run's first step moves it into its label
OWNER_LABEL = OWNER_TAG
# The tags of each flow's runs, a deployment's (infra/prefect.yaml, flows/deployments.py) or a command's.
FLOW_TAGS = {"training-pipeline": ("mnistops", "training"), "batch-inference": ("mnistops", "inference"),
             "hyperparameter-sweep": ("mnistops", "sweep")}
_ADOPTED: set[str] = set()  # flow runs this process labelled (cancel_own_flow_runs finds them by id)


def owner_tag() -> str:
    return TAG_PREFIX + owner_id(os.getpid())


@contextlib.contextmanager
def owned_flow_runs() -> Iterator[None]:
    """Flow runs started inside carry this process's owner from creation; stale ones are reaped first."""
    from prefect import tags

    reap_flow_runs()
    with tags(owner_tag()):
        yield


def _owner_of(run) -> str | None:
    owner = (run.labels or {}).get(OWNER_LABEL)
    if owner:
        return str(owner)
    tagged = [t[len(TAG_PREFIX):] for t in run.tags if t.startswith(TAG_PREFIX)]
    return tagged[0] if tagged else None


def _adopt(flow_run, flow_name: str) -> None:
    """The current flow run labelled with this process as its owner, its tags those of its flow."""
    wanted = sorted({t for t in flow_run.tags if not t.startswith(TAG_PREFIX)} | set(FLOW_TAGS.get(flow_name, ())))
    with _client() as client:
        client.update_flow_run_labels(flow_run.id, {OWNER_LABEL: owner_id(os.getpid())})
        if sorted(flow_run.tags) != wanted:
            client.update_flow_run(flow_run.id, tags=wanted)
    _ADOPTED.add(str(flow_run.id))


@contextlib.contextmanager
def untagged_task_runs() -> Iterator[None]:
    """A flow run's first step: the run is labelled with its owner, this process, and carries its
    flow's tags instead of the owner tag it was created with (_adopt); task runs created inside do
    not inherit that tag either. Prefect takes every tag of a task run for a possible tag-based
    concurrency limit and asks its API for a slot before each task run starts: one more request per
    task for a limit that never exists, and when the API's SQLite database is busy, a 503 that its
    client retries 2 s later (seen in one `mnistops run` in four on 2 cores). Other tags are kept."""
    from prefect.context import FlowRunContext, TagsContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        _adopt(ctx.flow_run, ctx.flow.name if ctx.flow else "")
    current = TagsContext.get().current_tags
    with TagsContext(current_tags={t for t in current if not t.startswith(TAG_PREFIX)}):
        yield


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def reap_flow_runs() -> list[str]:
    """Mark Running/Pending flow runs whose owner is certainly gone as Crashed."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    reaped = []
    with _client() as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
        for run in runs:
            owner = _owner_of(run)
            if owner and owner_alive(owner) is False:
                client.set_flow_run_state(run.id, Crashed(message=f"its owner process {owner} ended "
                                                                  "without finishing the run"), force=True)
                log.warning("Prefect flow run %s (%s) marked Crashed: its owner %s is gone", run.name, run.id, owner)
                reaped.append(str(run.id))
    return reaped


def cancel_own_flow_runs(reason: str) -> list[str]:
    """After an interruption: this process's flow runs that did not complete become Cancelled
    (the engine records a SIGTERM as a crash, and a task stopped by a signal as failed): those it
    labelled, and any still carrying its owner tag (stopped before their first step)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    cancelled = []
    with _client() as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[owner_tag()])))
        if _ADOPTED:
            runs += client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=sorted(_ADOPTED))))
        for run in {r.id: r for r in runs}.values():
            if run.state is None or run.state.type not in (StateType.COMPLETED, StateType.CANCELLED):
                client.set_flow_run_state(run.id, Cancelled(message=reason), force=True)
                cancelled.append(str(run.id))
    return cancelled
