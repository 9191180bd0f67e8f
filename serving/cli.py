"""Command line of the batch job: `python -m serving ...`, and `mnistops infer` through
`add_infer_arguments` / `config_from_args` / `run`.

Exit codes (serving.errors, the one table): 0 done, 1 an error (bad input, missing model, an output
that would clobber something), 2 bad usage, 4 a drift alert with --fail-on-drift."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from serving.defaults import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, EXPERIMENT, FORMATS
from serving.errors import EXIT_ERROR, EXIT_OK, DriftAlert, ServingError
from serving.model_source import DEFAULT_MODEL_URI

# serving.job imports onnxruntime and pyarrow (~0.5 s): only the functions that run a job import it.


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive integer")
    return value


def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `infer` options, added to `parser` (a top-level parser or a subcommand's)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", type=Path, default=None,
        help="IDX images file (gzipped or not), .npy array (uint8, or float in 0..255 or 0..1 as its "
        "largest value says; [N,28,28] or [N,784]), or a folder of PNG/JPEG images of any size "
        "(every non-hidden image file under it is one record, in path order; other files are "
        "ignored and listed in the manifest; a labels.csv with lines file,label gives true labels)",
    )
    source.add_argument(
        "--inbox", type=Path, default=None, metavar="DIR",
        help="score every input in DIR (IDX or .npy files, image folders) not scored yet, exactly "
        "once per content (a ledger in the --output folder); one predictions file + manifest each",
    )
    parser.add_argument(
        "--output", type=Path, required=True,
        help="predictions file (columns id, prediction, probability, ood_score when the model has a "
        "drift reference, label and correct with labels); a manifest OUTPUT.manifest.json is written "
        "beside it; both appear only when the job succeeds. With --inbox: a folder",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing output (an input is never overwritten)",
    )
    parser.add_argument(
        "--rescore", action="store_true",
        help="with --inbox: score inputs again that were scored before, with the current model",
    )
    parser.add_argument(
        "--fail-on-drift", action="store_true",
        help="exit 4 (after writing the outputs) when the drift check alerts",
    )
    parser.add_argument(
        "--drift-reference", default=None, metavar="JSON|URI",
        help="drift profile to check against (default: the one stored with the model version)",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_URI,
        help="MLflow registry URI (models:/NAME@ALIAS or models:/NAME/VERSION) or a local .onnx file "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=None,
        help=f"images per inference call; memory is bounded by a few batches (default: "
        f"{CPU_BATCH_SIZE} on CPU, {CUDA_BATCH_SIZE} on CUDA)",
    )
    parser.add_argument(
        "--labels", type=Path, default=None,
        help="IDX labels file or 1-D integer .npy of the true classes, one per input record in input "
        "order (a folder: one per image file, in path order); the output then has label and correct "
        "columns and the job reports accuracy (default: none; a folder's own labels.csv)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="auto: CUDA when a GPU is usable, else CPU; cuda: fail unless CUDA is actually used "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--on-error", choices=("fail", "skip"), default="fail",
        help="fail: stop at the first bad image or record; skip: skip bad images of a folder and "
        "bad (NaN/inf, out of range) records of a float array, listed in the manifest "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default=None,
        help="output format (default: csv when --output ends in .csv, else parquet)",
    )
    parser.add_argument(
        "--all-probabilities", action="store_true",
        help="also write the ten class probabilities prob_0..prob_9",
    )
    parser.add_argument(
        "--threads", type=_positive, default=None,
        help="onnxruntime intra-op threads per run (default: the CPUs this process may use / streams)",
    )
    parser.add_argument(
        "--streams", type=_positive, default=None,
        help="batches inferred side by side (default: 1 on CUDA, else min(4, CPUs / threads))",
    )
    parser.add_argument(
        "--no-track", dest="track", action="store_false",
        help=f"do not log an MLflow run (default: log one in experiment {EXPERIMENT!r} at the "
        "current MLFLOW_TRACKING_URI)",
    )
    return parser


def config_from_args(args: argparse.Namespace):
    from serving.job import JobConfig

    return JobConfig(
        input=args.input if args.input is not None else args.inbox,
        output=args.output,
        model=args.model,
        batch_size=args.batch_size,
        labels=args.labels,
        device=args.device,
        on_error=args.on_error,
        format=args.format,
        all_probabilities=args.all_probabilities,
        threads=args.threads,
        streams=args.streams,
        track=args.track,
        overwrite=args.overwrite,
        fail_on_drift=args.fail_on_drift,
        drift_reference=args.drift_reference,
    )


def summary(result) -> dict[str, object]:
    return {
        "output": str(result.output),
        "manifest": str(result.manifest),
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
    from serving.errors import InputError, OutputError

    if args.inbox is not None:
        if not args.inbox.is_dir():
            raise InputError(f"{args.inbox}: no such inbox folder")
        if args.output.exists() and not args.output.is_dir():
            raise OutputError(f"{args.output}: with --inbox the output must be a folder, and this is a file")
        return
    if not args.input.exists():
        raise InputError(f"{args.input}: no such file or folder")
    if args.labels is not None and not args.labels.is_file():
        raise InputError(f"{args.labels}: no such labels file")
    if args.rescore:
        raise OutputError("--rescore: only with --inbox")


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
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Batch inference with onnxruntime: images in, predictions (Parquet or CSV) and "
        "a JSON manifest out, written atomically. Uses the same store as `mnistops` "
        "(MNISTOPS_HOME/mlflow.db unless MLFLOW_TRACKING_URI is set).",
    )
    args = add_infer_arguments(parser).parse_args(argv)
    from serving.settings import configure_store

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (Kubernetes, Prefect cancelling a run) as SystemExit, so the temp file is removed on the
    # way out; only SIGKILL leaves one behind (the next job removes it).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        validate(args)
        configure_store()
        s = run(args)
    except ServingError as e:
        return report_error(parser.prog, e)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
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
