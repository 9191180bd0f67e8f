"""Which lock serialises the promotions of one registered model, chosen from what the user
configured, never from a command's own temporary Prefect API (which no other command shares).

- A SQLite store (the embedded default): a file lock beside the store (nn_core.registry.lock_path).
  Every command on that store takes it, whatever its Prefect API: `run`, `sweep` and `serve` (whose
  temporary API is theirs alone), their deployments' flow runs, `promote`.
- An MLflow server with a Prefect server the user configured (PREFECT_API_URL, not the temporary
  one): a Prefect global concurrency limit of 1 keyed by the registered model, created on first use,
  shared by every host that uses that Prefect server; and the machine's file lock too, so that
  commands on this machine without that setting are excluded as well.
- An MLflow server and no configured Prefect server: the machine's file lock only. Gates on other
  machines (or in containers that share no /tmp) are not excluded; the rule still converges (see
  nn_core/registry.py: the alias ends on the latest accepted decision, each accepted version beat the
  champion it read, but two gates at the same time were not compared with each other).
"""

from __future__ import annotations

import contextlib
import re

from common import settings
from nn_core import registry

LIMIT_PREFIX = "mnistops-promotion-"
# Set by flows.prefect_api.start for the command and the processes it starts: the URL of its own
# temporary API, which is never where a promotion lock lives.
TEMPORARY_API_ENV = "MNISTOPS_TEMPORARY_PREFECT_API"


def limit_name(model_name: str) -> str:
    # Prefect refuses some characters in names ('/', '%', '&', '>', '<'); MLflow allows them.
    return LIMIT_PREFIX + re.sub(r"[/%&<>]", "-", model_name)


def user_prefect_url() -> str | None:
    """The Prefect API the user configured (environment, profile, a test harness), or None when the
    only one is a command's temporary API."""
    from flows.prefect_api import configured_url

    url = configured_url()
    return None if not url or url == settings.env(TEMPORARY_API_ENV) else url


def deciding_command() -> str:
    """Who decides, as a gate's decision record names it (the champion's history shows it): the
    flow run's flow and the deployment that started it (a schedule, a trigger, a worker), else the
    command line that ran the flow (its MLflow run's source says the same)."""
    from flows.observability import mlflow_context_tags, prefect_flow_run

    _, _, flow, deployment = prefect_flow_run()
    if deployment:
        return f"gate of {flow}/{deployment} (a deployment's flow run)"
    source = mlflow_context_tags(flow or "a flow")["mlflow.source.name"]
    return f"gate of {flow} ({source})" if flow and source != flow else f"gate of {source}"


def lock_kind() -> str:
    """'store file' (SQLite), 'prefect limit' (a configured Prefect server) or 'machine file'."""
    if registry.shared_by_store():
        return "store file"
    return "prefect limit" if user_prefect_url() else "machine file"


@contextlib.contextmanager
def promotion_lock(model_name: str):
    with registry.promotion_lock(model_name):
        if lock_kind() == "prefect limit":
            with prefect_limit(model_name):
                yield
        else:
            yield


@contextlib.contextmanager
def prefect_limit(model_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = limit_name(model_name)
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass  # made by the first promotion of this model, on any host
    # strict: a limit that vanished must fail the gate, never let it run unserialised.
    with concurrency(name, occupy=1, strict=True):
        yield
