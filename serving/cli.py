"""Command line of the batch job: `python -m serving.cli ...`, and `mnistops infer` through
`add_infer_arguments` / `config_from_args`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from serving.errors import ServingError
from serving.job import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, EXPERIMENT, JobConfig, JobResult, run_job
from serving.model_source import DEFAULT_MODEL_URI
from serving.writers import FORMATS


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive integer")
    return value


def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `infer` options, added to `parser` (a top-level parser or a subcommand's)."""
    parser.add_argument(
        "--input", type=Path, required=True,
        help="IDX images file (gzipped or not), .npy array (uint8, or float in 0..255 or 0..1 as its "
        "largest value says; [N,28,28] or [N,784]), or a folder of PNG/JPEG images of any size "
        "(every non-hidden file in it is one record, in name order; converted the MNIST way)",
    )
    parser.add_argument(
        "--output", type=Path, required=True,
        help="predictions file (columns id, label, probability); a manifest OUTPUT.manifest.json is "
        "written beside it; both appear only when the job succeeds",
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
        "order (a folder: one per file, in name order): the job then reports accuracy (default: none)",
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


def config_from_args(args: argparse.Namespace) -> JobConfig:
    return JobConfig(
        input=args.input,
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
    )


def summary(result: JobResult) -> dict[str, object]:
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
        "mlflow_run_id": result.mlflow_run_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.cli",
        description="Batch inference with onnxruntime: images in, predictions (Parquet or CSV) and "
        "a JSON manifest out, written atomically.",
    )
    args = add_infer_arguments(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (Kubernetes, Prefect cancelling a run) as SystemExit, so the temp file is removed on the
    # way out; only SIGKILL leaves one behind (the next job removes it).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = run_job(config_from_args(args))
    except (ServingError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
