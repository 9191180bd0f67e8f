"""MLflow experiments and runs as the MLflow UI expects them, for training runs and batch jobs alike.

- `ensure_experiment`: found or created by name, marked as a model-training experiment (MLflow 3
  opens experiments in its GenAI view unless `mlflow.experimentKind` says otherwise) and described.
- `run_context_tags`: the standard tags MLflow's own fluent API fills in (`mlflow.user`,
  `mlflow.source.name`/`type`, `mlflow.source.git.commit`), which runs created through MlflowClient with
  explicit run ids (as this project does, so that restarted workers find their run) would lack.

Torch-free (mlflow-skinny is a base dependency); mlflow is imported on call, so a job that does not
track pays nothing for it.
"""

from __future__ import annotations

import functools
import getpass
import subprocess
from pathlib import Path

from common import settings

ARTIFACT_ROOT_ENV = "MNISTOPS_ARTIFACT_ROOT"
GIT_COMMIT_ENV = "MNISTOPS_GIT_COMMIT"  # set by the images from a build argument: they carry no .git
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the value MLflow 3.17's UI reads as "model training"
NOTE_TAG = "mlflow.note.content"  # the description the UI shows for an experiment or a run


def ensure_experiment(name: str, client=None, description: str | None = None) -> str:
    """The experiment's id, created on first use. With the embedded store, artifacts go under
    MNISTOPS_ARTIFACT_ROOT (set by the entry point) rather than wherever the process happens to run.
    An experiment made before it carried the kind tag gets it (and the description) on the way."""
    from mlflow.exceptions import MlflowException

    from common.settings import mlflow_client

    c = client or mlflow_client()
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING, **({NOTE_TAG: description} if description else {})}
    exp = c.get_experiment_by_name(name)
    if exp is None:
        root = settings.env(ARTIFACT_ROOT_ENV)
        location = Path(root, name).resolve().as_uri() if root else None
        try:
            return c.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:
            # Another process created it between our lookup and create.
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    for key, value in tags.items():
        if key not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the running code: MNISTOPS_GIT_COMMIT (images), else git in the code's folder;
    None when neither knows (then the tag is left out rather than filled with a placeholder)."""
    if commit := settings.env(GIT_COMMIT_ENV, "").strip():
        return commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def run_context_tags(source_name: str, source_type: str = "LOCAL") -> dict[str, str]:
    """`mlflow.user`, `mlflow.source.name`, `mlflow.source.type` (LOCAL for a command, JOB for a
    scheduled deployment) and `mlflow.source.git.commit` when known: the UI's "Created by" and
    "Source" columns."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = settings.env("USER", "unknown")
    tags = {"mlflow.user": user, "mlflow.source.name": source_name, "mlflow.source.type": source_type}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags
