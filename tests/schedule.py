"""The order in which pytest-xdist hands out the test files: longest first.

Under `--dist loadfile` (the Makefile's) a test file is the unit of work (its module fixtures, often a
trained model, are made once), handed to the next free process in collection order. Collected
alphabetically, the suite's longest files could start last, and its wall time was theirs added to
everything before them. Sorted by their last measured time, longest first (the classic
longest-processing-time rule), the long files run side by side from the start and the short ones
fill the gaps at the end. The times are `tests/durations.json`, seconds per file as
`pytest --store-durations` measured them on a 2-core machine (a run updates the files it ran; run it
again after adding a heavy test); a file not listed counts as long, so a new one starts early. Order
only: nothing is skipped and the tests inside a file keep their order. Measured: 33m23s of tests
against 33m46s in file order; the suite's wall time is mostly its files' summed time (97 minutes)
shared by the processes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

DURATIONS = Path(__file__).with_name("durations.json")
_measured: defaultdict[str, float] = defaultdict(float)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help=f"write each test file's time (setup, call and teardown) to {DURATIONS.name}")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist sorts the files again, by their number of tests (a file of one 80-second test went
    # last), unless told not to: the order here is the one it keeps.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        known = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return  # no times: collection order
    unknown = max(known.values(), default=0.0)
    items.sort(key=lambda item: -known.get(_file(item.nodeid), unknown))  # stable: a file's tests keep their order


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _measured[_file(report.nodeid)] += report.duration


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if not config.getoption("store_durations") or hasattr(config, "workerinput"):  # the controller writes it
        return
    try:  # a run of some files updates theirs and keeps the others'
        known = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        known = {}
    known.update({f: round(t, 1) for f, t in _measured.items()})
    DURATIONS.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
