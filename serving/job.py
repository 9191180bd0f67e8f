"""The batch inference job: read -> predict -> write, atomically, tracked in MLflow.

    input (IDX | .npy | folder) -> chunks (read and inferred by the streams, serving.pipeline) -> onnxruntime session
      -> drift monitor (per-record ood_score) -> Parquet/CSV temp file -> rename into place
      -> manifest (with the drift report) -> MLflow run

`run_job(JobConfig(...))` is the whole job; the CLI, the inbox and the Prefect flow only build the
config. Outputs never clobber: an output that is one of the inputs (images, labels, model file) is
refused, and an existing one is replaced only with `overwrite`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
from tqdm import tqdm

from serving import drift, feedback, monitor
from serving.config import JobConfig
from serving.defaults import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, EXPERIMENT  # noqa: F401 (re-exported)
from common import digests, storage
from common.digests import Algorithm
from common.errors import BeyondMachineError, DriftAlert, InputChanged, InputError, OutputError
from common.experiments import ensure_experiment, run_context_tags
from common.owner import KILLED_REASON_TAG, OWNER_TAG, owner_id
from common.resources import mem_available
from serving.model_source import ModelRef, is_remote, resolve_model
from serving.pipeline import in_order, read_ahead
from serving.readers import Chunk, ImageReader, LabelReader, Skipped, file_digest, open_images, open_labels
from serving.session import (
    CUDA,
    INPUT_NAME,
    OUTPUT_NAME,
    SUMS_NAME,
    create_session,
    gpu_usable,
    has_pixel_sums,
    plan_threads,
    provider,
)
from serving.writers import (
    Batch,
    Columns,
    PredictionWriter,
    manifest_path,
    remove_stale_temps,
    write_json_temp,
)

log = logging.getLogger(__name__)

# 2: columns prediction/label/correct/ood_score, drift, ignored files; 3: digests named by their
# algorithm ("blake3", or "sha256" in an inbox whose ledger began with it), BLAKE3 by default
MANIFEST_VERSION = 3

# Host memory a job holds per image of its batch size: the chunks in flight (read, waiting, being
# written) and, per inference stream, onnxruntime's buffers of a run (the float input, activations).
# Peak RSS scoring a 1.2 M-image .npy with the drift check (2026-12-04, 2 cores): 0.2 GB at batch
# 1,024; at batch 131,072, 3.2 GB with 1 stream, 5.4 GB with 2, 10.0 GB with 4: ~17 KiB an image a
# stream plus ~6 KiB. A batch may take at most BATCH_MEMORY_SHARE of the memory available.
BATCH_IMAGE_BYTES, STREAM_IMAGE_BYTES = 6 * 1024, 18 * 1024
BATCH_MEMORY_SHARE = 0.5


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
    input_digest: str  # of the input file (folder: of its b3sum-style listing), hex
    labels_digest: str | None
    mlflow_run_id: str | None
    drift: drift.DriftReport
    input_path: Path | str | None = None
    manifest_data: dict[str, Any] | None = None  # what the manifest file holds
    mean_confidence: float | None = None  # mean top probability over the predicted records
    monitor_run_id: str | None = None  # the model version's monitoring record this batch added a point to
    digest_algorithm: Algorithm = digests.DEFAULT  # of input_digest and labels_digest (common.digests)


# --- MLflow ----------------------------------------------------------------------------------------


def run_name(input_path: Path) -> str:
    """`infer-<folder>/<input>`: two jobs on files of one name in different folders (two inboxes'
    `t10k-images-idx3-ubyte.gz`) are told apart in the runs table."""
    return f"infer-{input_path.parent.name}/{input_path.name}" if input_path.parent.name else f"infer-{input_path.name}"


def _source_name() -> str:
    """MLflow's "Source" of a job's run: the command that started it."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name == "mnistops" or argv0.endswith(("flows/cli.py", "flows.cli")):
        return "mnistops infer"
    return "python -m serving" if argv0.endswith(("serving/__main__.py", "serving")) else "batch-inference"


class _Tracking:
    """One MLflow run per job, through MlflowClient with an explicit run id (no active-run state)."""

    def __init__(self, cfg: JobConfig, model: ModelRef, provider_used: str, reader: ImageReader):
        from common.settings import mlflow_client

        self.client = mlflow_client()
        self.model = model
        exp_id = ensure_experiment(cfg.experiment, self.client)
        tags = {
            **run_context_tags(_source_name(), "LOCAL"),  # a flow run says JOB and links itself later
            # The process that must end this run; if it dies first, the next command marks it KILLED.
            OWNER_TAG: owner_id(os.getpid()),
            "mnistops.job": "inference",
            "provider": provider_used,
            "model_uri": model.uri,
            "model_version": model.version or "",
        }
        run = self.client.create_run(exp_id, run_name=run_name(cfg.input), tags=tags)
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

    def finish(self, result: JobResult, manifest: Path) -> str | None:
        """The job's figures on its run, its point on the version's monitoring record (a registered
        version only); returns that record's run id."""
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
        if result.mean_confidence is not None:
            metrics["mean_confidence"] = result.mean_confidence
        metrics.update(result.drift.metrics())
        params = [Param("input_digest", f"{result.digest_algorithm}:{result.input_digest}")]
        if result.labels_digest:
            params.append(Param("labels_digest", f"{result.digest_algorithm}:{result.labels_digest}"))
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=params,
        )
        self.client.set_tag(self.run_id, "drift.status", result.drift.status)
        monitor_run = None
        if self.model.name and self.model.version:
            point = monitor.point_of(result.predicted, result.mean_confidence, result.accuracy, result.drift,
                                     dt.datetime.fromtimestamp(now / 1000, dt.timezone.utc))
            monitor_run = monitor.record(self.client, self.model.name, self.model.version, point)
            self.client.set_tag(self.run_id, monitor.JOB_TAG, monitor_run)
        self.client.log_artifact(self.run_id, str(manifest))
        self.client.set_terminated(self.run_id, "FINISHED")
        return monitor_run

    def fail(self, error: BaseException) -> None:
        """FAILED with the error; KILLED with the reason when a signal or Ctrl-C stopped the job (what
        reaches here as a BaseException that is no Exception: KeyboardInterrupt, SystemExit, the
        command line's Stopped), as a killed job's run is marked by the next command."""
        killed = not isinstance(error, Exception)
        text = f"{type(error).__name__}: {error}"[:5000]
        try:
            self.client.set_tag(self.run_id, KILLED_REASON_TAG if killed else "error", text)
            self.client.set_terminated(self.run_id, "KILLED" if killed else "FAILED")
        except Exception:  # noqa: BLE001  # the job's own error is the one to report
            log.exception("could not mark MLflow run %s as failed", self.run_id)


# --- the job ---------------------------------------------------------------------------------------


def _resolved(p: Path | str) -> Path:
    return Path(p).expanduser().resolve()


def check_output(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Never clobber: `output` (and its manifest) must not be any input, nor lie inside an input
    folder; an existing output is replaced only with `overwrite`; its parent must be a folder."""
    out = _resolved(output)
    manifest = manifest_path(out)
    for inp in inputs:
        if out == inp or manifest == inp:
            raise OutputError(f"{output}: refusing to write over the input {inp}; choose another --output")
    for inp in inputs:
        if inp.is_dir() and out.is_relative_to(inp):
            raise OutputError(f"{output}: inside the input folder {inp}; choose an --output outside it")
    if out.is_dir():
        raise OutputError(f"{output}: is a folder, expected a file path for the predictions")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{output}: cannot create it, {parent} is a file, not a folder")
            break
    if not overwrite:
        for p in (out, manifest):
            if p.exists():
                raise OutputError(f"{p}: already exists; pass --overwrite to replace it")


def _check(cfg: JobConfig) -> JobConfig:
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"batch size {cfg.batch_size}, expected >= 1")
    inp = _resolved(cfg.input)
    labels = _resolved(cfg.labels) if cfg.labels else None
    inputs = [inp] + ([labels] if labels else []) + ([inp / "labels.csv"] if inp.is_dir() else [])
    if not is_remote(cfg.model):
        inputs.append(_resolved(cfg.model))
    if cfg.drift_reference and not is_remote(cfg.drift_reference):
        inputs.append(_resolved(cfg.drift_reference))
    check_output(cfg.output, inputs, cfg.overwrite)
    return dataclasses.replace(cfg, input=inp, output=_resolved(cfg.output), labels=labels)


def check_batch_fits(batch_size: int, records: int, streams: int, available: int | None) -> None:
    """BeyondMachineError when the buffers of `batch_size` (as many as the input has, at most) on
    `streams` streams would take more than BATCH_MEMORY_SHARE of `available` bytes (None: unknown)."""
    per_image = BATCH_IMAGE_BYTES + streams * STREAM_IMAGE_BYTES
    need = min(batch_size, records) * per_image
    if available is None or need <= BATCH_MEMORY_SHARE * available:
        return
    most = int(BATCH_MEMORY_SHARE * available // per_image)
    raise BeyondMachineError(
        f"--batch-size {batch_size}: ~{need / 2**30:.1f} GiB of buffers with {streams} stream(s) "
        f"(~{per_image // 1024} KiB an image), more than {BATCH_MEMORY_SHARE:.0%} of the "
        f"{available / 2**30:.1f} GiB this machine has available; expected at most {most}")


@dataclass
class _Inferred:
    probs: np.ndarray  # (B, 10)
    prediction: np.ndarray  # (B,)
    probability: np.ndarray  # (B,)
    ood: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (scores, intensity bins, confidence bins)


@dataclass
class _Counts:
    predicted: int = 0
    correct: int = 0
    confidence: float = 0.0  # sum of the top probabilities


def _infer(session: ort.InferenceSession, monitor: drift.DriftMonitor | None, sums: bool,
           pixels: np.ndarray) -> _Inferred:
    """Everything per chunk that needs no ordering, run on the pool beside the other streams: only
    the writes (in input order) are left to the consuming thread. `sums`: the drift check's pixel
    sums come from the model's own run (its `pixel_sums` output)."""
    out = session.run([OUTPUT_NAME, SUMS_NAME] if sums else [OUTPUT_NAME], {INPUT_NAME: pixels})
    probs = out[0]  # (B, 10)
    prediction = probs.argmax(axis=1)
    probability = np.take_along_axis(probs, prediction[:, None], axis=1)[:, 0]
    ood = monitor.scores(pixels, probability, out[1] if sums else None) if monitor is not None else None
    return _Inferred(probs, prediction, probability, ood)


def _write_chunk(chunk: Chunk, r: _Inferred, labels: LabelReader | None, monitor: drift.DriftMonitor | None,
                 writer: PredictionWriter, all_probabilities: bool, counts: _Counts) -> None:
    y = None
    if labels is not None:
        y = labels.read(chunk.start, chunk.stop)
        if chunk.keep is not None:
            y = y[chunk.keep - chunk.start]
        counts.correct += int(np.count_nonzero(r.prediction == y))
    if monitor is not None:
        monitor.count(r.ood, r.prediction)
    ids = chunk.names if chunk.names is not None else chunk.positions()
    writer.write(Batch(ids, r.prediction, r.probability, r.ood[0] if r.ood is not None else None, y,
                       r.probs if all_probabilities else None))
    counts.predicted += len(r.prediction)
    counts.confidence += float(r.probability.sum(dtype=np.float64))


def _predict_chunks(session: ort.InferenceSession, reader: ImageReader, labels: LabelReader | None,
                    writer: PredictionWriter, cfg: JobConfig, streams: int,
                    monitor: drift.DriftMonitor | None) -> _Counts:
    """Chunks are read and inferred by `streams` threads side by side (serving.pipeline) and written
    here, in input order."""
    counts = _Counts()
    show = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    assert cfg.batch_size is not None
    sums = monitor is not None and has_pixel_sums(session)
    chunks = reader.chunks(cfg.batch_size)
    inferred = in_order(chunks if streams > 1 else read_ahead(chunks),
                        lambda c: _infer(session, monitor, sums, c.pixels), streams, 2 * streams)
    with (
        tqdm(total=reader.count, unit="img", unit_scale=True, disable=not show, mininterval=0.5) as bar,
        contextlib.closing(inferred),  # a write that fails stops the streams at once
    ):
        for chunk, r in inferred:
            _write_chunk(chunk, r, labels, monitor, writer, cfg.all_probabilities, counts)
            bar.update(chunk.stop - chunk.start)
    return counts


def _manifest(
    cfg: JobConfig, model: ModelRef, prov: str, reader: ImageReader, labels: LabelReader | None,
    result: JobResult, started: dt.datetime, columns: list[str], shown: "_Shown",
) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "output": {"path": shown.output or str(result.output), "format": cfg.output_format(),
                   "rows": result.predicted, "columns": columns, "all_probabilities": cfg.all_probabilities},
        "model": {**model.to_dict(), "onnxruntime": ort.__version__},
        "input": {"path": shown.input or str(cfg.input), "kind": reader.kind, "records": reader.count,
                  result.digest_algorithm: result.input_digest, **reader.details},
        "labels": None if labels is None else {"path": shown.labels or str(labels.path),
                                               result.digest_algorithm: labels.digest},
        "provider": prov,
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "on_error": cfg.on_error,
        "counts": {"records": result.records, "predicted": result.predicted,
                   "skipped": len(result.skipped)},
        "skipped": [dataclasses.asdict(s) for s in result.skipped],
        "accuracy": result.accuracy,
        "mean_confidence": result.mean_confidence,
        "drift": result.drift.to_dict(),
        "seconds": round(result.seconds, 6),
        "throughput_img_per_s": round(result.throughput, 1),
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "mlflow_run_id": result.mlflow_run_id,
    }


@dataclass(frozen=True)
class LoadedModel:
    """A resolved, loaded model: what an inbox run shares across its inputs."""

    ref: ModelRef
    session: ort.InferenceSession
    provider: str
    streams: int
    reference: drift.Reference | None
    reference_source: str | None
    reference_missing: str  # why there is no reference, when there is none


def _reference(cfg: JobConfig, model: ModelRef) -> tuple[drift.Reference | None, str | None, str]:
    source = cfg.drift_reference or model.drift_reference
    if source is None:
        why = (f"model version {model.version} has no drift reference (registered before profiles)"
               if model.version else "a local model file: give --drift-reference to check drift")
        return None, None, why
    return drift.load_reference(source), str(source), ""


def load_model(cfg: JobConfig, decoding: bool = False) -> LoadedModel:
    """The model resolved (downloaded if remote), loaded into a session, and its drift reference.
    `decoding`: the input needs a CPU to decode (gzip, images), so the session leaves it one."""
    with tempfile.TemporaryDirectory(prefix="mnistops-model-") as tmp:
        model = resolve_model(cfg.model, Path(tmp))
        cuda = cfg.device != "cpu" and gpu_usable()
        streams, threads = plan_threads(cuda, cfg.streams, cfg.threads, 1 if decoding else 0)
        session = create_session(model.path, cfg.device, threads)  # the model is in memory now
    ref, source, why = _reference(cfg, model)
    return LoadedModel(model, session, provider(session), streams, ref, source, why)


def _labels_for(cfg: JobConfig, reader: ImageReader) -> LabelReader | None:
    if cfg.labels:
        return open_labels(cfg.labels, reader.count, cfg.input, reader.algorithm)
    if reader.labels is not None and reader.labels_csv is not None:
        return LabelReader(reader.labels_csv, reader.count, file_digest(reader.labels_csv, reader.algorithm),
                           _mm=reader.labels)
    return None


@dataclass(frozen=True)
class _Shown:
    """How the job's locations are named in its manifest when they are not the local paths it read
    and wrote (a URL, redacted, whose object was copied here)."""

    input: str | None = None
    labels: str | None = None
    output: str | None = None


@dataclass(frozen=True)
class Expected:
    """The content an input must have: an inbox claimed it under its `digest` (of `algorithm`, the
    ledger's: common.digests). `unchanged`, when given, vouches for a file without hashing it a
    second time: asked once the file is read, it tells whether the file is still the one `digest` was
    taken of (serving.inbox compares its identity: inode, size, modification and change times)."""

    digest: str
    algorithm: Algorithm = digests.DEFAULT
    unchanged: Callable[[], bool] | None = None


def _write_outputs(cfg: JobConfig, loaded: LoadedModel, reader: ImageReader, labels: LabelReader | None,
                   tracking: _Tracking | None, started: dt.datetime, shown: _Shown,
                   expect: Expected | None) -> JobResult:
    """Predict into the output's temp file and write the manifest beside it, both complete on disk
    before either is renamed into place (and neither, when the input read is not what `expect` says)."""
    monitor = drift.DriftMonitor(loaded.reference, loaded.reference_source or "") if loaded.reference else None
    cols = Columns(pa.string() if reader.id_kind == "file" else pa.int64(), ood_score=monitor is not None,
                   labels=labels is not None, all_probabilities=cfg.all_probabilities)
    t0 = time.perf_counter()
    with PredictionWriter(cfg.output, cfg.output_format(), cols) as writer:
        counts = _predict_chunks(loaded.session, reader, labels, writer, cfg, loaded.streams, monitor)
        input_digest = reader.digest()  # None: read without hashing, `expect` vouches for it
        if expect is not None:
            if not (expect.unchanged() if input_digest is None else input_digest == expect.digest):
                raise InputChanged(f"{shown.input or cfg.input}: changed while it was scored (claimed as "
                                   f"{expect.algorithm} {expect.digest[:12]}...); nothing written")
            input_digest = expect.digest
        writer.close()
        seconds = time.perf_counter() - t0
        result = JobResult(
            output=cfg.output, manifest=manifest_path(cfg.output), model=loaded.ref, provider=loaded.provider,
            records=reader.count, predicted=counts.predicted, skipped=tuple(reader.skipped),
            accuracy=counts.correct / counts.predicted if labels is not None else None,
            seconds=seconds, throughput=counts.predicted / seconds, wall_seconds=0.0, input_digest=input_digest,
            labels_digest=labels.digest if labels is not None else None,
            mlflow_run_id=tracking.run_id if tracking else None,
            drift=monitor.report() if monitor is not None else drift.unavailable(loaded.reference_missing),
            input_path=cfg.input,
            mean_confidence=counts.confidence / counts.predicted if counts.predicted else None,
            digest_algorithm=reader.algorithm,
        )
        data = _manifest(cfg, loaded.ref, loaded.provider, reader, labels, result, started, writer.schema.names,
                         shown)
        result = dataclasses.replace(result, manifest_data=data)
        manifest_tmp = write_json_temp(result.manifest, data)
        try:
            writer.commit()
            os.replace(manifest_tmp, result.manifest)
        finally:
            manifest_tmp.unlink(missing_ok=True)
    return result


def run_job(cfg: JobConfig, loaded: LoadedModel | None = None, *, source: str | None = None,
            expect: Expected | None = None) -> JobResult:
    """Read -> predict -> write. On any error nothing is left at `cfg.output` or beside it (an
    existing output of an earlier job stays as it was). With `fail_on_drift`, a drift alert raises
    DriftAlert after the output and its manifest are in place (they are the evidence). Input,
    labels and output may be URLs (common.storage); `source` names a local input's origin (an inbox
    entry copied from a bucket) in the manifest. `expect`: the content the input must have (an inbox
    claimed it under its digest); InputChanged, with nothing written, when it was not what was read."""
    if any(storage.is_url(x) for x in (cfg.input, cfg.labels, cfg.output)):
        result = _run_at_urls(cfg, loaded, source, expect)
    else:
        result = _run_local(cfg, loaded, _Shown(input=source), expect)
    return dataclasses.replace(result, input_path=source) if source else result


def _run_local(cfg: JobConfig, loaded: LoadedModel | None, shown: _Shown, expect: Expected | None = None) -> JobResult:
    wall0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc)
    cfg = _check(cfg)
    # Input first: bad input fails in milliseconds, before any model download or MLflow run.
    reader = open_images(cfg.input, on_error=cfg.on_error, workers=cfg.decode_workers,
                         hashed=expect is None or expect.unchanged is None,
                         algorithm=expect.algorithm if expect is not None else digests.DEFAULT)
    labels = _labels_for(cfg, reader)
    tracking: _Tracking | None = None
    try:
        loaded = loaded or load_model(cfg, decoding=reader.kind in ("idx.gz", "folder"))
        if cfg.batch_size is None:
            cfg = dataclasses.replace(cfg, batch_size=CUDA_BATCH_SIZE if loaded.provider == CUDA else CPU_BATCH_SIZE)
        check_batch_fits(cfg.batch_size, reader.count, loaded.streams, mem_available())
        log.info("model %s (version %s) on %s, %d stream(s)", loaded.ref.uri, loaded.ref.version, loaded.provider,
                 loaded.streams)
        tracking = _Tracking(cfg, loaded.ref, loaded.provider, reader) if cfg.track else None
        if tracking is not None and labels is not None and cfg.feedback:  # a labelled batch becomes a feedback set
            feedback.record_job(cfg, loaded.ref, tracking.client, tracking.run_id, shown.input or str(cfg.input))
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cfg.output)
        result = _write_outputs(cfg, loaded, reader, labels, tracking, started, shown, expect)
        if tracking is not None:
            result = dataclasses.replace(result, monitor_run_id=tracking.finish(result, result.manifest))
    except BaseException as e:
        if tracking is not None:
            tracking.fail(e)
        raise
    finally:
        if labels is not None:
            labels.close()
    log.info("%d predictions -> %s (%.0f images/s%s; drift %s)", result.predicted, result.output, result.throughput,
             "" if result.accuracy is None else f", accuracy {result.accuracy:.4f}", result.drift.status)
    result = dataclasses.replace(result, wall_seconds=time.perf_counter() - wall0)
    if cfg.fail_on_drift and result.drift.alert:
        raise DriftAlert(f"{cfg.input}: drift alert: {result.drift.reason} (predictions written to "
                         f"{result.output}; manifest {result.manifest})", result)
    return result


def _check_url_output(cfg: JobConfig) -> None:
    """Never clobber, for an output URL: not an input, not inside an input prefix, replaced only
    with `overwrite`; its bucket reachable (before anything is read)."""
    out = str(cfg.output)
    for inp in (cfg.input, cfg.labels):
        if inp is not None and storage.is_url(inp):
            if out == str(inp) or out.startswith(str(inp).rstrip("/") + "/"):
                raise OutputError(f"{storage.shown(out)}: refusing to write over or inside the input "
                                  f"{storage.shown(str(inp))}; choose another --output")
    storage.check_bucket(out)
    if not cfg.overwrite:
        for p in (out, out + ".manifest.json"):
            if storage.exists(p):
                raise OutputError(f"{storage.shown(p)}: already exists; pass --overwrite to replace it")


def _run_at_urls(cfg: JobConfig, loaded: LoadedModel | None, source: str | None,
                 expect: Expected | None) -> JobResult:
    """The job with URLs: inputs copied to a private temporary folder in blocks, the outputs written
    there and uploaded when complete (the output first, then its manifest: a manifest at the
    destination means its output is there)."""
    out_url = str(cfg.output) if storage.is_url(cfg.output) else None
    if out_url:
        _check_url_output(cfg)
    with tempfile.TemporaryDirectory(prefix="mnistops-job-") as tmp:
        local = Path(tmp)

        def here(loc, name: str):
            if loc is None or not storage.is_url(loc):
                return loc
            return storage.fetch(str(loc), local / name / str(loc).rstrip("/").rsplit("/", 1)[-1])

        shown = _Shown(input=storage.shown(str(cfg.input)) if storage.is_url(cfg.input) else source,
                       labels=storage.shown(str(cfg.labels)) if storage.is_url(cfg.labels) else None,
                       output=storage.shown(out_url) if out_url else None)
        job = dataclasses.replace(cfg, input=here(cfg.input, "input"), labels=here(cfg.labels, "labels"),
                                  output=local / "output" / out_url.rsplit("/", 1)[-1] if out_url else cfg.output)
        try:
            result = _run_local(job, loaded, shown, expect)
        except DriftAlert as alert:  # the outputs are written: they go to their destination too
            if out_url:
                _upload(alert.result, out_url)
                alert.result = dataclasses.replace(alert.result, output=out_url, manifest=out_url + ".manifest.json")
            raise
        if out_url:
            _upload(result, out_url)
            result = dataclasses.replace(result, output=out_url, manifest=out_url + ".manifest.json")
    return dataclasses.replace(result, input_path=cfg.input)


def _upload(result: JobResult, out_url: str) -> None:
    storage.upload(Path(result.output), out_url)
    storage.upload(Path(result.manifest), out_url + ".manifest.json")


__all__ = ["EXPERIMENT", "Expected", "InputError", "JobConfig", "JobResult", "LoadedModel", "load_model", "run_job"]
