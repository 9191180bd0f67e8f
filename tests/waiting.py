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
