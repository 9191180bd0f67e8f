"""The batch job's settings, declared once (common.fields): `mnistops infer`, `python -m serving`,
their environment variables (MNISTOPS_INFER_...) and the `batch-inference` flow's typed parameter are
all derived from JobConfig. Imports neither
onnxruntime nor pyarrow, so `--help` and argument errors stay instant."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from serving.defaults import CPU_BATCH_SIZE, CUDA_BATCH_SIZE, DEFAULT_MODEL_URI, EXPERIMENT, Format
from common.fields import FORM, check, setting

Device = Literal["auto", "cpu", "cuda"]
OnError = Literal["fail", "skip"]


@dataclass(frozen=True)
class JobConfig:
    __pydantic_config__ = FORM  # Prefect's form: see common.fields
    # Its variables are MNISTOPS_INFER_BATCH_SIZE, ...: training has a batch size and a device too.
    ENV_SECTION: ClassVar[str] = "INFER_"
    input: Path = setting(
        description="IDX images file (gzipped or not), .npy array (uint8, or float in 0..255 or 0..1 as its largest "
        "value says; [N,28,28] or [N,784]), or a folder of PNG/JPEG images of any size (every non-hidden image "
        "file under it is one record, in path order; other files are ignored and listed in the manifest; a "
        "labels.csv with lines file,label gives true labels)", option=False)
    output: Path = setting(
        description="predictions file (columns id, prediction, probability, ood_score when the model has a drift "
        "reference, label and correct with labels); a manifest OUTPUT.manifest.json is written beside it; both "
        "appear only when the job succeeds", option=False)
    model: str = setting(DEFAULT_MODEL_URI, "MLflow registry URI (models:/NAME@ALIAS or models:/NAME/VERSION) or a "
                                            "local .onnx file")
    batch_size: int | None = setting(None, f"images per inference call; memory is bounded by a few batches "
                                           f"(default: {CPU_BATCH_SIZE} on CPU, {CUDA_BATCH_SIZE} on CUDA)", ge=1)
    labels: Path | None = setting(
        None, "IDX labels file or 1-D integer .npy of the true classes, one per input record in input order (a "
        "folder: one per image file, in path order); the output then has label and correct columns and the job "
        "reports accuracy (default: none; a folder's own labels.csv); a path or a URL", parse=str)
    device: Device = setting("auto", "auto: CUDA when a GPU is usable, else CPU; cuda: fail unless CUDA is actually "
                                     "used")
    on_error: OnError = setting("fail", "fail: stop at the first bad image or record; skip: skip bad images of a "
                                        "folder and bad (NaN/inf, out of range) records of a float array, listed in "
                                        "the manifest")
    format: Format | None = setting(None, "output format (default: csv when the output ends in .csv, else parquet)")
    all_probabilities: bool = setting(False, "also write the ten class probabilities prob_0..prob_9")
    threads: int | None = setting(None, "onnxruntime intra-op threads per run (default: the CPUs this process may "
                                        "use / streams)", ge=1)
    streams: int | None = setting(None, "batches inferred side by side (default: 1 on CUDA, else min(4, CPUs / "
                                        "threads); one CPU fewer for gzipped or image input, whose decoding needs "
                                        "one)", ge=1)
    decode_workers: int | None = setting(None, "decoding threads of a folder input (default: 1 for MNIST-sized "
                                               "images, which decode faster on one thread, else min(4, CPUs))",
                                         ge=1, option=False)
    track: bool = setting(True, f"log the job as an MLflow run (in experiment {EXPERIMENT!r} at the current "
                                "MLFLOW_TRACKING_URI)")
    feedback: bool = setting(True, "keep a labelled input as a feedback set of the model's task, for the next "
                                   "training and the gate's slices (off: labels only measure accuracy)")
    overwrite: bool = setting(False, "replace an existing output (an input is never overwritten)")
    fail_on_drift: bool = setting(False, "exit 4 (after writing the outputs) when the drift check alerts")
    drift_reference: str | None = setting(None, "drift profile (JSON file or artifact URI) to check against "
                                                "(default: the one stored with the model version)",
                                          metavar="JSON|URI")
    experiment: str = setting(EXPERIMENT, "MLflow experiment of the job's run", option=False)
    progress: bool | None = setting(None, "a progress bar (default: only when stderr is a terminal)", internal=True)

    def __post_init__(self):
        from common.storage import is_url

        # a URL (s3://bucket/key) stays text: Path would fold its '//' (common.storage)
        for name in ("input", "output", "labels"):
            value = getattr(self, name)
            if value is not None and not is_url(value):
                object.__setattr__(self, name, Path(value))
        check(self)

    def output_format(self) -> Format:
        if self.format is not None:
            return self.format
        return "csv" if str(self.output).lower().endswith(".csv") else "parquet"
