"""The failures a user can fix, and the exit codes every mnistops command shares.

Each message names the file, record or setting and what was expected. The exit codes are the one
table for `mnistops` and `python -m serving` alike (documented in the README).
"""

from __future__ import annotations

import signal

EXIT_OK = 0  # done (for run/sweep/promote: the candidate was promoted)
EXIT_ERROR = 1  # an error: bad input, a missing model, a failed step
EXIT_USAGE = 2  # bad command-line usage
EXIT_REJECTED = 3  # the gate rejected the candidate: a normal outcome, not an error
EXIT_DRIFT = 4  # a batch job's input drifted from the model's reference profile (--fail-on-drift)
EXIT_NO_ROLLBACK = 5  # rollback: no champion, or no valid earlier one, to go back to; the champion stays
EXIT_SIGINT = 128 + signal.SIGINT  # 130: interrupted (Ctrl-C)
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: stopped by SIGTERM (Kubernetes, Prefect cancelling a run)


class ServingError(Exception):
    """Base of the errors the CLI reports as one line instead of a traceback, with `exit_code`."""

    exit_code = EXIT_ERROR


class InputError(ServingError, ValueError):
    """Bad input: wrong shape or dtype, NaN/inf, an unreadable or non-image file, an empty input, a label
    count that does not match. The message names the file or record index."""


class InputChanged(InputError):
    """An input whose bytes changed while it was scored: what was read is not the content it was
    claimed under (an inbox's ledger keys by content). Nothing was written; it is not recorded as bad,
    since its content was never shown bad: the next run scores it as it is then."""


class OutputError(ServingError, ValueError):
    """An output that would clobber something: an input, an existing file without --overwrite, or a
    path whose parent is a file."""


class BeyondMachineError(ServingError, ValueError):
    """A job setting this machine cannot hold (a batch size whose buffers exceed its memory): a usage
    error, raised before anything is read or written."""

    exit_code = EXIT_USAGE


class DriftAlert(ServingError):
    """The job finished and wrote its outputs, but its input drifted from the model's reference profile
    and the job was asked to fail on drift (--fail-on-drift): exit code EXIT_DRIFT. `result` is the
    finished job's result (or an inbox run's), for the caller to report."""

    exit_code = EXIT_DRIFT

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result


class ModelSourceError(ServingError, ValueError):
    """The model could not be found or does not satisfy the serving contract."""


class DeviceError(ServingError, RuntimeError):
    """The requested device is not usable (e.g. `--device cuda` without a usable GPU)."""
