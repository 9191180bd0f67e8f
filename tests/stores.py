"""Empty MLflow stores for tests, made once per test process and copied.

Building a SQLite store runs MLflow's schema migrations (5-9 s of CPU on a 2-core machine, more under
load), which every test with a store of its own paid again. `empty_store` copies one store built by
the product's own code (common.settings.create_sqlite_store), made the first time a test asks, and
points its Default experiment at the test's artifact folder, as a store made there would. A test that
is about making a store (a fresh home, two commands making one at once) does not use it.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_template: list[Path] = []


def _template_db() -> Path:
    with _lock:
        if not _template:
            from common.settings import create_sqlite_store

            db = Path(tempfile.mkdtemp(prefix="mnistops-test-store-")) / "mlflow.db"
            create_sqlite_store(f"sqlite:///{db}", str(db.parent / "mlartifacts"))
            _template.append(db)
        return _template[0]


def empty_store(db: Path, artifact_root: Path) -> str:
    """An empty, migrated SQLite store at `db` (which must not exist) whose Default experiment keeps
    its artifacts under `artifact_root`; returns its tracking URI."""
    db = Path(db).resolve()
    if db.exists():
        raise FileExistsError(f"{db}: a store is there already")
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template_db(), db)
    location = (Path(artifact_root).resolve() / "0").as_uri()
    with contextlib.closing(sqlite3.connect(db)) as c, c:
        c.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (location,))
    return f"sqlite:///{db}"


def home_with_store(home: Path) -> Path:
    """A MNISTOPS_HOME whose embedded store exists already (as after a first command there)."""
    empty_store(Path(home) / "mlflow.db", Path(home) / "mlartifacts")
    return Path(home)


@contextlib.contextmanager
def store_for_module(root: Path, **env: str):
    """An empty store at `root` that this process's MLflow calls and the commands it starts use
    until the block ends (a module-scoped fixture's store: made once for all its tests). `env`:
    more variables set for the same span (MNISTOPS_HOME, ...). Yields the tracking URI."""
    import mlflow
    import pytest

    uri = empty_store(Path(root) / "mlflow.db", Path(root) / "mlartifacts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MNISTOPS_ARTIFACT_ROOT", str(Path(root) / "mlartifacts"))
        for key, value in env.items():
            mp.setenv(key, value)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def experiment_id(name: str) -> str:
    """The id of the current store's experiment `name`, made if new. For a test's own runs
    (mlflow.start_run(experiment_id=...)): mlflow.set_experiment would leave it active in this
    process, and the product's later start_run(run_id=...) of a run in another experiment fails."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)
