"""Racing processes of tests/promote_racer.py, each logging to `<folder>/racer-<i>.log`, stopped and
their logs closed when the block ends, however it ends. No pytest in here."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

RACER = Path(__file__).with_name("promote_racer.py")


@contextmanager
def racers(folder: Path, args: list[list[str]], envs: list[dict]) -> Iterator[list[subprocess.Popen]]:
    """One promote_racer.py process per entry of `args` (its arguments after the script) with the
    matching environment of `envs`."""
    logs = [open(Path(folder) / f"racer-{i}.log", "wb") for i in range(len(args))]  # noqa: SIM115
    procs = [subprocess.Popen([sys.executable, str(RACER), *a], env=e, stdout=log, stderr=subprocess.STDOUT)
             for a, e, log in zip(args, envs, logs)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
