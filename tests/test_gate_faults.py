"""Registry errors never move the champion: against a real MLflow server behind a real proxy that
answers chosen requests with 503, the gate fails (and Prefect retries it) instead of reading the
error as "no champion yet"."""

from __future__ import annotations


import mlflow
import pytest
from mlflow.exceptions import MlflowException

from fault_proxy import FaultRule, fault_proxy
from idx_files import synthetic_dataset
from nn_core import registry, tracking
from nn_core.data import prepare
from nn_core.distributed import ddp_context
from nn_core.launch import TrainResult
from nn_core.registry import GateConfig
from nn_core.release import export_and_check, gate_and_record, register
from nn_core.train import TrackingConfig, TrainConfig, TrainJob, train
from waiting import finished_task_run

pytestmark = [pytest.mark.slow]

# What the gate reads the champion from (and the alias lookup MLflow offers for it).
CHAMPION_READS = ("/registered-models/get", "/registered-models/alias")
GATE = GateConfig(threshold=0.0)  # let any figure pass: only the comparison with the champion matters


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    from servers import mlflow_server

    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(f"sqlite:///{root}/mlflow.db", root / "artifacts") as url, fault_proxy(url) as (proxy, rules):
        mp = pytest.MonkeyPatch()
        mp.setenv("MLFLOW_TRACKING_URI", proxy)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retries are Prefect's; fail fast here
        mlflow.set_tracking_uri(proxy)
        yield url, rules, root
        mlflow.set_tracking_uri(None)
        mp.undo()


@pytest.fixture(scope="module")
def candidates(registry_server, tmp_path_factory):
    """A good and a bad model of one synthetic task, registered on the server; the good one champion."""
    _, rules, _ = registry_server
    tmp = tmp_path_factory.mktemp("faults")
    spec = synthetic_dataset(tmp / "src", n_train=1200, n_test=200)
    prepared = prepare(spec, str(tmp / "src"), tmp / "data")

    def trained(name: str, **cfg) -> TrainResult:
        job = TrainJob(data_path=str(prepared.cache_path), out_dir=str(tmp / name),
                       train=TrainConfig(batch_size=32, **cfg), tracking=TrackingConfig(training_id=name, experiment="faults"))
        with ddp_context("cpu") as env:
            train(job, env)
        return TrainResult.read(tmp / name)

    good, bad = trained("good", epochs=3), trained("bad", epochs=1, lr=1e-6)
    out = {}
    for key, result in (("good", good), ("bad", bad)):
        exported = export_and_check(result, prepared.cache_path)
        out[key] = (result, exported, register(result, exported, prepared.cache_path, "faults-mlp"))
    d = gate_and_record(*out["good"][:2], out["good"][2], prepared.cache_path, "faults-mlp", GATE)
    assert d.accepted and registry.champion("faults-mlp") == out["good"][2]
    assert out["bad"][0].val_accuracy < out["good"][0].val_accuracy
    return prepared, out


def _state(version: str):
    c = tracking.client()
    return registry.champion("faults-mlp"), c.get_model_version("faults-mlp", version).tags["promotion"]


def test_missing_alias_and_missing_model_read_as_no_champion(registry_server, candidates):
    c = tracking.client()
    c.create_registered_model("no-alias-mlp")
    assert registry.champion("no-alias-mlp") is None and registry.champion("never-registered") is None
    # Why champion() does not ask for the alias itself: a missing alias answers INVALID_PARAMETER_VALUE,
    # the code of malformed input too.
    with pytest.raises(MlflowException) as e:
        c.get_model_version_by_alias("no-alias-mlp", registry.CHAMPION)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


def test_a_registry_error_fails_the_gate_and_leaves_the_alias(registry_server, candidates):
    _, rules, _ = registry_server
    prepared, out = candidates
    result, exported, version = out["bad"]
    before = _state(version)
    assert before == (out["good"][2], "pending")
    rules.append(rule := FaultRule(CHAMPION_READS))
    try:
        with pytest.raises(MlflowException):
            registry.champion("faults-mlp")  # an error is never "no champion"
        with pytest.raises(MlflowException):
            gate_and_record(result, exported, version, prepared.cache_path, "faults-mlp", GATE)
        assert rule.failed >= 2
    finally:
        rules.remove(rule)
    assert _state(version) == before  # champion untouched, no decision recorded



def test_prefect_retries_the_gate_after_a_registry_error(registry_server, candidates, prefect_api):
    """The champion read fails in the gate task's first attempt; Prefect retries it and the retry
    compares with the real champion: the worse candidate is rejected, the champion stays."""
    from prefect import flow

    from flows.training import gate_task

    _, rules, _ = registry_server
    prepared, out = candidates
    result, exported, version = out["bad"]

    @flow
    def gate_flow():
        return gate_task(result, exported, version, prepared, "faults-mlp", GATE, return_state=True)

    # The first attempt reads the bound task (registered-models/get) once, then the champion: fail that.
    rules.append(rule := FaultRule(("/registered-models/get",), after=1, times=1))
    try:
        task_state = gate_flow()
    finally:
        rules.remove(rule)
    assert rule.failed == 1
    decision = task_state.result()
    assert not decision.accepted and "worse than the champion" in decision.reason
    assert decision.champion_version == out["good"][2]
    assert _state(version) == (out["good"][2], "rejected")

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        task_run = finished_task_run(client, task_state.state_details.task_run_id)
    assert task_run.run_count == 2  # failed once, retried once
