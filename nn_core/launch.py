"""Start the DDP workers with torch's elastic launcher (the engine behind torchrun), from Python."""

from __future__ import annotations

import json
import logging
import os
import threading
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from nn_core import tracking
from nn_core.distributed import cuda_device_count
from nn_core.train import RESULT_NAME, TrainJob, worker_main

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchSpec:
    nproc: int = 1  # CPU processes when there is no CUDA; with CUDA, one process per GPU
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # HOST:PORT for multi-node; a free local port otherwise
    rdzv_id: str | None = None  # the same on every node; also the training id
    max_restarts: int = 0
    device: str = "auto"  # auto | cpu | cuda
    monitor_interval: float = 0.2
    # Workers' stdout/stderr go to files under this folder instead of the terminal, for a caller that
    # forwards them (the Prefect task tails them into its run's logs); None: on the terminal.
    log_dir: str | None = None
    # GPU ids this training may use, one process each (a sweep trial's share); None: every GPU
    devices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TrainResult:
    run_id: str | None
    checkpoint: Path
    val_accuracy: float
    test_accuracy: float
    metrics: dict

    @classmethod
    def read(cls, out_dir: Path) -> "TrainResult":
        d = json.loads((Path(out_dir) / RESULT_NAME).read_text())
        return cls(run_id=d["run_id"], checkpoint=Path(d["checkpoint"]), val_accuracy=d["val_accuracy"],
                   test_accuracy=d["test_accuracy"], metrics=d)


class TrainingError(RuntimeError):
    """The workers failed after the launcher's own restarts; the message carries their error."""


def new_training_id() -> str:
    return uuid.uuid4().hex[:12]


def plan_workers(spec: LaunchSpec, gpu_count: int, cores: int) -> tuple[int, int | None, str]:
    """(processes on this node, torch threads per process, device), from the machine's GPU count and
    usable cores (pure: the launcher passes what it found). With GPUs: one process per GPU of the
    training's share (`spec.devices`, else all). On the CPU: `spec.nproc` processes, one share of the
    cores each: more threads than cores slows every process down."""
    if spec.device == "cuda" and gpu_count == 0:
        raise TrainingError("--device cuda requested but CUDA is not available on this machine")
    if spec.device != "cpu" and gpu_count > 0:
        if spec.devices:
            if any(d < 0 or d >= gpu_count for d in spec.devices) or len(set(spec.devices)) != len(spec.devices):
                raise TrainingError(f"GPU ids {list(spec.devices)}: expected distinct ids in 0..{gpu_count - 1}")
            return len(spec.devices), None, "cuda"
        return gpu_count, None, "cuda"
    return spec.nproc, max(1, cores // spec.nproc), "cpu"


def _processes_and_threads(spec: LaunchSpec) -> tuple[int, int | None, str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return plan_workers(spec, cuda_device_count(spec.device), cores)


def launch_training(job: TrainJob, spec: LaunchSpec) -> TrainResult | None:
    """Run the DDP training; the result on the node that hosts rank 0, None on the other nodes.
    A one-process CPU training with no restarts runs in this process (train_in_process)."""
    nproc, threads, device = _processes_and_threads(spec)
    if spec.nnodes > 1 and not (spec.rdzv_endpoint and spec.rdzv_id):
        raise TrainingError("multi-node training needs --rdzv-endpoint HOST:PORT and --rdzv-id on every node")
    training_id = spec.rdzv_id or job.tracking.training_id
    job = replace(job, threads=threads, device=device, devices=spec.devices if device == "cuda" else None,
                  tracking=replace(job.tracking, training_id=training_id))
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_NAME).unlink(missing_ok=True)
    if in_process_eligible(spec, nproc, device) and _IN_PROCESS.acquire(blocking=False):
        try:
            return train_in_process(job)
        finally:
            _IN_PROCESS.release()
    config = LaunchConfig(
        min_nodes=spec.nnodes,
        max_nodes=spec.nnodes,
        nproc_per_node=nproc,
        run_id=training_id,
        rdzv_backend="c10d",
        # Port 0: the c10d store binds a free port, so two trainings on one machine never collide.
        rdzv_endpoint=spec.rdzv_endpoint or "127.0.0.1:0",
        max_restarts=spec.max_restarts,
        monitor_interval=spec.monitor_interval,
        start_method="spawn",
        logs_specs=_logs_specs(spec.log_dir),
    )
    # Give every restart round a fresh store for the workers' process group. With the store shared
    # with the rendezvous (torch's default), restarted gloo workers read their dead predecessors'
    # addresses and fail to connect (pytorch/pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    log.info("launching %d %s worker(s) x %d node(s), training id %s", nproc, device, spec.nnodes, training_id)
    try:
        # {global rank: return value} of this node's workers only.
        returns = elastic_launch(config, worker_main)(job)
    except Exception as e:  # ChildFailedError carries the workers' tracebacks
        _mark_failed(job)
        raise TrainingError(f"training {training_id} failed after {spec.max_restarts} restart(s):\n{e}") from e
    # With out_dir on a shared volume every node sees rank 0's result.json: only the node whose
    # workers included rank 0 reports it.
    if 0 not in (returns or {}) or not (out_dir / RESULT_NAME).exists():
        return None  # this node did not host rank 0
    return TrainResult.read(out_dir)


def _logs_specs(log_dir: str | None):
    """torch's own per-rank log files: <log_dir>/<run>/attempt_<n>/<rank>/{stdout,stderr}.log."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std

    return DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ALL) if log_dir else None
# ---------------------------------------------------------------------------------------------
# The in-process path: one CPU process, no spawn


# One default process group per process: a second in-process training at the same time (a sweep's
# trials on threads) takes the launcher instead.
_IN_PROCESS = threading.Lock()
IN_PROCESS_ENV = "MNISTOPS_TRAIN_IN_PROCESS"  # "0": always start worker processes


def in_process_eligible(spec: LaunchSpec, nproc: int, device: str) -> bool:
    """A training that needs no launcher: one CPU process on one node with no restarts (a restart
    needs a process to replace). Anything else (nproc > 1, --max-restarts > 0, multi-node, CUDA)
    goes through torch's elastic launcher."""
    if os.environ.get(IN_PROCESS_ENV, "1") == "0":
        return False
    return nproc == 1 and spec.nnodes == 1 and spec.max_restarts == 0 and device == "cpu" \
        and not dist.is_initialized()


def train_in_process(job: TrainJob) -> TrainResult:
    """train() in a gloo process group of one, in this process: the same worker code (rank-0 MLflow
    run, checkpoints and resume, collectives), without spawning a Python that imports torch and MLflow
    again, a rendezvous and a TCP store (seconds of start-up for a training whose epochs take
    fractions of one). An error is reported like a worker's: TrainingError with its traceback, the
    MLflow run marked FAILED."""
    from nn_core.distributed import single_process_group
    from nn_core.train import train

    training_id = job.tracking.training_id
    threads_before = torch.get_num_threads()
    log.info("training %s in this process (1 cpu worker, %s threads)", training_id, job.threads or threads_before)
    try:
        if job.threads:
            torch.set_num_threads(job.threads)
        with single_process_group(job.device) as env:
            train(job, env)
    except Exception as e:
        _mark_failed(job)
        trace = "".join(traceback.format_exception(e)).rstrip()
        raise TrainingError(f"training {training_id} failed (in-process worker, rank 0): {type(e).__name__}: {e}\n"
                            f"{trace}") from e
    finally:
        torch.set_num_threads(threads_before)
    return TrainResult.read(Path(job.out_dir))


def _mark_failed(job: TrainJob) -> None:
    if not job.tracking.enabled:
        return
    try:
        run_id = tracking.find_run(job.tracking.experiment, job.tracking.training_id)
        if run_id:
            tracking.end_run(run_id, "FAILED")
    except Exception as e:  # the training error matters more than this one
        log.warning("could not mark the MLflow run failed: %s", e)
