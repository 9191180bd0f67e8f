"""The batch inference job: read -> predict -> write, atomically, tracked in MLflow.

    input (IDX | .npy | folder) -> chunks (read ahead on a thread) -> onnxruntime session
      -> Parquet/CSV temp file -> rename into place -> manifest -> MLflow run

`run_job(JobConfig(...))` is the whole job; the CLI and the Prefect flow only build the config.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import pyarrow as pa
from tqdm import tqdm

from serving.errors import InputError
from serving.experiments import ensure_experiment
from serving.model_source import DEFAULT_MODEL_URI, ModelRef, resolve_model
from serving.readers import Chunk, ImageReader, LabelReader, OnError, Skipped, open_images, open_labels
from serving.session import (
    CUDA,
    INPUT_NAME,
    OUTPUT_NAME,
    Device,
    create_session,
    gpu_usable,
    plan_threads,
    provider,
)
from serving.writers import Format, PredictionWriter, manifest_path, remove_stale_temps, write_json_temp

log = logging.getLogger(__name__)

EXPERIMENT = "mnist-mlp-inference"
# Measured on 2 CPU cores with the 784-50-10 MLP: 1024-2048 beat 8192 by ~1.3x (a batch's float
# intermediates stay in cache) and need a third of the memory; a GPU wants big batches to stay busy.
CPU_BATCH_SIZE = 1024
CUDA_BATCH_SIZE = 16384
MANIFEST_VERSION = 1
T = TypeVar("T")


@dataclass(frozen=True)
class JobConfig:
    input: Path  # IDX images file (gzipped or not), .npy array, or a folder of PNG/JPEG images
    output: Path  # predictions file; its manifest goes beside it as OUTPUT.manifest.json
    model: str = DEFAULT_MODEL_URI  # registry URI (models:/NAME@ALIAS, models:/NAME/VERSION) or .onnx path
    batch_size: int | None = None  # images per run; None: CPU_BATCH_SIZE, or CUDA_BATCH_SIZE on CUDA
    labels: Path | None = None  # IDX labels file or 1-D .npy: the job then reports accuracy
    device: Device = "auto"
    on_error: OnError = "fail"  # skip: bad images (folder) / bad float records are skipped and listed
    format: Format | None = None  # None: csv when the output ends in .csv, else parquet
    all_probabilities: bool = False  # also write prob_0..prob_9
    threads: int | None = None  # onnxruntime intra-op threads per run; None: CPUs / streams
    streams: int | None = None  # batches inferred side by side; None: 1 on CUDA, else min(4, CPUs),
    #   one CPU fewer for gzipped or image input (their decoding needs one)
    decode_workers: int | None = None  # folder input's decoding threads; None: 1 for small images
    #   (MNIST-sized PNGs decode faster on one thread), else min(4, CPUs)
    track: bool = True  # log an MLflow run in `experiment` (current tracking URI)
    experiment: str = EXPERIMENT
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal

    def output_format(self) -> Format:
        if self.format is not None:
            return self.format
        return "csv" if self.output.suffix.lower() == ".csv" else "parquet"


@dataclass(frozen=True)
class JobResult:
    output: Path
    manifest: Path
    model: ModelRef
    provider: str
    records: int  # records in the input, skipped ones included
    predicted: int  # rows written
    skipped: tuple[Skipped, ...]
    accuracy: float | None  # over the predicted records, when labels were given
    seconds: float  # read -> predict -> write, model loading and tracking excluded
    throughput: float  # predicted images per second over `seconds`
    wall_seconds: float  # the whole run_job call
    input_digest: str  # SHA-256 of the input file (folder: of its sha256sum-style listing)
    labels_digest: str | None
    mlflow_run_id: str | None


# --- reading ahead -------------------------------------------------------------------------------


def read_ahead(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run `items` on a background thread, up to `depth` items ahead, so reading and decoding (file
    reads, zlib and Pillow release the GIL) overlap with inference. Memory stays bounded: at most
    depth + 2 chunks exist at once. Errors of the reader are raised here, in the consumer."""
    q: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any, err: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                q.put((item, err), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001  # handed over to the consumer
            put(None, e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's finally blocks (thread pools, files) run on its own thread

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


# --- MLflow ----------------------------------------------------------------------------------------


class _Tracking:
    """One MLflow run per job, through MlflowClient with an explicit run id (no active-run state)."""

    def __init__(self, cfg: JobConfig, model: ModelRef, provider_used: str, reader: ImageReader):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        exp_id = ensure_experiment(cfg.experiment, self.client)
        tags = {
            "mnistops.job": "inference",
            "provider": provider_used,
            "model_uri": model.uri,
            "model_version": model.version or "",
        }
        run = self.client.create_run(exp_id, run_name=f"infer-{cfg.input.name}", tags=tags)
        self.run_id: str = run.info.run_id
        params = {
            "model_uri": model.uri,
            "model_name": model.name,
            "model_version": model.version,
            "model_run_id": model.run_id,
            "input": str(cfg.input),
            "input_kind": reader.kind,
            "labels": str(cfg.labels) if cfg.labels else None,
            "output": str(cfg.output),
            "format": cfg.output_format(),
            "batch_size": cfg.batch_size,
            "device": cfg.device,
            "provider": provider_used,
            "on_error": cfg.on_error,
        }
        from mlflow.entities import Param

        self.client.log_batch(
            self.run_id, params=[Param(k, str(v)) for k, v in params.items() if v is not None]
        )

    def finish(self, result: JobResult, manifest: Path) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        metrics = {
            "records": result.records,
            "predicted": result.predicted,
            "skipped": len(result.skipped),
            "throughput_img_per_s": result.throughput,
            "seconds": result.seconds,
        }
        if result.accuracy is not None:
            metrics["accuracy"] = result.accuracy
        params = [Param("input_digest", result.input_digest)]
        if result.labels_digest:
            params.append(Param("labels_digest", result.labels_digest))
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=params,
        )
        self.client.log_artifact(self.run_id, str(manifest))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException) -> None:
        try:
            self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # noqa: BLE001  # the job's own error is the one to report
            log.exception("could not mark MLflow run %s as failed", self.run_id)


# --- the job ---------------------------------------------------------------------------------------


def _check(cfg: JobConfig) -> JobConfig:
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"batch size {cfg.batch_size}, expected >= 1")
    out = Path(cfg.output).expanduser().resolve()
    inp = Path(cfg.input).expanduser().resolve()
    if out.is_dir():
        raise ValueError(f"{out}: the output is a folder, expected a file path")
    if out == inp:
        raise ValueError(f"{out}: the output would overwrite the input")
    labels = Path(cfg.labels).expanduser().resolve() if cfg.labels else None
    return dataclasses.replace(cfg, input=inp, output=out, labels=labels)


@dataclass
class _Counts:
    predicted: int = 0
    correct: int = 0


def _predict_chunks(
    session: ort.InferenceSession,
    reader: ImageReader,
    labels: LabelReader | None,
    writer: PredictionWriter,
    cfg: JobConfig,
    streams: int,
) -> _Counts:
    """Chunks are read ahead on one thread, inferred `streams` at a time on a pool, and written here,
    in input order."""
    counts = _Counts()
    show = sys.stderr.isatty() if cfg.progress is None else cfg.progress

    def infer(pixels: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]  # (B, 10)

    def finish(chunk: Chunk, probs: np.ndarray, bar: tqdm) -> None:
        label = probs.argmax(axis=1)
        probability = np.take_along_axis(probs, label[:, None], axis=1)[:, 0]
        if labels is not None:
            y = labels.read(chunk.start, chunk.stop)
            if chunk.keep is not None:
                y = y[chunk.keep - chunk.start]
            counts.correct += int(np.count_nonzero(label == y))
        ids = chunk.names if chunk.names is not None else chunk.positions()
        writer.write(ids, label, probability, probs if cfg.all_probabilities else None)
        counts.predicted += len(label)
        bar.update(chunk.stop - chunk.start)

    with (
        tqdm(total=reader.count, unit="img", unit_scale=True, disable=not show, mininterval=0.5) as bar,
        ThreadPoolExecutor(streams, thread_name_prefix="infer") as pool,
    ):
        pending: deque[tuple[Chunk, Future[np.ndarray]]] = deque()
        assert cfg.batch_size is not None
        for chunk in read_ahead(reader.chunks(cfg.batch_size)):
            pending.append((chunk, pool.submit(infer, chunk.pixels)))
            if len(pending) >= streams:
                done, fut = pending.popleft()
                finish(done, fut.result(), bar)
        while pending:
            done, fut = pending.popleft()
            finish(done, fut.result(), bar)
    return counts


def _manifest(
    cfg: JobConfig, model: ModelRef, prov: str, reader: ImageReader, labels: LabelReader | None,
    result: JobResult, started: dt.datetime,
) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "output": {"path": str(result.output), "format": cfg.output_format(), "rows": result.predicted,
                   "all_probabilities": cfg.all_probabilities},
        "model": {**model.to_dict(), "onnxruntime": ort.__version__},
        "input": {"path": str(cfg.input), "kind": reader.kind, "records": reader.count,
                  "sha256": result.input_digest, **reader.details},
        "labels": None if labels is None else {"path": str(labels.path), "sha256": labels.digest},
        "provider": prov,
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "on_error": cfg.on_error,
        "counts": {"records": result.records, "predicted": result.predicted,
                   "skipped": len(result.skipped)},
        "skipped": [dataclasses.asdict(s) for s in result.skipped],
        "accuracy": result.accuracy,
        "seconds": round(result.seconds, 6),
        "throughput_img_per_s": round(result.throughput, 1),
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "mlflow_run_id": result.mlflow_run_id,
    }


def _open_session(cfg: JobConfig, reader: ImageReader) -> tuple[ModelRef, ort.InferenceSession, int]:
    """(model, session, streams): the model resolved (downloaded if remote) and loaded."""
    with tempfile.TemporaryDirectory(prefix="mnistops-model-") as tmp:
        model = resolve_model(cfg.model, Path(tmp))
        # gzip and image decoding run on the reader's side: leave them a CPU
        reserve = 1 if reader.kind in ("idx.gz", "folder") else 0
        cuda = cfg.device != "cpu" and gpu_usable()
        streams, threads = plan_threads(cuda, cfg.streams, cfg.threads, reserve)
        session = create_session(model.path, cfg.device, threads)  # the model is in memory now
    return model, session, streams


def run_job(cfg: JobConfig) -> JobResult:
    """Read -> predict -> write. On any error nothing is left at `cfg.output` or beside it (an
    existing output of an earlier job stays as it was). The output and its manifest are both
    complete on disk under temp names before either is renamed into place."""
    wall0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc)
    cfg = _check(cfg)
    # Input first: bad input fails in milliseconds, before any model download or MLflow run.
    reader = open_images(cfg.input, on_error=cfg.on_error, workers=cfg.decode_workers)
    labels = open_labels(cfg.labels, reader.count, cfg.input) if cfg.labels else None
    tracking: _Tracking | None = None
    try:
        model, session, streams = _open_session(cfg, reader)
        prov = provider(session)
        if cfg.batch_size is None:
            cfg = dataclasses.replace(cfg, batch_size=CUDA_BATCH_SIZE if prov == CUDA else CPU_BATCH_SIZE)
        log.info("model %s (version %s) on %s, %d stream(s)", model.uri, model.version, prov, streams)
        tracking = _Tracking(cfg, model, prov, reader) if cfg.track else None
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cfg.output)
        id_type = pa.string() if reader.id_kind == "file" else pa.int64()
        t0 = time.perf_counter()
        with PredictionWriter(cfg.output, cfg.output_format(), id_type, cfg.all_probabilities) as writer:
            counts = _predict_chunks(session, reader, labels, writer, cfg, streams)
            input_digest = reader.digest()
            writer.close()
            seconds = time.perf_counter() - t0
            result = JobResult(
                output=cfg.output,
                manifest=manifest_path(cfg.output),
                model=model,
                provider=prov,
                records=reader.count,
                predicted=counts.predicted,
                skipped=tuple(reader.skipped),
                accuracy=counts.correct / counts.predicted if labels is not None else None,
                seconds=seconds,
                throughput=counts.predicted / seconds,
                wall_seconds=0.0,
                input_digest=input_digest,
                labels_digest=labels.digest if labels is not None else None,
                mlflow_run_id=tracking.run_id if tracking else None,
            )
            manifest_tmp = write_json_temp(
                result.manifest, _manifest(cfg, model, prov, reader, labels, result, started)
            )
            try:
                writer.commit()
                os.replace(manifest_tmp, result.manifest)
            finally:
                manifest_tmp.unlink(missing_ok=True)
        if tracking is not None:
            tracking.finish(result, result.manifest)
    except BaseException as e:
        if tracking is not None:
            tracking.fail(e)
        raise
    finally:
        if labels is not None:
            labels.close()
    log.info(
        "%d predictions -> %s (%.0f images/s%s)", result.predicted, result.output, result.throughput,
        "" if result.accuracy is None else f", accuracy {result.accuracy:.4f}",
    )
    return dataclasses.replace(result, wall_seconds=time.perf_counter() - wall0)


__all__ = ["EXPERIMENT", "InputError", "JobConfig", "JobResult", "read_ahead", "run_job"]
