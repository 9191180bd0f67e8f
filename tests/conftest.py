"""Shared fixtures. Every test gets a private MLflow store and working folder; tests on the real
MNIST files run whenever MNISTOPS_DATA_SOURCE is set (CI sets it), and fail rather than skip in CI."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from common.settings import QUIET as QUIET_DEFAULTS
from environ import let_go_of_prefect_api, restore
from needs import missing

# Longest test files first under pytest-xdist (tests/schedule.py); `--store-durations` measures them.
pytest_plugins = ["schedule"]

# No telemetry from any library the tests start (these machines have no internet); quiet progress bars.
for _k, _v in QUIET_DEFAULTS.items():
    os.environ.setdefault(_k, _v)
# One torch thread per process: the suite runs several test processes (pytest-xdist) on few cores,
# and torch's default of one thread per core in each made every CPU training there 10-20 times slower
# (threads spinning on cores the others hold). The trainings the tests start read it too
# (nn_core.launch.threads_set); a value set outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A Prefect home of this test session's own: cached task results persist under it and must not leak
# into later sessions (or come from the user's profile). Set before anything imports prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mnistops-test-prefect-")
# Likewise a mnistops home of the session's own for a test that names none: nothing a test runs
# writes the user's ./.mnistops.
os.environ["MNISTOPS_HOME"] = tempfile.mkdtemp(prefix="mnistops-test-home-")
os.environ.pop("PREFECT_API_URL", None)
# The folder of the session's templates (an empty MLflow store, a migrated Prefect database:
# tests/stores.py): named by the first process, so the test processes pytest-xdist starts from it
# inherit it and share one set; removed by that process at the end.
_OWN_TEMPLATES = "MNISTOPS_TEST_TEMPLATES" not in os.environ
if _OWN_TEMPLATES:
    os.environ["MNISTOPS_TEST_TEMPLATES"] = tempfile.mkdtemp(prefix="mnistops-test-templates-")
# Prefect binds its console log handler to sys.stderr when prefect.main is first imported (that is
# when it sets up logging). Imported here, that is pytest's session-long capture; imported inside a
# test using capsys, it would be a stream closed when that test ends, and every later Prefect log
# line would fail.
import prefect.main  # noqa: E402, F401


def real_mnist_source() -> Path | None:
    src = os.environ.get("MNISTOPS_DATA_SOURCE")
    return Path(src).resolve() if src else None


@pytest.fixture(scope="session")
def mnist_source() -> Path:
    src = real_mnist_source()
    if src is None:
        missing("MNISTOPS_DATA_SOURCE not set: real-MNIST tests need the four IDX files")
    return src


DEFAULT_FASHION_SOURCE = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


@pytest.fixture(scope="session")
def fashion_source() -> Path:
    """The real Fashion-MNIST files (infra/scripts/ensure-test-data.sh installs Debian's copy, which
    Debian recompressed: the case the content pins are for)."""
    src = Path(os.environ.get("MNISTOPS_FASHION_SOURCE") or DEFAULT_FASHION_SOURCE)
    if not src.is_dir():
        missing(f"{src}: no Fashion-MNIST files (run infra/scripts/ensure-test-data.sh or set MNISTOPS_FASHION_SOURCE)")
    return src.resolve()


@pytest.fixture(scope="session")
def mnist(mnist_source, tmp_path_factory):
    """Real MNIST, verified and cached once per test session."""
    from nn_core.data import prepare
    from nn_core.datasets import MNIST

    return prepare(MNIST, str(mnist_source), tmp_path_factory.mktemp("mnist-cache"))


# --- The servers a session shares ----------------------------------------------------------------
# One Prefect server (on PostgreSQL where its programs are installed) for every test that is not about
# starting one: the commands a test starts get its PREFECT_API_URL through their environment (the
# `prefect_env` fixture), the flows a test runs in-process through Prefect's settings (`prefect_api`).
# Without it, every `mnistops run/sweep/serve` booted a temporary API of its own (10-27 s each).
# It starts in the background as soon as collection shows that a test needs it, so its boot overlaps
# the tests that come first.
_shared: dict = {}


def _shared_servers():
    from servers import InBackground, shared_stack

    if "servers" not in _shared:
        root = Path(tempfile.mkdtemp(prefix="mnistops-test-servers-"))
        _shared["root"] = root
        _shared["servers"] = InBackground(lambda: shared_stack(root), "the session's shared servers")
    return _shared["servers"]


def pytest_collection_finish(session):
    opt = session.config.option
    if opt.collectonly or getattr(opt, "setupplan", False) or getattr(opt, "setuponly", False):
        return
    if any("shared_servers" in getattr(item, "fixturenames", ()) for item in session.items):
        _shared_servers()


def pytest_unconfigure(config):
    servers = _shared.pop("servers", None)
    if servers is not None:
        servers.stop()
        shutil.rmtree(_shared.pop("root"), ignore_errors=True)
    if _OWN_TEMPLATES:
        shutil.rmtree(os.environ["MNISTOPS_TEST_TEMPLATES"], ignore_errors=True)


@pytest.fixture(scope="session")
def shared_servers():
    """The session's servers (servers.Stack): its Prefect API URL, and the DSN of its PostgreSQL
    cluster (None without PostgreSQL), which holds an empty `mlflow` database."""
    return _shared_servers().value(timeout=300)


@pytest.fixture(scope="session")
def prefect_server_url(shared_servers) -> str:
    return shared_servers.prefect_url


# The two below take the URL from shared_servers, not from prefect_server_url: a test module may
# define a prefect_server_url of its own (a server it starts), which would then be theirs.
@pytest.fixture
def prefect_env(shared_servers, monkeypatch) -> str:
    """PREFECT_API_URL of the session's Prefect server in this test's environment, so the commands it
    starts run their flows there. With it set a command takes the configured-server path (a batch job
    runs as a flow, a promotion takes the Prefect concurrency limit); the embedded default (a
    temporary API per command) is what tests/test_lifecycle.py exercises."""
    monkeypatch.setenv("PREFECT_API_URL", shared_servers.prefect_url)
    return shared_servers.prefect_url


@pytest.fixture(scope="session")
def prefect_api(shared_servers):
    """The flows a test runs in this process run on the session's Prefect server (its URL in Prefect's
    settings, not in the environment: in-process code keeps the embedded default's file lock)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: shared_servers.prefect_url}):
        yield
        let_go_of_prefect_api()  # their last logs and events sent while the server is still there


@pytest.fixture(autouse=True)
def _environment_of_its_own():
    """Every test starts from the environment the session and its wider fixtures set, whatever the
    tests before it in this process did. The product's in-process start-up fills in its defaults in
    os.environ (MNISTOPS_HOME, MLFLOW_TRACKING_URI, MNISTOPS_ARTIFACT_ROOT, Prefect's result storage),
    as a command does for the processes it starts; left there, they pointed a later test's commands
    at an earlier test's store (its artifacts went to that store's folder, not the S3 bucket the test
    named)."""
    saved = dict(os.environ)
    yield
    if os.environ.get("PREFECT_API_URL") != saved.get("PREFECT_API_URL"):
        # It ran a command in-process on a temporary API of its own: done with it (see environ.py).
        let_go_of_prefect_api()
        from flows import prefect_api

        prefect_api.stop()
    if os.environ != saved:
        restore(saved)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A private embedded MLflow store (SQLite + artifact folder) and working folder for one test; the
    store is copied from one made once per test process (tests/stores.py)."""
    import mlflow

    from stores import empty_store

    uri = empty_store(tmp_path / "mlflow.db", tmp_path / "mlartifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MNISTOPS_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("MNISTOPS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
