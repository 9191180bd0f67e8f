"""Where the model comes from: an MLflow registry URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`),
another MLflow artifact URI (`runs:/...`), or a local `.onnx` path. Either way the job gets a local
file and a `ModelRef` saying which model version it used.

mlflow is imported inside the functions that need it: a job on a local file with tracking off does
not pay its import time (about a second).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from serving.defaults import DEFAULT_MODEL_URI  # noqa: F401 (re-exported)
from common.errors import ModelSourceError

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class ModelRef:
    uri: str  # as given (a local path made absolute)
    name: str | None  # registered model name; None for a local file
    version: str | None  # registered version; None for a local file
    run_id: str | None  # the MLflow run that logged the model, when known
    path: Path  # the local .onnx file
    drift_reference: str | None = None  # where the version's drift profile is (its tag), when known

    def to_dict(self) -> dict[str, str | None]:
        # A downloaded model's path is a temp folder that is gone after the job: not worth recording.
        return {**asdict(self), "path": None if is_remote(self.uri) else str(self.path)}


def is_remote(uri: str) -> bool:
    return "://" in uri or uri.startswith(("models:/", "runs:/"))


def _find_onnx(folder: Path, uri: str) -> Path:
    files = sorted(folder.rglob("*.onnx"))
    if len(files) != 1:
        raise ModelSourceError(f"{uri}: expected one .onnx file in the model's artifacts, found {len(files)}")
    return files[0]


@contextlib.contextmanager
def _quiet_download() -> Iterator[None]:
    """MLflow draws a download progress bar on stderr even into a log file; off unless on a terminal
    (or the user set MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ or sys.stderr.isatty():
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _download(artifact_uri: str, dst_dir: Path, uri: str) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        with _quiet_download():
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst_dir))
    except (MlflowException, OSError) as e:
        raise ModelSourceError(f"{uri}: cannot download the model ({e})") from e
    local_path = Path(local)
    return local_path if local_path.is_file() else _find_onnx(local_path, uri)


def _from_registry(uri: str, dst_dir: Path) -> ModelRef:
    import mlflow
    from mlflow.exceptions import MlflowException

    from common.settings import mlflow_client

    m = _REGISTRY_URI.match(uri)
    if m is None:
        raise ModelSourceError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name = m["name"]
    client = mlflow_client()
    try:
        mv = (
            client.get_model_version_by_alias(name, m["alias"])
            if m["alias"]
            else client.get_model_version(name, m["version"])
        )
    except MlflowException as e:
        raise ModelSourceError(
            f"{uri}: not found in the model registry at {mlflow.get_registry_uri()} ({e.message})"
        ) from e
    # Download the version the alias pointed at just now, not the alias again: if the alias moves
    # in between, the job still records the version it actually ran.
    path = _download(f"models:/{name}/{mv.version}", dst_dir, uri)
    from serving.drift import VERSION_TAG

    return ModelRef(uri=uri, name=name, version=str(mv.version), run_id=mv.run_id, path=path,
                    drift_reference=(mv.tags or {}).get(VERSION_TAG))


def resolve_model(uri: str, dst_dir: Path) -> ModelRef:
    """A local .onnx file for `uri`; remote models are downloaded into `dst_dir`."""
    if uri.startswith("models:/"):
        return _from_registry(uri, dst_dir)
    if is_remote(uri):
        run = re.match(r"^runs:/(?P<run_id>[^/]+)/", uri)
        return ModelRef(uri, None, None, run["run_id"] if run else None, _download(uri, dst_dir, uri))
    path = Path(uri).expanduser().resolve()
    if not path.is_file():
        raise ModelSourceError(f"{uri}: no such ONNX file (or give a models:/NAME@ALIAS URI)")
    return ModelRef(uri=str(path), name=None, version=None, run_id=None, path=path)
