"""The `mnistops` command itself: help everywhere, clear errors on bad input. (The MLflow UI on
localhost, and `train` without Prefect: tests/test_lifecycle.py, which starts those commands anyway.)"""

from __future__ import annotations

import os

import numpy as np
import pytest

from flows.cli import EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, build_parser, main
from nn_core.tracking import redact_url
from import_probe import run_probed

COMMANDS = ["prepare-data", "train", "run", "models", "promote", "rollback", "ui", "infer", "sweep", "serve", "monitor"]


def test_every_command_is_there_and_has_help(capsys):
    import argparse
    import re

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: mnistops {cmd}" in out
        text = re.sub(r"\s+", " ", out)
        for action in sub.choices[cmd]._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.option_strings[-1] in out, f"{cmd}: {action.option_strings} missing from --help"
            assert action.help, f"{cmd} {action.option_strings[-1]}: no help text"
            # an option with a value and a default says what it is (None: the help says what happens)
            if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS) and "default:" not in action.help:
                shown = action.default if isinstance(action.default, str) else str(action.default)
                assert f"(default: {shown})" in text, f"{cmd} {action.option_strings[-1]}: default not shown"


# ---------------------------------------------------------------------------------------------
# Bad input, as a user meets it: a real `mnistops` process, one line, the documented exit code,
# nothing written, and (checked before anything starts) neither torch nor Prefect imported.


def _mnistops(tmp_path, argv, **env_extra):
    env = {**os.environ, "MNISTOPS_HOME": str(tmp_path / "home"), "MNISTOPS_DATA_DIR": str(tmp_path / "data"),
           **env_extra}
    for key in ("MLFLOW_TRACKING_URI", "MNISTOPS_DATA_SOURCE", "MNISTOPS_DEBUG", "MNISTOPS_ARTIFACT_ROOT"):
        env.pop(key, None) if key not in env_extra else None
    return run_probed(argv, env, tmp_path)


def _inputs(tmp_path):
    """Files the bad invocations point at: a folder without the IDX files, a file where a folder
    belongs, an images file, an unreadable sweep file."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    np.save(tmp_path / "images.npy", np.zeros((3, 28, 28), dtype=np.uint8))
    (tmp_path / "sweep.yaml").write_text("hidden: [[50]]\nlearning_rate: [0.1]\n")


BAD_INPUTS = [
    # (argv, exit code, words the one line must contain); {t} is the test's folder
    (["run", "--nproc", "0"], EXIT_USAGE, "--nproc: 0: expected an integer >= 1"),
    (["run", "--epochs", "0"], EXIT_USAGE, "--epochs"),
    (["run", "--lr", "-1"], EXIT_USAGE, "--lr"),
    (["run", "--threshold", "1.5"], EXIT_USAGE, "--threshold: 1.5"),
    (["run", "--hidden", "fifty"], EXIT_USAGE, "expected integers like 50"),
    (["run", "--resume", "nosuchtraining"], EXIT_ERROR, "no checkpoint of a training 'nosuchtraining'"),
    (["run", "--resume"], EXIT_ERROR, "no unfinished training to resume"),
    (["run", "--data-source", "{t}/nowhere"], EXIT_ERROR, "{t}/nowhere: data source folder does not exist"),
    (["run", "--data-source", "{t}/empty"], EXIT_ERROR, "lacks train-images-idx3-ubyte"),
    (["train", "--schedule", "linear"], EXIT_USAGE, "invalid choice"),
    (["train", "--batch-size", "0"], EXIT_USAGE, "--batch-size"),
    (["train", "--device", "cpu", "--nproc", "3"], EXIT_USAGE, "not divisible by --nproc 3"),
    (["train", "--nnodes", "2"], EXIT_USAGE, "--rdzv-endpoint"),
    (["train", "--rdzv-endpoint", "node0"], EXIT_USAGE, "expected HOST:PORT"),
    (["train", "--data-source", "ftp://mirror/mnist"], EXIT_ERROR, "expected a folder, a file:// URL or an http"),
    (["train", "--data-dir", "{t}/a-file"], EXIT_ERROR, "{t}/a-file: the data folder"),
    (["promote", "0"], EXIT_USAGE, "version: 0"),
    (["promote", "1", "--margin", "-0.1"], EXIT_USAGE, "--margin"),
    (["rollback", "--to", "0"], EXIT_USAGE, "--to: 0"),
    (["promote", "1", "--data-source", "{t}/nowhere"], EXIT_ERROR, "data source folder does not exist"),
    (["infer", "--input", "{t}/images.npy"], EXIT_USAGE, "--output"),
    (["infer", "--input", "{t}/images.npy", "--output", "{t}/p.csv", "--batch-size", "0"], EXIT_USAGE, "--batch-size"),
    (["infer", "--input", "{t}/missing.npy", "--output", "{t}/p.csv"], EXIT_ERROR, "{t}/missing.npy: no such file"),
    (["infer", "--input", "{t}/images.npy", "--output", "{t}/p.csv", "--model", "{t}/none.onnx"], EXIT_ERROR,
     "{t}/none.onnx: no such file"),
    (["sweep", "--config", "{t}/sweep.yaml"], EXIT_ERROR, "unknown keys ['learning_rate']"),
    (["sweep", "--concurrency", "0"], EXIT_USAGE, "--concurrency"),
    (["ui", "--port", "70000"], EXIT_USAGE, "--port"),
]


@pytest.mark.parametrize("argv, code, words", BAD_INPUTS, ids=[" ".join(a[0]) for a in BAD_INPUTS])
def test_bad_input_is_one_line_before_anything_starts(tmp_path, argv, code, words):
    _inputs(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r, imported = _mnistops(tmp_path, [a.format(t=tmp_path) for a in argv])
    assert r.returncode == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"mnistops {argv[0]}: error: ") and words.format(t=tmp_path) in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    # Nothing written: no MNISTOPS_HOME, no data folder, no output.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "imported.json") == before
    assert imported == [], f"imported {imported} before refusing"


def test_debug_adds_the_traceback(tmp_path):
    r, _ = _mnistops(tmp_path, ["--debug", "run", "--resume", "x"])
    assert r.returncode == EXIT_ERROR and "Traceback" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("mnistops run: error: ")
    r, _ = _mnistops(tmp_path, ["run", "--resume", "x"], MNISTOPS_DEBUG="1")
    assert "Traceback" in r.stderr


def test_every_failure_maps_to_the_one_table():
    from flows.cli import CommandError, Stopped, UsageError, _failure

    class MlflowException(Exception):  # matched by name, as the error path must not import mlflow
        def __init__(self, message):
            super().__init__(f"RESOURCE_DOES_NOT_EXIST: {message}")
            self.message = message

    assert _failure(UsageError("x")) == (EXIT_USAGE, "error: x")
    assert _failure(CommandError("x")) == (EXIT_ERROR, "error: x")
    assert _failure(ValueError("first line\nsecond line")) == (EXIT_ERROR, "error: first line")
    assert _failure(MlflowException("Model Version 7 not found")) == (EXIT_ERROR, "error: Model Version 7 not found")
    assert _failure(KeyboardInterrupt())[0] == EXIT_SIGINT
    assert _failure(Stopped(15))[0] == EXIT_SIGTERM
    try:  # a signal that surfaced as another exception (torch's agent, Prefect's engine) still counts
        try:
            raise Stopped(15)
        except Stopped as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as wrapped:
        assert _failure(wrapped)[0] == EXIT_SIGTERM
    code, line = _failure(TypeError("bug"))
    assert code == EXIT_ERROR and "TypeError: bug" in line and "--debug" in line


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


def test_loading_pauses_the_collector_and_freezes_what_was_loaded():
    import gc

    from common.settings import loading

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with pytest.raises(RuntimeError):
        with loading():
            assert not gc.isenabled()
            kept = [[] for _ in range(1000)]  # tracked objects made while loading
            raise RuntimeError("an import failed")
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(kept)
    gc.unfreeze()  # leave the test process's collector as it was
    gc.disable()
    try:
        with loading():
            pass
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.unfreeze()
        gc.enable()
