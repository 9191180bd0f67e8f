"""Issue 24, point 6: the loop, end to end, on inverted digits (255 - x), on real MLflow and Prefect
servers with a process worker, driven by the commands a user types.

    mnistops run                      -> version 1, the champion (MNIST only)
    prefect deploy + prefect worker   -> the training deployment of infra/prefect.yaml, its trigger K = 2
    mnistops infer (inverted)         -> alert 1
    mnistops infer (inverted, labels) -> alert 2, and the batch is recorded as a feedback set
    the trigger                       -> the worker runs the training deployment: version 2 trains on the
                                         set, the gate promotes it on the validation split and the set's slice
    mnistops infer (inverted, labels) -> ok, and more accurate (the manifest, the monitoring record)
    mnistops rollback                 -> version 1 again

The MLflow server keeps its store in a database of its own on the session's PostgreSQL cluster (SQLite
without PostgreSQL), the Prefect server is the session's; the deployment, its automation and the work
pool made here are deleted at the end. Training is cheap but honest: 2 epochs at batch size 128 reach
>= 96% validation accuracy (the gate's threshold, not lowered) for version 1, 3 for the retraining
(the deployment's parameters written out in the deployed file, as infra/prefect.yaml says to).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from environ import let_go_of_prefect_api
from servers import QUIET_ENV, _venv_script, mlflow_server
from waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
NAME = "mnist-mlp"
TRAIN = {"epochs": 2, "batch_size": 128}  # >= 96% validation accuracy (measured: 0.965-0.968)
# The retraining trains one epoch more: it must also not trail the champion on the validation slice
# beyond two paired standard errors (~0.0024), and a 2-epoch one with the feedback set did
# (measured: 0.9620 against 0.9650, refused by that slice).
RETRAIN = {"epochs": 3, "batch_size": 128}
BATCH = 2000  # records per shifted batch; the labelled one is twice that (a feedback set of 4,000)


def _mlflow_backend(stack, root: Path) -> str:
    """A database of this test's own for the MLflow server: the session's `mlflow` one is another test's."""
    if stack.postgres_dsn is None:
        return f"sqlite:///{root / 'mlflow.db'}"
    import psycopg

    db = f"loop_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{stack.postgres_dsn}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    return f"{stack.postgres_dsn}/{db}"


def _deployed_file(tmp_path: Path, pool: str) -> Path:
    """infra/prefect.yaml's training deployment as a team would deploy it for this: its training
    parameters written out (small), its pool, and no cron schedule (the nightly run must not start
    in the middle of the test; the trigger is what is tested)."""
    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    (training,) = [d for d in spec["deployments"] if d["name"] == "training-nightly"]
    training["parameters"]["train"] = dict(RETRAIN)
    training["schedules"] = []
    training["work_pool"]["name"] = pool
    spec["deployments"] = [training]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def test_inverted_digits_alert_retrain_promote_score_ok_and_roll_back(tmp_path, mnist, mnist_source, shared_servers,
                                                                      capsys):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from nn_core.data import load_splits
    from serving.feedback import FeedbackTask, recorded
    from serving.monitor import history

    pool = f"loop-{uuid.uuid4().hex[:8]}"
    prefect_url = shared_servers.prefect_url
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MNISTOPS_"))}
    base.update(QUIET_ENV, PREFECT_API_URL=prefect_url, PREFECT_HOME=str(tmp_path / "prefect-cli"),
                MNISTOPS_DATA_DIR=str(mnist.cache_path.parent), MNISTOPS_DATA_SOURCE=str(mnist_source))
    work = tmp_path / "user"  # where the user types the commands
    work.mkdir()

    s = load_splits(mnist.cache_path)
    # One stream of inverted digits: the batches are drawn from the test split in one shuffled order.
    # In file order they were not one population: MNIST's test split has one group of writers in its
    # first 5,000 records and another in its last 5,000, so a labelled set from the first group and a
    # "fresh" batch from the second are a shift the drift check is right to notice (it did: 4.7% of
    # that batch above the threshold, against 1.4-1.6% for a batch of the set's own population).
    order = np.random.default_rng(0).permutation(len(s.test_labels))
    inverted, labels = 255 - s.test_images.numpy()[order], s.test_labels.numpy()[order]  # (10000, 28, 28) uint8
    batches = {"first": slice(0, BATCH), "labelled": slice(BATCH, 3 * BATCH), "after": slice(3 * BATCH, 4 * BATCH)}
    for name, part in batches.items():
        np.save(work / f"{name}.npy", inverted[part])
        np.save(work / f"{name}-labels.npy", labels[part])

    with mlflow_server(_mlflow_backend(shared_servers, tmp_path), tmp_path / "artifacts") as mlflow_url:
        env = {**base, "MLFLOW_TRACKING_URI": mlflow_url, "MNISTOPS_HOME": str(tmp_path / "home")}

        def mnistops(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=timeout)

        def prefect(*args: str) -> str:
            done = subprocess.run([_venv_script("prefect"), *args], cwd=ROOT, env=deploy_env, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, f"prefect {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
            return done.stdout

        client = MlflowClient(tracking_uri=mlflow_url)
        # 1. The first champion, trained on MNIST alone; meanwhile the training deployment is deployed
        #    (infra/README.md's commands) with K = 2 alerts in 10 minutes, and its worker started.
        first = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--epochs", str(TRAIN["epochs"]),
                                  "--batch-size", str(TRAIN["batch_size"]), "--no-inference"],
                                 cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deploy_env = {**base, "MNISTOPS_RETRAIN_ALERTS": "2", "MNISTOPS_RETRAIN_WINDOW": "600"}
        with temporary_settings(updates={PREFECT_API_URL: prefect_url}), get_client(sync_client=True) as pc:
            pc.create_work_pool(WorkPoolCreate(name=pool, type="process"))  # `prefect work-pool create`'s call
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(_deployed_file(tmp_path, pool)))
        worker_home = tmp_path / "worker-home"
        worker_home.mkdir()
        log = tmp_path / "worker.log"
        with open(log, "wb") as f:
            worker = subprocess.Popen(
                [_venv_script("prefect"), "worker", "start", "--pool", pool], cwd=ROOT, stdout=f,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**env, "MNISTOPS_HOME": str(worker_home), "PREFECT_WORKER_QUERY_SECONDS": "2"})
        worker.stdout = open(log)  # what waiting.wait_for shows if the worker dies
        deployment_id = None
        try:
            out, _ = first.communicate(timeout=900)
            assert first.returncode == 0, out
            assert client.get_model_version_by_alias(NAME, "champion").version == "1"
            with temporary_settings(updates={PREFECT_API_URL: prefect_url}), get_client(sync_client=True) as pc:
                deployment_id = pc.read_deployment_by_name("training-pipeline/training-nightly").id

                def triggered():  # the flow runs of the deployment the automation created
                    return [r for r in pc.read_flow_runs(deployment_filter=DeploymentFilter(
                        id=DeploymentFilterId(any_=[deployment_id]))) if r.created_by and r.created_by.type == "AUTOMATION"]

                # 2. Inverted digits arrive: the first batch alerts; nothing is retrained on one alert.
                r = mnistops("infer", "--input", "first.npy", "--output", "first.parquet")
                assert r.returncode == 0, r.stdout + r.stderr
                assert _manifest(work / "first.parquet")["drift"]["status"] == "alert"
                assert triggered() == []
                # 3. ...the second comes with its labels: it alerts too, and is recorded as a feedback set
                #    before the alert is sent, so the retraining the second alert starts finds it.
                r = mnistops("infer", "--input", "labelled.npy", "--labels", "labelled-labels.npy",
                             "--output", "labelled.parquet")
                assert r.returncode == 0, r.stdout + r.stderr
                labelled = _manifest(work / "labelled.parquet")
                assert labelled["drift"]["status"] == "alert"
                # 4. The trigger runs the training deployment; the worker runs it to the end.
                (run,) = wait_for(triggered, 120, worker, "the trigger's run of the training deployment")
                done = wait_for(lambda: (fr := pc.read_flow_run(run.id)).state.is_final() and fr, 900, worker,
                                "the retraining to finish")
                assert done.state.is_completed(), f"{done.state.message}\n{log.read_text()[-6000:]}"

            # 5. Version 2: trained on the set, promoted by the gate on both slices.
            mnist_task = FeedbackTask("mnist", s.digest)
            with _tracking(mlflow_url):
                (fs,) = recorded(mnist_task)
            champion = client.get_model_version_by_alias(NAME, "champion")
            assert champion.version == "2", log.read_text()[-6000:]
            train_run = client.get_run(champion.run_id)
            assert train_run.data.params["feedback"] == fs.digest
            assert str(done.id) in json.dumps(train_run.data.tags)  # the flow run the trigger made trained it
            from nn_core import registry

            with _tracking(mlflow_url):
                decision = registry.recorded_decision(NAME, champion)
            assert decision.accepted, decision.reason
            val, shifted = decision.slices
            assert val["name"] == "validation" and val["candidate_accuracy"] >= 0.96 and val["passed"]
            assert shifted["name"] == fs.name and shifted["records"] == len(fs.holdout) and shifted["passed"]
            # better on the shifted slice beyond noise: more than the tolerance the gate allows for the worse side
            assert shifted["candidate_accuracy"] > shifted["champion_accuracy"] + shifted["tolerance"], shifted
            ref = json.loads(Path(client.download_artifacts(champion.run_id, "drift/reference.json",
                                                            str(tmp_path))).read_text())
            assert [c["name"] for c in ref["components"]] == [fs.name]

            # 6. Inverted digits now score ok with the new champion, and more accurately.
            r = mnistops("infer", "--input", "after.npy", "--labels", "after-labels.npy", "--output", "after.parquet")
            assert r.returncode == 0, r.stdout + r.stderr
            after = _manifest(work / "after.parquet")
            assert after["drift"]["status"] == "ok", after["drift"]
            share = {name: m["drift"]["statistics"]["exceed_fraction"] for name, m in (("v2", after), ("v1", labelled))}
            assert share["v2"] < share["v1"] / 3, share
            assert after["accuracy"] > labelled["accuracy"] + 0.2, (after["accuracy"], labelled["accuracy"])
            with _tracking(mlflow_url):
                v1_points, v2_points = history(client, NAME, "1"), history(client, NAME, "2")
            assert [p.status for p in v1_points] == ["alert", "alert"] and [p.status for p in v2_points] == ["ok"]
            assert v2_points[0].accuracy > v1_points[1].accuracy
            # The last three commands run in this process (flows.cli.main: the installed command's exit
            # codes and lines, without ~5 s of imports each), on the same servers.
            with _tracking(mlflow_url), temporary_settings(updates={PREFECT_API_URL: prefect_url}):
                code, out = _main(capsys, env, "monitor", "--model", NAME)
                assert code == 0, out
                assert f"{NAME} version 2 (champion): 1 batch(es), 0 alert(s)" in out, out
                assert f"{NAME} version 1: 2 batch(es), 2 alert(s)" in out, out

                # 7. The team rolls back: version 1 is the champion again, and the history says why.
                code, out = _main(capsys, env, "rollback")
                assert code == 0, out
                assert client.get_model_version_by_alias(NAME, "champion").version == "1"
                code, out = _main(capsys, env, "models")
                assert code == 0, out
                assert "2 -> 1  mnistops rollback" in out, out
                let_go_of_prefect_api()  # what they sent, sent while the settings still say where
        finally:
            if first.poll() is None:
                first.kill()
            _stop(worker)
            worker.stdout.close()
            with temporary_settings(updates={PREFECT_API_URL: prefect_url}), get_client(sync_client=True) as pc:
                if deployment_id is not None:  # the session's server: leave no trigger behind
                    pc.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
                    pc.delete_deployment(deployment_id)
                pc.delete_work_pool(pool)


def _main(capsys, env: dict, *argv: str) -> tuple[int, str]:
    """`mnistops ARGV` in this process, in `env`'s working setup (its home; the caller set the servers):
    (exit code, stdout and stderr)."""
    from flows.cli import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNISTOPS_HOME", env["MNISTOPS_HOME"])
        code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def _manifest(output: Path) -> dict:
    return json.loads(output.with_name(output.name + ".manifest.json").read_text())


class _tracking:
    """This process's MLflow calls on the server for a while (the project's helpers use the default URI)."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self):
        import mlflow

        self.before = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = self.uri
        mlflow.set_tracking_uri(self.uri)

    def __exit__(self, *exc):
        import mlflow

        if self.before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self.before
        mlflow.set_tracking_uri(None)
