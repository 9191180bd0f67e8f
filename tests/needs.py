"""What a test needs from its machine: a missing input fails in CI (a broken set-up, never a silent
skip) and skips elsewhere."""

from __future__ import annotations

import os

import pytest


def missing(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)
