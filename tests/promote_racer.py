"""One racer of tests/test_champion_race.py and tests/test_rollback.py: a real process that runs
`mnistops promote` (or any mnistops command) once per round, all racers released at the same instant
by a file, so that their gates overlap.

    python promote_racer.py FOLDER INDEX ROUNDS [extra mnistops args...]

The heavy imports happen before the first round (a race between imports would not be a race between
gates). Round r starts when FOLDER/go-r exists (a JSON list, one entry per racer: the version it
promotes, or the whole mnistops command line as a list); the exit code goes to FOLDER/done-r-INDEX.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow  # noqa: F401
import onnxruntime  # noqa: F401
import prefect.client.orchestration  # noqa: F401 (what a gate on a Prefect limit imports)
import prefect.concurrency.sync  # noqa: F401

import flows.cli
import flows.promotion  # noqa: F401
import nn_core.data  # noqa: F401
import nn_core.registry  # noqa: F401


def main() -> None:
    folder, index, rounds, extra = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    (folder / f"ready-{index}").touch()
    for r in range(rounds):
        while not (folder / f"go-{r}").exists():
            time.sleep(0.005)
        versions = json.loads((folder / f"go-{r}").read_text())
        mine = versions[index]
        code = flows.cli.main(mine if isinstance(mine, list) else ["promote", str(mine), *extra])
        done = folder / f".done-{r}-{index}"
        done.write_text(str(code))
        done.rename(folder / f"done-{r}-{index}")  # whole: the test reads it as soon as it appears


if __name__ == "__main__":
    main()
