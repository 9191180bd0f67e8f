"""The training pipeline flow: prepare data -> train (DDP launch) -> export and parity -> register
-> gate. Thin tasks over nn_core functions; Prefect adds retries, caching, artifacts and the UI."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import settings
from nn_core import tracking
from nn_core.data import PreparedDataset, SourceUnavailableError, cache_path, default_data_dir, prepare
from nn_core.datasets import fingerprint, get_spec
from nn_core.launch import LaunchSpec, TrainResult, launch_training, new_training_id
from nn_core.model import MLPConfig
from nn_core.registry import GateConfig, GateDecision
from nn_core.release import ExportResult, export_and_check, gate_and_record, register
from nn_core.train import TrackingConfig, TrainConfig, TrainJob


@dataclass(frozen=True)
class PipelineResult:
    """What a training pipeline run returns (and `mnistops run` prints)."""

    run_id: str | None
    training_id: str
    model_name: str
    version: str | None
    promoted: bool
    reason: str
    metrics: dict = field(default_factory=dict)
    run_url: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Tasks: I/O gets retries; each wraps one library function.


def _retry_on_network_errors(task, task_run, state) -> bool:
    """Retry only what a retry can fix: an unreachable source, not a corrupt file."""
    try:
        state.result()
    except SourceUnavailableError:
        return True
    except Exception:
        return False
    return False


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_cache_key(context, parameters) -> str | None:
    """The dataset's pinned fingerprint and the SHA-256 of the cache file as it is now: a cache file
    changed or corrupted since is a different key, so its stale answer is never handed out. No
    cache file yet: no key (nothing cached; the task builds it)."""
    spec = get_spec(parameters["dataset"])
    data_dir = Path(parameters.get("data_dir") or default_data_dir()).resolve()
    target = cache_path(spec, data_dir)
    if not target.is_file():
        return None
    where = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return f"prepare-{spec.name}-{fingerprint(spec)[:16]}-{where}-{_file_digest(target)[:32]}"


@task(
    name="prepare-data",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    retry_condition_fn=_retry_on_network_errors,
    cache_key_fn=_data_cache_key,
    cache_expiration=datetime.timedelta(days=7),
    persist_result=True,
    # JSON, not pickle: a cached answer is data to read, never code to run. It is stored under
    # MNISTOPS_HOME (PREFECT_LOCAL_STORAGE_PATH, set by flows.settings.configure).
    result_serializer="json",
)
def prepare_data(dataset: str, data_source: str | None, data_dir: str | None = None) -> PreparedDataset:
    prepared = prepare(get_spec(dataset), data_source, Path(data_dir) if data_dir else None)
    get_run_logger().info("dataset %s digest %s splits %s (cache %s)", prepared.name, prepared.digest,
                          prepared.split_sizes, "reused" if prepared.reused_cache else "written")
    return prepared


@task(name="train", cache_policy=NO_CACHE)
def train_model(job: TrainJob, launch: LaunchSpec) -> TrainResult:
    result = launch_training(job, launch)
    if result is None:
        raise RuntimeError("this node did not host rank 0; the pipeline runs on the node that does")
    get_run_logger().info("trained: val acc %.4f, test acc %.4f, MLflow run %s",
                          result.val_accuracy, result.test_accuracy, result.run_id)
    return result


@task(name="export-and-parity", cache_policy=NO_CACHE)
def export_task(result: TrainResult, prepared: PreparedDataset) -> ExportResult:
    exported = export_and_check(result, prepared.cache_path)
    get_run_logger().info("ONNX parity: %s (max |diff| %.2g)", exported.parity.reason, exported.parity.max_abs_diff)
    return exported


@task(name="register", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def register_task(result: TrainResult, exported: ExportResult, prepared: PreparedDataset, model_name: str) -> str:
    return register(result, exported, prepared.cache_path, model_name)


# Re-running the gate is safe (it decides again under the lock and moves the alias at most once),
# so a registry hiccup is retried like any other I/O.
@task(name="gate", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def gate_task(result: TrainResult, exported: ExportResult, version: str, prepared: PreparedDataset,
              model_name: str, gate: GateConfig) -> GateDecision:
    decision = gate_and_record(result, exported, version, prepared.cache_path, model_name, gate)
    get_run_logger().info("gate: version %s %s: %s", version, decision.promotion, decision.reason)
    return decision


# ---------------------------------------------------------------------------------------------
# Shared by the training pipeline and the sweep


def obtain_data(dataset: str, data_source: str | None, data_dir: str | None) -> PreparedDataset:
    """prepare_data, answered from Prefect's cache when that answer is known good: it is keyed on
    the cache file's content, and was stored by a run that verified exactly that content (a run that
    had to rebuild the file stored its answer under the key of the bad content it found). Otherwise
    the file is prepared (verified, or rebuilt from the source) again."""
    state = prepare_data(dataset, data_source, data_dir, return_state=True)
    prepared = state.result()
    if state.name == "Cached" and (not prepared.reused_cache or not Path(prepared.cache_path).exists()):
        prepared = prepare_data.with_options(refresh_cache=True)(dataset, data_source, data_dir)
    return prepared


def train_job(prepared: PreparedDataset, *, hidden: list[int], epochs: int, batch_size: int, lr: float,
              weight_decay: float, schedule: str, seed: int, data_source: str | None, experiment: str,
              training_id: str | None = None, parent_run_id: str | None = None,
              run_name: str | None = None) -> TrainJob:
    cfg = settings.configure()
    training_id = training_id or new_training_id()
    return TrainJob(
        data_path=str(prepared.cache_path),
        out_dir=str(cfg.runs_dir / training_id),
        model=MLPConfig(hidden=tuple(hidden)),
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                          schedule=schedule, seed=seed),
        tracking=TrackingConfig(training_id=training_id, experiment=experiment, run_name=run_name,
                                parent_run_id=parent_run_id),
        data_source=data_source,
    )


def release(result: TrainResult, prepared: PreparedDataset, model_name: str, gate: GateConfig,
            training_id: str, experiment: str) -> PipelineResult:
    """export -> parity -> register -> gate, the same path for a pipeline run and a sweep's best."""
    exported = export_task(result, prepared)
    metrics = {
        "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
        "parity_max_abs_diff": exported.parity.max_abs_diff, "train_seconds": result.metrics["train_seconds"],
    }
    url = settings.run_url(tracking.ensure_experiment(experiment), result.run_id) if result.run_id else None
    if not exported.parity.passed:
        return PipelineResult(result.run_id, training_id, model_name, None, False,
                              f"not registered: {exported.parity.reason}", metrics, url)
    version = register_task(result, exported, prepared, model_name)
    decision = gate_task(result, exported, version, prepared, model_name, gate)
    metrics["onnx_val_accuracy"] = decision.val_accuracy
    if decision.champion_val_accuracy is not None:
        metrics["champion_val_accuracy"] = decision.champion_val_accuracy
    return PipelineResult(result.run_id, training_id, model_name, version, decision.accepted,
                          decision.reason, metrics, url)


def publish(result: PipelineResult, key: str = "training-pipeline") -> None:
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.metrics.items())
    verdict = "PROMOTED to champion" if result.promoted else "NOT PROMOTED"
    create_markdown_artifact(
        key=key,
        description=f"{result.model_name} v{result.version}: {verdict}",
        markdown=(
            f"# {result.model_name} version {result.version or '(not registered)'}: {verdict}\n\n"
            f"**Gate:** {result.reason}\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n\n"
            f"MLflow run: [{result.run_id}]({result.run_url})\n"
        ),
    )


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    dataset: str = "mnist",
    data_source: str | None = None,
    hidden: list[int] = [50],  # noqa: B006 (Prefect parameters are validated copies)
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    seed: int = 0,
    nproc: int = 1,
    max_restarts: int = 0,
    device: str = "auto",
    gate_threshold: float = 0.96,
    gate_margin: float = 0.0,
    model_name: str = "mnist-mlp",
    experiment: str = "mnist-mlp",
    data_dir: str | None = None,
    training_id: str | None = None,
) -> PipelineResult:
    """Data -> DDP training -> ONNX export and parity -> registry -> gate -> champion.
    `training_id` of a killed training resumes it from its checkpoint, into the same MLflow run."""
    settings.configure()
    gate = GateConfig(threshold=gate_threshold, margin=gate_margin)
    prepared = obtain_data(dataset, data_source, data_dir)
    job = train_job(prepared, hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, schedule=schedule, seed=seed, data_source=data_source,
                    experiment=experiment, training_id=training_id)
    result = train_model(job, LaunchSpec(nproc=nproc, max_restarts=max_restarts, device=device))
    outcome = release(result, prepared, model_name, gate, job.tracking.training_id, experiment)
    publish(outcome)
    print(f"{'PROMOTED' if outcome.promoted else 'NOT PROMOTED'}: {model_name} version {outcome.version}: {outcome.reason}")
    return outcome
