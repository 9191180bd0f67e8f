"""Waiting on a command under test: a condition polled with a deadline, never a fixed sleep."""

from __future__ import annotations

import subprocess
import time

import pytest


def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str):
    """predicate()'s first truthy value; the test fails if `proc` ends or `timeout` s pass first."""
    deadline = time.time() + timeout
    while not (value := predicate()):
        if proc.poll() is not None:
            pytest.fail(f"the command ended (code {proc.returncode}) while waiting for {what}:\n{proc.stdout.read()}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def finished_task_run(client, task_run_id, timeout: float = 30.0):
    """The task run as the Prefect API has it once its final state is recorded. The API records task
    runs from the events their engine emits, after the task has returned: read at once, one may be
    missing (404) or a state behind."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.time() + timeout
    while True:
        try:
            run = client.read_task_run(task_run_id)
            if run.state is not None and run.state.is_final():
                return run
        except ObjectNotFound:
            pass
        assert time.time() < deadline, f"timed out waiting for the API to record task run {task_run_id}"
        time.sleep(0.2)
