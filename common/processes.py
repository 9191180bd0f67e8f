"""Whether a process still runs, from /proc: the one check of it that owners (common.owner), claims
(serving.inbox), temp files (serving.writers) and half-made stores (common.settings) share. It
imports nothing of the project, so every module of `common` may use it."""

from __future__ import annotations

import os


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if
    there is no such process, or only a zombie of one: it has exited and waits for its parent to
    reap it, which a container's init may do late or never (a killed job re-parented there kept its
    inbox inputs busy for a lease's length, and its temp files on disk). Off Linux: "" for a live
    process (pid reuse not detected there)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
            return ""
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
