"""Hyperparameter sweep configurations: a grid over hidden sizes, learning rate, batch size and
epochs (from a small YAML file or options), optionally a seeded random sample of it."""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

AXES = ("hidden", "lr", "batch_size", "epochs")


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


@dataclass(frozen=True)
class SweepSpec:
    hidden: tuple[tuple[int, ...], ...] = ((50,),)
    lr: tuple[float, ...] = (3e-3,)
    batch_size: tuple[int, ...] = (256,)
    epochs: tuple[int, ...] = (10,)
    sample: int | None = None  # None: the whole grid; N: N distinct points drawn at random
    seed: int = 0

    def points(self) -> list[SweepPoint]:
        grid = [SweepPoint(tuple(h), float(lr), int(bs), int(ep))
                for h, lr, bs, ep in itertools.product(self.hidden, self.lr, self.batch_size, self.epochs)]
        if self.sample is None or self.sample >= len(grid):
            return grid
        return random.Random(self.seed).sample(grid, self.sample)


def spec_from_mapping(d: dict, source: str = "sweep config") -> SweepSpec:
    unknown = set(d) - {*AXES, "sample", "seed"}
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}; expected {list(AXES)} plus sample and seed")

    def axis(key, cast, default):
        values = d.get(key, default)
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{source}: '{key}' must be a non-empty list, got {values!r}")
        try:
            return tuple(cast(v) for v in values)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: '{key}' has a value that is not valid: {values!r}") from None

    def hidden(v):
        sizes = tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        if not sizes or min(sizes) < 1:
            raise ValueError
        return sizes

    default = SweepSpec()
    sample = d.get("sample")
    if sample is not None and (not isinstance(sample, int) or sample < 1):
        raise ValueError(f"{source}: 'sample' must be a positive integer, got {sample!r}")
    return SweepSpec(
        hidden=axis("hidden", hidden, default.hidden), lr=axis("lr", float, default.lr),
        batch_size=axis("batch_size", int, default.batch_size), epochs=axis("epochs", int, default.epochs),
        sample=sample, seed=int(d.get("seed", 0)),
    )


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
