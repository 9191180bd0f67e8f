"""The MLflow model registry and the promotion gate.

A registered model belongs to one task: its first registration records the dataset and its pinned
digest on the registered model, and no candidate, split or `force` of another task gets in.
A candidate is registered only after it passed parity. The gate is evaluated on the registered ONNX
artifact (what will be served): validation accuracy >= threshold, parity passed, and not worse than
the champion on the task's validation split by more than the margin. Only then does the `champion`
alias move, in one registry call: a failure before it leaves the previous champion in place.

Prefect retries registration and the gate, so both are idempotent: a run's model is registered once,
and a version that carries a decision keeps it. Only "not found" means absent: any other registry
error propagates and the alias stays where it was.
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
from nn_core.config import GateConfig, default_model_name  # noqa: F401 (default_model_name: re-exported)
from nn_core.export import ParityReport, onnx_accuracy

log = logging.getLogger(__name__)

CHAMPION = "champion"
# Tags on the registered model (not its versions): the task it is bound to.
DATASET_TAG, DIGEST_TAG = "mnistops.dataset", "mnistops.dataset_digest"
PENDING, ACCEPTING, ACCEPTED, REJECTED = "pending", "accepting", "accepted", "rejected"


class TaskMismatchError(ValueError):
    """A candidate, a version or a validation split of another task than the registered model's.
    Never overridden, `force` included."""


@dataclass(frozen=True)
class Task:
    """What a registered model is bound to: a dataset and the digest of its pinned files."""

    dataset: str
    digest: str

    def tags(self) -> dict[str, str]:
        return {DATASET_TAG: self.dataset, DIGEST_TAG: self.digest}

    def __str__(self) -> str:
        return f"{self.dataset} (dataset digest {self.digest})"


def _code(e: MlflowException) -> str:
    return getattr(e, "error_code", "")


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


# ---------------------------------------------------------------------------------------------
# The task a registered model is bound to


def _registered_model(model_name: str):
    """The registered model, or None when there is none of that name. Every other error propagates."""
    try:
        return tracking.client().get_registered_model(model_name)
    except MlflowException as e:
        if _code(e) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _version_task(tags: dict) -> Task | None:
    if tags.get("dataset") and tags.get("dataset_digest"):
        return Task(tags["dataset"], tags["dataset_digest"])
    return None


def _description(model_name: str, task: Task) -> str:
    """What the registry page says of the model: its task, its contract, and what the alias means."""
    return (f"The {task.dataset} MLP as ONNX, bound to that task: every version was trained on and is gated on "
            f"{task.dataset}'s validation split (dataset digest `{task.digest}`); candidates of another dataset "
            "are refused, `mnistops promote --force` included.\n\n"
            "Input `pixels`, uint8 [batch, 28, 28] raw pixels; outputs `logits` and `probabilities`, float32 "
            "[batch, 10]. Each version is a candidate from the training pipeline, its description is its "
            "model card. The `champion` alias marks the version that passed the gate (validation accuracy of "
            "the ONNX model at or above the threshold, ONNX parity, not worse than the previous champion); "
            f"batch inference serves `models:/{model_name}@champion`.")


def _bind(model_name: str, rm, fallback: Task | None) -> Task:
    """The task recorded on `rm`. A registered model from before tasks were recorded is bound to the
    task its versions agree on (or `fallback` when it has none)."""
    tags = rm.tags or {}
    if tags.get(DATASET_TAG) and tags.get(DIGEST_TAG):
        return Task(tags[DATASET_TAG], tags[DIGEST_TAG])
    seen = {t for v in tracking.client().search_model_versions(f"name = '{model_name}'") if (t := _version_task(v.tags))}
    if len(seen) > 1:
        raise TaskMismatchError(
            f"registered model {model_name!r} holds versions of several datasets ({', '.join(sorted(map(str, seen)))}) "
            f"and is bound to none: set its tags {DATASET_TAG} and {DIGEST_TAG} to the task it serves")
    task = next(iter(seen), fallback)
    if task is None:
        raise TaskMismatchError(f"registered model {model_name!r} is bound to no dataset and has no version that names one")
    c = tracking.client()
    for k, v in task.tags().items():
        c.set_registered_model_tag(model_name, k, v)
    if not rm.description:
        c.update_registered_model(model_name, description=_description(model_name, task))
    return task


def _mismatch(model_name: str, bound: Task, other: Task, what: str) -> TaskMismatchError:
    hint = (f"; register it under another name (the default for {other.dataset} is "
            f"{default_model_name(other.dataset)!r})" if other.dataset != bound.dataset else "")
    return TaskMismatchError(f"registered model {model_name!r} is bound to {bound}; {what} is {other}{hint}")


def bound_task(model_name: str) -> Task:
    """The task an existing registered model is bound to (ValueError when there is no such model)."""
    rm = _registered_model(model_name)
    if rm is None:
        raise ValueError(f"no registered model {model_name!r} in {mlflow.get_tracking_uri()}")
    return _bind(model_name, rm, None)


def check_task(model_name: str, task: Task, what: str = "the candidate") -> None:
    """Refuse `task` early (before training) when `model_name` exists and is bound to another task."""
    rm = _registered_model(model_name)
    if rm is not None:
        bound = _bind(model_name, rm, task)
        if bound != task:
            raise _mismatch(model_name, bound, task, what)


def bind_task(model_name: str, task: Task) -> Task:
    """Create `model_name` bound to `task` (its first registration), or check that it is bound to it."""
    c = tracking.client()
    rm = _registered_model(model_name)
    if rm is None:
        try:
            c.create_registered_model(model_name, tags=task.tags(), description=_description(model_name, task))
            return task
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            rm = c.get_registered_model(model_name)  # another pipeline created it first
    bound = _bind(model_name, rm, task)
    if bound != task:
        raise _mismatch(model_name, bound, task, "the candidate")
    return bound


# ---------------------------------------------------------------------------------------------
# Registration


def version_of_run(model_name: str, run_id: str):
    """The version of `model_name` already registered from `run_id`, if any (a run logs one model)."""
    found = tracking.client().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register_candidate(run_id: str, onnx_path: Path, parity: ParityReport, model_name: str,
                       example: np.ndarray, tags: dict[str, str], task: Task) -> str:
    """Log the ONNX model on the training run and register it as a new version of `model_name`, which
    must be bound to `task` (the first registration binds it); returns the version. Refuses a model
    that failed parity or belongs to another task, before anything is registered. Idempotent: a run
    already registered (a retry after a failure past the registration) gets its version back."""
    import onnx
    from mlflow.models import infer_signature

    if not parity.passed:
        raise ValueError(f"{onnx_path}: not registered, parity failed: {parity.reason}")
    bind_task(model_name, task)
    c = tracking.client()
    existing = version_of_run(model_name, run_id)
    if existing is not None:
        version, decided = str(existing.version), existing.tags.get("promotion")
        log.info("run %s is already registered as %s version %s", run_id, model_name, version)
    else:
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
                # One self-contained .onnx file, as exported and parity-checked (MLflow would split the
                # weights into a separate .data file): a download is one file, and serving reads it.
                save_as_external_data=False,
            )
        version, decided = str(info.registered_model_version), None
    # A handful of tags a version list can show (the run id is the version's own field; the parity
    # details and the gate's figures are in the model card, the version's description).
    all_tags = {**tags, "dataset": task.dataset, "dataset_digest": task.digest,
                "parity_max_abs_diff": f"{parity.max_abs_diff:.3g}", "parity_passed": "true"}
    for k, v in all_tags.items():
        c.set_model_version_tag(model_name, version, k, str(v))
    if decided is None:  # a decision already recorded by the gate is never reset
        c.set_model_version_tag(model_name, version, "promotion", PENDING)
    return version


# ---------------------------------------------------------------------------------------------
# The gate


def champion(model_name: str) -> str | None:
    """The champion's version; None only when there is no such model or it has no champion alias.

    Read from the registered model's alias map rather than get_model_version_by_alias: for a missing
    alias that raises INVALID_PARAMETER_VALUE (SQL store and REST server alike), the same code as for
    malformed input, while here "absent" is a dict lookup and the one not-found error is
    RESOURCE_DOES_NOT_EXIST for the model itself. Anything else (network, 5xx) propagates: it must
    never read as "no champion yet"."""
    rm = _registered_model(model_name)
    if rm is None:
        return None
    version = (rm.aliases or {}).get(CHAMPION)
    return None if version is None else str(version)


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
    Across machines the flows use a Prefect global concurrency limit instead (flows/promotion.py)."""
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{model_name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"mnistops-promotion-{key}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _float_tag(tags: dict, key: str) -> float | None:
    value = tags.get(key, "none")
    return None if value == "none" else float(value)


def recorded_decision(model_name: str, version: str, tags: dict) -> GateDecision:
    """The decision recorded on a version's tags."""
    champ = tags.get("promotion.champion_version", "none")
    return GateDecision(
        accepted=tags["promotion"] in (ACCEPTED, ACCEPTING), reason=tags["promotion.reason"], model_name=model_name,
        version=str(version), val_accuracy=float(tags["promotion.val_accuracy"]),
        parity_passed=tags.get("parity_passed") == "true", champion_version=None if champ == "none" else champ,
        champion_val_accuracy=_float_tag(tags, "promotion.champion_val_accuracy"),
        threshold=float(tags["promotion.threshold"]), margin=float(tags["promotion.margin"]),
    )


def _record(model_name: str, version: str, decision: GateDecision, promotion: str) -> None:
    """The decision's figures first, the `promotion` marker last: a failure in between leaves the
    marker as it was, so a retry decides again instead of trusting half a record."""
    c = tracking.client()
    tags = decision.tags()
    tags.pop("promotion")
    for k, v in tags.items():
        c.set_model_version_tag(model_name, version, k, v)
    c.set_model_version_tag(model_name, version, "promotion", promotion)


def gate(model_name: str, version: str, val_images: np.ndarray, val_labels: np.ndarray,
         cfg: GateConfig, force: bool = False, *, task: Task, lock=promotion_lock,
         decide_again: bool = False) -> GateDecision:
    """Decide on `version` and move the champion alias when it is accepted; record the decision as
    tags on the version and its run. The split must be the registered model's own task's (`task`
    names it) and so must the version: TaskMismatchError otherwise, whatever `force` says. `force`
    overrides the figures only. A version that already carries a decision keeps it (a retried gate
    changes nothing) unless `decide_again` (a promotion asked for by hand). `lock` serialises
    promotions of one registered model."""
    version = str(version)
    bound = bound_task(model_name)
    if task != bound:
        raise _mismatch(model_name, bound, task, "the validation split given to the gate")
    c = tracking.client()
    with lock(model_name):
        mv = c.get_model_version(model_name, version)  # read under the lock: another attempt may have decided
        version_task = _version_task(mv.tags)
        if version_task != bound:
            raise _mismatch(model_name, bound, version_task or Task("an unknown dataset", "none"), f"version {version}")
        decision = _decided(model_name, version, mv.tags, decide_again)
        if decision is None:
            decision = _decide(model_name, version, mv.tags, val_images, val_labels, cfg, force)
    if mv.run_id:
        tracking.log_tags(mv.run_id, {**decision.tags(), "registered_version": version})
    return decision


def _decided(model_name: str, version: str, tags: dict, decide_again: bool) -> GateDecision | None:
    """The decision a previous attempt made, completed if it was cut short; None to decide now."""
    state = tags.get("promotion", PENDING)
    if state in (ACCEPTED, REJECTED) and not decide_again:
        return recorded_decision(model_name, version, tags)
    if state == ACCEPTING:
        # Accepted against the champion recorded then: still valid while that one is the champion.
        decision = recorded_decision(model_name, version, tags)
        current = champion(model_name)
        if current in (version, decision.champion_version):
            if current != version:
                tracking.client().set_registered_model_alias(model_name, CHAMPION, version)
            tracking.client().set_model_version_tag(model_name, version, "promotion", ACCEPTED)
            return decision
    return None


def _decide(model_name: str, version: str, tags: dict, val_images, val_labels, cfg: GateConfig,
            force: bool) -> GateDecision:
    c = tracking.client()
    current = champion(model_name)
    candidate_acc = version_accuracy(model_name, version, val_images, val_labels)
    parity_ok = tags.get("parity_passed") == "true"
    if current == version:  # asked by hand to promote the champion itself: nothing to compare
        return GateDecision(True, f"version {version} is already the champion", model_name, version,
                            candidate_acc, parity_ok, None, None, cfg.threshold, cfg.margin)
    champion_acc = None if current is None else version_accuracy(model_name, current, val_images, val_labels)
    accepted, reason = decide(candidate_acc, parity_ok, champion_acc, cfg)
    if force and not accepted:
        accepted, reason = True, f"forced by hand despite: {reason}"
    decision = GateDecision(
        accepted=accepted, reason=reason, model_name=model_name, version=version,
        val_accuracy=candidate_acc, parity_passed=parity_ok, champion_version=current,
        champion_val_accuracy=champion_acc, threshold=cfg.threshold, margin=cfg.margin,
    )
    if not accepted:
        _record(model_name, version, decision, REJECTED)
        return decision
    _record(model_name, version, decision, ACCEPTING)
    c.set_registered_model_alias(model_name, CHAMPION, version)  # the one atomic move
    c.set_model_version_tag(model_name, version, "promotion", ACCEPTED)
    return decision
