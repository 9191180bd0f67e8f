"""Shared fixtures. Every test gets a private MLflow store and working folder; tests on the real
MNIST files run whenever MNISTOPS_DATA_SOURCE is set (CI sets it), and fail rather than skip in CI."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from common.settings import QUIET as QUIET_DEFAULTS
from needs import missing

# No telemetry from any library the tests start (these machines have no internet); quiet progress bars.
for _k, _v in QUIET_DEFAULTS.items():
    os.environ.setdefault(_k, _v)
# A Prefect home of this test session's own: cached task results persist under it and must not leak
# into later sessions (or come from the user's profile). Set before anything imports prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mnistops-test-prefect-")
os.environ.pop("PREFECT_API_URL", None)
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


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test API for the flows run in this process, started once per session: a harness
    started and stopped per module left later ones hanging while draining their log and event
    workers at teardown."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A private embedded MLflow store (SQLite + artifact folder) and working folder for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MNISTOPS_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("MNISTOPS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
