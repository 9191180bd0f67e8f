"""Empty MLflow stores and migrated Prefect databases for tests, made once per test session and copied.

Building a SQLite store runs MLflow's schema migrations (5-9 s of CPU on a 2-core machine, more under
load), which every test with a store of its own paid again. `empty_store` copies one store built by
the product's own code (common.settings.create_sqlite_store), made the first time a test asks, and
points its Default experiment at the test's artifact folder, as a store made there would. Likewise a
command's temporary Prefect API migrates a new home's database on its first boot (~12 s of CPU);
`migrated_prefect_home` puts a copy of one migrated by Prefect's own `prefect server database upgrade`
there, as a first command would have left it. A test that is about making a store or booting a new
home (two commands making one at once) uses neither.

The templates are made once per test session: under pytest-xdist the controller names a folder
(MNISTOPS_TEST_TEMPLATES, set in tests/conftest.py before the test processes start) and the first
process to need a template makes it there under a file lock; the others wait and copy it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from common.settings import QUIET

TEMPLATES_ENV = "MNISTOPS_TEST_TEMPLATES"
_lock = threading.Lock()


def _template(name: str, make) -> Path:
    """The session's template file `name`, made by `make(path)` by whichever process asks first."""
    if not os.environ.get(TEMPLATES_ENV):  # used outside the suite: a folder of this process's own
        os.environ[TEMPLATES_ENV] = tempfile.mkdtemp(prefix="mnistops-test-templates-")
    root = Path(os.environ[TEMPLATES_ENV])
    path = root / name
    with _lock, open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
            make(scratch / name)
            (scratch / name).replace(path)  # complete or absent: a process killed mid-way leaves no template
            shutil.rmtree(scratch, ignore_errors=True)
    return path


def _make_mlflow_store(db: Path) -> None:
    from common.settings import create_sqlite_store

    create_sqlite_store(f"sqlite:///{db}", str(db.parent / "mlartifacts"))


def _make_prefect_db(db: Path) -> None:
    # Prefect's own command, on the same sqlite+aiosqlite URL the temporary API uses (flows/prefect_api.py).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(QUIET, PREFECT_HOME=str(db.parent), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{db}")
    prefect = Path(sys.executable).parent / "prefect"
    subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=env, check=True,
                   capture_output=True, timeout=300)


def _template_db() -> Path:
    return _template("mlflow.db", _make_mlflow_store)


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


def migrated_prefect_db(db: Path) -> str:
    """A migrated Prefect SQLite database at `db` (which must not exist), for a Prefect server of a
    test's own; returns its connection URL."""
    db = Path(db).resolve()
    if db.exists():
        raise FileExistsError(f"{db}: a Prefect database is there already")
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template("prefect.db", _make_prefect_db), db)
    return f"sqlite+aiosqlite:///{db}"


def migrated_prefect_home(home: Path) -> Path:
    """A MNISTOPS_HOME whose temporary Prefect API's database is migrated already (as after a first
    command there): a command's API boots there without migrating. Returns `home`."""
    from flows.prefect_api import MIGRATED

    home = Path(home)
    migrated_prefect_db(home / "prefect.db")
    (home / MIGRATED).touch()
    return home


def home_with_store(home: Path) -> Path:
    """A MNISTOPS_HOME whose embedded store and Prefect database exist already (as after a first
    command there)."""
    empty_store(Path(home) / "mlflow.db", Path(home) / "mlartifacts")
    return migrated_prefect_home(home)


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
