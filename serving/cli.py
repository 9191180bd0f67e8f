"""Command line of the batch job: `python -m serving ...`, and `mnistops infer` through
`add_infer_arguments` / `config_from_args` / `run`.

Exit codes (common.errors, the one table): 0 done, 1 an error (bad input, missing model, an output
that would clobber something), 2 bad usage, 4 a drift alert with --fail-on-drift."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

from common import fields
from serving.config import JobConfig
from common.errors import EXIT_ERROR, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, DriftAlert, ServingError

# serving.job imports onnxruntime and pyarrow (~0.5 s): only the functions that run a job import it.


def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `infer` options, added to `parser` (a top-level parser or a subcommand's): what to score
    (one input or an inbox) and where to, then every JobConfig setting (serving.config)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=location, default=None, help=_help("input") + "; a path or a URL")
    source.add_argument("--inbox", type=location, default=None, metavar="DIR|URL",
                        help="score every input in DIR (IDX or .npy files, image folders) not scored yet, exactly "
                             "once per content (a ledger in the --output folder); one predictions file + manifest each")
    parser.add_argument("--output", type=location, required=True,
                        help=_help("output") + "; a path or a URL. With --inbox: a folder or a URL prefix")
    parser.add_argument("--rescore", action="store_true",
                        help="with --inbox: score inputs again that were scored before, with the current model")
    fields.add_arguments(parser, JobConfig)
    return parser


def location(text: str) -> Path | str:
    """A path, or a URL (s3://...) kept as text: Path would fold its '//'."""
    from common.storage import is_url

    return text if is_url(text) else Path(text)


def _help(name: str) -> str:
    return next(f.metadata["description"] for f in dataclasses.fields(JobConfig) if f.name == name)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    return fields.from_args(JobConfig, args, input=args.input if args.input is not None else args.inbox,
                            output=args.output)


def summary(result) -> dict[str, object]:
    from common.storage import shown

    return {
        "output": shown(result.output),
        "manifest": shown(result.manifest),
        "model": result.model.uri,
        "model_version": result.model.version,
        "provider": result.provider,
        "records": result.records,
        "predicted": result.predicted,
        "skipped": len(result.skipped),
        "accuracy": result.accuracy,
        "throughput_img_per_s": round(result.throughput, 1),
        "drift": result.drift.status,
        "mlflow_run_id": result.mlflow_run_id,
    }


def validate(args: argparse.Namespace) -> None:
    """Checks that need no model and no import of onnxruntime, torch or prefect: bad paths fail in
    milliseconds with one line (ServingError)."""
    from common import storage
    from common.errors import InputError, OutputError

    if args.inbox is not None:
        if storage.is_url(args.inbox):
            storage.check_bucket(args.inbox)
        elif not args.inbox.is_dir():
            raise InputError(f"{args.inbox}: no such inbox folder")
        if not storage.is_url(args.output) and args.output.exists() and not args.output.is_dir():
            raise OutputError(f"{args.output}: with --inbox the output must be a folder, and this is a file")
        return
    _check_exists(args.input, "no such file or folder")
    if args.labels is not None:
        _check_exists(args.labels, "no such labels file")
    if args.rescore:
        raise OutputError("--rescore: only with --inbox")


def _check_exists(loc, missing: str) -> None:
    """A named input is there: a path on this machine, or an object or prefix at a URL (whose store
    answers: a missing bucket, no credentials, an unreachable endpoint are each one line)."""
    from common import storage
    from common.errors import InputError

    if storage.is_url(loc):
        storage.check_bucket(loc)
        if not storage.exists(loc):
            raise InputError(f"{storage.shown(loc)}: {missing}")
    elif not Path(loc).exists():
        raise InputError(f"{loc}: {missing}")


def run(args: argparse.Namespace) -> dict[str, object]:
    """The job (or the inbox run) the arguments describe; returns its summary."""
    cfg = config_from_args(args)
    if args.inbox is not None:
        from serving.inbox import run_inbox

        return run_inbox(args.inbox, args.output, cfg, rescore=args.rescore).summary()
    from serving.job import run_job

    return summary(run_job(cfg))


def result_summary(result) -> dict[str, object]:
    """The summary of a job's or an inbox run's result (as DriftAlert carries it)."""
    return result.summary() if hasattr(result, "summary") else summary(result)


def report_error(prog: str, e: ServingError) -> int:
    """One line on stderr (after the summary, for a drift alert: the outputs exist); the exit code."""
    if isinstance(e, DriftAlert) and e.result is not None:
        print(json.dumps(result_summary(e.result), indent=2, default=str))
    print(f"{prog}: error: {e}", file=sys.stderr)
    return e.exit_code


def main(argv: list[str] | None = None) -> int:
    from common.settings import skip_final_collection

    skip_final_collection()
    parser = argparse.ArgumentParser(
        prog="python -m serving", formatter_class=fields.HelpFormatter,
        description="Batch inference with onnxruntime: images in, predictions (Parquet or CSV) and "
        "a JSON manifest out, written atomically. Uses the same store as `mnistops` "
        "(MNISTOPS_HOME/mlflow.db unless MLFLOW_TRACKING_URI is set).",
    )
    args = add_infer_arguments(parser).parse_args(argv)
    from common.logs import configure_logging, debug_enabled
    from common.settings import configure_store

    configure_logging(debug_enabled(), fmt="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (Kubernetes, Prefect cancelling a run) as SystemExit, so the temp file is removed on the
    # way out; only SIGKILL leaves one behind (the next job removes it).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        validate(args)
        if args.track or "://" in args.model or args.model.startswith(("models:", "runs:")):
            from common.servers import check_mlflow

            check_mlflow()  # a tracking server that does not answer: one line within seconds
        configure_store()
        s = run(args)
    except ServingError as e:
        return report_error(parser.prog, e)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C: unwound like SIGTERM (temp files removed, the run marked failed)
        print(f"{parser.prog}: interrupted (SIGINT), stopped cleanly", file=sys.stderr)
        return EXIT_SIGINT
    except SystemExit as e:
        if e.code == EXIT_SIGTERM:
            print(f"{parser.prog}: interrupted (SIGTERM), stopped cleanly", file=sys.stderr)
        raise
    print(json.dumps(s, default=str))
    return exit_code(parser.prog, s)


def exit_code(prog: str, s: dict[str, object]) -> int:
    """EXIT_ERROR when an inbox run met bad inputs (the others were scored; each failure is recorded
    in the ledger and reported once), else EXIT_OK."""
    failed = s.get("failed") or []
    if failed:
        print(f"{prog}: error: {len(failed)} input(s) of the inbox failed, first: {failed[0]['error']}",
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
