"""`mnistops rollback` and the champion's history, on one real MNIST candidate registered as several
versions (one training; the other versions are the same logged model, as tests/test_champion_race.py
makes them): walking back reign by reign, versions passed over, each refused target, and rollbacks
racing promotions in real processes. The commands run in this process (flows.cli.main: the same
exit codes and lines as the installed command) except the racers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from common.errors import EXIT_ERROR, EXIT_NO_ROLLBACK, EXIT_OK
from nn_core import registry, rollback, tracking
from nn_core.rollback import Change, Decided
from environ import restore
from racers import racers

NAME = "mnist-mlp"
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# The stack of reigns, pure


def _ch(before, after, promotion="accepted", rolled_back_from=None) -> Change:
    return Change(before, after, Decided(0, after or "0", promotion, "", "", rolled_back_from))


@pytest.mark.parametrize("changes, stack", [
    ([_ch(None, "1"), _ch("1", "2"), _ch("2", "3")], ["1", "2", "3"]),
    # a rollback pops back to its target; a second one pops one further
    ([_ch(None, "1"), _ch("1", "2"), _ch("2", "3"), _ch("3", "2", rolled_back_from="3")], ["1", "2"]),
    ([_ch(None, "1"), _ch("1", "2"), _ch("2", "3"), _ch("3", "2", rolled_back_from="3"),
      _ch("2", "1", rolled_back_from="2")], ["1"]),
    # a promotion after a rollback starts a new branch: the abandoned 3 is gone
    ([_ch(None, "1"), _ch("1", "2"), _ch("2", "3"), _ch("3", "2", rolled_back_from="3"), _ch("2", "4")],
     ["1", "2", "4"]),
    # a rollback to a version not below (an abandoned one) pushes it
    ([_ch(None, "1"), _ch("1", "2"), _ch("2", "1", rolled_back_from="2"), _ch("1", "2", rolled_back_from="1")],
     ["1", "2"]),
    # the champion decided again and rejected: the rule falls back to a reign below
    ([_ch(None, "1"), _ch("1", "2"), _ch("2", "1", promotion="rejected")], ["1"]),
    # promoting an earlier champion by hand is a new reign, not a rollback
    ([_ch(None, "1"), _ch("1", "2"), _ch("2", "1")], ["1", "2", "1"]),
])
def test_reigns(changes, stack):
    assert rollback.reigns(changes) == stack


# ---------------------------------------------------------------------------------------------
# One store, one training, several versions of it


@pytest.fixture(scope="module")
def home(tmp_path_factory, mnist):
    """MNISTOPS_HOME and its embedded store, for this process and the racers; the environment is
    restored whole afterwards (the commands run here fill in their defaults)."""
    root = tmp_path_factory.mktemp("rollback")
    saved = dict(os.environ)
    home = root / "home"
    uri = f"sqlite:///{home}/mlflow.db"
    os.environ.update(MNISTOPS_HOME=str(home), MLFLOW_TRACKING_URI=uri, MNISTOPS_ARTIFACT_ROOT=str(home / "mlartifacts"),
                      MNISTOPS_DATA_DIR=str(Path(mnist.cache_path).parent))
    from stores import home_with_store

    home_with_store(home)  # the embedded store a first command there makes, copied (not migrated again)
    mlflow.set_tracking_uri(uri)
    yield home
    mlflow.set_tracking_uri(None)
    restore(saved)


@pytest.fixture(scope="module")
def candidate(home, mnist):
    """One real candidate of the pipeline's own code, registered as version 1 (not gated yet)."""
    from nn_core.distributed import ddp_context
    from nn_core.launch import TrainResult
    from nn_core.release import export_and_check, register
    from nn_core.train import TrackingConfig, TrainConfig, TrainJob, train

    out = home.parent / "candidate"
    job = TrainJob(data_path=str(mnist.cache_path), out_dir=str(out), train=TrainConfig(epochs=1, batch_size=2048),
                   tracking=TrackingConfig(training_id="rollback-candidate", experiment="rollback-test"))
    with ddp_context("cpu") as env:
        train(job, env)
    result = TrainResult.read(out)
    exported = export_and_check(result, mnist.cache_path)
    version = register(result, exported, mnist.cache_path, NAME)
    assert version == "1"
    return SimpleNamespace(result=result, onnx_path=exported.onnx_path, mv=tracking.client().get_model_version(NAME, "1"))


def _new_version(candidate, name: str = NAME, run_id: str | None = None, **tags) -> str:
    """Another version of the candidate's logged model (or of another run's record), undecided."""
    c = tracking.client()
    return str(c.create_model_version(name, candidate.mv.source, run_id=run_id or candidate.result.run_id,
                                      tags={"promotion": "pending", **tags}).version)


def _cli(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    from flows.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), [line for line in err.splitlines() if line.startswith("mnistops ")]


def _promote(capsys, version: str, threshold: str = "0.5") -> int:
    code, out, err = _cli(capsys, "promote", version, "--threshold", threshold)
    assert code in (0, 3), (out, err)
    return code


def _state(name: str = NAME):
    """What a refusal must leave as it was: the alias, and every version's decision tags."""
    return registry.champion(name), {str(v.version): dict(v.tags) for v in registry.tracking.client()
                                     .search_model_versions(f"name = '{name}'")}


def _rolls_back(capsys, before: str, after: str, *argv: str) -> None:
    code, out, err = _cli(capsys, "rollback", *argv)
    assert code == EXIT_OK, (out, err)
    assert out[-1] == (f"{NAME}: champion rolled back from version {before} to version {after} "
                       f"(rolled back from v{before} to v{after} by mnistops rollback{''.join(' ' + a for a in argv)})")
    assert registry.champion(NAME) == after
    # the rule over every decision says the same as the alias, and the record names the command
    c = tracking.client()
    assert registry.rule_champion(c.search_model_versions(f"name = '{NAME}'"), after) == after
    record = registry.recorded_decision(NAME, c.get_model_version(NAME, after))
    assert record.accepted and record.champion_version == before


@pytest.mark.e2e
def test_rollback_walks_back_reign_by_reign(home, candidate, capsys):
    for v in ("2", "3"):
        assert _new_version(candidate) == v
    for v in ("1", "2", "3"):
        assert _promote(capsys, v) == 0
    _rolls_back(capsys, "3", "2")
    assert _promote(capsys, _new_version(candidate)) == 0  # version 4, after the rollback: a new branch
    _rolls_back(capsys, "4", "2")  # not the abandoned 3
    _rolls_back(capsys, "2", "1")  # a second rollback goes one further back, no flip-flop
    before = _state()
    code, out, err = _cli(capsys, "rollback")
    assert code == EXIT_NO_ROLLBACK and not err, (out, err)
    assert out == [f"registered model {NAME!r}: no earlier champion to roll back to from version 1; the champion stays"]
    assert _state() == before
    # --to the champion itself changes nothing, so a retried `rollback --to V` is safe
    code, out, err = _cli(capsys, "rollback", "--to", "1")
    assert code == EXIT_OK and out == [f"{NAME} version 1 is already the champion: nothing changed"], (out, err)
    assert _state() == before

    # `models` shows the history, who did what, and what a rollback would do now
    code, out, _ = _cli(capsys, "models", "--history", "0")
    assert code == 0
    start = out.index(next(line for line in out if line.startswith("champion history")))
    moves = [(line.split()[2:5], line.split(None, 5)[5]) for line in out[start + 1:start + 8]]
    assert [m for m, _ in moves] == [["-", "->", "1"], ["1", "->", "2"], ["2", "->", "3"], ["3", "->", "2"],
                                     ["2", "->", "4"], ["4", "->", "2"], ["2", "->", "1"]], out
    assert moves[0][1].startswith("mnistops promote: validation accuracy") and "no champion yet" in moves[0][1]
    assert moves[3][1] == "mnistops rollback: rolled back from v3 to v2 by mnistops rollback"
    assert out[start + 8] == "mnistops rollback: nothing earlier to restore"
    code, out, _ = _cli(capsys, "models", "--history", "2")
    assert sum("->" in line for line in out) == 2 and any("5 earlier not shown" in line for line in out)


@pytest.mark.e2e
def test_rollback_passes_over_versions_no_longer_valid(home, candidate, capsys):
    """A version the gate rejected since it reigned (decided again by `promote`) is passed over."""
    for v in ("2", "3", "4"):
        assert _promote(capsys, v) == 0
    assert _promote(capsys, "3", threshold="0.999") == 3  # now rejected; the champion stays 4
    assert registry.champion(NAME) == "4"
    code, out, err = _cli(capsys, "rollback")
    assert code == EXIT_OK, (out, err)
    assert out[0].startswith(f"{NAME} version 3: passed over (it was rejected by its latest decision (validation accuracy")
    assert registry.champion(NAME) == "2"
    _rolls_back(capsys, "2", "1", "--to", "1")


@pytest.fixture(scope="module")
def refused(home, candidate, mnist):
    """Versions of mnist-mlp that can never be champion, and a model with no champion."""
    import onnx

    c = tracking.client()
    rejected = _new_version(candidate)
    registry.gate(NAME, rejected, *_val(mnist), registry.GateConfig(threshold=0.999), task=registry.bound_task(NAME),
                  extra={"command": "test"})
    failed = _new_version(candidate)
    registry.mark_failed(NAME, failed, "its registration was cut short (this test)")
    exp = tracking.ensure_experiment("rollback-test")
    # A Fashion-MNIST run's model under mnist-mlp, its version tags forged to say accepted
    fashion_run = c.create_run(exp).info.run_id
    c.log_param(fashion_run, "dataset", "fashion-mnist")
    c.log_param(fashion_run, "dataset_digest", "f" * 64)
    fashion = _new_version(candidate, run_id=fashion_run, promotion="accepted", **{"promotion.at": "1"})
    # A run of this task that logged its own model but records a failed parity check
    params = c.get_run(candidate.result.run_id).data.params
    bad_parity = c.create_run(exp).info.run_id
    c.log_param(bad_parity, "dataset", params["dataset"])
    c.log_param(bad_parity, "dataset_digest", params["dataset_digest"])
    c.set_tag(bad_parity, "parity", "failed")
    with mlflow.start_run(run_id=bad_parity):
        info = mlflow.onnx.log_model(onnx.load(str(candidate.onnx_path)), name=NAME, save_as_external_data=False)
    no_parity = str(c.create_model_version(NAME, info.model_uri, run_id=bad_parity,
                                           tags={"promotion": "accepted", "promotion.at": "2"}).version)
    registry.bind_task("solo-mlp", registry.bound_task(NAME))
    _new_version(candidate, name="solo-mlp")  # undecided: no champion
    return SimpleNamespace(rejected=rejected, failed=failed, fashion=fashion, no_parity=no_parity)


def _val(mnist):
    from nn_core.data import load_splits

    s = load_splits(mnist.cache_path)
    return s.val_images.numpy(), s.val_labels.numpy()


@pytest.mark.e2e
def test_refused_targets_leave_the_champion(home, candidate, refused, capsys):
    cases = [
        (["--to", "99"], EXIT_ERROR, f"registered model {NAME!r} has no version 99 (its versions: 1, 2,"),
        (["--to", refused.rejected], EXIT_ERROR,
         f"version {refused.rejected} cannot be champion again: it was rejected by its latest decision (validation "
         "accuracy"),
        (["--to", refused.failed], EXIT_ERROR,
         f"version {refused.failed} cannot be champion again: it was marked failed (its registration was cut short"),
        (["--to", refused.fashion], EXIT_ERROR,
         f"version {refused.fashion} cannot be champion again: registered model {NAME!r} is bound to mnist"),
        (["--to", refused.no_parity], EXIT_ERROR,
         f"version {refused.no_parity} cannot be champion again: its run records no passed ONNX parity check"),
        (["--model", "no-such-mlp"], EXIT_ERROR, "no registered model 'no-such-mlp' in sqlite:///"),
        (["--model", "solo-mlp"], EXIT_NO_ROLLBACK, "registered model 'solo-mlp' has no champion to roll back from"),
        (["--model", "solo-mlp", "--to", "1"], EXIT_ERROR, "version 1 cannot be champion again: it has no decision yet"),
    ]
    before = _state(), _state("solo-mlp"), registry.champion(NAME)
    assert before[2] is not None
    for argv, expected, text in cases:
        code, out, err = _cli(capsys, "rollback", *argv)
        lines = err if expected == EXIT_ERROR else out
        assert code == expected and len(lines) == 1 and text in lines[0], (argv, code, out, err)
        assert lines[0].startswith("mnistops rollback: error: ") == (expected == EXIT_ERROR), lines
    assert (_state(), _state("solo-mlp"), registry.champion(NAME)) == before
    # the fashion version's forged tags are never read as the task: its run's record is
    assert "is fashion-mnist" in _cli(capsys, "rollback", "--to", refused.fashion)[2][0]


# ---------------------------------------------------------------------------------------------
# Rollbacks racing promotions and each other, in real processes on one store


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MNISTOPS_TEMPORARY"))}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return env


def _round(folder: Path, r: int, commands: list[list[str]], procs) -> list[int]:
    go = folder / f".go-{r}"
    go.write_text(json.dumps(commands))
    go.rename(folder / f"go-{r}")
    deadline = time.monotonic() + 300
    while not all((folder / f"done-{r}-{i}").exists() for i in range(len(procs))):
        assert all(p.poll() is None or (folder / f"done-{r}-{i}").exists() for i, p in enumerate(procs)), \
            [p.read_text()[-2000:] for p in folder.glob("racer-*.log")]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return [int((folder / f"done-{r}-{i}").read_text()) for i in range(len(procs))]


def _agree() -> str:
    """The alias and the rule over every decision agree, and the replayed history ends there."""
    alias = registry.champion(NAME)
    versions = tracking.client().search_model_versions(f"name = '{NAME}'")
    assert registry.rule_champion(versions, alias) == alias
    assert rollback.history(NAME, alias, versions)[-1].after == alias
    return alias


@pytest.mark.e2e
@pytest.mark.slow
def test_rollbacks_racing_promotions(home, candidate, tmp_path, capsys):
    extra = _new_version(candidate)
    for v in ("1", "2", "3"):
        _promote(capsys, v)
    with racers(tmp_path, [[str(tmp_path), str(i), "2"] for i in range(2)], [_env(home)] * 2) as procs:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.2)
        # a rollback and a promotion at once: serialised, either order is a valid history
        codes = _round(tmp_path, 0, [["rollback"], ["promote", extra, "--threshold", "0.5"]], procs)
        assert codes == [0, 0]
        assert _agree() in (extra, "3")  # promote last: the new version; rollback last: back from it to 3
        # two rollbacks at once: two reigns back, never both from the same champion to the same one
        stack = rollback.reigns(rollback.history(NAME, registry.champion(NAME)))
        codes = _round(tmp_path, 1, [["rollback"], ["rollback"]], procs)
        assert codes == [0, 0]
        assert _agree() == stack[-3]
