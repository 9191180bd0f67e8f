"""Who owns a run: the process that must finish it, named so that a later command can tell whether
that process is gone. Every layer tags its runs with it (training runs, batch jobs, sweeps, Prefect
flow runs); nn_core.reaping and flows.ownership mark the runs of dead owners.

An owner is `host:pid:start:boot:pidns`:
- `start`, the process's start time in clock ticks since boot (/proc/PID/stat), tells the owner from
  a later process that reuses its pid;
- `boot`, the kernel's boot id (/proc/sys/kernel/random/boot_id), names one boot of one kernel:
  containers on one machine share it, two machines (or two boots of one) never do;
- `pidns`, the inode of the PID namespace (/proc/self/ns/pid): containers that share a host name
  (host networking) but not a PID namespace see different processes under the same pid.

What is decided (owner_alive), and why: a pid says something only in the PID namespace of the
kernel that gave it. So the owner is judged, by its pid and start time, only when its boot and PID
namespace are ours; then the host name does not matter (same kernel, same processes). An owner of
another boot is another machine that carries our host name, or this machine before a reboot:
nothing here tells them apart, so it is left alone (None). An owner of another PID namespace of
our boot is a process of another container: from ours it cannot be looked up, so it is left alone
too. Only an owner certainly gone is False. Older owners (`host:pid:start`, from before boot and
namespace were recorded) are judged as they were then: on the same host name, by pid and start time.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from common import settings
from common.processes import start_time  # noqa: F401 (re-exported: owner_id and the tests use it)

OWNER_TAG = "mnistops.owner"
KILLED_REASON_TAG = "mnistops.killed_reason"
OWNER_PID_ENV = "MNISTOPS_OWNER_PID"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_id() -> str:
    """This kernel's boot id; "" off Linux."""
    return _read("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> str:
    """The inode of this process's PID namespace (`pid:[4026531836]` -> `4026531836`); "" off Linux."""
    try:
        link = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return link.partition("[")[2].rstrip("]")


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str
    boot: str = ""  # "" in older owners and off Linux
    pidns: str = ""

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        """The owner a tag names, in today's form or the older `host:pid:start`; None if neither."""
        parts = text.split(":")
        if len(parts) not in (3, 5):
            return None
        try:
            return cls(parts[0], int(parts[1]), *parts[2:])
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}:{self.boot}:{self.pidns}"


def owner_id(pid: int | None = None) -> str:
    """This run's owner: `pid`, else the launcher (which sets MNISTOPS_OWNER_PID for its workers),
    else this process. The pid is one of this PID namespace (a worker's launcher is)."""
    if pid is None:
        pid = int(settings.env(OWNER_PID_ENV) or os.getpid())
    return str(Owner(socket.gethostname(), pid, start_time(pid) or "", boot_id(), pid_namespace()))


def _comparable(owner: Owner) -> bool:
    """Whether `owner`'s pid can be looked up here (see the module doc)."""
    boot = boot_id()
    if owner.boot and boot:
        ns = pid_namespace()
        return owner.boot == boot and bool(owner.pidns) and owner.pidns == ns
    return owner.host == socket.gethostname()  # an older owner, or no /proc here


def owner_alive(owner: str) -> bool | None:
    """True/False for an owner whose pid means the same process here; None when that is not certain:
    another boot or machine, another PID namespace, an unreadable owner."""
    parsed = Owner.parse(owner)
    if parsed is None or not _comparable(parsed):
        return None
    now = start_time(parsed.pid)
    return now is not None and (now == parsed.start or not parsed.start or not now)
