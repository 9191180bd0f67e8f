"""What this machine can run, and the bound on what a training asks of it.

Torch-free: the command line checks a request with it before anything is imported or started, and
the flows check their parameters with it (a deployment run asking for 64 workers fails at once, like
the command). A request beyond the machine is one line naming the figures, exit code 2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.errors import EXIT_USAGE
from common.resources import mem_available, usable_cores  # noqa: F401 (used here, and re-exported)

# The peak resident memory of one DDP worker (the largest of a training's workers: rank 0, which also
# logs to MLflow, checkpoints and draws the plots), in bytes. Measured 2026-12-03 on the 2-core
# development VM with CPU workers (torch 2.14.1, mlflow 3.17.2), MNIST, default settings (10 epochs,
# batch 256): 1,302,436 KiB (1.24 GiB) with 2 workers, 1,326,408 KiB (1.26 GiB) with 1, each the
# resource.getrusage(RUSAGE_CHILDREN).ru_maxrss of a Python process that had prepared the dataset and
# then run nn_core.launch.launch_training(job, LaunchSpec(nproc=N)) with MNISTOPS_TRAIN_IN_PROCESS=0
# (its children are the workers: the largest peak among them). Rounded up to 1.3 GiB. A CUDA worker
# also maps the CUDA libraries and its context on the host: not measured yet (no GPU lent so far),
# the CPU figure stands for it.
WORKER_PEAK_RSS = 1_331 * 2**20
GiB = 2**30


class BeyondMachine(ValueError):
    """A request this machine cannot run (more workers than cores or memory, a batch larger than the
    training split): a usage error, raised before anything is started."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Machine:
    cores: int  # usable by this process (its CPU affinity), not the machine's total
    gpus: int | None  # CUDA devices a training may use; None: not known without torch
    mem_available: int | None  # bytes, /proc/meminfo's MemAvailable; None where there is none


def gpus_without_torch() -> int | None:
    """0 when no CUDA device can be usable here (no NVIDIA device node, no WSL GPU): the training is
    then certainly on the CPU. None otherwise: how many torch sees is known once torch is imported."""
    dev = Path("/dev")
    if any(re.fullmatch(r"nvidia\d+|dxg", p.name) for p in (dev.iterdir() if dev.is_dir() else ())):
        return None
    return 0


def this_machine(gpus: int | None = None) -> Machine:
    """This machine's figures now; `gpus`: torch's count where the caller has it."""
    return Machine(usable_cores(), gpus if gpus is not None else gpus_without_torch(), mem_available())


def check_request(nproc: int, device: str, batch_sizes: Iterable[int], dataset: str | None, machine: Machine,
                  trainings: int = 1, devices: tuple[int, ...] | None = None) -> None:
    """Raise BeyondMachine unless `machine` can run the request: every batch size at most the training
    split of `dataset` (None: not checked); on the CPU `nproc` workers per training (per node, for a
    multi-node one) times `trainings` at once (a sweep's concurrency) at most the usable cores, and on
    the CPU or CUDA (one worker per GPU) that many workers within the memory available. One worker is
    always allowed: it is what any training needs. `device`: the launch's preference (auto/cpu/cuda)."""
    if dataset is not None:
        _check_batch_sizes(batch_sizes, dataset)
    on_cpu = device == "cpu" or (device == "auto" and machine.gpus == 0)
    if on_cpu:
        workers = nproc * trainings
        what = f"--nproc {nproc}" + (f" x {trainings} trainings at once (--concurrency)" if trainings > 1 else "")
    elif machine.gpus:  # one worker per GPU of the training's share: the GPUs bound the count
        workers = len(devices) if devices else machine.gpus
        what = f"{workers} CUDA worker(s), one per GPU"
    else:  # the GPU count is not known yet (the launch checks again), or --device cuda without a GPU
        return
    fits = _workers_in_memory(machine.mem_available)
    if (on_cpu and workers > machine.cores) or (workers > 1 and fits is not None and workers > fits):
        raise BeyondMachine(f"{what}: this machine has {machine.cores} usable core(s) and memory for "
                            f"~{fits if fits is not None else '?'} worker(s) of ~{WORKER_PEAK_RSS / GiB:.1f} GiB "
                            f"(MemAvailable {_gb(machine.mem_available)}); expected at most "
                            f"{_most(machine.cores if on_cpu else None, fits)} worker(s) at once")


def _check_batch_sizes(batch_sizes: Iterable[int], dataset: str) -> None:
    from nn_core.datasets import get_spec

    train_size = get_spec(dataset).train_size
    for b in batch_sizes:
        if b > train_size:
            raise BeyondMachine(f"--batch-size {b}: larger than {dataset}'s training split ({train_size:,} "
                                f"images), so every epoch would be one step; expected at most {train_size}")


def _workers_in_memory(available: int | None) -> int | None:
    return None if available is None else available // WORKER_PEAK_RSS


def _most(cores: int | None, fits: int | None) -> int:
    return max(1, min(n for n in (cores, fits) if n is not None)) if (cores, fits) != (None, None) else 1


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"
