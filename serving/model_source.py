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


def _registry_error(uri: str, registry: str, e: Exception) -> ModelSourceError:
    """Only "not found" means absent: a server that cannot be reached (MLflow's retries gave up) or
    any other registry failure is reported as what it is, never as a missing model."""
    from common.servers import ServerUnreachable, redact_url, tracking_server

    if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
        return ModelSourceError(f"{uri}: not found in the model registry at {redact_url(registry)} ({e.message})")
    chain, x = [], e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    server = tracking_server()
    if server and any(isinstance(x, ConnectionError) or type(x).__name__ in ("ConnectionError", "ConnectTimeout")
                      for x in chain):
        return ServerUnreachable(f"MLFLOW_TRACKING_URI={redact_url(server)}: the MLflow tracking server cannot be "
                                 f"reached (looking up {uri})")
    first = next((line.strip() for line in str(getattr(e, "message", e)).splitlines() if line.strip()), "")
    return ModelSourceError(f"{uri}: the model registry at {redact_url(registry)} failed ({first})")


def _lookup(client, name: str, alias: str | None, version: str | None):
    """The model version; RESOURCE_DOES_NOT_EXIST (an MlflowException) when the model, the version
    or the alias is not there. A missing alias is looked up in the model's alias map: MLflow raises
    INVALID_PARAMETER_VALUE for it, the code of other failures too."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    if version is not None:
        return client.get_model_version(name, version)
    rm = client.get_registered_model(name)
    if alias not in (rm.aliases or {}):
        raise MlflowException(f"registered model {name!r} has no alias {alias!r}", error_code=RESOURCE_DOES_NOT_EXIST)
    return client.get_model_version(name, str(rm.aliases[alias]))


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
        mv = _lookup(client, name, m["alias"], m["version"])
    except MlflowException as e:
        raise _registry_error(uri, mlflow.get_registry_uri(), e) from e
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
