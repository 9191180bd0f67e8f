"""What this process may use of the machine: its cores and the memory it can take without swapping.
Plain reads of the kernel's figures, for every bound on what a user asks for (training workers,
scoring workers, a batch job's batch size)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of the memory that can be taken without swapping, in bytes; None where
    there is no such figure."""
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None
