"""From a finished training to a gated registry version: export -> parity -> register -> gate -> card.
Each step is one function, so that a flow can make a task of each."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nn_core import metrics as M
from nn_core import tracking
from nn_core.card import model_card
from nn_core.checkpoint import load_model
from nn_core.data import load_splits
from nn_core.datasets import get_spec
from nn_core.export import ParityReport, check_parity, export_onnx
from nn_core.launch import TrainResult
from nn_core import registry
from nn_core.registry import GateConfig, GateDecision, Task, TaskMismatchError, gate, promotion_lock, register_candidate
from serving.drift import VERSION_TAG as DRIFT_TAG
from serving.drift import store_reference


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    parity: ParityReport


def export_and_check(result: TrainResult, data_path: Path, onnx_path: Path | None = None) -> ExportResult:
    """Export the trained model to ONNX and check parity on the validation split; log the figures
    as metrics of the training run."""
    model, _ = load_model(result.checkpoint)
    splits = load_splits(data_path)
    onnx_path = Path(onnx_path or Path(result.checkpoint).with_name("model.onnx"))
    export_onnx(model, onnx_path)
    parity = check_parity(model, onnx_path, splits.val_images, splits.val_labels)
    if result.run_id:
        tracking.log_metrics(result.run_id, parity.metrics())
        tracking.log_tags(result.run_id, {"parity": "passed" if parity.passed else f"failed: {parity.reason}",
                                          **parity.tags()})
    return ExportResult(onnx_path=onnx_path, parity=parity)


def task_of(splits) -> Task:
    return Task(splits.name, splits.digest)


def register(result: TrainResult, exported: ExportResult, data_path: Path, model_name: str) -> str:
    """Register the candidate under `model_name`, bound to the candidate's dataset (refused when the
    registered model serves another one). Idempotent: a retry returns the version already made."""
    splits = load_splits(data_path)
    version = register_candidate(result.run_id, exported.onnx_path, exported.parity, model_name,
                                 splits.val_images[:2].numpy(), task_of(splits))
    # The drift reference profile (serving.drift), stored with the version: what batch jobs compare with.
    # It describes what the version was trained on: the training split and the feedback training parts,
    # pooled, and each feedback set as a component of its own.
    store_reference(model_name, version, result.run_id, exported.onnx_path, trained_on(splits, result),
                    splits.val_images.numpy(), feedback_components(result))
    link_model_metrics(result, model_name, version)
    return version


def trained_on(splits, result: TrainResult) -> np.ndarray:
    """The images a training saw: the training split plus its feedback parts (result.json lists them)."""
    parts = result.metrics.get("feedback") or []
    images = [splits.train_images.numpy()]
    for path in parts:
        with np.load(path, allow_pickle=False) as z:
            images.append(z["images"])
    return np.concatenate(images) if parts else images[0]


def feedback_components(result: TrainResult) -> tuple[tuple[str, np.ndarray, np.ndarray], ...]:
    """(name, training part, held-out part) of each feedback set the training took (its parts' files)."""
    from serving.feedback import set_name

    out = []
    for path in result.metrics.get("feedback") or []:
        with np.load(path, allow_pickle=False) as z:
            held_out = z["holdout_images"] if "holdout_images" in z.files else z["images"][:0]
            out.append((set_name(str(z["digest"])), z["images"], held_out))
    return tuple(out)


def link_model_metrics(result: TrainResult, model_name: str, version: str) -> None:
    """Attach the run's final validation accuracy to the logged model (MLflow 3's model page shows a
    model's own metrics). The point is the series' last one, re-sent with the model's id: same key,
    step, value and timestamp, so the run's history gains no duplicate."""
    c = tracking.client()
    model_id = logged_model_id(model_name, version)
    history = c.get_metric_history(result.run_id, M.VAL_ACCURACY) if model_id else []
    if history:
        last = max(history, key=lambda m: (m.step, m.timestamp))
        c.log_metric(result.run_id, M.VAL_ACCURACY, last.value, timestamp=last.timestamp, step=last.step,
                     model_id=model_id)


def logged_model_id(model_name: str, version: str) -> str | None:
    """The MLflow 3 logged model behind a registered version: its source is `models:/<model id>`
    (the version's own model_id field is left empty by the SQL store)."""
    mv = tracking.client().get_model_version(model_name, version)
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def gate_and_record(result: TrainResult, exported: ExportResult, version: str, data_path: Path,
                    model_name: str, cfg: GateConfig, lock=promotion_lock, extra: dict | None = None) -> GateDecision:
    """Run the gate on the registered version, then attach the model card to the run and the version.
    `extra`: more fields for the decision record (who decides: nn_core.rollback.COMMAND)."""
    splits = load_splits(data_path)
    decision = gate(model_name, version, splits.val_images.numpy(), splits.val_labels.numpy(), cfg,
                    task=task_of(splits), lock=lock, extra=extra)
    _, ckpt = load_model(result.checkpoint)
    card = model_card(
        model_name=model_name, version=version, run_id=result.run_id, dataset=splits.name,
        digest=splits.digest, split_sizes=splits.sizes(), model_config=ckpt["model_config"],
        train_config=ckpt["train_config"], train_metrics=result.metrics, parity=exported.parity.to_dict(),
        decision=decision.to_dict(), classes=list(get_spec(splits.name).classes),
    )
    c = tracking.client()
    c.update_model_version(model_name, version, description=card)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_card.md"
        path.write_text(card)
        c.log_artifact(result.run_id, str(path))
    return decision


# ---------------------------------------------------------------------------------------------
# Versions left without a decision by a registration that was cut short (the command killed)


def complete_unfinished(model_name: str, data_path: Path, cfg: GateConfig,
                        lock=promotion_lock) -> dict[str, tuple[str, GateDecision | None]]:
    """Give every abandoned version of `model_name` (registry.abandoned_versions) its decision:
    completed (drift reference stored, then gated like any candidate) when its run finished and its
    ONNX export is intact and of the model's task, else marked failed. Returns {version: (one line
    saying which, the decision or None when it was marked failed)}."""
    out = {}
    for mv in registry.abandoned_versions(model_name):
        version = str(mv.version)
        why = _of_another_task(model_name, mv) or _not_completable(model_name, mv)
        if why is None:
            try:
                decision = _complete(model_name, mv, load_splits(data_path), cfg, lock)
                out[version] = (f"its registration was cut short; completed now: {decision.promotion} "
                                f"({decision.reason})", decision)
                continue
            except TaskMismatchError as e:
                why = str(e)
        with lock(model_name):
            if registry.undecided(tracking.client().get_model_version(model_name, version).tags):
                registry.mark_failed(model_name, version, f"registration cut short, cannot be completed: {why}")
        out[version] = (f"its registration was cut short and it cannot be completed: marked failed ({why})", None)
    return out


def _of_another_task(model_name: str, mv) -> str | None:
    """Why a cut-short version is not of the model's task (its run's own record), checked before its
    export is loaded: such a version is never completed. None when it is of the task."""
    try:
        registry.check_version(model_name, mv, registry.bound_task(model_name))
    except TaskMismatchError as e:
        return str(e)
    return None


def _not_completable(model_name: str, mv) -> str | None:
    """Why a cut-short version cannot be completed (None: it can): its run did not finish, or its
    registered ONNX file is missing or does not load."""
    from nn_core.export import onnx_session

    if not mv.run_id:
        return "it has no run"
    status = tracking.client().get_run(mv.run_id).info.status
    if status != "FINISHED":
        return f"its run {mv.run_id} is {status}, not FINISHED"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(registry.mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model_name}/{mv.version}", dst_path=tmp))
            onnx_session(next(local.rglob("*.onnx")))
    except Exception as e:  # a missing or corrupt export: the version is marked failed, naming why
        return f"its ONNX export is not intact ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _complete(model_name: str, mv, splits, cfg: GateConfig, lock) -> GateDecision:
    version = str(mv.version)
    registry.check_version(model_name, mv, registry.bound_task(model_name))  # before anything is added
    if DRIFT_TAG not in (mv.tags or {}):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(registry.mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model_name}/{version}", dst_path=tmp))
            store_reference(model_name, version, mv.run_id, next(local.rglob("*.onnx")),
                            splits.train_images.numpy(), splits.val_images.numpy())
    decision = gate(model_name, version, splits.val_images.numpy(), splits.val_labels.numpy(), cfg,
                    task=task_of(splits), lock=lock, extra={"completed": "registration cut short, completed by a later command"})
    tracking.client().update_model_version(model_name, version, description=(
        f"# {model_name} version {version}\n\nIts registration was cut short (the command ended); a later "
        f"command completed it.\n\n**Gate decision: {decision.promotion.upper()}**: {decision.reason}\n"))
    return decision
