"""The command lines' log policy, one for `mnistops` and `python -m serving`: log records on stderr,
and without --debug (or MNISTOPS_DEBUG) a failure is reported once, by the command's own `error:`
line, never as a library's traceback."""

from __future__ import annotations

import logging
import sys

from common.settings import env

# Libraries that log at INFO what a user of a command does not need.
NOISY = ("alembic", "httpx", "httpcore", "mlflow.store.db.utils", "onnx_ir", "onnxscript", "urllib3", "asyncio",
         "matplotlib", "PIL", "git", "filelock", "fsspec", "aiobotocore", "botocore")
# Prefect's queue services (events, API logs) warn when they drain at exit with items still queued
# ("EventsWorker: Still processing items: 1 items remaining..."): progress of a drain that then
# completes, not a fault; a failed send is logged as an error of its own.
DRAIN_PROGRESS = ("EventsWorker", "APILogWorker")


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not the stream of start-up time (which a
    caller such as a test harness may have swapped and closed since). Its name must not start with
    "_": Prefect keeps its own console handler off the root logger only when the root logger already
    has a handler that is not "private"."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class NoClusterChatter(logging.Filter):
    """A local Dask cluster's start and stop, ~30 INFO lines a `mnistops infer --workers` run (its
    scheduler, nannies and connections): dropped without --debug. A level on the `distributed` logger
    would not hold: distributed sets its own levels when it is imported, after the command line's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("distributed")


class OneLinePerFailure(logging.Filter):
    """Without --debug a failure is reported once, by the command line's own `error:` line. The error
    records of these libraries only repeat it with a traceback each, so they are dropped: Prefect's
    "Finished in state Failed", torch elastic's child-failure report, and asyncio's "Task exception was
    never retrieved" (an S3 client's background write to an endpoint that died: the request that
    needed it fails too, and the command names the URL). Other records lose their tracebacks."""

    LOUD = ("prefect", "torch.distributed.elastic", "asyncio")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.startswith(self.LOUD):
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def debug_enabled() -> bool:
    return env("MNISTOPS_DEBUG", "").lower() not in ("", "0", "false", "no")


def configure_logging(debug: bool = False, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """Log records on stderr; called by the command lines only. `mnistops` installs it before Prefect
    is imported, so Prefect sends its records here too (it leaves a root logger that already has a
    handler alone) and `--debug` decides about tracebacks in one place."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, CurrentStderrHandler)), None)
    if handler is None:
        handler = CurrentStderrHandler()
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt))
    for f in [f for f in handler.filters if isinstance(f, (OneLinePerFailure, NoClusterChatter))]:
        handler.removeFilter(f)
    if not debug:
        handler.addFilter(OneLinePerFailure())
        handler.addFilter(NoClusterChatter())
    root.setLevel(logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in DRAIN_PROGRESS:
        logging.getLogger(name).setLevel(logging.ERROR)
