"""Hyperparameter sweep configurations: a grid over hidden sizes, learning rate, batch size and
epochs (from a small YAML file or options), optionally a seeded random sample of it. Each axis is a
field of the model's or the training's config (nn_core.config): a point replaces those fields of the
sweep's base configs."""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from nn_core.config import MLPConfig, TrainConfig
from common.fields import FORM, setting

AXES = ("hidden", "lr", "batch_size", "epochs")
MODEL_AXES = ("hidden",)  # the others are TrainConfig fields


@dataclass(frozen=True)
class SweepPoint:
    hidden: tuple[int, ...]
    lr: float
    batch_size: int
    epochs: int

    def name(self) -> str:
        return f"mlp{'x'.join(map(str, self.hidden))}-lr{self.lr:g}-bs{self.batch_size}-e{self.epochs}"

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}

    def apply(self, model: MLPConfig, train: TrainConfig) -> tuple[MLPConfig, TrainConfig]:
        """The base configs with this point's values."""
        values = asdict(self)
        return (replace(model, **{k: values[k] for k in MODEL_AXES}),
                replace(train, **{k: values[k] for k in AXES if k not in MODEL_AXES}))


def _sizes(v) -> tuple[int, ...]:
    sizes = tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    if not sizes or min(sizes) < 1:
        raise ValueError
    return sizes


def _positive(kind: type):
    def cast(v):
        value = kind(v)
        if not value > 0:
            raise ValueError
        return value

    return cast


_CASTS = {"hidden": _sizes, "lr": _positive(float), "batch_size": _positive(int), "epochs": _positive(int)}


def _axis(key: str, values) -> tuple:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"'{key}' must be a non-empty list, got {values!r}")
    try:
        cast = tuple(_CASTS[key](v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"'{key}' has a value that is not valid: {values!r}") from None
    return cast


@dataclass(frozen=True)
class SweepSpec:
    """The grid: each axis a list of values of one config field; every combination is one trial."""

    __pydantic_config__ = FORM  # Prefect's form: see common.fields
    hidden: tuple[tuple[int, ...], ...] = setting(((50,),), "hidden layer sizes to try, e.g. [[50], [128, 64]]")
    lr: tuple[float, ...] = setting((3e-3,), "Adam learning rates to try")
    batch_size: tuple[int, ...] = setting((256,), "global batch sizes to try")
    epochs: tuple[int, ...] = setting((10,), "epoch counts to try")
    sample: int | None = setting(None, "train only this many configs, drawn at random from the grid (default: "
                                       "all of them)")
    seed: int = setting(0, "seed of the random draw")

    def __post_init__(self):
        # Lists from a YAML file, a Prefect form or a JSON deployment become tuples, each value checked.
        for key in AXES:
            object.__setattr__(self, key, _axis(key, getattr(self, key)))
        if self.sample is not None and (not isinstance(self.sample, int) or self.sample < 1):
            raise ValueError(f"'sample' must be a positive integer, got {self.sample!r}")

    def points(self) -> list[SweepPoint]:
        grid = [SweepPoint(h, lr, bs, ep) for h, lr, bs, ep in itertools.product(self.hidden, self.lr, self.batch_size,
                                                                                 self.epochs)]
        if self.sample is None or self.sample >= len(grid):
            return grid
        return random.Random(self.seed).sample(grid, self.sample)


def spec_from_mapping(d: dict, source: str = "sweep config") -> SweepSpec:
    unknown = set(d) - {*AXES, "sample", "seed"}
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}; expected {list(AXES)} plus sample and seed")
    try:
        return SweepSpec(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def load_spec(path: Path) -> SweepSpec:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the sweep config ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with keys {list(AXES)}")
    return spec_from_mapping(data, str(path))


def assign_devices(gpu_count: int, concurrency: int) -> list[tuple[int, ...] | None]:
    """The GPU ids of each of `concurrency` trials that train side by side: disjoint equal blocks
    when there are at least as many GPUs as trials (8 GPUs, 3 trials: (0, 1), (2, 3), (4, 5); the
    remainder stays idle, as equal world sizes keep the trials comparable), one GPU each, shared
    round-robin, when there are fewer (a 784-50-10 MLP leaves a GPU mostly idle). No GPU: None each
    (the trials run on the CPU)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if gpu_count < 0:
        raise ValueError(f"gpu_count must be >= 0, got {gpu_count}")
    if gpu_count == 0:
        return [None] * concurrency
    if concurrency <= gpu_count:
        per = gpu_count // concurrency
        return [tuple(range(i * per, (i + 1) * per)) for i in range(concurrency)]
    return [(i % gpu_count,) for i in range(concurrency)]
