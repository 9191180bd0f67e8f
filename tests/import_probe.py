"""A `mnistops` command line run as the console script runs it, in a real process of its own, which
also records which of the heavy packages (torch, Prefect, MLflow) it had imported when it ended
(tests/test_cli.py: bad input is refused before any of them; tests/test_lifecycle.py: `train` is
nn_core only, without Prefect)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE_ENV = "MNISTOPS_TEST_PROBE"

# Runs the command line like the console script does, then records which heavy packages it imported.
_PROBE = """
import json, os, sys
from flows.cli import main
code = 0
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
finally:
    with open(os.environ["MNISTOPS_TEST_PROBE"], "w") as f:
        json.dump(sorted(m for m in ("torch", "prefect", "mlflow") if m in sys.modules), f)
sys.exit(code)
"""


def run_probed(argv: list[str], env: dict, cwd: Path, timeout: float = 120):
    """(the finished process, the heavy packages it imported or None when it recorded nothing);
    the record is written to cwd/imported.json."""
    probe = Path(cwd) / "imported.json"
    r = subprocess.run([sys.executable, "-c", _PROBE, *argv], env={**env, PROBE_ENV: str(probe)}, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    return r, json.loads(probe.read_text()) if probe.exists() else None
