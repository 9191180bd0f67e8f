"""Our own temporary Prefect API for a command when no Prefect server is configured.

Prefect's embedded default starts a uvicorn server of its own (SubprocessASGIServer) and stops it at
exit, but not when the command is killed: a SIGKILLed `mnistops run` left it serving, orphaned. This
starts the same server (the same uvicorn command, ephemeral mode: no UI, only the services a temporary
server runs) under a lifeline tied to the command (flows/lifeline.py), so it goes when the command
goes, however it ends. Its SQLite database lives under MNISTOPS_HOME, so the flow runs of one home
stay visible to the next command there (which reaps runs whose owner died).

It is started first thing, before torch and Prefect are imported, so that the ~10-20 s it needs to
boot overlap with those imports; `wait_ready()` is called just before the first flow.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import settings
from flows import lifeline

MIGRATED = "prefect.db.migrated"
START_TIMEOUT_S = float(settings.env("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))


class PrefectApiError(RuntimeError):
    """The temporary Prefect API did not come up; the message names its log file."""


@dataclass
class TemporaryApi:
    url: str  # http://127.0.0.1:PORT/api
    proc: object  # the lifeline's Popen
    log: Path
    home: Path
    ready: bool = False
    migrating: object | None = None  # the held lock of a new database's first boot (see _first_boot_lock)


def _first_boot_lock(home: Path):
    """A new home's database is migrated by the first server that boots on it; two commands starting
    there at once would run the migrations side by side, and one server fails. So until one server
    has answered on this home (the marker file), a boot holds this lock; the others wait for it."""
    import fcntl

    if (home / MIGRATED).exists() and (home / "prefect.db").exists():
        return None
    lock = open(home / "prefect.db.lock", "a")  # noqa: SIM115 (held until the server answers)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _answered(api: TemporaryApi) -> None:
    api.ready = True
    if api.migrating is not None:
        (api.home / MIGRATED).touch()
        api.migrating.close()  # releases the lock
        api.migrating = None


_current: TemporaryApi | None = None


def configured_url() -> str | None:
    """The Prefect API this process would use: PREFECT_API_URL from the environment, the active
    profile, or (when Prefect is already imported, as in a test harness) Prefect's own settings."""
    if url := settings.env("PREFECT_API_URL"):
        return url
    if "prefect" in sys.modules:
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
        return str(url) if url else None
    import tomllib

    home = Path(settings.env("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(settings.env("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(profiles.read_text())
    except (OSError, ValueError):
        return None
    active = settings.env("PREFECT_PROFILE") or data.get("active", "ephemeral")
    url = data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(home: Path) -> TemporaryApi | None:
    """Start the temporary API unless a Prefect API is configured; set PREFECT_API_URL for this
    process and those it starts. Returns immediately (see wait_ready)."""
    global _current
    if _current is not None or configured_url():
        return _current
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    port = _free_port()
    log = home / "logs" / "prefect-api.log"
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",  # what Prefect's own temporary server sets: no UI, fewer services
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    migrating = _first_boot_lock(home)
    with open(log, "ab") as out:
        proc = lifeline.spawn(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    _current = TemporaryApi(url=f"http://127.0.0.1:{port}/api", proc=proc, log=log, home=home, migrating=migrating)
    os.environ["PREFECT_API_URL"] = _current.url
    # Marks this API as the command's own (inherited by its flow-run processes): flows/promotion.py
    # never takes a promotion lock on it, since no other command shares it.
    os.environ["MNISTOPS_TEMPORARY_PREFECT_API"] = _current.url
    # Stopped at exit, after Prefect's own exit handlers (registered later, run earlier) have sent
    # their last logs and events to it: stopped before them, they retry for minutes.
    atexit.register(stop)
    return _current


def booting() -> bool:
    """Whether the temporary API was started and does not answer yet (a new home's first boot
    migrates its database: seconds in which the command can do other work)."""
    api = _current
    if api is None or api.ready:
        return False
    try:
        with urllib.request.urlopen(f"{api.url}/health", timeout=0.5) as r:
            if r.status == 200:
                _answered(api)
    except OSError:
        pass
    return not api.ready


def wait_ready(timeout: float = START_TIMEOUT_S) -> None:
    """Block until the temporary API answers (no-op when none was started)."""
    api = _current
    if api is None or api.ready:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{api.url}/health", timeout=2) as r:
                if r.status == 200:
                    _answered(api)
                    return
        except OSError:
            pass
        if api.proc.poll() is not None:
            raise PrefectApiError(f"Prefect's temporary API exited with code {api.proc.returncode} while "
                                  f"starting; see {api.log}")
        if time.monotonic() > deadline:
            raise PrefectApiError(f"Prefect's temporary API did not answer within {timeout:.0f} s; see {api.log} "
                                  "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS sets the limit)")
        time.sleep(0.2)


@contextlib.contextmanager
def without_heartbeats():
    """Flow runs on the temporary API send no heartbeats: nothing reads them there (the API goes with
    the command, and a killed command's flow runs are found by their owner tag, flows/ownership.py),
    and the end of every flow run waited for Prefect's heartbeat thread, which sleeps in 1 s steps
    (0.5 s a flow run on average). With a configured Prefect API, heartbeats are sent as configured."""
    if _current is None:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def stop() -> None:
    global _current
    api, _current = _current, None
    if api is None:
        return
    lifeline.stop(api.proc)
    if api.migrating is not None:
        api.migrating.close()
    if settings.env("PREFECT_API_URL") == api.url:
        del os.environ["PREFECT_API_URL"]
    if settings.env("MNISTOPS_TEMPORARY_PREFECT_API") == api.url:
        del os.environ["MNISTOPS_TEMPORARY_PREFECT_API"]
