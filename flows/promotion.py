"""Which lock serialises the promotions of one registered model.

With a Prefect server (PREFECT_API_URL set), pipelines on many hosts share it: a Prefect global
concurrency limit of 1 keyed by the registered model, created on first use. Without one (Prefect's
temporary per-process API), the pipelines can only be on this machine: nn_core's file lock.
"""

from __future__ import annotations

import contextlib
import re

from common import settings
from nn_core import registry

LIMIT_PREFIX = "mnistops-promotion-"


def limit_name(model_name: str) -> str:
    # Prefect refuses some characters in names ('/', '%', '&', '>', '<'); MLflow allows them.
    return LIMIT_PREFIX + re.sub(r"[/%&<>]", "-", model_name)


def promotion_lock(model_name: str):
    if settings.env("PREFECT_API_URL"):
        return prefect_limit(model_name)
    return registry.promotion_lock(model_name)


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
