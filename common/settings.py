"""The environment, read in one place, and the default store, the same for `mnistops` and
`python -m serving`: torch-free, applied at the entry point (never at import time).

Every environment variable the project reads is declared in ENVIRONMENT below and read through
`env()`; the config fields' own variables (MNISTOPS_LR, MNISTOPS_EPOCHS, ...) are derived from the
fields by common.fields and read through `env()` too. QUIET holds the no-telemetry defaults, the one
list: the entry points apply it, and `python -m common.settings CMD ...` runs any other command with it
(the Makefile's test and bench targets, tests/servers.py's servers).

Embedded default: MLflow on a SQLite store and an artifact folder under MNISTOPS_HOME (default
./.mnistops). MLFLOW_TRACKING_URI selects a real server instead. Set as environment variables, so
that child processes (DDP workers, Prefect's flow-run processes) inherit them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common.processes import start_time

HOME_ENV = "MNISTOPS_HOME"
DEFAULT_HOME = ".mnistops"

# Every variable read (besides the config fields' MNISTOPS_<FIELD>, see common.fields.env_name), with
# what it does; the README's list follows this table.
ENVIRONMENT = {
    "MNISTOPS_HOME": "folder of the store, checkpoints, outputs and Prefect's results (default ./.mnistops)",
    "MNISTOPS_ARTIFACT_ROOT": "MLflow artifact folder of the embedded store (default MNISTOPS_HOME/mlartifacts)",
    "MNISTOPS_DEBUG": "1: tracebacks with every error (as --debug)",
    "MNISTOPS_GIT_COMMIT": "the code's commit, recorded on runs where there is no .git (the images)",
    "MNISTOPS_CUDA_GRAPHS": "0: a one-GPU training's steps run eagerly, not replayed from a CUDA graph",
    "MNISTOPS_TRAIN_IN_PROCESS": "0: a one-process CPU training starts a worker process anyway",
    "MNISTOPS_OWNER_PID": "set by the launcher for its workers: the process that owns the training",
    "MLFLOW_TRACKING_URI": "MLflow's store or server (default: sqlite in MNISTOPS_HOME)",
    "PREFECT_API_URL": "Prefect's API (default: a temporary local one per command)",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "how long a temporary Prefect API may take to start",
    "PREFECT_HOME": "Prefect's home, where its profiles live",
    "PREFECT_PROFILES_PATH": "Prefect's profiles file",
    "PREFECT_PROFILE": "Prefect's active profile",
    "PREFECT_LOCAL_STORAGE_PATH": "where Prefect keeps task results (default MNISTOPS_HOME/prefect-results)",
    "OMP_NUM_THREADS": "torch threads per CPU training process (default: the usable cores shared among them)",
    "XDG_CACHE_HOME": "the user's cache folder: the dataset cache is XDG_CACHE_HOME/mnistops",
    "USER": "the user recorded on runs",
    "MLFLOW_TRACKING_INSECURE_TLS": "MLflow's client: true to skip TLS verification (the start-up check follows it)",
    "MLFLOW_TRACKING_SERVER_CERT_PATH": "MLflow's client: the CA bundle of an https server",
    "PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "Prefect's client: true to skip TLS verification",
    "PREFECT_API_SSL_CERT_FILE": "Prefect's client: the CA bundle of an https API",
    "MNISTOPS_TEMPORARY_PREFECT_API": "internal: the URL of the command's own temporary Prefect API (never a lock's home)",
    "_MNISTOPS_PREFECT_STORAGE": "internal: remembers that the storage path above was chosen by mnistops",
}

# No telemetry (these machines have no internet, and users don't want it either); no download bars.
# The one list: configure_store applies it, `python -m common.settings CMD` runs CMD with it.
QUIET = {
    "ORT_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # also: without it a SQLite server can log "database is locked"
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Prefect's temporary local API takes 10-27 s to start on 2 cores; its default allows 20.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def env(name: str, default: str | None = None) -> str | None:
    """The one reader of the environment: the value of `name`, `default` when it is not set."""
    return os.environ.get(name, default)


@contextlib.contextmanager
def environ_restored(names: Iterable[str]) -> Iterator[None]:
    """The variables `names` of this process's environment as they were on entry, put back on exit
    (set, changed or removed meanwhile, by this code or a library's)."""
    before = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quiet_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with QUIET's defaults where it sets nothing."""
    base = dict(os.environ if base is None else base)
    return {**QUIET, **base}


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


@contextlib.contextmanager
def loading():
    """Wrap a command's imports (and the start-up that imports MLflow, Prefect, torch): the garbage
    collector is off while they run, and the objects they made (modules, classes, registries,
    pydantic schemas: ~500,000) are frozen out of its reach afterwards. Imports make long-lived
    objects, not garbage, yet every full collection walked all of them: 11-15 collections of
    0.01-0.3 s each in a `mnistops run` on 2 cores. Garbage made later is collected as before."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class Store:
    home: Path
    tracking_uri: str
    embedded_mlflow: bool


def configure_store() -> Store:
    """Fill in the store's defaults (an explicit setting always wins) and return them. Nothing is
    opened: the store is made by its first client (mlflow_client), so an install without MLflow's
    store backend (the slim inference image) runs untracked jobs."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    home = Path(env(HOME_ENV, DEFAULT_HOME)).resolve()
    os.environ[HOME_ENV] = str(home)
    embedded = env("MLFLOW_TRACKING_URI") is None
    if embedded:
        home.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    if env("MLFLOW_TRACKING_URI").startswith("sqlite:"):
        os.environ.setdefault("MNISTOPS_ARTIFACT_ROOT", str(home / "mlartifacts"))
    return Store(home=home, tracking_uri=env("MLFLOW_TRACKING_URI"), embedded_mlflow=embedded)


def mlflow_client():
    """An MlflowClient of the configured store, made whole first when it is a new SQLite store
    (create_sqlite_store): the one way this project opens MLflow, so no command races a migration."""
    from mlflow import MlflowClient

    create_sqlite_store()
    return MlflowClient()


def _alive(pid: str) -> bool:
    return pid.isdigit() and start_time(int(pid)) is not None


def create_sqlite_store(uri: str | None = None, artifact_root: str | None = None) -> None:
    """Make a new SQLite store whole before anyone opens it. Two commands starting on a new home at
    once would otherwise both run MLflow's schema migrations on the same file, and one of them fails
    ("Online migration expected to match one row ..."). So the schema is built in a file of this
    process's own and linked into place only if no store is there yet (a link, unlike a rename, never
    replaces one that another process already uses). An existing store costs one stat."""
    uri = uri or env("MLFLOW_TRACKING_URI", "")
    artifact_root = artifact_root or env("MNISTOPS_ARTIFACT_ROOT", "mlartifacts")
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is None or db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    for stale in db.parent.glob(f".{db.name}.*.new"):  # left by a command killed while making one
        if not _alive(stale.name.split(".")[-2]):
            stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.new")
    try:
        SqlAlchemyStore(f"sqlite:///{tmp}", Path(artifact_root).resolve().as_uri()).engine.dispose()
        os.link(tmp, db)
    except FileExistsError:
        pass  # another command made it first: that one is used
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    """`python -m common.settings CMD ARG...`: CMD run with the no-telemetry defaults (an explicit
    setting wins), so a Makefile or CI job needs no copy of the list."""
    if not argv:
        print("usage: python -m common.settings CMD [ARG...]", file=sys.stderr)
        return 2
    os.execvpe(argv[0], argv, quiet_environment())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
