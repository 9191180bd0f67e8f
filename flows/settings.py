"""Process-wide settings, applied once at the entry point (never at import time).

Embedded defaults that need nothing running: MLflow on a SQLite store and an artifact folder under
MNISTOPS_HOME (default ./.mnistops), Prefect's own temporary local API. MLFLOW_TRACKING_URI and
PREFECT_API_URL select real servers; they are set as environment variables so that the DDP workers
and Prefect's flow-run processes inherit them.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Schedules of the deployments `mnistops serve` serves (and infra/prefect.yaml declares).
TRAINING_CRON, INFERENCE_CRON = "0 2 * * *", "0 * * * *"

QUIET_DEFAULTS = {
    # No telemetry: these machines have no internet, and users don't want it either.
    "ORT_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Prefect's temporary local API takes 10-27 s to start on 2 cores; its default allows 20.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


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
    """Fill in the environment's defaults (an explicit setting always wins) and return them."""
    from serving.settings import configure_store  # the one definition, shared with `python -m serving`

    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    store = configure_store()
    return Settings(home=store.home, tracking_uri=store.tracking_uri, embedded_mlflow=store.embedded_mlflow)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not the stream of start-up time (which a
    caller such as a test harness may have swapped and closed since)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging() -> None:
    """Log lines of the library code (nn_core, serving) on stderr; called by the command line only."""
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("alembic", "httpx", "mlflow.store.db.utils", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def mlflow_ui_base() -> str:
    """Where the MLflow UI for the current store lives: the server itself, or `mnistops ui`'s default."""
    from nn_core.tracking import redact_url

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return redact_url(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(experiment_id: str, run_id: str) -> str:
    # MLflow 3.17's UI opens in its GenAI view unless the link asks for the model-training one.
    return f"{mlflow_ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
