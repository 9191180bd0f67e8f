"""Child processes that cannot outlive the mnistops command that starts them, however it ends.

Linux's parent-death signal (prctl PR_SET_PDEATHSIG) reaches only a direct child, and a server such
as `mlflow ui` starts its own children. So a server runs under a small lifeline process
(`python -m flows.lifeline PARENT_PID -- COMMAND...`, standard library only):

- the lifeline gets SIGTERM when the command dies (even by SIGKILL), and checks its parent twice a
  second besides, for the case where the command died before the lifeline could ask for that; it
  obeys signals from its parent only (a signal to the whole process group reaches the command, which
  stops the server last, after what uses it);
- the server runs in its own process group, which the lifeline stops as a whole: SIGTERM, then
  SIGKILL after a grace period; a server that exits by itself has its group's stragglers removed too;
- the server gets SIGKILL when the lifeline itself is killed.

The server being in its own group also keeps a terminal's Ctrl-C from reaching it before the command
has decided what to do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

GRACE_S = 5.0  # SIGTERM -> SIGKILL
POLL_S = 0.5


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """In a freshly forked child (preexec_fn): receive `sig` when the parent dies. Linux only; a
    no-op elsewhere. `parent` guards the race of a parent that died before the call."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def spawn(cmd: list[str], env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start `cmd` under a lifeline tied to this process; the Popen is the lifeline's (its exit code
    is the command's; terminate() stops the command's whole process group)."""
    me = os.getpid()
    return subprocess.Popen(
        [sys.executable, "-m", "flows.lifeline", str(me), "--", *cmd], env=env,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM, me), **popen_kwargs,
    )


def stop(proc: subprocess.Popen, timeout: float = GRACE_S + 5) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # its server then gets SIGKILL through its own parent-death signal
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def tied(cmd: list[str], env: dict | None = None, **popen_kwargs) -> Iterator[subprocess.Popen]:
    proc = spawn(cmd, env, **popen_kwargs)
    try:
        yield proc
    finally:
        stop(proc)


# ---------------------------------------------------------------------------------------------
# The lifeline process


def _stop_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-pgid, os.WNOHANG)  # reap the direct child so the group can empty


def _main(argv: list[str]) -> int:
    parent, sep, cmd = int(argv[0]), argv[1], argv[2:]
    assert sep == "--" and cmd, "usage: python -m flows.lifeline PARENT_PID -- COMMAND..."
    # Only the parent decides when the server stops: its explicit SIGTERM, or its death. A signal
    # sent to the whole process group (a terminal's Ctrl-C, `timeout`, `kill -- -PGID`) reaches the
    # command too, which then stops what uses the server first and the server last.
    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    me = os.getpid()

    def in_child() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
        die_with_parent(signal.SIGKILL, me)

    child = subprocess.Popen(cmd, process_group=0, preexec_fn=in_child)
    code, stop_signal = None, None
    while code is None and stop_signal is None:
        info = signal.sigtimedwait(watched, POLL_S)
        if info is not None and info.si_pid == parent:
            stop_signal = info.si_signo
        elif os.getppid() != parent:
            stop_signal = signal.SIGTERM
        else:
            code = child.poll()
    _stop_group(child.pid)
    if code is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(1)
        return 128 + stop_signal
    return code


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
