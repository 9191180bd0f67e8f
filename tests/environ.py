"""Putting the test process's own state back as it was: os.environ, key by key, and Prefect's
workers that send a process's events and logs to one API.

Never by clearing os.environ and filling it again: a thread of the test process (the session's
servers start in one, tests/conftest.py) that starts a program in between finds no PATH, falls back
to /bin:/usr/bin and misses /usr/sbin's runuser (seen in CI: 17 errors, "No such file or directory:
'runuser'")."""

from __future__ import annotations

import os
import sys


def restore(saved: dict[str, str]) -> None:
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def let_go_of_prefect_api() -> None:
    """Call while the API a test ran flows on in this process is still up, before it stops: that
    test's last events and logs are sent to it, and Prefect's workers that sent them are stopped.
    Prefect keeps one events worker per process, bound to the API it first sent to whatever the
    settings say later (its cache key has no URL); left running, it sent the later tests' events
    to a stopped API (seen in CI: test_monitor's alert event went to test_infra_servers's server)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
