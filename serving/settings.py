"""The default store, the same for `mnistops` and `python -m serving`: torch-free, applied at the entry
point (never at import time).

Embedded default: MLflow on a SQLite store and an artifact folder under MNISTOPS_HOME (default
./.mnistops). MLFLOW_TRACKING_URI selects a real server instead. Set as environment variables, so
that child processes (DDP workers, Prefect's flow-run processes) inherit them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "MNISTOPS_HOME"
DEFAULT_HOME = ".mnistops"
# No telemetry (these machines have no internet, and users don't want it either); no download bars.
QUIET = {
    "ORT_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


_FREEZE_REGISTERED = False


def skip_final_collection() -> None:
    """Call first thing in a command's main: at exit, Python's final garbage collection walks every
    object the libraries made (Prefect, pydantic, MLflow, torch: ~1.7 s of a `mnistops run`'s exit on
    2 cores). Nothing needs it by then (runs, files and servers are closed by the code and exit
    handlers that ran before), so the objects alive at exit are frozen out of it. Registered first,
    the freeze runs last of the exit handlers."""
    global _FREEZE_REGISTERED
    if not _FREEZE_REGISTERED:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _FREEZE_REGISTERED = True


@dataclass(frozen=True)
class Store:
    home: Path
    tracking_uri: str
    embedded_mlflow: bool


def configure_store() -> Store:
    """Fill in the store's defaults (an explicit setting always wins) and return them."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    home = Path(os.environ.get(HOME_ENV, DEFAULT_HOME)).resolve()
    os.environ[HOME_ENV] = str(home)
    embedded = "MLFLOW_TRACKING_URI" not in os.environ
    if embedded:
        home.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    if os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:"):
        os.environ.setdefault("MNISTOPS_ARTIFACT_ROOT", str(home / "mlartifacts"))
    return Store(home=home, tracking_uri=os.environ["MLFLOW_TRACKING_URI"], embedded_mlflow=embedded)
