"""One configuration, many faces: each setting is declared once, as a config dataclass field, and the
command line, the Prefect flows' parameter forms and the checks at construction all follow from it."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from flows.cli import build_parser
from nn_core import datasets
from nn_core.config import (MULTI_NODE, DataConfig, Dataset, GateConfig, LaunchSpec, MLPConfig, TrackingConfig,
                            TrainConfig)
from nn_core.sweep import AXES, SweepSpec
from common import fields
from serving.config import JobConfig
from common.fields import add_arguments, check, from_args, setting


@dataclass(frozen=True)
class Example:
    count: int = setting(3, "how many", ge=1)
    rate: float = setting(0.5, "a rate", gt=0, le=1)
    mode: Literal["a", "b"] = setting("a", "which mode")
    name: str | None = setting(None, "a name")
    path: Path | None = setting(None, "a path")
    sizes: tuple[int, ...] = setting((4,), "sizes", parse=fields.sizes, text=fields.sizes_text)
    verbose: bool = setting(False, "say more")
    track: bool = setting(True, "record it")
    secret: int = setting(7, "set by the program", internal=True)

    def __post_init__(self):
        check(self)


def _parse(argv: list[str], cls=Example) -> argparse.Namespace:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, cls)
    return p.parse_args(argv)


def test_the_command_line_is_derived_from_the_fields():
    assert from_args(Example, _parse([])) == Example()
    args = _parse(["--count", "5", "--rate", "1", "--mode", "b", "--name", "x", "--path", "p", "--sizes", "8,2",
                   "--verbose", "--no-track"])
    assert from_args(Example, args) == Example(5, 1.0, "b", "x", Path("p"), (8, 2), True, False)
    assert not hasattr(args, "secret")  # internal: no option


@pytest.mark.parametrize("argv, words", [
    (["--count", "0"], "--count: 0: expected an integer >= 1"),
    (["--count", "x"], "expected an integer"),
    (["--rate", "0"], "--rate: 0: expected a number > 0 and <= 1"),
    (["--rate", "nan"], "expected a number"),
    (["--mode", "c"], "invalid choice"),
    (["--sizes", "0"], "expected positive integers"),
])
def test_a_bad_value_is_a_usage_error_naming_the_option(argv, words):
    with pytest.raises(argparse.ArgumentError, match=words.replace("(", r"\(")):
        _parse(argv)


@pytest.mark.parametrize("kwargs, words", [
    ({"count": 0}, "Example.count: 0: expected a number >= 1"),
    ({"rate": 2.0}, "Example.rate: 2.0: expected a number > 0 and <= 1"),
    ({"mode": "c"}, "Example.mode: 'c': expected one of a, b"),
])
def test_the_same_bounds_hold_whoever_builds_the_config(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        Example(**kwargs)


def test_prefect_validates_and_describes_a_config_parameter():
    from prefect import flow
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    def f(cfg: Example = Example()):
        return cfg

    params = flow(f).validate_parameters({"cfg": {"count": 2, "sizes": [1, 2], "mode": "b"}})
    assert params["cfg"] == Example(count=2, sizes=(1, 2), mode="b")
    with pytest.raises(ParameterTypeError, match="greater than or equal to 1"):
        flow(f).validate_parameters({"cfg": {"count": 0}})
    with pytest.raises(ParameterTypeError, match="'a' or 'b'"):
        flow(f).validate_parameters({"cfg": {"mode": "c"}})
    props = parameter_schema(f).model_dump()["definitions"]["Example"]["properties"]
    assert props["count"]["description"] == "how many" and props["count"]["minimum"] == 1
    assert props["mode"]["enum"] == ["a", "b"] and props["secret"]["readOnly"] is True


def test_the_dataset_choices_are_the_known_datasets():
    assert typing.get_args(Dataset) == tuple(datasets.DATASETS)


# ---------------------------------------------------------------------------------------------
# The wiring: every option field of a config is an option of each command that uses the config and a
# described field of the flow parameter that carries it, so adding one is one field plus its use.


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions}


COMMANDS = {
    "train": [DataConfig, MLPConfig, TrainConfig, TrackingConfig, LaunchSpec],
    "run": [DataConfig, MLPConfig, TrainConfig, TrackingConfig, (LaunchSpec, MULTI_NODE), GateConfig],
    "serve": [DataConfig, MLPConfig, TrainConfig, TrackingConfig, (LaunchSpec, MULTI_NODE), GateConfig],
    "sweep": [DataConfig, (MLPConfig, AXES), (TrainConfig, AXES), TrackingConfig, (LaunchSpec, MULTI_NODE),
              GateConfig],
    "infer": [JobConfig],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_field_is_an_option_of_the_commands_that_use_it(command):
    dests = _dests(_subparser(command))
    for entry in COMMANDS[command]:
        cls, exclude = entry if isinstance(entry, tuple) else (entry, ())
        missing = {f.name for f in fields.options(cls, exclude=exclude)} - dests
        assert not missing, f"mnistops {command} lacks options for {cls.__name__}.{sorted(missing)}"
    if command == "sweep":  # the grid's axes, several values each
        assert {f"grid_{a}" for a in AXES} <= dests


def _flow_properties(fn, param: str) -> dict:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(fn).model_dump()
    ref = schema["properties"][param]["$ref"].rsplit("/", 1)[1]
    return schema["definitions"][ref]["properties"]


@pytest.mark.parametrize("flow_name, param, cls", [
    ("flows.training:training_pipeline", "data", DataConfig),
    ("flows.training:training_pipeline", "model", MLPConfig),
    ("flows.training:training_pipeline", "train", TrainConfig),
    ("flows.training:training_pipeline", "launch", LaunchSpec),
    ("flows.training:training_pipeline", "gate", GateConfig),
    ("flows.sweep:hyperparameter_sweep", "grid", SweepSpec),
    ("flows.sweep:hyperparameter_sweep", "train", TrainConfig),
    ("flows.inference:batch_inference", "job", JobConfig),
])
def test_the_flows_take_the_configs_as_described_typed_parameters(flow_name, param, cls):
    import importlib

    module, name = flow_name.split(":")
    fn = getattr(importlib.import_module(module), name).fn
    props = _flow_properties(fn, param)
    for f in dataclasses.fields(cls):
        assert props[f.name]["description"] == f.metadata["description"], f"{cls.__name__}.{f.name}"


def test_a_resumed_training_gets_its_own_configs_back(tmp_path):
    """job.json (what a training records) turns back into the same configs, whatever they hold."""
    import json

    from flows.cli import _resumed

    job = {"model": dataclasses.asdict(MLPConfig(hidden=(128, 64), mean=33.4, std=78.7)),
           "train": dataclasses.asdict(TrainConfig(epochs=7, lr=1e-3, schedule="onecycle", seed=4)),
           "tracking": {"experiment": "exp"}, "data_source": "/data/mnist"}
    params = _resumed({"data": DataConfig(), "train": TrainConfig(), "model": MLPConfig(), "experiment": "x"},
                      ("abc", json.loads(json.dumps(job))))
    assert params["training_id"] == "abc" and params["experiment"] == "exp"
    assert params["model"] == MLPConfig(hidden=(128, 64), mean=33.4, std=78.7)
    assert params["train"] == TrainConfig(epochs=7, lr=1e-3, schedule="onecycle", seed=4)
    assert params["data"].data_source == "/data/mnist"
