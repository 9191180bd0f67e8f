"""The DDP worker process's entry point, as torch's elastic agent starts it (a binary entrypoint:
`python -P -u -c BOOTSTRAP ...`, see nn_core.launch.worker_command).

Its first act, before it imports torch or anything else of ours, is to make sure it dies with the
launcher: Linux's parent-death signal (SIGKILL), then a check that the launcher is still its parent
(had the launcher died between the fork and that call, no signal would ever come). Only then does it
import the training. A worker started as a function (multiprocessing's spawn) could not do this: its
interpreter imports torch while it unpickles the function, seconds before any of our code runs, and
multiprocessing adds a resource-tracker process that outlives a killed launcher.

This module imports only the standard library at its top, so nothing heavy runs before `main`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

# Seen in a worker's command line: how the launcher's stop path (flows.lifeline) and the tests find
# workers among a process's children.
WORKER_MODULE = "nn_core.worker"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(launcher_pid: int) -> None:
    """SIGKILL this process when the thread that started it exits (the launcher's, even by SIGKILL),
    and exit now if that launcher is already gone (this process was re-parented before the call)."""
    if sys.platform == "linux":
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != launcher_pid:
        # The launcher died before the signal was armed: nobody waits for this worker's result.
        os._exit(1)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what torch's agent stops workers with


def whole_error_file_handler():
    """torch's ErrorHandler for `record`, writing the worker's error file with the stop signals held
    off until it is whole. torch writes it in place (open, then json.dump); when a worker fails on its
    own (a peer killed: its collective breaks) the agent stops the others with SIGTERM at that moment,
    and one that dies mid-write leaves an empty file, on which the agent's parse raises: the training
    failed instead of restarting ("Expecting value: line 1 column 1", seen in CI). Held off, the
    signal lands once the file is written and the worker dies by it as before."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    class WholeErrorFile(ErrorHandler):
        def record_exception(self, e: BaseException) -> None:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                super().record_exception(e)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)

    return WholeErrorFile()


def main(argv: list[str]) -> None:
    """argv: [launcher pid, "local" or "multi-node", the job as JSON]."""
    launcher_pid, where, job_json = int(argv[0]), argv[1], argv[2]
    die_with_parent(launcher_pid)
    # Protected from here on: the training's imports (torch, MLflow) take seconds.
    from torch.distributed.elastic.multiprocessing.errors import record

    from nn_core.train import worker_main

    job = job_from_dict(json.loads(job_json))
    # record: the exception goes to torchelastic's error file, so the launcher reports the worker's
    # real error rather than a bare exit code.
    record(local_worker if where == "local" else worker_main, whole_error_file_handler())(job)
    # Done, and everything it wrote is closed (MLflow's run ended, the checkpoint and results renamed
    # into place). Leave without the interpreter's teardown: the C++ destructors of torch's
    # distributed runtime ran there racing the other ranks' exits, and once in a CI run a finished
    # rank aborted ("terminate called without an active exception", SIGABRT), failing a training whose
    # every epoch had completed.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def local_worker(job):
    """A one-node worker: its communication stays on the loopback (the workers' store bound to
    127.0.0.1 by rank 0, gloo's and NCCL's sockets on `lo`), then the usual worker."""
    from nn_core.distributed import bound_socket, host_store
    from nn_core.train import worker_main

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    store = None
    if os.environ.get("RANK") == "0" and os.environ.get("MASTER_ADDR") == "127.0.0.1":
        sock = bound_socket("127.0.0.1", int(os.environ["MASTER_PORT"]))
        store = host_store(sock) if sock is not None else None
    try:
        return worker_main(job)
    finally:
        del store


def job_from_dict(d: dict):
    """A TrainJob back from its JSON form (a worker's command line, job.json)."""
    from nn_core.config import MLPConfig, TrackingConfig, TrainConfig
    from nn_core.train import TrainJob

    return TrainJob(**{**d, "model": MLPConfig.from_dict(d["model"]), "train": TrainConfig(**d["train"]),
                       "tracking": TrackingConfig(**d["tracking"]),
                       "devices": tuple(d["devices"]) if d.get("devices") is not None else None,
                       "feedback": tuple(d.get("feedback", ()))})
