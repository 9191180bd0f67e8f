"""infra/k8s/inbox-scoring-job.yaml exercised without a cluster: its container's command line, read
from the YAML with its $(VAR) references expanded as the kubelet does, run as K local processes (K =
the Job's parallelism) against one inbox in the loopback S3 bucket (tests/s3_server.py), each with a
home and temporary folder of its own as in a pod (so also the check of workers on separate machines
sharing nothing but the bucket); every input is scored exactly once. Its schema is checked with the
other manifests (tests/test_infra_files.py)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from s3_server import S3Server, s3  # noqa: F401 (the fixture)
from serving_fixtures import digits, save_model
from stores import home_with_store

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "infra" / "k8s" / "inbox-scoring-job.yaml"
QUIET = {"ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def _job() -> tuple[dict, dict]:
    (job,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return job, container


def _expanded(command: list[str], env: dict[str, str]) -> list[str]:
    """$(NAME) replaced by the container's variable, as the kubelet does (an unknown one stays)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in command]


def test_the_manifest_is_k_copies_of_the_batch_job_with_credentials_from_secrets() -> None:
    from serving.cli import add_infer_arguments
    import argparse

    job, c = _job()
    assert job["spec"]["parallelism"] == job["spec"]["completions"] >= 2
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    cmd = _expanded(c["command"], env)
    assert cmd[:3] == ["python", "-m", "serving"]
    args = add_infer_arguments(argparse.ArgumentParser()).parse_args(cmd[3:])  # the real parser refuses a typo
    assert args.inbox.startswith("s3://") and args.output.startswith("s3://")
    assert not args.output.startswith(args.inbox.rstrip("/") + "/")
    assert not any(k.startswith("AWS_") or "SECRET" in k or "PASSWORD" in k for k in env)
    assert {s["secretRef"]["name"] for s in c["envFrom"]} == {"mnistops-object-store", "mnistops-mlflow"}


@pytest.mark.slow
def test_k_pods_command_lines_score_one_bucket_inbox_exactly_once(s3: S3Server, tmp_path: Path) -> None:
    job, c = _job()
    k = job["spec"]["parallelism"]
    bucket = s3.bucket()
    names = [f"batch-{i}.npy" for i in range(3 * k)]
    for i, n in enumerate(names):
        buf = io.BytesIO()
        np.save(buf, digits(2000, seed=30 + i))
        s3.client().put_object(Bucket=bucket, Key=f"incoming/{n}", Body=buf.getvalue())
    save_model(tmp_path / "m.onnx")
    # What differs from the cluster: the bucket, a model file instead of the registry (the registry
    # path is tests/test_mlflow_s3.py's), the pod's folders; the Secret's variables are the server's.
    # The jobs are tracked (the manifest's command has no --no-track): MLflow's Secret is stood in for
    # by a store already made in each pod's home, as a tracking server would be there already.
    values = {"INBOX_URL": f"s3://{bucket}/incoming/", "OUTPUT_URL": f"s3://{bucket}/scored/",
              "MODEL_URI": str(tmp_path / "m.onnx")}
    procs = []
    for pod in range(k):
        scratch = tmp_path / f"pod{pod}"
        scratch.mkdir()
        home_with_store(scratch / "mnistops")
        env = {**{e["name"]: e["value"] for e in c["env"]}, **values, "TMPDIR": str(scratch),
               "MNISTOPS_HOME": str(scratch / "mnistops")}
        cmd = _expanded(c["command"], env)
        assert "$(" not in " ".join(cmd)
        procs.append(subprocess.Popen([sys.executable, *cmd[1:]], cwd=scratch, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE,
                                      env={**s3.env(), **QUIET, **env, "PYTHONPATH": str(REPO)}))
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0] * k, [e[-2000:] for _, e in outs]
    scored = [x["input"].rsplit("/", 1)[1] for o, _ in outs for x in json.loads(o)["scored"]]
    assert sorted(scored) == names  # each input by exactly one pod
    records = [json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())
               for key in s3.records(bucket, "scored")]
    assert sorted(r["input"] for r in records) == names
    assert all(r["status"] == "scored" and len(r["history"]) == 1 for r in records)
    assert len([key for key in s3.keys(bucket, "scored/") if key.endswith(".parquet")]) == len(names)
    # each pod tracked its own jobs, in its own store
    assert [run_inputs(tmp_path / f"pod{pod}" / "mnistops") for pod in range(k)] == [
        sorted(x["input"].rsplit("/", 1)[1] for x in json.loads(o)["scored"]) for o, _ in outs]


def run_inputs(home: Path) -> list[str]:
    """The names of the inputs of the batch-job runs tracked in the store of a pod's home."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return sorted(r.data.params["input"].rsplit("/", 1)[-1] for r in client.search_runs(exps))
