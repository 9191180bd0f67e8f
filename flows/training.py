"""The training pipeline flow: prepare data -> train (DDP launch) -> export and parity -> register
-> gate. Thin tasks over nn_core functions; Prefect adds retries, caching, artifacts and the UI."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import settings
from flows.observability import forward_worker_logs, link_mlflow_run, mlflow_context_tags, prefect_note
from flows.ownership import untagged_task_runs
from nn_core import tracking
from nn_core.config import (DataConfig, GateConfig, LaunchSpec, MLPConfig, TrackingConfig, TrainConfig,
                            default_experiment)
from nn_core.data import PreparedDataset, SourceUnavailableError, cache_path, default_data_dir, prepare_dataset
from nn_core.datasets import fingerprint, get_spec
from nn_core.launch import TrainResult, check_launch, launch_training, new_job, new_training_id
from nn_core.registry import GateDecision, Task, TaskMismatchError, check_task
from nn_core.release import ExportResult, complete_unfinished, export_and_check, gate_and_record, register
from nn_core.train import TrainJob
from nn_core.slices import table as slice_table
from common.errors import InputError


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
    slices: list = field(default_factory=list)  # the gate's per-slice comparisons (nn_core.slices)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Tasks: I/O gets retries; each wraps one library function.


def _retry_on_network_errors(task, task_run, state) -> bool:
    """Retry only what a retry can fix: an unreachable source, not a corrupt file or a missing one."""
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
    data: DataConfig = parameters["data"]
    spec = get_spec(data.dataset)
    data_dir = Path(data.data_dir or default_data_dir()).resolve()
    target = cache_path(spec, data_dir)
    if not target.is_file():
        return None
    where = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return f"prepare-{spec.name}-{fingerprint(spec)[:16]}-{where}-{_file_digest(target)[:32]}"


@task(
    name="prepare-data",
    task_run_name="prepare-data {data.dataset}",
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
def prepare_data(data: DataConfig) -> PreparedDataset:
    prepared = prepare_dataset(data)
    get_run_logger().info("dataset %s digest %s splits %s (cache %s)", prepared.name, prepared.digest,
                          prepared.split_sizes, "reused" if prepared.reused_cache else "written")
    return prepared


@task(name="train", cache_policy=NO_CACHE, task_run_name="train {job.tracking.run_name}")
def train_model(job: TrainJob, launch: LaunchSpec) -> TrainResult:
    # The workers are child processes: their output goes to files that are followed into this task
    # run's logs (and, through Prefect's console handler, to the terminal), epoch lines included.
    log_dir = Path(job.out_dir) / "logs"
    with forward_worker_logs(log_dir, get_run_logger()):
        result = launch_training(job, replace(launch, log_dir=str(log_dir)))
    if result is None:
        raise RuntimeError("this node did not host rank 0; the pipeline runs on the node that does")
    get_run_logger().info("trained: val acc %.4f, test acc %.4f, MLflow run %s",
                          result.val_accuracy, result.test_accuracy, result.run_id)
    return result


@task(name="export-and-parity", cache_policy=NO_CACHE, task_run_name="export-and-parity {prepared.name}")
def export_task(result: TrainResult, prepared: PreparedDataset) -> ExportResult:
    exported = export_and_check(result, prepared.cache_path)
    get_run_logger().info("ONNX parity: %s (max |diff| %.2g)", exported.parity.reason, exported.parity.max_abs_diff)
    return exported


def _retry_registry_errors(task, task_run, state) -> bool:
    """A registry error (network, 5xx) is retried; a candidate of another task never will pass."""
    try:
        state.result()
    except (TaskMismatchError, InputError):  # another task, bad feedback: a retry will not change them
        return False
    except Exception:
        return True
    return False


@task(name="feedback", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE,
      retry_condition_fn=_retry_registry_errors,
      task_run_name="feedback {prepared.name}")
def feedback_task(prepared: PreparedDataset, locations: list[str], recorded: bool) -> list[str]:
    """The feedback sets this training takes: those at `locations` recorded for the task first (all
    read and checked before any is recorded; one of another task is refused), plus, with `recorded`,
    every set recorded for the task. Their training parts as files for the workers (content-addressed,
    under MNISTOPS_HOME/feedback)."""
    from serving import feedback as fb

    task = fb.FeedbackTask(prepared.name, prepared.digest)
    sets = {fs.digest: fs for fs in fb.offer(list(locations), task, tracking.client())}
    if recorded:
        sets.update({fs.digest: fs for fs in fb.recorded(task, tracking.client()) if fs.digest not in sets})
    for fs in sets.values():
        get_run_logger().info("feedback set %s (%s): %d records, %d trained on, %d held out for the gate",
                              fs.digest[:12], fs.source, len(fs.labels), len(fs.labels) - len(fs.holdout),
                              len(fs.holdout))
    return fb.write_training_parts(list(sets.values()), settings.configure().home / "feedback")


# Both are idempotent, so a registry hiccup is retried like any other I/O: a retried register finds
# the version it made, a retried gate the decision it recorded (or finishes a promotion cut short).
@task(name="register", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_retry_registry_errors,
      cache_policy=NO_CACHE, task_run_name="register {model_name}")
def register_task(result: TrainResult, exported: ExportResult, prepared: PreparedDataset, model_name: str) -> str:
    return register(result, exported, prepared.cache_path, model_name)


@task(name="gate", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_retry_registry_errors,
      cache_policy=NO_CACHE, task_run_name="gate {model_name} version {version}")
def gate_task(result: TrainResult, exported: ExportResult, version: str, prepared: PreparedDataset,
              model_name: str, gate: GateConfig) -> GateDecision:
    from flows.promotion import deciding_command, promotion_lock
    from nn_core.rollback import COMMAND

    # Versions a killed command left without a decision get theirs first (completed or failed), so
    # that this candidate is compared with the champion of every decision the registry can hold.
    for other, (line, _) in complete_unfinished(model_name, prepared.cache_path, gate, lock=promotion_lock).items():
        get_run_logger().warning("%s version %s: %s", model_name, other, line)
    decision = gate_and_record(result, exported, version, prepared.cache_path, model_name, gate, lock=promotion_lock,
                               extra={COMMAND: deciding_command()})
    get_run_logger().info("gate: version %s %s: %s", version, decision.promotion, decision.reason)
    return decision


# ---------------------------------------------------------------------------------------------
# Shared by the training pipeline and the sweep


def obtain_data(data: DataConfig) -> PreparedDataset:
    """prepare_data, answered from Prefect's cache when that answer is known good: it is keyed on
    the cache file's content, and was stored by a run that verified exactly that content (a run that
    had to rebuild the file stored its answer under the key of the bad content it found). Otherwise
    the file is prepared (verified, or rebuilt from the source) again."""
    state = prepare_data(data, return_state=True)
    prepared = state.result()
    if state.name == "Cached" and (not prepared.reused_cache or not Path(prepared.cache_path).exists()):
        prepared = prepare_data.with_options(refresh_cache=True)(data)
    return prepared


def refuse_other_task(model_name: str, prepared: PreparedDataset) -> None:
    """Fail before training when `model_name` serves another dataset (register checks it again)."""
    check_task(model_name, Task(prepared.name, prepared.digest), "this pipeline's dataset")


def train_job(prepared: PreparedDataset, model: MLPConfig, train: TrainConfig, experiment: str, *,
              data_source: str | None = None, training_id: str | None = None, parent_run_id: str | None = None,
              run_name: str | None = None) -> TrainJob:
    """A training of the pipeline (or a sweep's trial), under MNISTOPS_HOME/runs, tagged with the flow run."""
    tracking_cfg = TrackingConfig(training_id=training_id or new_training_id(), experiment=experiment, run_name=run_name,
                                  parent_run_id=parent_run_id, tags=mlflow_context_tags("training-pipeline"))
    return new_job(prepared, settings.configure().runs_dir, model, train, tracking_cfg, data_source)


def release(result: TrainResult, prepared: PreparedDataset, model_name: str, gate: GateConfig,
            training_id: str, experiment: str) -> PipelineResult:
    """export -> parity -> register -> gate, the same path for a pipeline run and a sweep's best."""
    exported = export_task(result, prepared)
    metrics = {
        "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
        "parity_max_abs_diff": exported.parity.max_abs_diff, "train_seconds": result.metrics["train_seconds"],
    }
    url = settings.run_url(tracking.ensure_experiment(experiment), result.run_id) if result.run_id else None
    link_mlflow_run(url, "mlflow-run", f"MLflow run {result.run_id} ({model_name} candidate)")
    if not exported.parity.passed:
        _note_outcome(result.run_id, f"Not registered: {exported.parity.reason}.")
        return PipelineResult(result.run_id, training_id, model_name, None, False,
                              f"not registered: {exported.parity.reason}", metrics, url)
    version = register_task(result, exported, prepared, model_name)
    decision = gate_task(result, exported, version, prepared, model_name, gate)
    _note_outcome(result.run_id, f"Registered as {model_name} version {version}: "
                                 f"{'promoted to champion' if decision.accepted else 'not promoted'} ({decision.reason}).")
    metrics["onnx_val_accuracy"] = decision.val_accuracy
    if decision.champion_val_accuracy is not None:
        metrics["champion_val_accuracy"] = decision.champion_val_accuracy
    return PipelineResult(result.run_id, training_id, model_name, version, decision.accepted,
                          decision.reason, metrics, url, list(decision.slices))


def _note_outcome(run_id: str | None, sentence: str) -> None:
    """The gate's outcome and the Prefect flow run, appended to the MLflow run's description."""
    if run_id:
        tracking.append_note(run_id, f"{sentence} {prefect_note()}")


def figure(v) -> str:
    """A table cell: accuracies and seconds as 0.9766; a tiny figure (a parity difference of 2e-06)
    in scientific notation rather than as 0.0000."""
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"
    return str(v)


def publish(result: PipelineResult, key: str = "training-pipeline") -> None:
    rows = "\n".join(f"| {k} | {figure(v)} |" for k, v in result.metrics.items())
    per_slice = ""
    if result.slices:
        header, cells = slice_table(result.slices)
        per_slice = ("**Per slice** (the candidate must not trail the champion beyond the tolerance on any):\n\n"
                     f"| {' | '.join(header)} |\n|{'---|' * len(header)}\n"
                     + "".join(f"| {' | '.join(r)} |\n" for r in cells) + "\n")
    verdict = "PROMOTED to champion" if result.promoted else "NOT PROMOTED"
    create_markdown_artifact(
        key=key,
        description=f"{result.model_name} v{result.version}: {verdict}",
        markdown=(
            f"# {result.model_name} version {result.version or '(not registered)'}: {verdict}\n\n"
            f"**Gate:** {result.reason}\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n\n{per_slice}"
            f"MLflow run: [{result.run_id}]({result.run_url})\n"
        ),
    )


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    data: DataConfig = DataConfig(),
    model: MLPConfig = MLPConfig(),
    train: TrainConfig = TrainConfig(),
    launch: LaunchSpec = LaunchSpec(),
    gate: GateConfig = GateConfig(),
    experiment: str | None = None,
    training_id: str | None = None,
    feedback: list[str] | None = None,
    recorded_feedback: bool = False,
) -> PipelineResult:
    """Data -> DDP training -> ONNX export and parity -> registry -> gate -> champion.

    Args:
        data: Which dataset, where its four IDX files come from, where the verified cache lives.
        model: The model's hidden layer sizes (the rest is derived from the data).
        train: Epochs, batch size, Adam's learning rate and weight decay, schedule, seed.
        launch: How the DDP workers start: processes, restarts, device.
        gate: The registered model a candidate competes for, and what it takes to become its champion.
        experiment: MLflow experiment of the training runs (default: DATASET-mlp, the task's own).
        training_id: The id of a killed training to resume from its checkpoint, into the same MLflow run
            (`mnistops run --resume`); default: a new training.
        feedback: Labelled inputs (folders or URL prefixes: images with a labels.csv, or an images file and
            a labels file) to record as feedback sets of the task and train on (their training parts).
        recorded_feedback: Also train on every feedback set recorded for the task (the scheduled retraining).
    """
    check_launch(launch, [train.batch_size], data.dataset)  # before anything starts: one line, no workers
    settings.configure()
    model_name = gate.model_for(data.dataset)
    experiment = experiment or default_experiment(data.dataset)
    with untagged_task_runs():
        prepared = obtain_data(data)
        refuse_other_task(model_name, prepared)
        job = train_job(prepared, model, train, experiment, data_source=data.data_source, training_id=training_id)
        if feedback or recorded_feedback:
            job = replace(job, feedback=tuple(feedback_task(prepared, list(feedback or []), recorded_feedback)))
        result = train_model(job, launch)
        outcome = release(result, prepared, model_name, gate, job.tracking.training_id, experiment)
        publish(outcome)
    print(f"{'PROMOTED' if outcome.promoted else 'NOT PROMOTED'}: {model_name} version {outcome.version}: {outcome.reason}")
    return outcome
