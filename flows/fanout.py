"""Batch scoring fanned out over an existing engine: Dask, through Prefect's task runner (prefect-dask).

`mnistops infer --inbox URL --workers N` runs N inbox workers as Prefect tasks on a Dask cluster:
a local one (N worker processes on this machine, one thread each) by default, or an existing one by
address (`--dask-address tcp://HOST:8786`, or MNISTOPS_DASK_ADDRESS). Each worker is the batch job's
own inbox loop (serving.inbox.run_inbox): it claims inputs through the ledger's leases, so workers
cooperate with nothing shared but the output location, exactly like K pods of `python -m serving`.
There is no pool of ours: Dask starts, watches and stops the processes.

Why Dask rather than Ray: prefect-dask is maintained by Prefect itself; a LocalCluster is plain
processes on this machine (no object store or raylet daemons to outlive the command: Dask's worker
processes exit when the process that started them dies, by a pipe that closes, SIGKILL included); the
same code scales to an existing cluster (dask-kubernetes, dask-jobqueue, a `dask scheduler` of a
team) by its address.

Prefect-free at import: the options are parsed and checked before Prefect or onnxruntime load.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from common import settings
from common.resources import mem_available, usable_cores
from common.fields import check, setting

DASK_ADDRESS_ENV = "MNISTOPS_DASK_ADDRESS"

# Memory one local scoring worker needs: a Dask worker process that has imported the batch job
# (onnxruntime, pyarrow, MLflow's client, Prefect's task engine) and scored an inbox of 20 .npy inputs
# of 15,000 images at batch 1024 peaked at 302-306 MiB (VmHWM; bench/bench_fanout.py prints it,
# 2026-12-03); 400 leaves room for an image-folder input's decoding buffers.
WORKER_MEMORY_MIB = 400


@dataclass(frozen=True)
class FanOut:
    """How an inbox run is spread over workers (`infer --workers`, the flow's `fan_out` parameter)."""

    workers: int = setting(1, "inbox workers scoring side by side, each claiming inputs through the ledger "
                              "(> 1: Prefect tasks on a Dask cluster; locally at most the CPUs, and the memory "
                              f"for ~{WORKER_MEMORY_MIB} MiB each)", ge=1)
    dask_address: str | None = setting(None, "an existing Dask scheduler to run the workers on (default: "
                                             f"${DASK_ADDRESS_ENV}; unset: a local cluster of --workers processes, "
                                             "one thread each, stopped with the command)",
                                       metavar="tcp://HOST:PORT")

    def __post_init__(self):
        check(self)

    def address(self) -> str | None:
        """The scheduler to use, read where the flow runs (a deployment's worker machine decides)."""
        return self.dask_address or settings.env(DASK_ADDRESS_ENV) or None


def available_mib() -> int:
    """Memory this machine can give without swapping, in MiB (none known: counted as none)."""
    return (mem_available() or 0) // 2**20


def local_limit() -> int:
    """The most local workers this machine holds: one per CPU, and the memory for each."""
    return max(1, min(usable_cores(), available_mib() // WORKER_MEMORY_MIB))


def usage_problem(fan: FanOut, inbox: bool) -> str | None:
    """Why these options do not go together (one line, for a usage error), or None."""
    if fan.workers == 1:
        return None
    if not inbox:
        return f"--workers {fan.workers}: only with --inbox (one --input is scored by one worker)"
    if fan.address() is None and fan.workers > (limit := local_limit()):
        return (f"--workers {fan.workers}: this machine runs at most {limit} local scoring worker(s) "
                f"({usable_cores()} CPUs, {available_mib()} MiB available, ~{WORKER_MEMORY_MIB} MiB each); "
                f"give --dask-address of a larger cluster for more")
    return None


def share_config(job, fan: FanOut):
    """The job settings of one worker: unless given, onnxruntime's threads are the CPUs shared out
    among the local workers, one stream each (N workers of one thread on N CPUs, not N x 4 streams
    fighting over them). On an existing cluster the session's own defaults hold (its machines)."""
    if fan.workers == 1:
        return job
    job = dataclasses.replace(job, fail_on_drift=False)  # the flow decides, once every worker is done
    if fan.address() is not None:
        return job
    threads = job.threads or max(1, usable_cores() // fan.workers)
    return dataclasses.replace(job, threads=threads, streams=job.streams or 1)


# A local cluster: worker processes of one thread each, on loopback, without a dashboard (the
# scheduler's own health routes listen on 127.0.0.1 too, on 8787 or a free port).
LOCAL_CLUSTER = {"threads_per_worker": 1, "processes": True, "host": "127.0.0.1", "dashboard_address": None}

# Dask's nanny starts every worker process with MALLOC_TRIM_THRESHOLD_=65536 (its config
# distributed.nanny.pre-spawn-environ), so that long-lived workers holding many results give freed
# memory back. Set at all, it also turns off glibc's adaptive mmap threshold: every buffer over
# 128 KiB (each 1 MiB block of a digest, each chunk of 1,024 images) is then mmapped, faulted in
# page by page and unmapped again. Our workers live for one command and stream with flat memory; on
# 2 cores, reading and hashing 24 inputs (940 MB) took 0.90 s in such a worker and 0.52 s in one
# without it (2026-12-04). distributed documents None as "do not set this variable".
LOCAL_WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


@contextlib.contextmanager
def local_worker_config(fan: FanOut) -> Iterator[None]:
    """Dask's configuration while the task runner starts a local cluster (LOCAL_WORKER_CONFIG); an
    existing cluster's workers run as their owner configured them.

    Dask's nanny sets its pre-spawn variables (OMP_NUM_THREADS=1 and the like) in this process's own
    environment before it spawns a worker, and leaves them there: every process started afterwards
    (a training's workers in the same flow-run process) would inherit one thread. They are put back
    as they were once the cluster is gone."""
    if fan.workers == 1 or fan.address() is not None:
        yield
        return
    import dask

    names = [*dask.config.get("distributed.nanny.pre-spawn-environ", {}), "PYTHONHASHSEED"]
    with settings.environ_restored(names), dask.config.set(LOCAL_WORKER_CONFIG):
        yield


def task_runner(fan: FanOut):
    """Prefect's Dask task runner: the existing cluster, or a local one of `workers` processes
    (LOCAL_CLUSTER; started under local_worker_config)."""
    from prefect_dask import DaskTaskRunner

    if fan.address() is not None:
        return DaskTaskRunner(address=fan.address())
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": fan.workers, **LOCAL_CLUSTER})
