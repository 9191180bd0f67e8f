"""Child processes that cannot outlive the mnistops command that starts them, however it ends.

Linux's parent-death signal (prctl PR_SET_PDEATHSIG) reaches only a direct child, and a server such
as `mlflow ui` starts its own children. So a server runs under a small lifeline process
(`python -m flows.lifeline PARENT_PID -- COMMAND...`, standard library only):

- the lifeline gets SIGTERM when the command dies (even by SIGKILL), and checks its parent twice a
  second besides, for the case where the command died before the lifeline could ask for that; it
  obeys signals from its parent only, and runs in a process group of its own, so that a signal to the
  command's whole group reaches the command (which stops the server last, after what uses it) but
  not the lifeline: a SIGKILL to that group leaves the lifeline to stop the server;
- the server runs in its own process group, which the lifeline stops as a whole: SIGTERM, then
  SIGKILL after a grace period; a server that exits by itself has its group's stragglers removed too;
- the server gets SIGKILL when the lifeline itself is killed (the server's own children would then
  be left, which is why nothing kills a lifeline but its own timeout in `stop`).

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
    # In a process group of its own: a kill sent to the command's whole group (a terminal's, a CI
    # job's cleanup, `timeout -s KILL`) would take the lifeline down with the command before it has
    # stopped the server, and the server's own children (uvicorn under `mlflow ui`) would be left.
    return subprocess.Popen(
        [sys.executable, "-m", "flows.lifeline", str(me), "--", *cmd], env=env, process_group=0,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM, me), **popen_kwargs,
    )


def stop(proc: subprocess.Popen, timeout: float = 2 * GRACE_S + 5) -> int | None:
    """Stop the lifeline and with it its server's group. The wait covers the lifeline's own worst
    case (SIGTERM, the grace period, SIGKILL, the grace period): killed earlier, it would leave the
    server's children behind."""
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


def stop_worker_children(timeout: float = GRACE_S) -> list[int]:
    """SIGTERM this process's DDP workers (children running nn_core.worker) and wait for them. The
    workers of a launch on the main thread are stopped by torch's agent itself; those of launches on
    other threads (a sweep's concurrent trainings) are not, and would keep the interpreter alive
    (they are in sessions of their own, so no terminal's signal reaches them either)."""
    from nn_core.worker import WORKER_MODULE

    me, pids, mark = os.getpid(), [], WORKER_MODULE.encode()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and mark in cmdline:
            pids.append(int(entry))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def on_signal(callback, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> int:
    """Call `callback` on a background thread when one of `signals` arrives, whichever Python
    handler is installed at the time (ours, torch's agent's, Prefect's flow engine's: each replaces
    the last). Python writes every signal's number to its wakeup fd before running that handler.
    Main thread only; the callback must be safe to run at any moment. Returns the previous wakeup fd
    (for signal.set_wakeup_fd when done)."""
    import threading

    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    wanted = {int(s) for s in signals}

    def watch() -> None:
        while data := os.read(r, 64):
            if wanted & set(data):
                callback()

    threading.Thread(target=watch, name="mnistops-signal-watch", daemon=True).start()
    return previous


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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
