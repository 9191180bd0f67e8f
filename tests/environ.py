"""Putting os.environ back as it was, key by key.

Never by clearing it and filling it again: a thread of the test process (the session's servers start
in one, tests/conftest.py) that starts a program in between finds no PATH, falls back to /bin:/usr/bin
and misses /usr/sbin's runuser (seen in CI: 17 errors, "No such file or directory: 'runuser'")."""

from __future__ import annotations

import os


def restore(saved: dict[str, str]) -> None:
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
