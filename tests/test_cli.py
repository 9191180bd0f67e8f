"""The `mnistops` command itself: help everywhere, clear errors on bad input, the MLflow UI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from flows.cli import EXIT_ERROR, build_parser, main
from nn_core.tracking import redact_url

COMMANDS = ["prepare-data", "train", "run", "models", "promote", "ui", "infer", "sweep", "serve"]


def test_every_command_is_there_and_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: mnistops {cmd}" in out
        # options show their defaults
        assert "(default:" in out or cmd in ("models",) or "--help" in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--hidden", "fifty"], "expected integers like 50"),
    (["train", "--schedule", "linear"], "invalid choice"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_source_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MNISTOPS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MNISTOPS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert main(["prepare-data", "--data-source", str(tmp_path / "nowhere")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "mnistops prepare-data: error:" in err and str(tmp_path / "nowhere") in err and "does not exist" in err
    assert not list((tmp_path / "data").glob("*.pt"))


def test_sweep_file_errors_name_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MNISTOPS_HOME", str(tmp_path / "home"))
    bad = tmp_path / "sweep.yaml"
    bad.write_text("hidden: [[50]]\nlearning_rate: [0.1]\n")
    assert main(["sweep", "--config", str(bad)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert str(bad) in err and "unknown keys ['learning_rate']" in err


def test_credentials_never_leave_a_url():
    assert redact_url("https://user:s3cret@mirror.example/mnist/") == "https://mirror.example/mnist/"
    assert redact_url("http://tok@127.0.0.1:5000/x?y=1") == "http://127.0.0.1:5000/x?y=1"
    assert redact_url("file:///data/mnist") == "file:///data/mnist"


@pytest.mark.slow
def test_ui_serves_the_embedded_store_on_localhost(tmp_path):
    from servers import free_port

    port = free_port()
    env = {**os.environ, "MNISTOPS_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"MLflow UI on http://127.0.0.1:{port}" in first and "mlflow.db" in first
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the UI did not come up"
                time.sleep(0.5)
        import psutil

        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
