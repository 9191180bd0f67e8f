"""The training side's settings, one frozen dataclass per concern: data, model, training, tracking,
launch and gate. Each is declared once, here; the command line's options, their environment
variables (MNISTOPS_EPOCHS, ...) and the Prefect flows' typed parameters are derived from these fields
(common.fields), and the DDP workers receive them inside a TrainJob. Adding a training option is one
field below plus its use: a checkpoint written before it resumes with the field's default.

Dataclasses rather than pydantic models: the workers pickle them, checkpoints store them as plain
dicts (`asdict`), and nn_core needs no validation library; Prefect's pydantic reads the fields'
metadata anyway, so a flow form shows each description and checks each bound and `Literal` choice.

Torch-free, so the command line parses and checks its options before torch is imported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from common.fields import FORM, check, host_port, setting, sizes, sizes_text

Dataset = Literal["mnist", "fashion-mnist"]  # nn_core.datasets.DATASETS holds their pinned files
Device = Literal["auto", "cpu", "cuda"]  # auto: CUDA when it is usable, else the CPU
Schedule = Literal["none", "cosine", "onecycle"]

DEFAULT_EXPERIMENT = "mnist-mlp"
# Mean and standard deviation of the MNIST training split's pixels on the 0..255 scale; replaced by
# the actual training split's figures when a training starts (nn_core.model.stats_from).
MNIST_MEAN, MNIST_STD = 33.32, 78.57


def default_model_name(dataset: str) -> str:
    """A registered model serves one task: its default name follows the dataset."""
    return f"{dataset}-mlp"


def default_experiment(dataset: str) -> str:
    """Each task's training runs have an experiment of their own, named like its registered model."""
    return f"{dataset}-mlp"


@dataclass(frozen=True)
class DataConfig:
    __pydantic_config__ = FORM  # Prefect's form: see common.fields
    dataset: Dataset = setting("mnist", "which dataset")
    data_source: str | None = setting(
        None, "folder or file:// URL with the four IDX files (gzipped or not), or an http(s) mirror; "
        "default: $MNISTOPS_DATA_SOURCE, else the official mirrors", metavar="PATH|URL")
    data_dir: str | None = setting(
        None, "where the verified cache lives; default: $MNISTOPS_DATA_DIR, else ~/.cache/mnistops", metavar="DIR")

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class MLPConfig:
    """The model as built: saved in every checkpoint, so export and serving rebuild it from there."""

    __pydantic_config__ = FORM  # Prefect's form: see common.fields
    hidden: tuple[int, ...] = setting((50,), "hidden layer sizes, e.g. 50 or 128,64", parse=sizes, text=sizes_text)
    in_features: int = setting(784, "input pixels (28 x 28), from the dataset", internal=True)
    num_classes: int = setting(10, "classes, from the dataset", internal=True)
    mean: float = setting(MNIST_MEAN, "pixel mean the model normalises by: the training split's, set when "
                                      "a training starts", internal=True)
    std: float = setting(MNIST_STD, "pixel standard deviation, the training split's, set when a training "
                                    "starts", internal=True)

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))  # a list from JSON or a form
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"MLPConfig.hidden: {list(self.hidden)}: expected positive layer sizes")
        check(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MLPConfig":
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    __pydantic_config__ = FORM  # Prefect's form: see common.fields
    # Defaults reach >= 97.2% validation accuracy for every seed 0..4 on MNIST (the gate is 96%).
    epochs: int = setting(10, "training epochs", ge=1)
    batch_size: int = setting(256, "global batch size (split evenly across processes)", ge=1)
    lr: float = setting(3e-3, "Adam learning rate", gt=0)
    weight_decay: float = setting(0.0, "Adam weight decay", ge=0)
    schedule: Schedule = setting("cosine", "learning-rate schedule")
    seed: int = setting(0, "seed of the initial weights and of the shuffling", ge=0)
    eval_batch_size: int = setting(10_000, "samples per evaluation step", ge=1, option=False)
    target_val_accuracy: float = setting(0.96, "validation accuracy whose time to reach is reported", ge=0, le=1,
                                         option=False)

    def __post_init__(self):
        check(self)


# TrainConfig fields that change no weight: a checkpoint or run may be resumed with other values.
REPORTING_ONLY = ("eval_batch_size", "target_val_accuracy")


@dataclass(frozen=True)
class TrackingConfig:
    """Where a training is recorded in MLflow; the pipeline fills in all but the experiment."""

    __pydantic_config__ = FORM  # Prefect's form: see common.fields
    training_id: str = setting(description="the training's id (its MLflow run, checkpoint folder, rendezvous)",
                               internal=True)
    experiment: str = setting(DEFAULT_EXPERIMENT, "MLflow experiment")
    run_name: str | None = setting(None, "MLflow run name (default: from the config)", internal=True)
    tags: dict = setting(default_factory=dict, description="extra MLflow run tags", internal=True)
    parent_run_id: str | None = setting(None, "a sweep's parent run", internal=True)
    enabled: bool = setting(True, "log to MLflow", internal=True)


@dataclass(frozen=True)
class LaunchSpec:
    """How the DDP workers are started (torch's elastic launcher)."""

    __pydantic_config__ = FORM  # Prefect's form: see common.fields
    nproc: int = setting(1, "CPU worker processes when there is no CUDA (with CUDA: one per GPU)", ge=1)
    max_restarts: int = setting(0, "times the launcher restarts failed workers (they resume from the checkpoint)",
                                ge=0)
    device: Device = setting("auto", "training device; auto takes CUDA when it is usable")
    nnodes: int = setting(1, "number of nodes; each runs this same command", ge=1)
    rdzv_endpoint: str | None = setting(None, "rendezvous address (node 0's host) for a multi-node training",
                                        parse=host_port, metavar="HOST:PORT")
    rdzv_id: str | None = setting(None, "training id, the same on every node")
    monitor_interval: float = setting(0.2, "seconds between the launcher's checks of its workers", gt=0,
                                      internal=True)
    # Workers' stdout/stderr go to files under this folder instead of the terminal, for a caller that
    # forwards them (the Prefect task tails them into its run's logs); None: on the terminal.
    log_dir: str | None = setting(None, "folder of the workers' log files (set by the pipeline)", internal=True)
    devices: tuple[int, ...] | None = setting(None, "GPU ids of this training, one process each (a sweep "
                                                    "trial's share); default: every GPU", internal=True)

    def __post_init__(self):
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))
        check(self)


MULTI_NODE = ("nnodes", "rdzv_endpoint", "rdzv_id")  # LaunchSpec fields only `mnistops train` offers


@dataclass(frozen=True)
class GateConfig:
    """Which registered model a candidate competes for, and what it takes to become its champion."""

    __pydantic_config__ = FORM  # Prefect's form: see common.fields
    threshold: float = setting(0.96, "minimum validation accuracy (of the ONNX model) to promote", ge=0, le=1)
    margin: float | None = setting(
        None, "fixed tolerance: how much worse than the champion a candidate may be on any slice (the validation "
        "split, each feedback hold-out) and still be promoted; default: two standard errors of the slice's paired "
        "accuracy difference (nn_core/slices.py)", ge=0, le=1)
    model_name: str | None = setting(None, "registered model name (default: DATASET-mlp); bound to the dataset "
                                           "of its first version")

    def __post_init__(self):
        check(self)

    def model_for(self, dataset: str) -> str:
        return self.model_name or default_model_name(dataset)
