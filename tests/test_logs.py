"""The command lines' log policy (common.logs): without --debug a library's error record never puts a
traceback on stderr; with it, the traceback is there."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from common.logs import configure_logging


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = [h for h in handlers if type(h).__module__.startswith("_pytest")]
    yield root
    root.handlers, root.level = handlers, level


def orphaned_task_failure() -> None:
    """What aiohttp leaves when an S3 endpoint dies mid-request: a task whose exception nobody
    retrieves, which asyncio logs (at ERROR, with the traceback) when the task is collected."""

    async def write_bytes():
        raise ConnectionResetError("Cannot write to closing transport")

    async def main():
        asyncio.get_running_loop().create_task(write_bytes())
        await asyncio.sleep(0.01)

    asyncio.run(main())
    gc.collect()


def library_warning_with_traceback() -> None:
    try:
        raise OSError("connection refused")
    except OSError:
        logging.getLogger("aiobotocore.somewhere").warning("retrying the request", exc_info=True)


@pytest.mark.parametrize("fmt", ["%(asctime)s %(levelname)s %(name)s: %(message)s", "%(levelname)s %(name)s: %(message)s"])
def test_without_debug_no_library_record_carries_a_traceback(root_logger, capsys, fmt):
    configure_logging(debug=False, fmt=fmt)
    orphaned_task_failure()
    library_warning_with_traceback()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert "never retrieved" not in err, err  # the command's own error line reports the failure
    assert "retrying the request" in err  # a library's warning stays, as one line
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_with_debug_the_tracebacks_are_shown(root_logger, capsys):
    configure_logging(debug=True)
    orphaned_task_failure()
    err = capsys.readouterr().err
    assert "Task exception was never retrieved" in err and "Traceback" in err, err
    assert "Cannot write to closing transport" in err
