"""The whole pipeline and a batch job against real servers (PostgreSQL, an MLflow tracking server on
it, a Prefect server on it: the session's shared PostgreSQL and Prefect server, tests/conftest.py),
checked through the servers' own APIs; and two pipelines finishing together against one registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from needs import missing
from mlflow.tracking import MlflowClient

from nn_core import metrics as M

pytestmark = [pytest.mark.servers, pytest.mark.e2e, pytest.mark.slow]


@dataclass(frozen=True)
class Stack:
    mlflow_url: str
    prefect_url: str


@pytest.fixture(scope="module")
def stack(shared_servers, tmp_path_factory):
    from servers import mlflow_server, postgres_missing

    if shared_servers.postgres_dsn is None:
        missing(postgres_missing() or "the session's servers run without PostgreSQL")
    root = tmp_path_factory.mktemp("stack")
    with mlflow_server(f"{shared_servers.postgres_dsn}/mlflow", root / "artifacts") as mlflow_url:
        yield Stack(mlflow_url, shared_servers.prefect_url)


def _env(stack: Stack, tmp_path: Path, mnist, mnist_source) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": stack.mlflow_url, "PREFECT_API_URL": stack.prefect_url,
            "MNISTOPS_HOME": str(tmp_path / "home"), "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent),
            "MNISTOPS_DATA_SOURCE": str(mnist_source)}


def _mnistops(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _flow_runs(prefect_url: str, flow_name: str, mentioning: str):
    """The flow runs of `flow_name` whose parameters mention `mentioning` (the server is shared with
    the rest of the session)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [fr for fr in runs if mentioning in json.dumps(fr.parameters, default=str)]


def test_pipeline_and_batch_job_against_real_servers(stack, tmp_path, mnist, mnist_source):
    env = _env(stack, tmp_path, mnist, mnist_source)
    r = _mnistops("run", "--epochs", "3", "--model-name", "servers-mlp", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "promoted to champion" in r.stdout and "batch inference over the test set" in r.stdout
    assert stack.mlflow_url in r.stdout  # the run link points at the server, not a local store
    assert not (tmp_path / "home" / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()

    c = MlflowClient(stack.mlflow_url)
    # The test split scored with its labels measures the champion; it never becomes a feedback set.
    assert c.get_experiment_by_name("mnistops-feedback") is None
    (run,) = c.search_runs([c.get_experiment_by_name("mnist-mlp").experiment_id],
                           filter_string="tags.`mnistops.kind` = 'training'", max_results=50)
    assert run.info.status == "FINISHED" and run.data.metrics[M.VAL_ACCURACY] >= 0.96
    champion = c.get_model_version_by_alias("servers-mlp", "champion")
    assert champion.version == "1" and champion.run_id == run.info.run_id and champion.tags["promotion"] == "accepted"
    (job,) = c.search_runs([c.get_experiment_by_name("mnist-mlp-inference").experiment_id])
    assert job.data.metrics["accuracy"] == pytest.approx(run.data.metrics[M.TEST_ACCURACY], abs=1e-9)
    assert {a.path for a in c.list_artifacts(run.info.run_id, "plots")} >= {"plots/loss_curve.png"}

    pipeline_runs = _flow_runs(stack.prefect_url, "training-pipeline", "servers-mlp")
    inference_runs = _flow_runs(stack.prefect_url, "batch-inference", str(tmp_path))
    assert [fr.state.type.value for fr in pipeline_runs] == ["COMPLETED"]
    assert [fr.state.type.value for fr in inference_runs] == ["COMPLETED"]

    # A batch job by hand against the same servers, from the registry's champion.
    images = tmp_path / "home" / "outputs" / "inputs" / "mnist-test-images.npy"
    labels = images.with_name("mnist-test-labels.npy")
    out = tmp_path / "preds.csv"
    r = _mnistops("infer", "--input", str(images), "--labels", str(labels), "--output", str(out),
                  "--model", "models:/servers-mlp@champion", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.exists() and Path(str(out) + ".manifest.json").exists()
    assert len(_flow_runs(stack.prefect_url, "batch-inference", str(tmp_path))) == 2


def test_two_pipelines_finishing_together(stack, tmp_path, mnist, mnist_source):
    env = _env(stack, tmp_path, mnist, mnist_source)
    procs = [
        subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--no-inference", "--epochs", "4", "--seed", str(seed),
                          "--model-name", "race-mlp"],
                         env={**env, "MNISTOPS_HOME": str(tmp_path / f"home{seed}")}, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for seed in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:  # none outlives the test, also when it timed out
            p.kill()
            p.wait()
    assert sorted(p.returncode for p in procs) in ([0, 0], [0, 3]), outs
    c = MlflowClient(stack.mlflow_url)
    versions = c.search_model_versions("name = 'race-mlp'")
    assert len(versions) == 2  # both registered
    champion = c.get_model_version_by_alias("race-mlp", "champion")
    assert champion.tags["promotion"] == "accepted"  # never a rejected version
    accs = {v.version: float(v.tags["promotion.val_accuracy"]) for v in versions}
    assert accs[champion.version] == max(accs.values())  # the better one
    # Serialised: only the first gate found no champion; the other compared with it.
    reasons = [v.tags["promotion.reason"] for v in versions]
    assert sum("no champion yet" in r for r in reasons) == 1, reasons
    # ... under the Prefect global concurrency limit of this registered model (the pipelines could be on
    # two hosts), created by the first promotion and released by both.
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.promotion import limit_name

    with temporary_settings({PREFECT_API_URL: stack.prefect_url}), get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name("race-mlp"))
    assert limit.limit == 1 and limit.active and limit.active_slots == 0

    # A rollback on the server, under the same limit: the other version forced in by hand, then the
    # champion before it restored; its decision record (on the server's artifact store) in the history.
    # The two commands' code in this process, in the commands' environment (what starting one does is
    # checked above).
    import mlflow

    from flows.cli import main
    from nn_core import rollback

    other = next(v.version for v in versions if v.version != champion.version)
    # (Prefect's settings too: this process's Prefect read its environment when it was imported.)
    with pytest.MonkeyPatch.context() as mp, temporary_settings({PREFECT_API_URL: stack.prefect_url}):
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MNISTOPS_HOME", "MNISTOPS_DATA_DIR", "MNISTOPS_DATA_SOURCE"):
            mp.setenv(key, env[key])
        mp.chdir(tmp_path)
        try:
            assert main(["promote", str(other), "--force", "--model-name", "race-mlp"]) == 0
            assert main(["rollback", "--model-name", "race-mlp"]) == 0
            assert c.get_model_version_by_alias("race-mlp", "champion").version == champion.version
            mlflow.set_tracking_uri(stack.mlflow_url)
            last = rollback.history("race-mlp")[-1]
        finally:
            mlflow.set_tracking_uri(None)
    assert (last.before, last.after, last.by.command) == (str(other), str(champion.version), "mnistops rollback")
