"""Start the DDP workers with torch's elastic launcher (the engine behind torchrun), from Python."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from nn_core import reaping, tracking
from nn_core.config import LaunchSpec, MLPConfig, TrackingConfig, TrainConfig
from nn_core.distributed import bound_socket, cuda_device_count, host_store
from nn_core.machine import check_request, this_machine, usable_cores
from nn_core.train import RESULT_NAME, STOPPING, TrainJob, default_run_name
from nn_core.worker import WORKER_MODULE
from common import settings
from common.atomic import atomic_path

log = logging.getLogger(__name__)


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


# STOPPING (nn_core.train) is set when the command is being stopped (SIGINT/SIGTERM): workers that die
# now were stopped, not failed, and an in-process training ends after its epoch.


class TrainingError(RuntimeError):
    """The workers failed after the launcher's own restarts; the message carries their error."""


def new_training_id() -> str:
    return uuid.uuid4().hex[:12]


def new_job(prepared, runs_dir: Path, model: MLPConfig, train: TrainConfig, tracking_cfg: TrackingConfig,
            data_source: str | None = None) -> TrainJob:
    """The job of one training on `prepared` (a PreparedDataset): its folder under `runs_dir`, its
    MLflow run named after its config unless named. Nothing is written yet (rank 0 makes the run)."""
    job = TrainJob(data_path=str(prepared.cache_path), out_dir=str(Path(runs_dir) / tracking_cfg.training_id),
                   model=model, train=train, tracking=tracking_cfg, data_source=data_source)
    # Named here, so that a Prefect task run and the MLflow run can carry the same name.
    return replace(job, tracking=replace(tracking_cfg, run_name=tracking_cfg.run_name or default_run_name(job)))


def plan_workers(spec: LaunchSpec, gpu_count: int, cores: int,
                 threads: int | None = None) -> tuple[int, int | None, str]:
    """(processes on this node, torch threads per process, device), from the machine's GPU count and
    usable cores (pure: the launcher passes what it found). With GPUs: one process per GPU of the
    training's share (`spec.devices`, else all). On the CPU: `spec.nproc` processes, `threads` each
    when the user set them (OMP_NUM_THREADS, as torchrun reads it: the cores may be shared with other
    work), else one share of the cores each: more threads than cores slows every process down."""
    if spec.device == "cuda" and gpu_count == 0:
        raise TrainingError("--device cuda requested but CUDA is not available on this machine")
    if spec.device != "cpu" and gpu_count > 0:
        if spec.devices:
            if any(d < 0 or d >= gpu_count for d in spec.devices) or len(set(spec.devices)) != len(spec.devices):
                raise TrainingError(f"GPU ids {list(spec.devices)}: expected distinct ids in 0..{gpu_count - 1}")
            return len(spec.devices), None, "cuda"
        return gpu_count, None, "cuda"
    return spec.nproc, threads or max(1, cores // spec.nproc), "cpu"


def threads_set() -> int | None:
    """OMP_NUM_THREADS when the user set it; TrainingError for a value that is not a positive count."""
    value = settings.env("OMP_NUM_THREADS")
    if value is None or not value.strip():
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise TrainingError(f"OMP_NUM_THREADS={value!r}: expected a positive whole number of threads")
    return int(value)


def _processes_and_threads(spec: LaunchSpec) -> tuple[int, int | None, str]:
    return plan_workers(spec, cuda_device_count(spec.device), usable_cores(), threads_set())


def check_launch(spec: LaunchSpec, batch_sizes: Iterable[int] = (), dataset: str | None = None,
                 trainings: int = 1) -> None:
    """nn_core.machine.check_request with this machine's figures, its GPUs as torch counts them:
    BeyondMachine (a usage error) for more workers than the cores or memory allow, or a batch larger
    than `dataset`'s training split. `trainings`: how many such launches run at once (a sweep's)."""
    machine = this_machine(gpus=cuda_device_count(spec.device))
    check_request(spec.nproc, spec.device, batch_sizes, dataset, machine, trainings, spec.devices)


def launch_training(job: TrainJob, spec: LaunchSpec) -> TrainResult | None:
    """Run the DDP training; the result on the node that hosts rank 0, None on the other nodes.
    A one-process CPU training with no restarts runs in this process (train_in_process). A request
    beyond this machine (nn_core.machine) is refused before anything is written or started."""
    check_launch(spec)
    nproc, threads, device = _processes_and_threads(spec)
    if job.train.batch_size % (nproc * spec.nnodes):
        raise ValueError(f"batch size {job.train.batch_size} is not divisible by the {nproc * spec.nnodes} "
                         "worker processes (the global batch is split evenly across them)")
    if spec.nnodes > 1 and not (spec.rdzv_endpoint and spec.rdzv_id):
        raise TrainingError("multi-node training needs --rdzv-endpoint HOST:PORT and --rdzv-id on every node")
    job = replace(job, threads=threads, device=device, devices=spec.devices if device == "cuda" else None,
                  tracking=replace(job.tracking, training_id=spec.rdzv_id or job.tracking.training_id))
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_NAME).unlink(missing_ok=True)
    write_job(job, out_dir)
    # The workers' MLflow run names this process as its owner (nn_core.reaping).
    os.environ[reaping.OWNER_PID_ENV] = str(os.getpid())
    if in_process_eligible(spec, nproc, device) and _IN_PROCESS.acquire(blocking=False):
        try:
            return train_in_process(job)
        finally:
            _IN_PROCESS.release()
    returns = _elastic_launch(job, spec, nproc, device)
    # With out_dir on a shared volume every node sees rank 0's result.json: only the node whose
    # workers included rank 0 reports it.
    if 0 not in (returns or {}) or not (out_dir / RESULT_NAME).exists():
        return None  # this node did not host rank 0
    return TrainResult.read(out_dir)


def _elastic_launch(job: TrainJob, spec: LaunchSpec, nproc: int, device: str) -> dict:
    """torch's elastic agent runs this node's `nproc` workers: {global rank: return value} of them."""
    training_id = job.tracking.training_id
    # Give every restart round a fresh store for the workers' process group. With the store shared
    # with the rendezvous (torch's default), restarted gloo workers read their dead predecessors'
    # addresses and fail to connect (pytorch/pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    log.info("launching %d %s worker(s) x %d node(s), training id %s", nproc, device, spec.nnodes, training_id)
    # torch's agent replaces the SIGTERM/SIGINT/SIGHUP handlers for the launch (it stops the workers
    # and raises SignalException) and leaves its own behind; the caller's come back afterwards.
    saved = _signal_handlers()
    try:
        with rendezvous_store(spec) as (endpoint, rdzv_configs):
            config = LaunchConfig(
                min_nodes=spec.nnodes, max_nodes=spec.nnodes, nproc_per_node=nproc, run_id=training_id,
                rdzv_backend="c10d", rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs,
                # One node: the workers' own store and MASTER_ADDR are on the loopback too.
                local_addr="127.0.0.1" if spec.nnodes == 1 else None,
                max_restarts=spec.max_restarts, monitor_interval=spec.monitor_interval,
                logs_specs=_logs_specs(spec.log_dir),
            )
            # A binary entrypoint: torch's agent starts each worker with subprocess.Popen (its own
            # session, no multiprocessing resource tracker), and nn_core.worker arms the parent-death
            # signal before the worker imports torch.
            return elastic_launch(config, sys.executable)(*worker_command(job, spec.nnodes == 1))
    except SignalException:  # stopped from outside: the workers are down, the run is resumable
        _mark_ended(job, "KILLED")
        raise
    except Exception as e:  # ChildFailedError carries the workers' tracebacks
        _mark_ended(job, "KILLED" if STOPPING.is_set() else "FAILED")
        raise TrainingError(f"training {training_id} failed after {spec.max_restarts} restart(s): "
                            f"{_root_cause(e)}") from e
    finally:
        _restore(saved)


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
    if settings.env(IN_PROCESS_ENV, "1") == "0":
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
        _mark_ended(job, "KILLED" if STOPPING.is_set() else "FAILED")
        trace = "".join(traceback.format_exception(e)).rstrip()
        raise TrainingError(f"training {training_id} failed (in-process worker, rank 0): {type(e).__name__}: {e}\n"
                            f"{trace}") from e
    except BaseException:  # stopped from outside (Ctrl-C, SIGTERM): the run is resumable
        _mark_ended(job, "KILLED")
        raise
    finally:
        torch.set_num_threads(threads_before)
    return TrainResult.read(Path(job.out_dir))



# ---------------------------------------------------------------------------------------------
# Where the rendezvous store listens (nn_core.distributed.host_store says why it is hosted here).


@contextlib.contextmanager
def rendezvous_store(spec: LaunchSpec) -> Iterator[tuple[str, dict]]:
    """(rdzv endpoint, rdzv configs) for the launch: one node on 127.0.0.1 (a free port), several
    nodes where --rdzv-endpoint says (hosted here if this machine has that address)."""
    if spec.nnodes == 1 and not spec.rdzv_endpoint:
        host, port = "127.0.0.1", 0
    else:
        host, _, port_text = spec.rdzv_endpoint.rpartition(":")
        host, port = host.strip("[]"), int(port_text)
    sock = bound_socket(host, port)
    store = None
    if sock is not None:
        try:
            store = host_store(sock)
        except (RuntimeError, OSError):  # another node's launcher on this machine got there first
            sock.close()
    if store is None:  # another machine (or process) hosts it: connect as a client
        yield f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", {"is_host": False}
        return
    try:
        yield f"{host}:{store.port}" if ":" not in host else f"[{host}]:{store.port}", {"is_host": False}
    finally:
        del store


def worker_command(job: TrainJob, one_node: bool) -> tuple[str, ...]:
    """The arguments after the interpreter of every worker of this launch: no current folder on its
    path (-P), unbuffered output (-u, as torchrun's), this launcher's own copy of the project first
    on its path (installed, on PYTHONPATH or a checkout: the workers run the code the launcher runs,
    as multiprocessing's spawn did by handing its sys.path over), then nn_core.worker.main with this
    process's pid (the parent it must die with) and the job, on the command line rather than in a
    file a concurrent launch or another node could rewrite."""
    root = str(Path(sys.modules[WORKER_MODULE].__file__).resolve().parents[1])
    bootstrap = f"import sys; sys.path.insert(0, sys.argv.pop(1)); from {WORKER_MODULE} import main; main(sys.argv[1:])"
    from dataclasses import asdict

    return ("-P", "-u", "-c", bootstrap, root, str(os.getpid()), "local" if one_node else "multi-node",
            json.dumps(asdict(job)))


JOB_NAME = "job.json"


def write_job(job: TrainJob, out_dir: Path) -> None:
    """What this training is, beside its checkpoint: `mnistops run --resume` reads it back."""
    from dataclasses import asdict

    with atomic_path(out_dir / JOB_NAME) as tmp:
        tmp.write_text(json.dumps(asdict(job), indent=2))


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}


def _restore(saved: dict) -> None:
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)


def _root_cause(e: Exception) -> str:
    """The first failed worker's own error ("ValueError: ..."), not the launcher's report around it."""
    failures = getattr(e, "failures", None) or {}
    for _, failure in sorted(failures.items()):
        message = str(getattr(failure, "message", "") or "").strip()
        if message:
            return message.splitlines()[-1] if message.startswith("Traceback") else message.splitlines()[0]
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _mark_ended(job: TrainJob, status: str) -> None:
    if not job.tracking.enabled:
        return
    try:
        run_id = tracking.find_run(job.tracking.experiment, job.tracking.training_id)
        if run_id:
            tracking.end_run(run_id, status)
    except Exception as e:  # the training error matters more than this one
        log.warning("could not mark the MLflow run %s: %s", status, e)
