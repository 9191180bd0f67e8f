"""MLflow experiments, found or created by name: one helper for training runs and batch jobs alike.

Torch-free (mlflow-skinny is a base dependency); mlflow is imported on call, so a job that does not
track pays nothing for it.
"""

from __future__ import annotations

import os
from pathlib import Path

ARTIFACT_ROOT_ENV = "MNISTOPS_ARTIFACT_ROOT"


def ensure_experiment(name: str, client=None) -> str:
    """The experiment's id, created on first use. With the embedded store, artifacts go under
    MNISTOPS_ARTIFACT_ROOT (set by the entry point) rather than wherever the process happens to run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    c = client or MlflowClient()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = os.environ.get(ARTIFACT_ROOT_ENV)
    location = Path(root, name).resolve().as_uri() if root else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between our lookup and create.
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
