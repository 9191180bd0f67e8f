"""The MLflow model registry and the promotion gate.

A candidate is registered only after it passed parity. The gate is evaluated on the registered ONNX
artifact (what will be served): validation accuracy >= threshold, parity passed, and not worse than
the champion on the same validation split by more than the margin. Only then does the `champion`
alias move, in one registry call: a failure before it leaves the previous champion in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from nn_core import tracking
from nn_core.export import ParityReport, onnx_accuracy

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "mnist-mlp"
CHAMPION = "champion"


@dataclass(frozen=True)
class GateConfig:
    threshold: float = 0.96
    margin: float = 0.0  # how much worse than the champion a candidate may be

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0 or self.margin < 0:
            raise ValueError(f"gate threshold must be in [0, 1] and margin >= 0, got {self.threshold}, {self.margin}")


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    model_name: str
    version: str
    val_accuracy: float
    parity_passed: bool
    champion_version: str | None
    champion_val_accuracy: float | None
    threshold: float
    margin: float

    @property
    def promotion(self) -> str:
        return "accepted" if self.accepted else "rejected"

    def tags(self) -> dict[str, str]:
        return {
            "promotion": self.promotion,
            "promotion.reason": self.reason,
            "promotion.val_accuracy": f"{self.val_accuracy:.6f}",
            "promotion.champion_version": self.champion_version or "none",
            "promotion.champion_val_accuracy": "none" if self.champion_val_accuracy is None else f"{self.champion_val_accuracy:.6f}",
            "promotion.threshold": f"{self.threshold:g}",
            "promotion.margin": f"{self.margin:g}",
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "promotion": self.promotion}


def decide(val_accuracy: float, parity_passed: bool, champion_accuracy: float | None, cfg: GateConfig) -> tuple[bool, str]:
    """The gate's rule, pure: (accepted, reason)."""
    if not parity_passed:
        return False, "ONNX parity check failed"
    if val_accuracy < cfg.threshold:
        return False, f"validation accuracy {val_accuracy:.4f} < threshold {cfg.threshold:.4f}"
    if champion_accuracy is not None and val_accuracy < champion_accuracy - cfg.margin:
        return False, (f"validation accuracy {val_accuracy:.4f} is worse than the champion's "
                       f"{champion_accuracy:.4f} by more than the margin {cfg.margin:g}")
    if champion_accuracy is None:
        return True, f"validation accuracy {val_accuracy:.4f} >= {cfg.threshold:.4f}, parity passed, no champion yet"
    return True, (f"validation accuracy {val_accuracy:.4f} >= {cfg.threshold:.4f}, parity passed, "
                  f"not worse than the champion's {champion_accuracy:.4f} (margin {cfg.margin:g})")


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in ("onnxruntime-gpu", "onnx", "numpy"):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return reqs


def register_candidate(run_id: str, onnx_path: Path, parity: ParityReport, model_name: str,
                       example: np.ndarray, tags: dict[str, str]) -> str:
    """Log the ONNX model on the training run and register it as a new version; returns the version.
    Refuses a model that failed parity: it is never registered as a candidate."""
    import onnx
    from mlflow.models import infer_signature

    if not parity.passed:
        raise ValueError(f"{onnx_path}: not registered, parity failed: {parity.reason}")
    from nn_core.export import onnx_session

    outputs = onnx_session(onnx_path).run(None, {"pixels": example})
    # Named input and outputs, as the ONNX graph and the serving contract call them.
    signature = infer_signature({"pixels": example}, {"logits": outputs[0], "probabilities": outputs[1]})
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name=model_name,  # the run's Models tab lists it by the registered model's name
            signature=signature,
            input_example={"pixels": example},
            registered_model_name=model_name,
            # Decided at load time by whoever serves it; without this every load tries CUDA first.
            onnx_execution_providers=["CPUExecutionProvider"],
            pip_requirements=_pip_requirements(),
        )
    version = str(info.registered_model_version)
    c = tracking.client()
    # A handful of tags a version list can show (the run id is the version's own field; the parity
    # details and the gate's figures are in the model card, the version's description).
    all_tags = {**tags, "parity_max_abs_diff": f"{parity.max_abs_diff:.3g}", "parity_passed": "true",
                "promotion": "pending"}
    for k, v in all_tags.items():
        c.set_model_version_tag(model_name, version, k, str(v))
    return version


def champion(model_name: str) -> str | None:
    try:
        return str(tracking.client().get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None


def version_accuracy(model_name: str, version: str, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of a registered version's ONNX artifact, run in onnxruntime on the given split."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=tmp))
        onnx_file = next(local.rglob("*.onnx"))
        return onnx_accuracy(onnx_file, images, labels)


@contextlib.contextmanager
def promotion_lock(model_name: str):
    """Serialise read-champion -> compare -> move-alias among the pipelines of this machine, so two
    pipelines finishing together cannot both beat the old champion and leave the worse one in place.
    (Across machines, run promotions through one Prefect work queue or concurrency limit.)"""
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{model_name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"mnistops-promotion-{key}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gate(model_name: str, version: str, val_images: np.ndarray, val_labels: np.ndarray,
         cfg: GateConfig, force: bool = False) -> GateDecision:
    """Decide on `version` and move the champion alias when it is accepted; record the decision as
    tags on the version and its run. `force` moves the alias whatever the checks say."""
    c = tracking.client()
    mv = c.get_model_version(model_name, version)
    with promotion_lock(model_name):
        current = champion(model_name)
        candidate_acc = version_accuracy(model_name, version, val_images, val_labels)
        champion_acc = None
        if current is not None and current != str(version):
            champion_acc = version_accuracy(model_name, current, val_images, val_labels)
        parity_ok = mv.tags.get("parity_passed") == "true"
        accepted, reason = decide(candidate_acc, parity_ok, champion_acc, cfg)
        if force and not accepted:
            accepted, reason = True, f"forced by hand despite: {reason}"
        decision = GateDecision(
            accepted=accepted, reason=reason, model_name=model_name, version=str(version),
            val_accuracy=candidate_acc, parity_passed=parity_ok,
            champion_version=current if current != str(version) else None,
            champion_val_accuracy=champion_acc, threshold=cfg.threshold, margin=cfg.margin,
        )
        if accepted:
            c.set_registered_model_alias(model_name, CHAMPION, str(version))  # the one atomic move
    for k, v in decision.tags().items():
        c.set_model_version_tag(model_name, str(version), k, v)
    if mv.run_id:
        tracking.log_tags(mv.run_id, {**decision.tags(), "registered_version": str(version)})
    return decision
