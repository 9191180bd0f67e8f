"""Real PostgreSQL, MLflow and Prefect servers on 127.0.0.1, as context managers.

No pytest in here: a test, a benchmark or a shell session can use them alike.

    with postgres_server(tmp) as dsn:                              # postgresql://postgres:PW@127.0.0.1:P
        with mlflow_server(f"{dsn}/mlflow", tmp / "artifacts") as mlflow_url, \\
             prefect_server(f"{dsn}/prefect") as prefect_api_url:  # http://127.0.0.1:P/api
            ...

Each one stops everything it started in `finally`, also when the body raises: the MLflow and Prefect
servers run in their own process group (SIGTERM to the group, SIGKILL after a grace period, since
uvicorn and Prefect can ignore the first signal for a while), PostgreSQL with `pg_ctl stop -m fast`.
PostgreSQL refuses to run as root, so as root it runs as the `postgres` user from Debian's package
(infra/scripts/ensure-postgres.sh installs it).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from common.settings import QUIET

PG_SYSTEM_USER = "postgres"  # the account Debian's package creates
PG_SUPERUSER = "postgres"  # the database role initdb creates

# Off on every server we start (no network here, and Prefect's analytics also lock SQLite): the
# project's one no-telemetry list.
QUIET_ENV = QUIET


class ServerError(RuntimeError):
    """A server did not start; the message carries the end of its log."""


def pg_bin(name: str) -> str | None:
    """Path of a PostgreSQL server program (initdb, pg_ctl, createdb), or None if not installed.

    Debian keeps them out of PATH, under /usr/lib/postgresql/<major>/bin; take the newest major.
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def postgres_missing() -> str | None:
    """Why postgres_server cannot run here, or None when it can."""
    missing = [name for name in ("initdb", "pg_ctl", "createdb") if pg_bin(name) is None]
    if missing:
        return f"PostgreSQL server programs not found ({', '.join(missing)}): run infra/scripts/ensure-postgres.sh"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            return f"running as root and no '{PG_SYSTEM_USER}' user to run PostgreSQL as: run infra/scripts/ensure-postgres.sh"
    return None


def free_port() -> int:
    # Bind to port 0 and let the kernel choose; the small race until the server binds is acceptable
    # for tests (a clash fails loudly at start, it never connects to a stranger).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _as_pg_user(cmd: list[str]) -> list[str]:
    # PostgreSQL exits at once when started as root; drop to the package's account.
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_SYSTEM_USER, "--", *cmd]
    return cmd


@contextmanager
def postgres_server(tmpdir: str | os.PathLike, *, databases=("mlflow", "prefect"), timeout: float = 60) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields `postgresql://postgres:PW@127.0.0.1:PORT`.

    The databases in `databases` exist; append `/NAME` to the DSN to use one. Host connections need
    the random password (scram-sha-256), so nothing else on the machine can use it by accident.
    The server log ends up in `tmpdir/postgres.log`.
    """
    why = postgres_missing()
    if why:
        raise ServerError(why)
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    # As root the data folder must belong to (and be reachable by) the postgres account; pytest's
    # tmp folders are private to root, so use a fresh folder under the system temp dir instead.
    base = Path(tempfile.mkdtemp(prefix="mnistops-pg-")) if os.geteuid() == 0 else tmpdir / "postgres"
    base.mkdir(exist_ok=True)
    data, log = base / "data", base / "server.log"
    password = secrets.token_hex(16)
    port = free_port()
    pg_ctl = pg_bin("pg_ctl")
    started = False
    try:
        pwfile = base / "pw"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(base, PG_SYSTEM_USER)
            shutil.chown(pwfile, PG_SYSTEM_USER)
        subprocess.run(
            _as_pg_user([pg_bin("initdb"), "-D", str(data), "-U", PG_SUPERUSER, "-E", "UTF8", "--no-locale",
                         "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]),
            check=True, capture_output=True, timeout=timeout,
        )
        pwfile.unlink()
        # Listen on loopback only; the Unix socket lives in the data folder, not /var/run, so it
        # needs no privileges and cannot clash with a system cluster.
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"
        started = True  # from here on a half-started server must be stopped
        subprocess.run(
            _as_pg_user([pg_ctl, "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", str(int(timeout)), "start"]),
            check=True, capture_output=True, timeout=timeout + 10,
        )
        for name in databases:
            subprocess.run(
                _as_pg_user([pg_bin("createdb"), "-h", str(data), "-p", str(port), "-U", PG_SUPERUSER, name]),
                check=True, capture_output=True, timeout=timeout,
            )
        yield f"postgresql://{PG_SUPERUSER}:{password}@127.0.0.1:{port}"
    except subprocess.CalledProcessError as exc:
        raise ServerError(
            f"PostgreSQL: {' '.join(map(str, exc.cmd))} exited {exc.returncode}:\n"
            f"{exc.stderr.decode(errors='replace')}\n{_tail(log)}"
        ) from exc
    finally:
        if started:
            _stop_postgres(pg_ctl, data)
        if log.exists():
            shutil.copyfile(log, tmpdir / "postgres.log")
        if base != tmpdir / "postgres":
            shutil.rmtree(base, ignore_errors=True)


def _stop_postgres(pg_ctl: str, data: Path) -> None:
    pidfile = data / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return  # never started, or already stopped
    # Fast mode: roll back open transactions and stop now; the cluster is thrown away anyway.
    subprocess.run(_as_pg_user([pg_ctl, "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"]),
                   capture_output=True)
    # pg_ctl returns once the pid file is gone, a moment before the postmaster has exited; wait for
    # it so that "the with block is over" means "the server is gone". Kill it if pg_ctl failed.
    if not _pid_gone(pid, 10):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _pid_gone(pid, 5)


def _pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # exited; only its parent's bookkeeping is left
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with {proc.returncode} before answering {url}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise ServerError(f"{what} did not answer {url} within {timeout:.0f} s:\n{_tail(log)}")


def _stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` seconds, and reap the leader."""
    descendants = []
    try:
        import psutil  # optional here: also catches children that left the process group

        descendants = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give the group's other members the same grace, then kill them.
        if sig == signal.SIGTERM and not _group_gone(proc.pid, grace):
            continue
        break
    for child in descendants:
        try:
            if child.is_running():
                child.kill()
                child.wait(timeout=5)
        except Exception:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@contextmanager
def _server_process(cmd: list[str], env: dict[str, str], log: Path, health_url: str, timeout: float, what: str):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # Own session = own process group, so one killpg reaches uvicorn's workers too.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        _wait_http(health_url, proc, log, timeout, what)
        yield proc
    finally:
        _stop_group(proc)


def _venv_script(name: str) -> str:
    # The console script next to this interpreter, so the servers run the same installed versions.
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


@contextmanager
def mlflow_server(backend_uri: str, artifact_root: str | os.PathLike, *, log_path: str | os.PathLike | None = None,
                  timeout: float = 120, port: int | None = None) -> Iterator[str]:
    """An MLflow tracking server on 127.0.0.1; yields its URL `http://127.0.0.1:PORT`.

    `backend_uri` is e.g. `postgresql://...:.../mlflow` (SQLAlchemy 2.1 reads a plain
    `postgresql://` as psycopg 3: `pip install 'psycopg[binary]'`).
    Artifacts are proxied by the server (`--serve-artifacts`) into the local folder `artifact_root`,
    the same path clients take when the destination is S3.
    """
    artifact_root = Path(artifact_root).resolve()
    artifact_root.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else artifact_root.parent / "mlflow-server.log"
    port = port or free_port()  # a fixed port: a restarted server where its clients expect it
    env = {**os.environ, **QUIET_ENV,
           # The job runners are extra processes we do not use, and they outlive a killed server.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [_venv_script("mlflow"), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifact_root), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with _server_process(cmd, env, log, f"{url}/health", timeout, "MLflow server"):
        yield url


@contextmanager
def prefect_server(database_url: str, *, home: str | os.PathLike | None = None,
                   log_path: str | os.PathLike | None = None, timeout: float = 120) -> Iterator[str]:
    """A Prefect server on 127.0.0.1 over PostgreSQL; yields its API URL `http://127.0.0.1:PORT/api`.

    `database_url` may be a plain `postgresql://` DSN: Prefect's server is async and needs the
    asyncpg driver, so the scheme is rewritten to `postgresql+asyncpg://`. The server gets its own
    PREFECT_HOME (a temporary folder unless `home` is given), so it never touches the user's profile.
    """
    if database_url.startswith("postgresql://"):
        database_url = "postgresql+asyncpg://" + database_url[len("postgresql://"):]
    own_home = home is None
    home = Path(tempfile.mkdtemp(prefix="mnistops-prefect-")) if own_home else Path(home)
    home.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else home / "prefect-server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(QUIET_ENV, PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=database_url)
    cmd = [_venv_script("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--no-ui", "--analytics-off"]
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        with _server_process(cmd, env, log, f"{api_url}/health", timeout, "Prefect server"):
            yield api_url
    finally:
        if own_home and log_path is None:
            # A temporary home (and the log in it) served this server only; errors already quoted the log.
            shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class Stack:
    postgres_dsn: str | None  # None where PostgreSQL's programs are missing (the Prefect server is on SQLite then)
    prefect_url: str


@contextmanager
def shared_stack(root: str | os.PathLike) -> Iterator[Stack]:
    """A Prefect server on PostgreSQL (on SQLite where PostgreSQL's programs are missing), with an
    empty `mlflow` database beside it for an MLflow server: what a test session shares."""
    root = Path(root)
    with ExitStack() as stack:
        dsn = None
        if postgres_missing() is None:
            dsn = stack.enter_context(postgres_server(root, databases=("prefect", "mlflow")))
        database = f"{dsn}/prefect" if dsn else f"sqlite+aiosqlite:///{root}/prefect.db"
        url = stack.enter_context(prefect_server(database, home=root / "prefect-home",
                                                 log_path=root / "prefect-server.log"))
        yield Stack(dsn, url)


class InBackground:
    """A context manager entered in a thread of its own, held until stop(): the ~20 s a server takes
    to start pass while the caller does other work; value() waits for what the `with` yielded."""

    def __init__(self, make, what: str):
        self._make, self._what = make, what
        self._ready, self._done = threading.Event(), threading.Event()
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._hold, name=what, daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        try:
            with self._make() as value:
                self._value = value
                self._ready.set()
                self._done.wait()
        except BaseException as exc:  # noqa: BLE001 (handed to whoever waits in value())
            self._error = exc
        finally:
            self._ready.set()

    def value(self, timeout: float):
        if not self._ready.wait(timeout):
            raise ServerError(f"{self._what}: not started within {timeout:.0f} s")
        if self._error is not None:
            raise ServerError(f"{self._what}: {self._error}") from self._error
        return self._value

    def stop(self, timeout: float = 300) -> None:
        """Leave the `with` (its servers stop) and wait for it, also while they are still starting."""
        self._done.set()
        self._thread.join(timeout)
