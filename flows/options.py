"""The options of the `mnistops` commands: typed values, argument groups and the cheap checks that run
before anything heavy is imported. Parsing only: the commands (flows.cli, flows.commands) use these,
nothing here runs a command."""

from __future__ import annotations

import argparse
import math
import os
import signal
from pathlib import Path

from serving.errors import EXIT_ERROR, EXIT_USAGE


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


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr (the usage block is one `--help` away), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# Typed options: a value out of range is a usage error before anything is imported or started.


def int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
        if value < low or (high is not None and value > high):
            expected = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{value}: expected an integer {expected}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            expected = (f"> {low:g}" if low_open else f">= {low:g}") + ("" if high == math.inf else f" and <= {high:g}")
            raise argparse.ArgumentTypeError(f"{text}: expected a number {expected}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
PORT = int_at_least(1, 65535)


def hidden_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden sizes {text!r}: expected integers like 50 or 128,64") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes {text!r}: expected positive integers like 50 or 128,64")
    return sizes


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return text


def data_args(p: argparse.ArgumentParser, dataset_help: str = "which dataset", dataset_default: str | None = "mnist") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=dataset_default, choices=["mnist", "fashion-mnist"], help=dataset_help)
    g.add_argument("--data-source", default=None, metavar="PATH|URL",
                   help="folder or file:// URL with the four IDX files (gzipped or not), or an http(s) mirror; "
                        "default: $MNISTOPS_DATA_SOURCE, else the official mirrors")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the verified cache lives; default: $MNISTOPS_DATA_DIR, else ~/.cache/mnistops")


def train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--hidden", type=hidden_sizes, default=[50], help="hidden layer sizes, e.g. 50 or 128,64")
    g.add_argument("--epochs", type=POSITIVE, default=10, help="training epochs")
    g.add_argument("--batch-size", type=POSITIVE, default=256, help="global batch size (split across processes)")
    g.add_argument("--lr", type=float_in(0, low_open=True), default=3e-3, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float_in(0), default=0.0, help="Adam weight decay")
    g.add_argument("--schedule", default="cosine", choices=["none", "cosine", "onecycle"], help="learning-rate schedule")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the initial weights and the shuffling")
    g.add_argument("--experiment", default="mnist-mlp", help="MLflow experiment")
    l = p.add_argument_group("launch (torch elastic)")
    l.add_argument("--nproc", type=POSITIVE, default=1, help="CPU worker processes when there is no CUDA (with CUDA: one per GPU)")
    l.add_argument("--max-restarts", type=NON_NEGATIVE, default=0, help="times the launcher restarts failed workers")
    l.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")


def gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry and gate")
    g.add_argument("--model-name", default=None,
                   help="registered model name (default: DATASET-mlp); bound to the dataset of its first version")
    g.add_argument("--threshold", type=float_in(0, 1), default=0.96, help="minimum validation accuracy (ONNX) to promote")
    g.add_argument("--margin", type=float_in(0, 1), default=0.0, help="how much worse than the champion a candidate may be")


def data_source_of(args) -> str | None:
    return args.data_source or os.environ.get("MNISTOPS_DATA_SOURCE") or None


# ---------------------------------------------------------------------------------------------
# Checks of what the options name (files, combinations), torch- and Prefect-free: they run before
# anything is imported, started or written, so a typo costs a fraction of a second and one line.


def data_dir_of(args) -> Path:
    # The rule of nn_core.data.default_data_dir, without importing torch for it.
    if args.data_dir or os.environ.get("MNISTOPS_DATA_DIR"):
        return Path(args.data_dir or os.environ["MNISTOPS_DATA_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnistops"


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
    if parsed.scheme and parsed.scheme != "file" and len(parsed.scheme) > 1:
        raise CommandError(f"data source {source!r}: expected a folder, a file:// URL or an http(s):// mirror")
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


def check_file(path, what: str) -> None:
    if path is not None and not Path(path).exists():
        raise CommandError(f"{path}: no such file or folder ({what})")


def check_infer(args) -> None:
    """The files `infer` reads exist (the batch job checks their content)."""
    check_file(args.input, "--input")
    check_file(args.labels, "--labels")
    if "://" not in args.model and not args.model.startswith(("models:", "runs:")):
        check_file(args.model, "--model")


def pipeline_kwargs(args) -> dict:
    return dict(dataset=args.dataset, data_source=data_source_of(args), data_dir=args.data_dir, hidden=args.hidden,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                schedule=args.schedule, seed=args.seed, nproc=args.nproc, max_restarts=args.max_restarts,
                device=args.device, gate_threshold=args.threshold, gate_margin=args.margin,
                model_name=args.model_name, experiment=args.experiment)
