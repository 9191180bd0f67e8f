"""A DDP worker's error file is whole even when the agent's SIGTERM lands while it is written (the
agent stops the other workers the moment one fails, and parses every error file it finds: an empty
one made the training fail instead of restart). nn_core.worker holds the stop signals off for it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The worker's handler writing its error file, made slow halfway through the write (json.dump is
# what torch's ErrorHandler writes with), so that the test's SIGTERM lands mid-write.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    os.environ["TORCHELASTIC_ERROR_FILE"] = sys.argv[1]
    from nn_core.worker import whole_error_file_handler

    def halting_dump(obj, fp, **kw):
        text = json.dumps(obj)
        fp.write(text[: len(text) // 2])
        fp.flush()
        print("halfway", flush=True)
        time.sleep(1)
        fp.write(text[len(text) // 2 :])

    json.dump = halting_dump
    handler = whole_error_file_handler()
    try:
        raise RuntimeError("Connection closed by peer")  # what gloo raises when a peer was killed
    except RuntimeError as e:
        handler.record_exception(e)
    print("not reached: the held SIGTERM ends the process once the file is written", flush=True)
""")


def test_a_sigterm_during_the_error_file_write_waits_for_it_to_be_whole(tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(error_file)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "halfway"
        child.send_signal(signal.SIGTERM)  # as torch's agent stops the workers
        rest = child.stdout.read()
        assert child.wait(timeout=30) == -signal.SIGTERM  # it still dies by the signal
    finally:
        child.kill()
    assert "not reached" not in rest
    data = json.loads(error_file.read_text())  # whole: the agent's parse succeeds
    assert data["message"]["message"] == "RuntimeError: Connection closed by peer"
