"""The deployments of infra/prefect.yaml on a process work pool, for real: a Prefect server, the
commands of infra/README.md (`prefect work-pool create`, `prefect --no-prompt deploy --all`,
`prefect worker start`) on a fresh MNISTOPS_HOME, the hourly inference run first (as its first hour
would, before any inbox or champion exists), then each deployment once by the worker, and what each
run must leave behind: a Completed flow run, the MLflow run, the registered version, the predictions
file.

The server keeps its state in SQLite (the PostgreSQL path of the same server is tests/test_infra_servers.py;
here the subject is the deployments, and SQLite starts faster). The worker gets MNISTOPS_HOME only
at run time, and `prefect deploy` runs without it: the pull step must read it on the worker.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from servers import QUIET_ENV, _venv_script, prefect_server
from stores import migrated_prefect_db

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "infra" / "prefect.yaml"
README = ROOT / "infra" / "README.md"
POOL = "mnistops-process"


def readme_prefect_commands() -> list[tuple[dict[str, str], list[str]]]:
    """Every `prefect ...` command line of infra/README.md, in order, once each: (the VAR=value
    assignments before it, argv)."""
    seen, out = set(), []
    for line in README.read_text().splitlines():
        # Indented code lines that run prefect, possibly after VAR=value assignments.
        words = shlex.split(line) if re.match(r"^ {4}(?:[A-Z_][A-Z0-9_]*=\S*\s+)*prefect\s", line) else []
        assigns = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            assigns[key] = value
        if words[:1] == ["prefect"] and line.strip() not in seen:
            seen.add(line.strip())
            out.append((assigns, words))
    return out


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def _prefect(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run([_venv_script("prefect"), *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _stop_worker(proc: subprocess.Popen) -> None:
    """A worker may ignore the first SIGTERM while it finishes up: a second one, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Its flow-run processes share its process group; none may outlive the test.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _flow_name(entrypoint: str) -> str:
    return {"training_pipeline": "training-pipeline", "batch_inference": "batch-inference",
            "hyperparameter_sweep": "hyperparameter-sweep"}[entrypoint.rsplit(":", 1)[-1]]


def test_deployments_run_on_a_process_work_pool(tmp_path, mnist, mnist_source):
    import pyarrow.parquet as pq
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.inference import export_test_split

    home = tmp_path / "home"  # MNISTOPS_HOME on the worker: created and owned before it starts
    home.mkdir()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "MLFLOW_", "MNISTOPS_"))}
    base.update(QUIET_ENV)
    with prefect_server(migrated_prefect_db(tmp_path / "prefect.db"), home=tmp_path / "prefect-server",
                        log_path=tmp_path / "prefect-server.log") as api_url:
        cli_env = {**base, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / "prefect-cli")}
        # infra/README.md's commands, verbatim, from the repository root; the worker last.
        commands = readme_prefect_commands()
        assert [argv[:3] for _, argv in commands] == [
            ["prefect", "work-pool", "create"], ["prefect", "--no-prompt", "deploy"], ["prefect", "worker", "start"]]
        (_, create), (_, deploy), (worker_assigns, worker_argv) = commands
        assert POOL in create and POOL in worker_argv
        _prefect(create, cli_env)
        out = _prefect(deploy, cli_env)  # without MNISTOPS_HOME: the worker's value must count
        declared = _deployments()
        for name in declared:
            assert name in out, out

        # The README's MNISTOPS_HOME=... becomes this test's folder; no other setting is needed.
        assert set(worker_assigns) == {"MNISTOPS_HOME"}, worker_assigns
        worker_env = {**cli_env, "MNISTOPS_HOME": str(home),
                      # The dataset cache this test session verified; the flows re-verify nothing else.
                      "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent), "MNISTOPS_DATA_SOURCE": str(mnist_source),
                      "PREFECT_WORKER_QUERY_SECONDS": "2", "OMP_NUM_THREADS": "1"}
        log = tmp_path / "worker.log"
        with open(log, "wb") as f:
            worker = subprocess.Popen([_venv_script("prefect"), *worker_argv[1:]], cwd=ROOT,
                                      env=worker_env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        try:
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                with get_client(sync_client=True) as client:
                    limits = {d.name: d.global_concurrency_limit and d.global_concurrency_limit.limit
                              for d in client.read_deployments()}
                assert limits == {name: d.get("concurrency_limit") for name, d in declared.items()}
                assert set(limits.values()) == {1}  # no schedule piles up

                def run(name: str, parameters: dict | None = None):
                    flow = _flow_name(declared[name]["entrypoint"])
                    fr = run_deployment(f"{flow}/{name}", parameters=parameters or {}, timeout=900, poll_interval=2)
                    assert fr.state.is_completed(), (f"{name}: {fr.state.type} {fr.state.message}\n"
                                                     f"{log.read_text()[-6000:]}")
                    return fr

                # The first hour on a fresh home, before anything else ran: no inbox, no champion. The
                # run makes the inbox, finds nothing to score and completes (it needs no model then).
                inbox = home / declared["inference-hourly"]["parameters"]["job"]["input"]
                assert not inbox.exists()
                run("inference-hourly")
                assert inbox.is_dir() and not any(inbox.iterdir())
                # Small parameters: one epoch passes a 0.5 gate, so the version becomes the champion.
                run("training-nightly", {"train": {"epochs": 1}, "gate": {"threshold": 0.5}})
                # New data arrives in the inbox, where the deployment's relative path points.
                export_test_split("mnist", str(mnist.cache_path.parent), inbox)
                run("inference-hourly")  # its own parameters, as the schedule would run it
                run("hyperparameter-sweep", {"grid": {"hidden": [[32]], "lr": [3e-3], "batch_size": [256],
                                                      "epochs": [1]},
                                             "gate": {"threshold": 0.5}})
        finally:
            _stop_worker(worker)

    # Everything landed under MNISTOPS_HOME, nowhere else: the embedded MLflow store...
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("mnist-mlp", "champion")
    versions = client.search_model_versions("name='mnist-mlp'")
    assert len(versions) == 2, [v.version for v in versions]  # the nightly training's and the sweep's best
    train_run = client.get_run(champion.run_id)
    assert train_run.info.status == "FINISHED" and train_run.data.metrics["val/accuracy"] > 0.5
    # ...and the predictions file of the hourly job (the inbox's one input), at the deployment's
    # relative output folder.
    params = declared["inference-hourly"]["parameters"]["job"]
    (predictions,) = (home / params["output"]).glob("*.parquet")
    assert predictions.name.startswith("mnist-test-images") and pq.read_table(predictions).num_rows == 10_000
    assert not (ROOT / params["output"]).exists()  # not resolved against the repository
