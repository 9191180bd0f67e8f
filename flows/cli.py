"""The `mnistops` command. Exit codes (common/errors.py holds the one table, the README shows it):
0 success (for run/sweep/promote: the candidate was promoted), 1 an error, 2 bad usage, 3 the gate
rejected the candidate (not an error), 4 drift (infer --fail-on-drift), 5 nothing to roll back to
(rollback), 130 interrupted (Ctrl-C),
143 stopped by SIGTERM. A failure prints one `mnistops COMMAND: error: ...` line; --debug (or
MNISTOPS_DEBUG=1) adds the traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from flows.options import (  # noqa: F401 (CommandError, Stopped, UsageError: re-exported for tests)
    PORT,
    POSITIVE,
    CommandError,
    Formatter,
    Parser,
    Stopped,
    UsageError,
    check_data,
    check_training,
    data_args,
    data_config,
    data_source_of,
    gate_args,
    multi_node_args,
    pipeline_parameters,
    train_args,
)
from nn_core.config import (DataConfig, GateConfig, LaunchSpec, MLPConfig, TrackingConfig, TrainConfig,
                            default_experiment)
from common.fields import add_arguments, from_args, number
from common import settings
from common.settings import create_sqlite_store
from common.errors import (  # noqa: F401 (the one table, re-exported for the commands and tests)
    EXIT_DRIFT,
    EXIT_ERROR,
    EXIT_NO_ROLLBACK,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_prepare_data(args) -> int:
    from nn_core.data import prepare_dataset

    p = prepare_dataset(data_config(args))
    print(f"dataset  {p.name}\ndigest   {p.digest}\ncache    {p.cache_path} ({'reused' if p.reused_cache else 'written'})")
    print("splits   " + "  ".join(f"{k}={v}" for k, v in p.split_sizes.items()))
    return EXIT_OK


def cmd_train(args) -> int:
    """The bare DDP training: nn_core only, no Prefect."""
    from flows.settings import configure
    from common.settings import loading

    with loading():
        from nn_core.data import prepare_dataset
        from nn_core.launch import launch_training, new_job, new_training_id

    data, launch = data_config(args), from_args(LaunchSpec, args)
    prepared = prepare_dataset(data)
    tracking_cfg = TrackingConfig(training_id=launch.rdzv_id or new_training_id(),
                                  experiment=args.experiment or default_experiment(data.dataset))
    job = new_job(prepared, configure().runs_dir, from_args(MLPConfig, args), from_args(TrainConfig, args),
                  tracking_cfg, data.data_source)
    result = launch_training(job, launch)
    if result is None:
        print("this node's workers finished; rank 0 (on another node) holds the result")
        return EXIT_OK
    print(f"validation accuracy {result.val_accuracy:.4f}\ntest accuracy       {result.test_accuracy:.4f}")
    print(f"MLflow run          {result.run_id}\ncheckpoint          {result.checkpoint}")
    return EXIT_OK


def _report(outcome) -> int:
    print(json.dumps(outcome.to_dict(), indent=2, default=str))
    verdict = "promoted to champion" if outcome.promoted else "NOT promoted"
    print(f"\n{outcome.model_name} version {outcome.version}: {verdict} ({outcome.reason})")
    return EXIT_OK if outcome.promoted else EXIT_REJECTED


def _home() -> Path:
    # flows.settings.configure's rule, before it runs (a check must not create the home).
    return Path(settings.env("MNISTOPS_HOME", ".mnistops")).resolve()


def _unfinished_training(training_id: str | None) -> tuple[str, dict]:
    """(training id, its job.json) of a training with a checkpoint and no result: the given one,
    else the latest in this MNISTOPS_HOME."""
    runs = _home() / "runs"
    if training_id:
        folder = runs / training_id
        if not (folder / "job.json").is_file() or not (folder / "checkpoint.pt").is_file():
            raise CommandError(f"{folder}: no checkpoint of a training {training_id!r} to resume "
                               f"(expected job.json and checkpoint.pt there)")
        if (folder / "result.json").exists():
            raise CommandError(f"training {training_id} already finished ({folder / 'result.json'})")
    else:
        candidates = [d for d in runs.glob("*") if (d / "job.json").is_file() and (d / "checkpoint.pt").is_file()
                      and not (d / "result.json").exists()] if runs.is_dir() else []
        if not candidates:
            raise CommandError(f"{runs}: no unfinished training to resume (none has a checkpoint and no result)")
        folder = max(candidates, key=lambda d: (d / "checkpoint.pt").stat().st_mtime)
    try:
        return folder.name, json.loads((folder / "job.json").read_text())
    except (OSError, ValueError) as e:
        raise CommandError(f"{folder / 'job.json'}: unreadable ({e})") from None


def _job_data(training_id: str, job: dict, data: DataConfig) -> DataConfig:
    """The data of a recorded training: its dataset and cache folder from its cache file's path
    (nn_core.data.cache_path names the file after the dataset), its source as it recorded it."""
    from dataclasses import replace
    from typing import get_args

    from nn_core.config import Dataset

    source = job.get("data_source") or data.data_source
    if not job.get("data_path"):
        return replace(data, data_source=source)
    path = Path(job["data_path"])
    if path.stem not in get_args(Dataset):
        raise CommandError(f"{_home() / 'runs' / training_id / 'job.json'}: data_path {path} names no known dataset "
                           f"(expected one of {', '.join(get_args(Dataset))} as the file's name)")
    return replace(data, dataset=path.stem, data_dir=str(path.parent), data_source=source)


def _check_run(args) -> None:
    if args.resume is not None:
        args.resume = training_id, job = _unfinished_training(None if args.resume == "latest" else args.resume)
        # The resumed training's dataset, not the options' (whose default is mnist): checked as such.
        data = _job_data(training_id, job, DataConfig(args.dataset, args.data_source, args.data_dir))
        args.dataset, args.data_source, args.data_dir = data.dataset, data.data_source, data.data_dir
    check_training(args)
    _check_feedback(args)


def _check_feedback(args) -> None:
    """Each local --feedback read and checked as the batch job reads labelled input (count, range,
    empty), before anything starts; a URL is read by the flow. Its task is checked by the flow."""
    from common.errors import InputError
    from common.storage import is_url
    from serving.feedback import read_labelled

    if args.feedback and args.resume is not None:
        raise UsageError("--feedback and --resume do not go together: a resumed training keeps its own data")
    for location in args.feedback or []:
        if not is_url(location):
            try:
                read_labelled(location)
            except InputError as e:
                raise CommandError(f"--feedback: {e}") from None


def _resumed(params: dict, resume: tuple[str, dict]) -> dict:
    """The pipeline's parameters with the killed training's own settings (its checkpoint continues
    exactly that training), read back from its job.json: dataset, model, training, experiment."""
    training_id, job = resume
    return {**params, "training_id": training_id, "model": MLPConfig.from_dict(job["model"]),
            "train": TrainConfig(**job["train"]), "experiment": job["tracking"]["experiment"],
            "data": _job_data(training_id, job, params["data"])}


def cmd_run(args) -> int:
    from common.settings import loading

    with loading():
        from flows import ownership, prefect_api
        from flows.training import training_pipeline

    params = {**pipeline_parameters(args), "feedback": args.feedback}
    if args.resume is not None:
        params = _resumed(params, args.resume)
        print(f"resuming training {args.resume[0]} ({params['data'].dataset}) from its checkpoint", flush=True)
    _while_prefect_boots(params["experiment"] or default_experiment(params["data"].dataset))
    prefect_api.wait_ready()
    with ownership.owned_flow_runs():
        outcome = training_pipeline(**params)
    code = _report(outcome)
    if not args.no_inference:
        from flows.inference import score_test_split
        from nn_core.registry import champion

        if champion(outcome.model_name) is None:  # a first candidate rejected on a fresh store
            print(f"no champion of {outcome.model_name!r} yet: the batch inference over the test set is skipped")
            return code
        s = score_test_split(dataset=args.dataset, data_dir=args.data_dir, model=f"models:/{outcome.model_name}@champion")
        print(f"batch inference over the test set with {s['model']} (version {s['model_version']}): "
              f"accuracy {s['accuracy']:.4f}, {s['predicted']} predictions in {s['output']}")
    return code


def _while_prefect_boots(experiment: str) -> None:
    """Work the pipeline does anyway, done while a new home's temporary Prefect API migrates its
    database (~4 s here) instead of after: the experiment (main made the store already) and a warm-up
    of the ONNX exporter (its first export in a process costs ~0.8 s more than the next)."""
    from flows import prefect_api

    if not prefect_api.booting():
        return
    from nn_core import tracking

    tracking.ensure_experiment(experiment, description=tracking.TRAINING_EXPERIMENT_DESCRIPTION)
    if prefect_api.booting():
        from nn_core.export import warm_up

        warm_up()


def _registered_names(c) -> list[str]:
    names, token = [], None
    while True:
        page = c.search_registered_models(max_results=100, page_token=token)
        names += [m.name for m in page]
        token = page.token
        if not token:
            return sorted(names)


def _print_versions(c, name: str, shown: int = 10) -> None:
    from nn_core import metrics as M
    from nn_core import registry

    versions = sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    try:
        task = registry.bound_task(name)
    except ValueError as e:  # a model this project did not register: listed, its binding named as unknown
        task = f"no task ({e})"
    print(f"{name}: bound to {task}")
    if not versions:
        print("  no versions")
        return
    best = registry.champion(name)
    # Left without a decision by a killed command: the next gate or `promote` completes or fails them.
    cut_short = {str(v.version) for v in registry.abandoned_versions(name)}
    print(f"{'version':>7}  {'champion':8}  {'val_acc':>7}  {'test_acc':>8}  {'promotion':9}  run_id")
    for v in versions:
        t = v.tags or {}
        metrics = c.get_run(v.run_id).data.metrics if v.run_id else {}
        val = t.get(registry.VAL_ACC) or (f"{metrics[M.VAL_ACCURACY]:.6f}" if M.VAL_ACCURACY in metrics else "-")
        test = f"{metrics[M.TEST_ACCURACY]:.6f}" if M.TEST_ACCURACY in metrics else "-"
        print(f"{v.version:>7}  {'*' if str(v.version) == best else '':8}  {val[:7]:>7}  {test[:8]:>8}  "
              f"{'cut short' if str(v.version) in cut_short else t.get(registry.PROMOTION, '-'):9}  {v.run_id}")
    if isinstance(task, registry.Task):
        _print_history(name, versions, best, task, shown)


def _when(at: int) -> str:
    import datetime as dt

    if at < 0:
        return "(unordered)"  # decided before decisions were ordered
    return dt.datetime.fromtimestamp(at / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _print_history(name: str, versions, alias: str | None, task, shown: int) -> None:
    """The champion's changes (nn_core.rollback.history: the decision records replayed through the
    rule), the last `shown` of them, and what `mnistops rollback` would restore now."""
    from nn_core import registry, rollback

    try:
        changes = rollback.history(name, alias, versions)
    except ValueError as e:  # an unreadable record: the versions above stand, the history cannot
        print(f"champion history: unavailable ({e})")
        return
    if not changes:
        print("champion history: none (no version was ever accepted)")
        return
    earlier = len(changes) - shown if shown else 0
    print(f"champion history (UTC, oldest first{f'; {earlier} earlier not shown, --history 0 shows all' if earlier > 0 else ''}):")
    for ch in changes[max(earlier, 0):]:
        move = f"{ch.before or '-'} -> {ch.after or '-'}"
        print(f"  {_when(ch.by.at)}  {move:>9}  {ch.by.command}: {ch.by.reason}")
    current = registry.rule_champion(versions, alias)
    if current is None:
        return
    by_version = {str(v.version): v for v in versions}
    try:
        target, _ = rollback.previous(name, current, changes, by_version, task)
        print(f"mnistops rollback would restore version {target}")
    except rollback.NothingToRollBack:
        print("mnistops rollback: nothing earlier to restore")


def cmd_models(args) -> int:
    """Every registered model with its versions; only the one named by --dataset or --model-name."""
    from nn_core import tracking

    c = tracking.client()
    store = tracking.redact_url(tracking.mlflow.get_tracking_uri())
    if args.dataset or args.model_name:
        names = [from_args(GateConfig, args).model_for(args.dataset or "mnist")]
        if not c.search_registered_models(f"name = '{names[0]}'"):
            print(f"no registered model {names[0]!r} in {store}")
            return EXIT_OK
    else:
        names = _registered_names(c)
        if not names:
            print(f"no registered models in {store}")
            return EXIT_OK
    for i, name in enumerate(names):
        if i:
            print()
        _print_versions(c, name, args.history)
    return EXIT_OK


def cmd_promote(args) -> int:
    """The gate by hand, on the registered model's own task: its dataset comes from the registered
    model, never from --dataset (which may only name it), and each version's from its run's record;
    --force overrides the threshold and the margin, never the task or parity. A version a killed
    command left without a decision is completed or marked failed first, and that is the answer."""
    from flows.promotion import promotion_lock
    from nn_core.data import load_splits, prepare_dataset
    from nn_core.registry import Task, TaskMismatchError, bound_task, gate
    from nn_core.rollback import COMMAND
    from nn_core.release import complete_unfinished

    cfg = from_args(GateConfig, args)
    name = cfg.model_for(args.dataset or "mnist")
    task = bound_task(name)
    if args.dataset and args.dataset != task.dataset:
        raise TaskMismatchError(f"registered model {name!r} is bound to {task}; --dataset {args.dataset} "
                                "names another task (its split is never used for this model)")
    prepared = prepare_dataset(DataConfig(task.dataset, data_source_of(args), args.data_dir))
    completed = complete_unfinished(name, prepared.cache_path, cfg, lock=promotion_lock)
    for version, (line, _) in completed.items():
        if version != str(args.version):
            print(f"{name} version {version}: {line}")
    if str(args.version) in completed:
        line, decision = completed[str(args.version)]
        if decision is None:
            raise CommandError(f"{name} version {args.version}: {line}")
        print(f"{name} version {args.version}: {line}")
        return EXIT_OK if decision.accepted else EXIT_REJECTED
    s = load_splits(prepared.cache_path)
    decision = gate(name, str(args.version), s.val_images.numpy(), s.val_labels.numpy(), cfg, force=args.force,
                    task=Task(s.name, s.digest), lock=promotion_lock, decide_again=True,
                    extra={COMMAND: "mnistops promote" + (" --force" if args.force else "")})
    print(f"{name} version {args.version}: {decision.promotion} ({decision.reason})")
    return EXIT_OK if decision.accepted else EXIT_REJECTED


def cmd_rollback(args) -> int:
    """The champion back to the previous champion (nn_core.rollback says which), or to --to, through
    the task and parity checks; the decision recorded, the alias published."""
    from flows.promotion import promotion_lock
    from nn_core import rollback

    name = from_args(GateConfig, args).model_for(args.dataset or "mnist")
    command = "mnistops rollback" + (f" --to {args.to}" if args.to else "")
    try:
        done = rollback.rollback(name, None if args.to is None else str(args.to), lock=promotion_lock,
                                 command=command)
    except rollback.NothingToRollBack as e:  # a normal outcome, like a rejection: not an error line
        print(str(e))
        return EXIT_NO_ROLLBACK
    for version, why in done.skipped:
        print(f"{name} version {version}: passed over ({why})")
    if done.decision is None:
        print(f"{name} version {done.after} is already the champion: nothing changed")
    else:
        print(f"{name}: champion rolled back from version {done.before} to version {done.after} "
              f"({done.decision.reason})")
    return EXIT_OK


def _check_ui(args) -> None:
    """The UI's address can be bound, asked before anything starts (the home's store included):
    uvicorn reports a taken port in a log line and then exits 0, after the server's start-up."""
    import socket

    from common.servers import tracking_server

    if tracking_server():
        return  # nothing is served here
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        with socket.create_server((args.host, args.port), family=family):  # SO_REUSEADDR, as uvicorn binds
            pass
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise CommandError(f"--port {args.port}: {args.host}:{args.port} cannot be bound ({why}); "
                           "choose another --port") from None


def cmd_ui(args) -> int:
    from common.servers import tracking_server
    from common.storage import redact_url
    from flows import lifeline
    from flows.settings import configure

    cfg = configure()
    if server := tracking_server():  # answers (checked at start-up) and serves its own UI
        print(f"MLFLOW_TRACKING_URI is a tracking server: its UI is {redact_url(server).rstrip('/')}/ "
              "(mnistops ui serves a local store only)")
        return EXIT_OK
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", cfg.tracking_uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    if artifact_root := settings.env("MNISTOPS_ARTIFACT_ROOT"):
        cmd += ["--default-artifact-root", Path(artifact_root).as_uri()]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {cfg.tracking_uri}); Ctrl-C stops it", flush=True)
    # Tied to this process: the server and its workers stop with it, however it ends (SIGKILL too).
    with lifeline.tied(cmd, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}) as proc:
        code = proc.wait()
    # The server never ends by itself (Ctrl-C or SIGTERM end the wait above with an exception), and
    # it exits 0 when the port was taken after the check: whatever its code, this is a failure.
    raise CommandError(f"--port {args.port}: the MLflow UI server on {args.host}:{args.port} stopped by itself "
                       f"(exit code {code}; its last lines above say why)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mnistops", formatter_class=Formatter, description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print tracebacks with errors (or MNISTOPS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn, help: str, check=None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=Formatter)
        p.set_defaults(fn=fn, check=check, prefect_api=False, reap=name in ("train", "models", "promote"))
        # Also after the command name; SUPPRESS keeps an earlier `mnistops --debug CMD` in place.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print tracebacks with errors (or MNISTOPS_DEBUG=1)")
        return p

    _training_commands(command)
    _registry_commands(command)
    p = command("ui", cmd_ui, "start the MLflow UI over the embedded store (127.0.0.1) and print its address; "
                              "with MLFLOW_TRACKING_URI=http(s)://..., print where that server's UI is", _check_ui)
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=PORT, default=5000, help="port")

    from flows import commands, monitoring

    commands.add(command)
    monitoring.add(command)
    return parser


def _training_commands(command) -> None:
    p = command("prepare-data", cmd_prepare_data, "obtain, verify and cache a dataset; print its splits and digest",
                check_data)
    data_args(p)

    p = command("train", cmd_train, "DDP training only (no Prefect): log to MLflow, write a checkpoint",
                check_training)
    data_args(p)
    train_args(p)
    multi_node_args(p)

    p = command("run", cmd_run, "the training pipeline once: data -> DDP training -> ONNX -> gate -> champion, "
                                "then a batch inference over the test set with the champion", _check_run)
    data_args(p)
    train_args(p)
    gate_args(p)
    p.add_argument("--no-inference", action="store_true", help="skip the batch inference over the test set")
    p.add_argument("--feedback", action="append", default=None, metavar="DIR|URL",
                   help="a labelled input (a folder of images with a labels.csv, or one images file and one labels "
                        "file, IDX or .npy; or a URL prefix) recorded as a feedback set of the task and trained on "
                        "(its training part; its held-out part joins the gate's slices); repeatable")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="TRAINING_ID",
                   help="continue a killed training from its checkpoint into the same MLflow run, then gate it "
                        "as a candidate of its dataset's model; its dataset (and cache), model, training "
                        "settings and experiment are the training's own, whatever the options say (default: "
                        "the latest unfinished training in MNISTOPS_HOME)")
    p.set_defaults(prefect_api=True, reap=True)


def _registry_commands(command) -> None:
    p = command("models", cmd_models, "registered versions, their metrics and the champion")
    add_arguments(p, DataConfig, only=["dataset"], defaults={"dataset": None},
                  helps={"dataset": "list only this task's registered model (default: every registered model)"})
    add_arguments(p, GateConfig, only=["model_name"])
    p.add_argument("--history", type=number(int, {"ge": 0}), default=10, metavar="N",
                   help="show the last N changes of each champion (0: all)")

    p = command("rollback", cmd_rollback, "move the champion back to the previous champion (the one before the "
                                          "current one took over; again: one further back), or to --to "
                                          "VERSION, through the task and parity checks; exit 5 when there is "
                                          "nothing to roll back to")
    add_arguments(p, DataConfig, only=["dataset"], defaults={"dataset": None},
                  helps={"dataset": "names the task: the default model name is DATASET-mlp (mnist-mlp without it)"})
    add_arguments(p, GateConfig, only=["model_name"])
    p.add_argument("--to", type=POSITIVE, default=None, metavar="VERSION",
                   help="the version to restore: one the gate accepted, of the model's task, parity passed "
                        "(default: the previous champion)")

    p = command("promote", cmd_promote, "move the champion alias to VERSION through the gate's checks, on the "
                                        "registered model's own validation split", check_data)
    p.add_argument("version", type=POSITIVE, help="registered model version")
    p.add_argument("--force", action="store_true",
                   help="move the alias even when the accuracy is below the threshold or worse than the "
                        "champion by more than the margin (never across datasets, never without parity)")
    data_args(p, defaults={"dataset": None},
              helps={"dataset": "names the task: the default model name is DATASET-mlp (mnist-mlp without it); "
                                "the split is always the registered model's own dataset's"})
    gate_args(p)


# ---------------------------------------------------------------------------------------------
# One line per failure


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _signal_of(e: BaseException) -> int | None:
    """The signal behind an interruption, whoever turned it into an exception: Python (SIGINT),
    our handler, torch elastic's agent (SignalException) or Prefect's flow engine (TerminationSignal)."""
    for x in _chain(e):
        if isinstance(x, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(x, Stopped):
            return x.signum
        names = {c.__name__ for c in type(x).__mro__}
        if "SignalException" in names and getattr(x, "sigval", None) is not None:
            return int(x.sigval)
        if "TerminationSignal" in names and getattr(x, "signal", None) is not None:
            return int(x.signal)
    return None


# Failures that are the user's to fix (matched by name: the error path must not import torch).
_USER_ERRORS = {"CommandError", "ValueError", "OSError", "DataError", "TrainingError", "ServingError",
                "MlflowException", "PrefectApiError"}


def _failure(e: BaseException) -> tuple[int, str]:
    """(exit code, the one line) for an exception that ended a command."""
    sig = _signal_of(e)
    if sig is not None:
        code = EXIT_SIGINT if sig == signal.SIGINT else 128 + sig
        return code, f"interrupted ({signal.Signals(sig).name}), stopped cleanly"
    text = getattr(e, "message", None) if "MlflowException" in {c.__name__ for c in type(e).__mro__} else None
    text = str(text or e).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if _USER_ERRORS & {c.__name__ for c in type(e).__mro__}:
        return getattr(e, "exit_code", EXIT_ERROR), f"error: {first or type(e).__name__}"
    return EXIT_ERROR, f"error: {type(e).__name__}: {first} (rerun with --debug for the traceback)"


def _reap_stale_runs() -> None:
    """Runs left RUNNING by a command that was killed are marked KILLED before this one starts."""
    import logging

    from common.settings import env

    uri = env("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return  # no store yet (infer on a new home: see _started), so no run to reap; nor MLflow to import
    from nn_core.reaping import reap_runs

    try:
        reap_runs()
    except Exception as e:  # reaping is housekeeping: the command itself decides about the store
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        logging.getLogger(__name__).warning("could not check for runs left by killed commands: %s", first)


def _cancel_own_flow_runs(reason: str) -> None:
    if "flows.ownership" not in sys.modules:
        return  # no flow run was started
    import logging

    try:
        sys.modules["flows.ownership"].cancel_own_flow_runs(reason)
    except Exception as e:
        logging.getLogger(__name__).warning("could not mark this command's flow runs cancelled: %s", e)


def _stop_trainings() -> None:
    """On SIGINT/SIGTERM: stop the DDP workers of trainings launched on other threads (a sweep's),
    which no signal handler reaches, so their launches end and the flow can unwind. Their MLflow runs
    are marked KILLED (resumable), not FAILED."""
    launch = sys.modules.get("nn_core.launch")
    if launch is not None:
        launch.STOPPING.set()
    from flows.lifeline import stop_worker_children

    stop_worker_children()


def _on_signal(signum, frame):
    raise Stopped(signum)


# The commands that talk to MLflow, and those that use a configured Prefect API: run, sweep and serve
# the one configured anywhere (else they start a temporary one); infer and promote one only when
# PREFECT_API_URL is in the environment (flows/commands.py, flows/promotion.py).
_MLFLOW_COMMANDS = {"train", "run", "sweep", "serve", "models", "promote", "rollback", "infer", "ui", "monitor"}
_PREFECT_COMMANDS = {"run", "sweep", "serve"}
_PREFECT_IF_SET = {"infer", "promote", "rollback"}


def _check_servers(args) -> None:
    """A configured server that does not answer is one line naming its setting, within seconds
    (common/servers.py), before anything is started or written; MLflow's own retries are bounded
    for the rest of the command."""
    from common.servers import check_mlflow, check_reachable, tls_context
    from flows import prefect_api

    uses_mlflow = args.command in _MLFLOW_COMMANDS
    if args.command == "infer":  # a local .onnx file, not tracked, needs no MLflow
        uses_mlflow = args.track or "://" in args.model or args.model.startswith(("models:", "runs:"))
    if uses_mlflow:
        check_mlflow()
    url = (prefect_api.configured_url() if args.command in _PREFECT_COMMANDS
           else os.environ.get("PREFECT_API_URL") if args.command in _PREFECT_IF_SET else None)
    if url:
        check_reachable(url, "PREFECT_API_URL", "the Prefect API",
                        context=tls_context("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "PREFECT_API_SSL_CERT_FILE"))


@contextlib.contextmanager
def _started(args, debug: bool):
    """What every command needs before it runs: its arguments checked, the home's settings and
    logging, Prefect's temporary API booting (when the command uses one), the home's MLflow store
    made, stale runs reaped. Its imports (MLflow's store, Prefect's settings) run with the garbage
    collector paused (common.settings.loading)."""
    from flows import prefect_api
    from common.logs import configure_logging
    from flows.settings import configure
    from common.settings import loading

    with contextlib.ExitStack() as stack:
        with loading():
            if args.check is not None:
                args.check(args)
            _check_servers(args)  # before the home is made: nothing is written for a server that is down
            cfg = configure()
            configure_logging(debug)
            if args.prefect_api:
                prefect_api.start(cfg.home)  # boots while the command imports torch and Prefect
            # A new home's store, made whole before any MLflow client opens it. Not for infer: the
            # batch job opens MLflow only through common.settings.mlflow_client(), which makes it
            # then, so on a new home an input refused on its contents costs ~0.6 s, not the ~3-6 s
            # of CPU that importing MLflow and migrating a store take.
            if args.command != "infer":
                create_sqlite_store()
            if args.reap:
                _reap_stale_runs()
            stack.enter_context(prefect_api.without_heartbeats())
        yield


def main(argv: list[str] | None = None) -> int:
    from common.settings import skip_final_collection

    skip_final_collection()
    args = build_parser().parse_args(argv)
    from common.logs import debug_enabled

    debug = args.debug or debug_enabled()
    if debug:
        os.environ["MNISTOPS_DEBUG"] = "1"  # for the processes it starts (workers, flow runs)
    handlers, wakeup_fd = {}, None
    if threading_is_main():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, _on_signal)
        if args.command in ("run", "sweep", "train"):
            from flows import lifeline

            wakeup_fd = lifeline.on_signal(_stop_trainings)
    try:
        with _started(args, debug):
            return args.fn(args)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        code, line = _failure(e)
        if _signal_of(e) is not None:
            _cancel_own_flow_runs(line)
        if debug:
            import traceback

            traceback.print_exception(e)
        print(f"mnistops {args.command}: {line}", file=sys.stderr, flush=True)
        return code
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        if wakeup_fd is not None:
            signal.set_wakeup_fd(wakeup_fd)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
