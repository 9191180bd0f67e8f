"""The scheduled `inference-hourly` deployment as `mnistops serve` serves it, on a real Prefect server:
a run over an inbox of digits completes and scores each input once; a run over a drifted inbox
(Fashion-MNIST) fails, so the alert shows as a failed flow run, with the outputs still written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from needs import missing

from common import idx
from serving import drift
from trained_model import digit_weights, train_images
from serving_fixtures import mlp_onnx, write_idx
from stores import empty_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
FASHION = Path(os.environ.get("MNISTOPS_FASHION_SOURCE", "/usr/share/datasets/fashion-mnist"))


def _champion_with_reference(store: Path, src: Path) -> str:
    """A digit model registered as mnist-mlp@champion in a SQLite store under `store` (copied from the
    process's empty one: tests/stores.py), its drift reference stored the way registration stores it.
    Returns the store's URI."""
    import mlflow
    import mlflow.onnx
    from mlflow import MlflowClient

    x = train_images(src)
    path = store / "m.onnx"
    onnx.save(mlp_onnx(digit_weights(src)), str(path))
    uri = empty_store(store / "mlflow.db", store / "artifacts")
    mlflow.set_tracking_uri(uri)
    try:
        exp = MlflowClient().create_experiment("training", artifact_location=(store / "artifacts" / "t").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.onnx.log_model(onnx.load(str(path)), name="model", registered_model_name="mnist-mlp",
                                  onnx_execution_providers=["CPUExecutionProvider"], pip_requirements=["onnxruntime"])
        drift.store_reference("mnist-mlp", "1", run.info.run_id, path, x[:50_000], x[50_000:])
        MlflowClient().set_registered_model_alias("mnist-mlp", "champion", "1")
    finally:
        mlflow.set_tracking_uri(None)
    return uri


def _final_state(client, run_id, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = client.read_flow_run(run_id).state
        if state.is_final():
            return state
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished: {client.read_flow_run(run_id).state}")


def test_hourly_inbox_deployment_fails_its_run_on_drift(prefect_server_url, tmp_path, mnist_source):
    if not (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        missing(f"no Fashion-MNIST at {FASHION} (infra/scripts/ensure-test-data.sh)")
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    store = tmp_path / "store"
    store.mkdir()
    tracking_uri = _champion_with_reference(store, mnist_source)
    inbox, out = tmp_path / "inbox", tmp_path / "scored"
    inbox.mkdir()
    test = idx.read_idx(mnist_source / "t10k-images-idx3-ubyte.gz", magic=idx.IMAGES_MAGIC)
    np.save(inbox / "digits-a.npy", test[:1000])
    write_idx(inbox / "digits-b-idx3-ubyte", test[1000:3000])

    env = {**os.environ, "PREFECT_API_URL": prefect_server_url, "MNISTOPS_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": tracking_uri, "MNISTOPS_ARTIFACT_ROOT": str(store / "artifacts")}
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--inference-cron", "0 0 1 1 *",
                              "--infer-inbox", str(inbox), "--infer-output", str(out)],
                             env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server_url}), get_client(sync_client=True) as client:
            # The session's server may hold this deployment from an earlier `serve`: wait for this one's.
            def served():
                return next((d for d in client.read_deployments() if d.name == "inference-hourly"
                             and d.parameters["job"]["input"] == str(inbox) and not d.paused), None)

            deadline = time.time() + 180
            while (dep := served()) is None:
                assert serve.poll() is None and time.time() < deadline, serve.stdout.read() if serve.poll() is not None else "timeout"
                time.sleep(0.5)
            job = dep.parameters["job"]
            assert dep.parameters["inbox"] is True and job["output"] == str(out) and job["fail_on_drift"] is True

            ok = run_deployment("batch-inference/inference-hourly", timeout=0)
            state = _final_state(client, ok.id)
            assert state.is_completed(), state
            scored = sorted(p.name for p in out.glob("*.parquet"))
            assert [s.split(".")[0] for s in scored] == ["digits-a", "digits-b-idx3-ubyte"]

            fashion = idx.read_idx(FASHION / "t10k-images-idx3-ubyte.gz", magic=idx.IMAGES_MAGIC)
            np.save(inbox / "new-upload.npy", fashion[:1000])
            drifted = run_deployment("batch-inference/inference-hourly", timeout=0)
            state = _final_state(client, drifted.id)
            assert state.is_failed() and "drift alert" in state.message, state
            new = list(out.glob("new-upload.npy.*.parquet"))
            assert len(new) == 1  # scored once, the evidence written
            manifest = json.loads(Path(str(new[0]) + ".manifest.json").read_text())
            assert manifest["drift"]["status"] == "alert"
            assert len(list(out.glob("*.parquet"))) == 3  # the digits were not scored again
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)
