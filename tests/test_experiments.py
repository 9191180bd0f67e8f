"""Experiments and run tags as the MLflow UI reads them, on a real (SQLite) MLflow store."""

from __future__ import annotations

from mlflow import MlflowClient

from serving.experiments import EXPERIMENT_KIND_TAG, MODEL_TRAINING, NOTE_TAG, ensure_experiment, run_context_tags


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
    from serving import experiments

    experiments.git_commit.cache_clear()
    monkeypatch.setenv("MNISTOPS_GIT_COMMIT", "0123abc")
    try:
        tags = run_context_tags("mnistops run", "JOB")
    finally:
        experiments.git_commit.cache_clear()
    assert tags["mlflow.source.name"] == "mnistops run" and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.git.commit"] == "0123abc" and tags["mlflow.user"]
