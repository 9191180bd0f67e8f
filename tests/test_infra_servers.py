"""The real servers of tests/servers.py: PostgreSQL, an MLflow server on it, a Prefect server on it.

Checks each through its own API, and that every process they started is gone afterwards, also when
the body of the `with` raised.
"""

from __future__ import annotations

import uuid

import pytest
from environ import let_go_of_prefect_api
from needs import missing

from servers import mlflow_server, postgres_server, prefect_server, postgres_missing

pytestmark = [pytest.mark.servers, pytest.mark.slow]

psutil = pytest.importorskip("psutil")


def _require(why: str | None) -> None:
    if why is not None:
        missing(why)


@pytest.fixture(autouse=True)
def _servers_available():
    _require(postgres_missing())
    try:
        # SQLAlchemy 2.1 maps a plain postgresql:// URI (MLflow's store) to psycopg 3.
        import psycopg  # noqa: F401
    except ImportError:
        _require("psycopg (3) is not installed: pip install 'psycopg[binary]'")


@pytest.fixture(autouse=True)
def _children_before():
    # Processes that earlier tests of this session left to pytest are not this test's servers.
    global _EARLIER
    _EARLIER = {p.pid for p in psutil.Process().children(recursive=True)}


_EARLIER: set[int] = set()


def _server_processes(*ports: int) -> list:
    """Every process we started: our children (MLflow, Prefect and their workers) plus the
    PostgreSQL postmaster and its backends, which pg_ctl detached from us. Found by listening port."""
    procs = {p.pid: p for p in psutil.Process().children(recursive=True) if p.pid not in _EARLIER}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports and conn.pid:
            owner = psutil.Process(conn.pid)
            for p in [owner, *owner.children(recursive=True)]:
                procs[p.pid] = p
    return list(procs.values())


def _assert_all_gone(procs: list) -> None:
    assert procs, "found no server process to watch"
    _, alive = psutil.wait_procs(procs, timeout=15)
    alive = [p for p in alive if _status(p) not in (None, psutil.STATUS_ZOMBIE)]  # a zombie has exited
    assert not alive, f"still running after the servers stopped: {[(p.pid, p.name()) for p in alive]}"


def _status(p):
    try:
        return p.status()
    except psutil.NoSuchProcess:
        return None


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _check_mlflow(url: str, tmp_path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    exp_id = client.create_experiment(f"infra-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    client.log_param(run.info.run_id, "hidden", "128")
    for step, acc in enumerate([0.90, 0.95, 0.97]):
        client.log_metric(run.info.run_id, "val_acc", acc, step=step)
    # An artifact goes through the server's proxy into its artifact folder.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    client.set_terminated(run.info.run_id)

    name = f"infra-model-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", mv.version)

    # Read everything back through the server, as another client would.
    again = MlflowClient(tracking_uri=url, registry_uri=url)
    got = again.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["val_acc"] == pytest.approx(0.97)
    assert [m.value for m in again.get_metric_history(run.info.run_id, "val_acc")] == pytest.approx([0.90, 0.95, 0.97])
    assert [a.path for a in again.list_artifacts(run.info.run_id, "model")] == ["model/MLmodel"]
    assert again.get_model_version_by_alias(name, "champion").version == mv.version


def _check_prefect(api_url: str) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @flow(name="infra-smoke", persist_result=False)
    def add_one(x: int) -> int:
        return x + 1

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        state = add_one(41, return_state=True)
        assert state.is_completed() and state.result() == 42
        with get_client(sync_client=True) as client:
            assert str(client.api_url).rstrip("/") == api_url
            run = client.read_flow_run(state.state_details.flow_run_id)
            assert run.state.is_completed()
            assert run.parameters == {"x": 41}
            assert client.read_flow(run.flow_id).name == "infra-smoke"
        let_go_of_prefect_api()  # this server stops with the test; the later tests' events go elsewhere


def test_servers_answer_and_stop_also_when_the_body_raises(tmp_path):
    """Each server stops in the `finally` of its context manager, one path whether its body ended or
    raised: here the MLflow and Prefect servers (servers._server_process) are left by an exception,
    PostgreSQL by its body's normal end, and every process of the three is gone afterwards. (Two tests
    did this before, each booting PostgreSQL and MLflow again for the other way out of the same
    `finally`.)"""
    with postgres_server(tmp_path) as dsn:
        with pytest.raises(RuntimeError, match="boom"):
            with mlflow_server(f"{dsn}/mlflow", tmp_path / "artifacts") as mlflow_url, \
                 prefect_server(f"{dsn}/prefect") as prefect_url:
                assert all(u.startswith("http://127.0.0.1:") for u in (mlflow_url, prefect_url))
                procs = _server_processes(_port(dsn), _port(mlflow_url), _port(prefect_url))
                _check_mlflow(mlflow_url, tmp_path)
                _check_prefect(prefect_url)
                # The artifact landed in the server's local destination, not in the client's folder.
                assert list((tmp_path / "artifacts").rglob("MLmodel"))
                raise RuntimeError("boom")
    _assert_all_gone(procs)
