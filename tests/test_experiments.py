"""Experiments and run tags as the MLflow UI reads them, on a real (SQLite) MLflow store."""

from __future__ import annotations

from mlflow import MlflowClient

from common.experiments import EXPERIMENT_KIND_TAG, MODEL_TRAINING, NOTE_TAG, ensure_experiment, run_context_tags


def test_experiments_are_model_training_experiments_with_a_description(mlflow_store):
    c = MlflowClient()
    exp_id = ensure_experiment("exp-a", description="Training runs of the MNIST MLP")
    exp = c.get_experiment(exp_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING and exp.tags[NOTE_TAG].startswith("Training runs")
    assert ensure_experiment("exp-a") == exp_id  # found again, not created twice

    # An experiment made before (by hand, or by an older version) is marked on first use.
    old = c.create_experiment("exp-old")
    assert EXPERIMENT_KIND_TAG not in c.get_experiment(old).tags
    assert ensure_experiment("exp-old", description="described later") == old
    tags = c.get_experiment(old).tags
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING and tags[NOTE_TAG] == "described later"


def test_run_context_tags_fill_the_created_by_and_source_columns(monkeypatch):
    from common import experiments

    experiments.git_commit.cache_clear()
    monkeypatch.setenv("MNISTOPS_GIT_COMMIT", "0123abc")
    try:
        tags = run_context_tags("mnistops run", "JOB")
    finally:
        experiments.git_commit.cache_clear()
    assert tags["mlflow.source.name"] == "mnistops run" and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.git.commit"] == "0123abc" and tags["mlflow.user"]


def test_commands_starting_together_on_a_new_home_share_one_store(tmp_path):
    """Three processes open the embedded store of the same new home at the same moment, the way the
    project opens MLflow (common.settings.mlflow_client): each gets the one complete store (no
    migration race), and no temporary file is left."""
    import os
    import sqlite3
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    code = ("import os, sys, time; from pathlib import Path\n"
            f"Path({str(tmp_path)!r}, 'imported-' + sys.argv[1]).touch()\n"
            f"while not Path({str(go)!r}).exists(): time.sleep(0.01)\n"
            "from common.settings import configure_store, mlflow_client; configure_store()\n"
            "mlflow_client().search_experiments()\n")
    env = {**os.environ, "MNISTOPS_HOME": str(tmp_path / "home")}
    for key in ("MLFLOW_TRACKING_URI", "MNISTOPS_ARTIFACT_ROOT"):
        env.pop(key, None)
    procs = [subprocess.Popen([sys.executable, "-c", "import mlflow.store.tracking.sqlalchemy_store\n" + code, str(i)],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(3)]
    # Each imports MLflow first, so that the three really start creating together.
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("imported-*"))) < 3:
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline, "the three processes did not import MLflow within 120 s"
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    with sqlite3.connect(tmp_path / "home" / "mlflow.db") as db:
        assert db.execute("select count(*) from alembic_version").fetchone() == (1,)
        assert db.execute("select name from experiments").fetchall() == [("Default",)]
    assert not list((tmp_path / "home").glob(".mlflow.db.*"))
