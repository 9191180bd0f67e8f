"""The options of the `mnistops` commands: argument groups derived from the configs (nn_core.config),
the flows' parameters built back from them (and as deployments hold them, JSON), and the cheap checks
that run before anything heavy is imported. Parsing only: the commands (flows.cli, flows.commands)
use these, nothing here runs one."""

from __future__ import annotations

import argparse
import dataclasses
import signal
from pathlib import Path

from nn_core.config import MULTI_NODE, DataConfig, GateConfig, LaunchSpec, MLPConfig, TrackingConfig, TrainConfig
from common.errors import EXIT_ERROR, EXIT_USAGE
from common.fields import HelpFormatter, add_arguments, form_values, from_args, number
from common.settings import env


class CommandError(Exception):
    """A failure the user can fix, found by the command line's own checks: one line, exit 1."""

    exit_code = EXIT_ERROR


class UsageError(CommandError):
    """Options that do not go together: one line, exit 2 (like argparse's own usage errors)."""

    exit_code = EXIT_USAGE


class Stopped(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwinds like KeyboardInterrupt, so `finally` blocks and context
    managers clean up; not an Exception, so no library's `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr (the usage block is one `--help` away), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# Options, derived from the configs that own them (nn_core.config through common.fields): a value
# out of range is a usage error before anything is imported or started.

POSITIVE = number(int, {"ge": 1})
PORT = number(int, {"ge": 1, "le": 65535})


def data_args(p: argparse.ArgumentParser, **overrides) -> None:
    """--dataset, --data-source, --data-dir (`overrides`: add_arguments' defaults= and helps=)."""
    add_arguments(p.add_argument_group("data"), DataConfig, **overrides)


def train_args(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """The model, training, tracking and one-node launch options."""
    g = p.add_argument_group("model and training")
    add_arguments(g, MLPConfig, exclude=exclude)
    add_arguments(g, TrainConfig, exclude=exclude)
    add_arguments(p.add_argument_group("tracking"), TrackingConfig, defaults={"experiment": None},
                  helps={"experiment": "MLflow experiment (default: DATASET-mlp, the task's own)"})
    add_arguments(p.add_argument_group("launch (torch elastic)"), LaunchSpec, exclude=MULTI_NODE)


def multi_node_args(p: argparse.ArgumentParser) -> None:
    add_arguments(p.add_argument_group("multi-node (torchrun's c10d rendezvous)"), LaunchSpec, only=MULTI_NODE)


def gate_args(p: argparse.ArgumentParser) -> None:
    add_arguments(p.add_argument_group("registry and gate"), GateConfig)


def data_config(args) -> DataConfig:
    return from_args(DataConfig, args, data_source=data_source_of(args))


def pipeline_parameters(args) -> dict:
    """The training pipeline flow's parameters, from a command's options."""
    return {"data": data_config(args), "model": from_args(MLPConfig, args), "train": from_args(TrainConfig, args),
            "launch": from_args(LaunchSpec, args), "gate": from_args(GateConfig, args),
            "experiment": args.experiment}


def data_source_of(args) -> str | None:
    return args.data_source or None  # the option, else MNISTOPS_DATA_SOURCE (common.fields)


def parameters_json(params: dict) -> dict:
    """A flow's parameters as a deployment holds them (and Prefect shows for each run): configs as
    their form's fields (common.fields.form_values), None values left out (the flow's default)."""
    return {k: form_values(v) if dataclasses.is_dataclass(v) else v for k, v in params.items() if v is not None}


def deployment_defaults() -> dict:
    """infra/prefect.yaml's build step (`prefect deploy` runs it): the training and sweep flows'
    defaults, taken from their signatures, as their deployments' parameters. Prefect shows a run's
    parameters as the deployment holds them: without this a run started with defaults showed `{}`."""
    import inspect

    from flows.sweep import hyperparameter_sweep
    from flows.training import training_pipeline

    def defaults(flow) -> dict:
        return parameters_json({name: p.default for name, p in inspect.signature(flow.fn).parameters.items()
                                if p.default is not inspect.Parameter.empty})

    training = defaults(training_pipeline)
    return {"training": training, "sweep": defaults(hyperparameter_sweep), "retraining": retraining_trigger(training)}


def retraining_trigger(training: dict) -> dict:
    """The training deployment's drift trigger (flows.drift_events) for the model its default
    parameters train, with K and the window from MNISTOPS_RETRAIN_ALERTS / MNISTOPS_RETRAIN_WINDOW."""
    from flows.drift_events import from_environment, trigger_spec
    from nn_core.config import DataConfig, GateConfig

    model = GateConfig(**training["gate"]).model_for(DataConfig(**training["data"]).dataset)
    return trigger_spec(model, from_environment())


# ---------------------------------------------------------------------------------------------
# Checks of what the options name (files, combinations), torch- and Prefect-free: they run before
# anything is imported, started or written, so a typo costs a fraction of a second and one line.


def data_dir_of(args) -> Path:
    # The rule of nn_core.data.default_data_dir, without importing torch for it; args.data_dir is the
    # option, else MNISTOPS_DATA_DIR (common.fields).
    if args.data_dir:
        return Path(args.data_dir).expanduser()
    return Path(env("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnistops"


def check_data(args) -> None:
    from urllib.parse import unquote, urlparse

    from nn_core.datasets import get_spec

    data_dir = data_dir_of(args)
    if data_dir.exists() and not data_dir.is_dir():
        raise CommandError(f"{data_dir}: the data folder (--data-dir / MNISTOPS_DATA_DIR) is a file, expected a folder")
    spec = get_spec(args.dataset) if args.dataset is not None else None
    source = data_source_of(args)
    if source in (None, "", "mirrors", "official"):
        return
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        return
    from common.storage import SOURCE_KINDS, STORE_SCHEMES

    if parsed.scheme in STORE_SCHEMES:
        return  # the store is asked when the data is prepared (one line naming the URL if it fails)
    if parsed.scheme and parsed.scheme != "file" and len(parsed.scheme) > 1:
        raise CommandError(f"data source {source!r}: {SOURCE_KINDS}")
    folder = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(source).expanduser()
    if spec is not None and (data_dir / f"{spec.name}.pt").is_file():
        return  # a cache is there: the source is only read if that cache fails its check
    if not folder.is_dir():
        raise CommandError(f"{folder}: data source folder does not exist")
    if spec is None:
        return  # promote: the dataset is the registered model's, known only from the registry
    missing = [f.filename for f in spec.files
               if not any((folder / n).is_file() for n in (f.filename, f.filename + ".gz"))]
    if missing:
        raise CommandError(f"{folder}: data source folder lacks {', '.join(missing)} (or .gz); "
                           f"expected the four {spec.name} IDX files")


def check_training(args) -> None:
    check_data(args)
    if getattr(args, "nnodes", 1) > 1 and not (args.rdzv_endpoint and args.rdzv_id):
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT and --rdzv-id, the same on every node")
    if args.device == "cpu" and args.batch_size % args.nproc:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by --nproc {args.nproc} "
                         "(the global batch is split evenly across processes)")
    check_machine(args, [args.batch_size])


def check_machine(args, batch_sizes: list[int], trainings: int = 1) -> None:
    """The request within this machine (nn_core.machine): --nproc (per node) x `trainings` at once
    within the usable cores and the memory available, each batch size within the dataset's training
    split. Before torch is imported, a machine with no NVIDIA device is known to train on the CPU;
    elsewhere the launch checks the workers again once torch has counted the GPUs."""
    from nn_core.machine import BeyondMachine, check_request, this_machine

    try:
        check_request(args.nproc, args.device, batch_sizes, args.dataset, this_machine(), trainings)
    except BeyondMachine as e:
        raise UsageError(str(e)) from None


def check_file(path, what: str) -> None:
    from common.storage import is_url

    if is_url(path):
        return  # a URL is checked by the batch job's own validation (serving.cli), which asks the store
    if path is not None and not Path(path).exists():
        raise CommandError(f"{path}: no such file or folder ({what})")


def check_infer(args) -> None:
    """The files `infer` reads exist (the batch job checks their content)."""
    check_file(args.input, "--input")
    check_file(args.labels, "--labels")
    if "://" not in args.model and not args.model.startswith(("models:", "runs:")):
        check_file(args.model, "--model")
