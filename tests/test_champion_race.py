"""The champion rule under real processes racing, on the embedded defaults (a SQLite store): in each
round, `mnistops promote` processes start their gates at the same instant, half of them as the gate of
a `run`, `sweep` or `serve` does it (PREFECT_API_URL pointing at the command's own temporary API, a
real Prefect server here), half as a plain `promote` (no Prefect API). Whatever the interleaving, the
decisions must read as if the gates ran one after another: each accepted decision compared with the
champion the previous one left, and the alias ends where the rule says. Then: a version whose tags
were forged is refused by its run's own record, `--force` or not; and a version a killed registration
left without a decision is completed or marked failed by the next command."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from nn_core import registry, tracking
from nn_core.distributed import ddp_context
from nn_core.launch import TrainResult
from nn_core.release import export_and_check, register
from nn_core.train import TrackingConfig, TrainConfig, TrainJob, train
from racers import racers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "mnist-mlp"
TESTS = Path(__file__).resolve().parent
RACERS, ROUNDS, VERSIONS = 4, 5, 5


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """MNISTOPS_HOME with its embedded store, shared by this process and the commands it starts."""
    root = tmp_path_factory.mktemp("race")
    home = root / "home"
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{home}/mlflow.db"
    for k, v in {"MNISTOPS_HOME": str(home), "MLFLOW_TRACKING_URI": uri,
                 "MNISTOPS_ARTIFACT_ROOT": str(home / "mlartifacts")}.items():
        mp.setenv(k, v)
    mlflow.set_tracking_uri(uri)
    yield home
    mlflow.set_tracking_uri(None)
    mp.undo()


def _train(data_path, out: Path, name: str, **cfg) -> TrainResult:
    job = TrainJob(data_path=str(data_path), out_dir=str(out / name), train=TrainConfig(**cfg),
                   tracking=TrackingConfig(training_id=name, experiment="race"))
    with ddp_context("cpu") as env:
        train(job, env)
    return TrainResult.read(out / name)


@pytest.fixture(scope="module")
def versions(mnist, home):
    """Five versions of one real MNIST candidate (one epoch of 12 steps: above the racers' threshold
    of 0.5), registered and not gated yet: one trained and
    registered by the pipeline's own code, four more of the same logged model with the same tags.
    Equal figures make every decision an acceptance, so any two gates that overlap leave two
    acceptances of the same champion (a lost update) instead of a rejection that could hide it."""
    result = _train(mnist.cache_path, home.parent, "candidate", epochs=1, batch_size=4096)  # val 0.85 > 0.5
    exported = export_and_check(result, mnist.cache_path)
    first = register(result, exported, mnist.cache_path, NAME)
    c = tracking.client()
    mv = c.get_model_version(NAME, first)
    for _ in range(VERSIONS - 1):
        c.create_model_version(NAME, mv.source, run_id=result.run_id, tags=mv.tags)
    found = sorted(str(v.version) for v in c.search_model_versions(f"name = '{NAME}'"))
    assert found == [str(v) for v in range(1, VERSIONS + 1)]
    return found


def _env(home: Path, mnist, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MNISTOPS_TEMPORARY"))}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")]),
               MNISTOPS_DATA_DIR=str(Path(mnist.cache_path).parent), OMP_NUM_THREADS="1", **extra)
    return env


def _chain_holds(before: str | None, decided: dict[str, dict]) -> str | None:
    """The decisions of one round read as one after another: starting from the champion before the
    round, each accepted decision compared with the champion the previous one left. Returns the
    champion at the end of that chain; fails naming the decisions that do not fit."""
    accepted = {v: t for v, t in decided.items() if t["promotion"] == "accepted"
                and "already the champion" not in t["promotion.reason"]}
    current, seen = before, {before}
    while accepted:
        nxt = [v for v, t in accepted.items() if t["promotion.champion_version"] == (current or "none")]
        assert len(nxt) == 1, (f"after champion {current}, {len(nxt)} accepted decisions compared with it "
                               f"(a lost update): {json.dumps(decided, indent=1)}")
        current = nxt[0]
        seen.add(current)
        del accepted[current]
    for v, t in decided.items():
        if t["promotion"] == "rejected":
            assert t["promotion.champion_version"] in {s or "none" for s in seen}, (v, t)
    return current


def test_promotions_race_on_one_store(home, versions, mnist, tmp_path, prefect_server_url):
    # Racers 0 and 1 gate as `run`/`sweep`/`serve` do: on the command's own temporary API, which
    # the product knows by its URL in MNISTOPS_TEMPORARY_PREFECT_API (the session's real server
    # stands in for it: booting one more is not what this is about).
    api = prefect_server_url
    temporary = {"PREFECT_API_URL": api, "MNISTOPS_TEMPORARY_PREFECT_API": api}
    args = [[str(tmp_path), str(i), str(ROUNDS), "--threshold", "0.5"] for i in range(RACERS)]
    envs = [_env(home, mnist, **(temporary if i < 2 else {})) for i in range(RACERS)]
    with racers(tmp_path, args, envs) as procs:
        _run_rounds(procs, versions, tmp_path)


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(folder.glob("racer-*.log")))


def _run_rounds(procs, versions: list[str], folder: Path) -> None:
    deadline = time.monotonic() + 900
    while not all((folder / f"ready-{i}").exists() for i in range(RACERS)):
        assert all(p.poll() is None for p in procs), _logs(folder)
        assert time.monotonic() < deadline
        time.sleep(0.2)
    c, rng = tracking.client(), random.Random(21)
    for r in range(ROUNDS):
        before = registry.champion(NAME)
        # Each racer promotes another version, none the champion: every decision is a comparison.
        round_versions = rng.sample([v for v in versions if v != before], RACERS)
        go = folder / f".go-{r}"
        go.write_text(json.dumps(round_versions))
        go.rename(folder / f"go-{r}")  # whole, at once: the racers start together
        while not all((folder / f"done-{r}-{i}").exists() for i in range(RACERS)):
            # a racer ends after its last round; one that ends before its answer has failed
            assert all(p.poll() is None or (folder / f"done-{r}-{i}").exists() for i, p in enumerate(procs)), \
                _logs(folder)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        codes = [int((folder / f"done-{r}-{i}").read_text()) for i in range(RACERS)]
        assert set(codes) <= {0, 3}, (codes, _logs(folder))  # promoted or rejected, never an error
        decided = {v: c.get_model_version(NAME, v).tags for v in round_versions}
        end = _chain_holds(before, decided)
        assert registry.champion(NAME) == end, (r, before, end, decided)
    # the rule over all decisions names the alias's version, and every record agrees with its tags
    end = registry.champion(NAME)
    assert registry.rule_champion(c.search_model_versions(f"name = '{NAME}'"), end) == end
    for v in versions:
        mv = c.get_model_version(NAME, v)
        record = registry.recorded_decision(NAME, mv)
        assert record.tags() == {k: mv.tags[k] for k in record.tags()}, (v, record)


# ---------------------------------------------------------------------------------------------
# The task from the run's own record; versions left half-made


def _mnistops(home: Path, mnist, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("mnistops")), *args], env=_env(home, mnist), text=True,
                          capture_output=True, timeout=600)


def _in_process(mnist, capsys, *args: str) -> subprocess.CompletedProcess:
    """A command's own code in this process, for a check that is not about its start-up (a real
    process costs ~6 s of CPU in imports), in the environment _mnistops gives one: its exit code,
    stdout and stderr."""
    from flows.cli import main

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNISTOPS_DATA_DIR", str(Path(mnist.cache_path).parent))
        code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["mnistops", *args], code, out.out, out.err)


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("mnistops promote: error:")]


def test_forged_version_tags_never_cross_tasks(home, versions, mnist, fashion_source, tmp_path, capsys):
    """A Fashion-MNIST run registered into mnist-mlp by hand, its version tags saying MNIST: refused
    by its run's own record, with and without --force; nothing changes."""
    from nn_core.data import prepare
    from nn_core.datasets import FASHION_MNIST

    fashion = prepare(FASHION_MNIST, str(fashion_source), tmp_path / "fashion-cache")
    result = _train(fashion.cache_path, tmp_path, "fashion", epochs=1, batch_size=4096)
    exported = export_and_check(result, fashion.cache_path)
    own = register(result, exported, fashion.cache_path, "fashion-mnist-mlp")
    c = tracking.client()
    forged = c.create_model_version(NAME, c.get_model_version("fashion-mnist-mlp", own).source, run_id=result.run_id,
                                    tags={"dataset": "mnist", "dataset_digest": mnist.digest,
                                          "parity_passed": "true", "promotion": "pending"}).version
    champion_before = registry.champion(NAME)
    for p in (_in_process(mnist, capsys, "promote", str(forged), "--threshold", "0.0"),
              _mnistops(home, mnist, "promote", str(forged), "--threshold", "0.0", "--force")):
        assert p.returncode == 1, p.stdout + p.stderr
        (line,) = _error_lines(p.stderr)
        assert f"version {forged}" in line and "is fashion-mnist" in line and "bound to mnist" in line, line
    assert registry.champion(NAME) == champion_before
    assert c.get_model_version(NAME, forged).tags["promotion"] == "pending"


def _dead_owner() -> str:
    from nn_core import reaping

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = reaping.owner_id(p.pid)  # its start time, read while it runs
    p.wait()
    return owner


def _half_made(result: TrainResult, onnx_path: Path, owner: str) -> str:
    """What a `mnistops run` SIGKILLed right after "Created version" leaves: the model logged on the
    finished run and a version of it with no tag at all, the run's owner gone."""
    import onnx

    with mlflow.start_run(run_id=result.run_id):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name=NAME, save_as_external_data=False,
                                     onnx_execution_providers=["CPUExecutionProvider"])
    c = tracking.client()
    c.set_tag(result.run_id, "mnistops.owner", owner)
    return str(c.create_model_version(NAME, info.model_uri, run_id=result.run_id).version)


def test_half_made_versions_are_completed_or_marked_failed(home, versions, mnist, tmp_path, capsys):
    c = tracking.client()
    good = _train(mnist.cache_path, tmp_path, "cut-short", epochs=1, batch_size=4096, lr=2e-3)
    completable = _half_made(good, export_and_check(good, mnist.cache_path).onnx_path, _dead_owner())
    killed = _train(mnist.cache_path, tmp_path, "killed-run", epochs=1, batch_size=4096, lr=2e-3)
    broken = _half_made(killed, export_and_check(killed, mnist.cache_path).onnx_path, _dead_owner())
    c.set_terminated(killed.run_id, status="KILLED")
    assert registry.undecided(c.get_model_version(NAME, completable).tags)
    listing = _in_process(mnist, capsys, "models")
    rows = {line.split()[0]: line for line in listing.stdout.splitlines() if line.split()[:1] in ([completable], [broken])}
    assert "cut short" in rows[completable] and "cut short" in rows[broken], listing.stdout + listing.stderr

    # `promote` of the cut-short version: completed (its drift reference too), one line saying so
    p = _mnistops(home, mnist, "promote", completable, "--threshold", "0.5")
    assert p.returncode in (0, 3), p.stdout + p.stderr
    assert f"{NAME} version {completable}: its registration was cut short; completed now: " in p.stdout
    tags = c.get_model_version(NAME, completable).tags
    assert tags["promotion"] in ("accepted", "rejected") and "drift.reference" in tags
    assert registry.recorded_decision(NAME, c.get_model_version(NAME, completable)).version == completable
    # the other one was marked failed by the same command, its line naming why
    assert f"{NAME} version {broken}: its registration was cut short and it cannot be completed: marked failed" in p.stdout
    assert "is KILLED, not FINISHED" in p.stdout
    assert c.get_model_version(NAME, broken).tags["promotion"] == "failed"
    # promoting the failed one: one line, exit 1, and it is never champion
    p = _in_process(mnist, capsys, "promote", broken, "--force")
    assert p.returncode == 1 and len(_error_lines(p.stderr)) == 1, p.stdout + p.stderr
    assert f"version {broken} is marked failed" in p.stderr and registry.champion(NAME) != broken
