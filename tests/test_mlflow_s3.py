"""MLflow's artifacts in an object store (issue 23, point 4), as the compose stack runs it: a real
`mlflow server --artifacts-destination s3://...` on the loopback S3 server (tests/s3_server.py),
`mnistops run` against it, then the batch job loading `models:/NAME@champion` through it. The clients
get no S3 credentials: the tracking server proxies every artifact to and from the bucket. The run's
flows go to the session's Prefect server (a temporary Prefect API is tests/test_lifecycle.py's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from s3_server import S3Server, mlflow_server_on_s3, s3  # noqa: F401 (the fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_run_and_batch_job_with_the_mlflow_server_keeping_artifacts_in_a_bucket(s3: S3Server, tmp_path: Path,
                                                                                 mnist, mnist_source,
                                                                                 prefect_env) -> None:
    from mlflow import MlflowClient

    from nn_core.data import load_splits

    bucket = s3.bucket()
    with mlflow_server_on_s3(s3, f"s3://{bucket}/mlartifacts", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             tmp_path / "mlflow-server.log") as url:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},  # no S3 keys on the client
               "MLFLOW_TRACKING_URI": url, "MNISTOPS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
               "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent), "MNISTOPS_DATA_SOURCE": str(mnist_source)}
        r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--epochs", "1", "--threshold", "0.5",
                            "--no-inference", "--model-name", "s3-mlp"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        assert "promoted to champion" in r.stdout
        champion = MlflowClient(url).get_model_version_by_alias("s3-mlp", "champion")
        keys = s3.keys(bucket, "mlartifacts/")
        assert [k for k in keys if k.endswith("/model.onnx")], keys  # the model's files are in the bucket
        assert [k for k in keys if k.endswith("drift/reference.json")], keys
        assert not (tmp_path / "home" / "mlartifacts").exists() and not (tmp_path / "mlruns").exists()

        split = load_splits(mnist.cache_path)
        np.save(tmp_path / "x.npy", split.test_images[:2000].numpy())
        np.save(tmp_path / "y.npy", split.test_labels[:2000].numpy())
        job = subprocess.run([sys.executable, "-m", "serving", "--input", "x.npy", "--labels", "y.npy",
                              "--output", "p.parquet", "--model", "models:/s3-mlp@champion", "--device", "cpu"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    s = json.loads(job.stdout.strip().splitlines()[-1])  # the summary is the last line
    assert str(s["model_version"]) == str(champion.version) and s["predicted"] == 2000
    assert s["accuracy"] > 0.85 and s["drift"] in ("ok", "alert")  # the reference came from the bucket too
    assert (tmp_path / "p.parquet").is_file()
