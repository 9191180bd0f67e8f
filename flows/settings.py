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


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not the stream of start-up time (which a
    caller such as a test harness may have swapped and closed since). Its name must not start with
    "_": Prefect keeps its own console handler off the root logger only when the root logger already
    has a handler that is not "private"."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _OneLinePerFailure(logging.Filter):
    """Without --debug a failure is reported once, by the command line's own `error:` line: the
    libraries' error records (Prefect's "Finished in state Failed", torch elastic's child-failure
    report) would only repeat it with a traceback each, so they are dropped, and other records lose
    their tracebacks."""

    LOUD = ("prefect", "torch.distributed.elastic")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.startswith(self.LOUD):
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def debug_enabled() -> bool:
    return env("MNISTOPS_DEBUG", "").lower() not in ("", "0", "false", "no")


def configure_logging(debug: bool = False) -> None:
    """Log lines of the library code (nn_core, serving) on stderr; called by the command line only.
    Installed before Prefect is imported, so Prefect sends its records here too (it leaves a root
    logger that already has a handler alone) and `--debug` decides about tracebacks in one place."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, CurrentStderrHandler)), None)
    if handler is None:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for f in [f for f in handler.filters if isinstance(f, _OneLinePerFailure)]:
        handler.removeFilter(f)
    if not debug:
        handler.addFilter(_OneLinePerFailure())
    root.setLevel(logging.INFO)
    for noisy in ("alembic", "httpx", "httpcore", "mlflow.store.db.utils", "onnx_ir", "onnxscript", "urllib3",
                  "asyncio", "matplotlib", "PIL", "git", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def mlflow_ui_base() -> str:
    """Where the MLflow UI for the current store lives: the server itself, or `mnistops ui`'s default."""
    from nn_core.tracking import redact_url

    uri = env("MLFLOW_TRACKING_URI", "")
    return redact_url(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(experiment_id: str, run_id: str) -> str:
    # MLflow 3.17's UI opens in its GenAI view unless the link asks for the model-training one.
    return f"{mlflow_ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
