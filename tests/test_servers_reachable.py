"""Servers that cannot be reached, and ports that cannot be bound, reported as what they are: one
line naming the setting (or the port), exit 1, within seconds; never "not found", never a traceback,
nothing left running. Real processes against real closed ports and real servers.

Each command runs under a 60 s timeout: MLflow's own retries alone would take ~250 s. A command facing
a closed port spends ~8 s of it idle (the start-up check waits out a blip, common/servers.py) and a
fraction of a second of CPU, so the module starts all of those at once (`started`) and each test
reads its own command's outcome: the waits pass side by side instead of one after another."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from common.errors import EXIT_ERROR, EXIT_OK
from servers import free_port

TIMEOUT_S = 60


def _env(tmp_path: Path, env_extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "MNISTOPS_HOME": str(tmp_path / "home"), "MNISTOPS_DATA_DIR": str(tmp_path / "data"),
           **env_extra}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MNISTOPS_DEBUG", "MNISTOPS_ARTIFACT_ROOT"):
        if key not in env_extra:
            env.pop(key, None)
    return env


def _run(tmp_path: Path, argv: list[str], **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=_env(tmp_path, env_extra), cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _mnistops(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return _run(tmp_path, [sys.executable, "-m", "flows.cli", *args], **env)


@dataclass
class _Started:
    """A command started in the background in its own folder `tmp`; result() is what _run returns,
    under the same TIMEOUT_S counted from the start."""

    tmp: Path
    proc: subprocess.Popen
    started: float

    def result(self) -> subprocess.CompletedProcess:
        try:
            out, err = self.proc.communicate(timeout=max(0.0, self.started + TIMEOUT_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def _start(tmp: Path, argv: list[str], **env_extra) -> _Started:
    proc = subprocess.Popen(argv, env=_env(tmp, env_extra), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return _Started(tmp, proc, time.monotonic())


def _one_line(r: subprocess.CompletedProcess, prog: str) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in r.stdout + r.stderr
    return lines[0]


def _images(tmp_path: Path) -> Path:
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((3, 28, 28), dtype=np.uint8))
    return path


INFER = {"mnistops infer": [sys.executable, "-m", "flows.cli", "infer"], "python -m serving": [sys.executable, "-m", "serving"]}
MLFLOW_COMMANDS = [["run", "--epochs", "1"], ["models"], ["promote", "1"], ["sweep"]]
PREFECT_COMMANDS = [["run", "--epochs", "1"], ["infer", "--input", "{images}", "--output", "{t}/p.csv"]]
# The lookup of test_only_not_found_reads_as_a_missing_model, in a process of its own under the 60 s
# timeout: MLflow's unbounded retries would take ~250 s.
LOOKUP = ("from pathlib import Path\n"
          "from common.servers import bound_mlflow_retries\n"
          "from serving.model_source import resolve_model\n"
          "bound_mlflow_retries()\n"
          "try:\n"
          "    resolve_model('models:/mnist-mlp@champion', Path('.'))\n"
          "except Exception as e:\n"
          "    print(type(e).__name__, e)\n")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """An MLflow server (servers.InBackground: value() is its URL) for test_ui_against_a_tracking_server_...,
    booting while the closed-port commands below wait."""
    from servers import InBackground, mlflow_server

    root = tmp_path_factory.mktemp("tracking-server")
    port = free_port()  # chosen now, so that no closed port of `started` is the one it binds later
    server = InBackground(lambda: mlflow_server(f"sqlite:///{root}/server.db", root / "artifacts", port=port),
                          "an MLflow server")
    server.port = port
    yield server
    server.stop()


@pytest.fixture(scope="module")
def started(tmp_path_factory, tracking_server) -> dict[str, tuple[_Started, int]]:
    """Every command of this module that waits on a closed port, started at once, each in a fresh
    folder with its own closed port: {case: (the started command, its port)}."""
    root = tmp_path_factory.mktemp("closed-ports")
    runs: dict[str, tuple[_Started, int]] = {}

    def case(key: str) -> tuple[Path, Path, int]:
        tmp = root / f"case{len(runs)}"
        tmp.mkdir()
        while (port := free_port()) == tracking_server.port:
            pass
        return tmp, _images(tmp), port

    for prog, argv in INFER.items():
        tmp, images, port = case(prog)
        runs[f"infer {prog}"] = _start(tmp, [*argv, "--input", str(images), "--output", str(tmp / "p.csv")],
                                       MLFLOW_TRACKING_URI=f"http://user:s3cret@127.0.0.1:{port}"), port
    data_source = os.environ.get("MNISTOPS_DATA_SOURCE", "")
    for command in MLFLOW_COMMANDS:
        tmp, _, port = case(" ".join(command))
        runs[f"mlflow {command[0]}"] = _start(tmp, [sys.executable, "-m", "flows.cli", *command],
                                              MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}",
                                              MNISTOPS_DATA_SOURCE=data_source), port
    for command in PREFECT_COMMANDS:
        tmp, images, port = case(" ".join(command))
        argv = [a.format(images=images, t=tmp) for a in command]
        runs[f"prefect {command[0]}"] = _start(tmp, [sys.executable, "-m", "flows.cli", *argv],
                                               PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
                                               MNISTOPS_DATA_SOURCE=data_source), port
    tmp, _, port = case("ui")
    runs["ui"] = _start(tmp, [sys.executable, "-m", "flows.cli", "ui"], MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"), port
    tmp, _, port = case("lookup")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    lookup = subprocess.Popen([sys.executable, "-c", LOOKUP], env={**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
                              cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs["lookup"] = _Started(tmp, lookup, time.monotonic()), port
    yield runs
    for run, _ in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


@pytest.mark.parametrize("prog", list(INFER))
def test_infer_against_a_closed_mlflow_port_names_the_setting(started, prog):
    run, port = started[f"infer {prog}"]
    r = run.result()
    assert r.returncode == EXIT_ERROR
    line = _one_line(r, prog)
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in line and "cannot be reached" in line
    assert "s3cret" not in line and "not found" not in line
    assert not (run.tmp / "p.csv").exists() and not (run.tmp / "home").exists()


@pytest.mark.parametrize("command", MLFLOW_COMMANDS)
def test_commands_against_a_closed_mlflow_port_name_the_setting(started, command):
    run, port = started[f"mlflow {command[0]}"]
    r = run.result()
    assert r.returncode == EXIT_ERROR
    line = _one_line(r, f"mnistops {command[0]}")
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: the MLflow tracking server cannot be reached" in line
    assert not (run.tmp / "home").exists()  # nothing started, nothing written


@pytest.mark.parametrize("command", PREFECT_COMMANDS)
def test_a_closed_prefect_api_port_names_prefect_api_url(started, command):
    run, port = started[f"prefect {command[0]}"]
    r = run.result()
    assert r.returncode == EXIT_ERROR
    line = _one_line(r, f"mnistops {command[0]}")
    assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api: the Prefect API cannot be reached" in line
    assert not (run.tmp / "p.csv").exists()


def test_only_not_found_reads_as_a_missing_model(tmp_path, mlflow_store, started):
    """On a store that answers, an absent model or alias is "not found"; on a server that does not
    (the start-up check skipped, MLflow's bounded retries giving up) it is "cannot be reached"."""
    from mlflow import MlflowClient

    from serving.model_source import ModelSourceError, resolve_model

    MlflowClient().create_registered_model("other-mlp")
    for uri, words in (("models:/nosuch-mlp@champion", "name=nosuch-mlp not found"),
                       ("models:/other-mlp@champion", "has no alias 'champion'"),
                       ("models:/other-mlp/3", "version=3) not found")):
        with pytest.raises(ModelSourceError, match="not found in the model registry") as e:
            resolve_model(uri, tmp_path)
        assert f"{uri}: not found" in str(e.value) and words in str(e.value)

    # The same lookup against a closed port (LOOKUP, started with the module's other waits).
    run, port = started["lookup"]
    r = run.result()
    assert r.stdout.startswith(f"ServerUnreachable MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: the MLflow tracking "
                               "server cannot be reached (looking up models:/mnist-mlp@champion)"), r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# mnistops ui


def test_ui_against_a_closed_tracking_server_port_names_the_setting(started):
    run, port = started["ui"]
    r = run.result()
    assert r.returncode == EXIT_ERROR
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: the MLflow tracking server cannot be reached" in \
        _one_line(r, "mnistops ui")


def _processes_naming(word: str) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if word in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def test_ui_on_a_taken_port_is_one_line_naming_it(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = _mnistops(tmp_path, "ui", "--port", str(port))
    assert r.returncode == EXIT_ERROR
    line = _one_line(r, "mnistops ui")
    assert f"--port {port}: 127.0.0.1:{port} cannot be bound" in line and "in use" in line
    assert "MLflow UI on" not in r.stdout  # no address printed for a server that never ran
    assert not _processes_naming(f"--port {port}") and not (tmp_path / "home").exists()


@pytest.mark.slow
def test_ui_against_a_tracking_server_says_where_its_ui_is(tmp_path, tracking_server):
    url = tracking_server.value(timeout=300)
    r = _mnistops(tmp_path, "ui", MLFLOW_TRACKING_URI=url)
    assert r.returncode == EXIT_OK, r.stderr
    assert r.stdout.splitlines() == [f"MLFLOW_TRACKING_URI is a tracking server: its UI is {url.rstrip('/')}/ "
                                     "(mnistops ui serves a local store only)"]
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# A blip is waited out (after the closed-port commands above: this one binds a port of its own)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the handler's API)
        self.send_response(200 if self.path.endswith("/health") else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_that_comes_up_within_seconds_is_waited_for():
    """A blip (a server restarting) is retried: the check passes once it answers, ~1.5 s late."""
    from common.servers import check_reachable

    port = free_port()
    servers = []

    def start_late() -> None:
        time.sleep(1.5)
        s = http.server.HTTPServer(("127.0.0.1", port), _Health)
        servers.append(s)
        s.serve_forever(poll_interval=0.1)

    t = threading.Thread(target=start_late, daemon=True)
    t.start()
    try:
        check_reachable(f"http://127.0.0.1:{port}", "MLFLOW_TRACKING_URI", "the MLflow tracking server")
    finally:
        while not servers:
            time.sleep(0.1)
        servers[0].shutdown()
        servers[0].server_close()
