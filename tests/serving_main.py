"""The batch job's command line run inside the test process: `serving.cli.main`, the function that
`python -m serving` runs, minus the ~4 s of CPU a new interpreter spends importing onnxruntime,
pyarrow and fsspec again. For the checks of what a command reports (its exit code, its one error line
on stderr, its summary on stdout) where nothing depends on it being a process of its own; a test
about processes (killed jobs, workers side by side, import isolation) starts real ones.

What main leaves behind in this process is put back: its stderr log handler and level on the root
logger, and its SIGTERM handler (a SystemExit in a process that is not a job)."""

from __future__ import annotations

import logging
import signal
import subprocess
from pathlib import Path

import pytest


def serving_main(capfd: pytest.CaptureFixture[str], *argv: str | Path,
                 env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """serving.cli.main(argv) with `env` set (None: unset) for the call; its exit code and what it
    wrote to file descriptors 1 and 2 (everything, logging included), as a finished process's."""
    from serving import cli

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sigterm = signal.getsignal(signal.SIGTERM)
    capfd.readouterr()  # what came before is not this call's
    args = [str(a) for a in argv]
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in (env or {}).items():
                if value is None:
                    mp.delenv(key, raising=False)
                else:
                    mp.setenv(key, value)
            code = cli.main(args)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "serving", *args], code, out, err)
