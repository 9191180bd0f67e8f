"""Process-wide settings, applied once at the entry point (never at import time).

Embedded defaults that need nothing running: MLflow on a SQLite store and an artifact folder under
MNISTOPS_HOME (default ./.mnistops), Prefect's own temporary local API. MLFLOW_TRACKING_URI and
PREFECT_API_URL select real servers; they are set as environment variables so that the DDP workers
and Prefect's flow-run processes inherit them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.settings import configure_store, env

# Schedules of the deployments `mnistops serve` serves (and infra/prefect.yaml declares).
TRAINING_CRON, INFERENCE_CRON = "0 2 * * *", "0 * * * *"

_STORAGE_SET_HERE = "_MNISTOPS_PREFECT_STORAGE"  # remembers that configure() chose the storage path


@dataclass(frozen=True)
class Settings:
    home: Path
    tracking_uri: str
    embedded_mlflow: bool

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"


def configure() -> Settings:
    """Fill in the environment's defaults (an explicit setting always wins; the no-telemetry ones are
    common.settings.QUIET, applied by configure_store) and return them."""
    store = configure_store()  # the one definition, shared with `python -m serving`
    home = store.home
    # Prefect's persisted task results (the prepare-data cache) live in the home too, not in
    # ~/.prefect/storage. Read by Prefect when it is imported, so this runs before that.
    storage = env("PREFECT_LOCAL_STORAGE_PATH")
    if storage is None or storage == env(_STORAGE_SET_HERE):  # ours, for an earlier home
        os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.environ[_STORAGE_SET_HERE] = str(home / "prefect-results")
    # Whatever Prefect stores there is JSON, data to read, never a pickle to run (its default).
    os.environ.setdefault("PREFECT_RESULTS_DEFAULT_SERIALIZER", "json")
    return Settings(home=home, tracking_uri=store.tracking_uri, embedded_mlflow=store.embedded_mlflow)


def mlflow_ui_base() -> str:
    """Where the MLflow UI for the current store lives: the server itself, or `mnistops ui`'s default."""
    from nn_core.tracking import redact_url

    uri = env("MLFLOW_TRACKING_URI", "")
    return redact_url(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(experiment_id: str, run_id: str) -> str:
    # MLflow 3.17's UI opens in its GenAI view unless the link asks for the model-training one.
    return f"{mlflow_ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
