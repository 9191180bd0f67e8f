"""One configuration, many faces: each setting is declared once, as a config dataclass field, and the
command line, the environment, the Prefect flows' parameter forms and the checks at construction all
follow from it."""

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
    __pydantic_config__ = fields.FORM
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
    assert props["mode"]["enum"] == ["a", "b"]
    assert "secret" not in props  # internal: set by the program, not a field of the form
    assert props["name"]["type"] == "string"  # `str | None` shows as a text input, not as "None"



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
        if fields.in_form(f):
            assert props[f.name]["description"] == f.metadata["description"], f"{cls.__name__}.{f.name}"
        else:
            assert f.name not in props, f"{cls.__name__}.{f.name}: derived, not for a user to set"


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


# ---------------------------------------------------------------------------------------------
# The environment face: MNISTOPS_<FIELD>, parsed by the option's own parser; command line > env > default


def _train_args(argv: list[str], monkeypatch, **env: str) -> argparse.Namespace:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return _subparser("train").parse_args(argv)  # the parser reads the environment when it is built


def test_command_line_beats_environment_beats_default(monkeypatch):
    from flows.options import pipeline_parameters

    assert pipeline_parameters(_train_args([], monkeypatch))["train"].lr == TrainConfig().lr
    assert pipeline_parameters(_train_args([], monkeypatch, MNISTOPS_LR=""))["train"].lr == TrainConfig().lr  # unset
    args = _train_args([], monkeypatch, MNISTOPS_LR="0.01", MNISTOPS_HIDDEN="128,64", MNISTOPS_SCHEDULE="none")
    params = pipeline_parameters(args)
    assert (params["train"].lr, params["train"].schedule, params["model"].hidden) == (0.01, "none", (128, 64))
    params = pipeline_parameters(_train_args(["--lr", "0.02", "--hidden", "32"], monkeypatch, MNISTOPS_LR="0.01"))
    assert (params["train"].lr, params["model"].hidden) == (0.02, (32,))


def test_a_boolean_from_the_environment(monkeypatch):
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, JobConfig)
    assert p.parse_args([]).track is True
    monkeypatch.setenv("MNISTOPS_INFER_TRACK", "0")
    monkeypatch.setenv("MNISTOPS_INFER_OVERWRITE", "yes")
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, JobConfig)
    args = p.parse_args([])
    assert (args.track, args.overwrite) == (False, True)


@pytest.mark.parametrize("var, value, words", [
    ("MNISTOPS_EPOCHS", "0", "argument --epochs: MNISTOPS_EPOCHS: 0: expected an integer >= 1"),
    ("MNISTOPS_LR", "fast", "argument --lr: MNISTOPS_LR: 'fast': expected a number"),
    ("MNISTOPS_SCHEDULE", "linear", "argument --schedule: MNISTOPS_SCHEDULE: 'linear': expected one of none, cosine"),
    ("MNISTOPS_HIDDEN", "0", "argument --hidden: MNISTOPS_HIDDEN: hidden sizes '0': expected positive integers"),
])
def test_a_bad_environment_value_is_a_one_line_usage_error_naming_the_variable(tmp_path, var, value, words):
    import os
    import subprocess
    import sys

    env = {**os.environ, var: value}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "train"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_two_options_of_a_command_read_the_same_variable(command):
    variables = [a.env for a in _subparser(command)._actions if getattr(a, "env", None)]
    assert variables and len(variables) == len(set(variables)), variables


def test_the_no_telemetry_defaults_run_any_command(tmp_path):
    """`python -m common.settings CMD` (the Makefile's test and bench targets): CMD sees the one list,
    and an explicit setting wins."""
    import os
    import subprocess
    import sys

    from common.settings import QUIET

    env = {k: v for k, v in os.environ.items() if k not in QUIET}
    env["DO_NOT_TRACK"] = "0"
    done = subprocess.run([sys.executable, "-m", "common.settings", "env"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=True)
    seen = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert {k: seen.get(k) for k in QUIET if k != "DO_NOT_TRACK"} == {k: v for k, v in QUIET.items()
                                                                      if k != "DO_NOT_TRACK"}
    assert seen["DO_NOT_TRACK"] == "0"


# ---------------------------------------------------------------------------------------------
# Adding a training option is one field plus its use: every face follows, and old checkpoints resume


LabelSmoothing = dataclasses.make_dataclass(
    "TrainConfig", [("label_smoothing", float, setting(0.0, "cross-entropy label smoothing", ge=0, le=1))],
    bases=(TrainConfig,), frozen=True, namespace={"__module__": __name__})


def _checkpoint_of(job) -> dict:
    """What save_checkpoint records of a job's configs, written before `label_smoothing` existed."""
    train = {k: v for k, v in dataclasses.asdict(job.train).items() if k != "label_smoothing"}
    return {"model_config": job.model.to_dict(), "train_config": train, "dataset_digest": "d"}


def test_a_new_training_field_is_an_option_a_variable_a_form_field_and_resumes_old_checkpoints(monkeypatch):
    from prefect import flow
    from prefect.utilities.callables import parameter_schema

    from nn_core.train import TrainJob, resume_mismatches

    # The command line and the environment.
    p = argparse.ArgumentParser(exit_on_error=False, formatter_class=fields.HelpFormatter)
    add_arguments(p, LabelSmoothing)
    assert from_args(LabelSmoothing, p.parse_args(["--label-smoothing", "0.1"])).label_smoothing == 0.1
    assert "cross-entropy label smoothing (default: 0.0) [env MNISTOPS_LABEL_SMOOTHING]" in \
        " ".join(p.format_help().split())
    with pytest.raises(argparse.ArgumentError, match="expected a number >= 0 and <= 1"):
        p.parse_args(["--label-smoothing", "2"])
    monkeypatch.setenv("MNISTOPS_LABEL_SMOOTHING", "0.2")
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, LabelSmoothing)
    assert from_args(LabelSmoothing, p.parse_args([])).label_smoothing == 0.2

    # Prefect's form and its validation.
    def f(train: LabelSmoothing = LabelSmoothing()):
        return train

    prop = parameter_schema(f).model_dump()["definitions"]["TrainConfig"]["properties"]["label_smoothing"]
    assert (prop["description"], prop["maximum"], prop["type"]) == ("cross-entropy label smoothing", 1, "number")
    assert flow(f).validate_parameters({"train": {"label_smoothing": 0.3}})["train"].label_smoothing == 0.3

    # A checkpoint written before the field existed resumes with its default; another value refuses.
    job = TrainJob(data_path="x", out_dir="y", train=LabelSmoothing(epochs=3))
    assert resume_mismatches(_checkpoint_of(job), job, "d") == []
    changed = TrainJob(data_path="x", out_dir="y", train=LabelSmoothing(epochs=3, label_smoothing=0.1))
    assert resume_mismatches(_checkpoint_of(job), changed, "d") == ["train.label_smoothing (checkpoint 0.0, job 0.1)"]


def test_a_changed_or_removed_field_of_a_checkpoint():
    from nn_core.train import TrainJob, resume_mismatches

    job = TrainJob(data_path="x", out_dir="y", model=MLPConfig(hidden=(64,)), train=TrainConfig(lr=1e-3))
    ckpt = _checkpoint_of(job)
    ckpt["train_config"]["momentum"] = 0.9  # a field removed since: not compared
    assert resume_mismatches(ckpt, job, "d") == []
    ckpt["train_config"]["lr"] = 2e-3
    ckpt["model_config"]["hidden"] = [50]
    assert resume_mismatches(ckpt, job, "other") == [
        "model.hidden (checkpoint [50], job [64])", "train.lr (checkpoint 0.002, job 0.001)",
        "dataset_digest (checkpoint d, job other)"]


# ---------------------------------------------------------------------------------------------
# Deployment forms: no derived fields, optional fields as their type, defaults in the parameters


def test_the_forms_offer_only_what_a_user_may_set():
    from prefect.utilities.callables import parameter_schema

    from flows.inference import batch_inference
    from flows.training import training_pipeline

    defs = parameter_schema(training_pipeline.fn).model_dump()["definitions"]
    assert not {"in_features", "num_classes", "mean", "std"} & set(defs["MLPConfig"]["properties"])
    assert not {"log_dir", "devices", "monitor_interval"} & set(defs["LaunchSpec"]["properties"])
    job = parameter_schema(batch_inference.fn).model_dump()["definitions"]["JobConfig"]["properties"]
    assert (job["batch_size"]["type"], job["batch_size"]["minimum"]) == ("integer", 1)
    assert job["labels"]["type"] == "string" and "progress" not in job
    # The flow still takes None for an optional field, and the derived fields keep their defaults.
    params = batch_inference.validate_parameters({"job": {"input": "a", "output": "b", "batch_size": None}})
    assert params["job"].batch_size is None


@pytest.mark.slow
def test_a_deployment_run_with_defaults_shows_them(tmp_path, prefect_server_url):
    """infra/prefect.yaml deployed to a real Prefect server (the session's): a run started with no
    parameters holds the flows' defaults (not `{}`), and the deployment's form has no derived field.
    Its training deployment gets the drift trigger `mnistops serve` declares, with K from
    MNISTOPS_RETRAIN_ALERTS at deploy time. The server is shared: the deployments are read by their
    flow's name, and what this test made is deleted again (a later `mnistops serve` on the server must
    not find a run of this one's waiting for it)."""
    import json
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    from flows.drift_events import RetrainTrigger, retrain_trigger
    from flows.options import deployment_defaults
    from servers import QUIET_ENV

    root = Path(__file__).resolve().parents[1]
    api_url = prefect_server_url
    names = {"training-nightly": "training-pipeline/training-nightly",
             "hyperparameter-sweep": "hyperparameter-sweep/hyperparameter-sweep",
             "inference-hourly": "batch-inference/inference-hourly"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MNISTOPS_"))}, **QUIET_ENV,
           "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / "cli"), "MNISTOPS_RETRAIN_ALERTS": "5"}
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:  # what `prefect work-pool create mnistops-process --type process` makes (README's own commands: test_infra_workpool)
            client.create_work_pool(WorkPoolCreate(name="mnistops-process", type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass
        done = subprocess.run([sys.executable, "-c", "from prefect.cli import app; app()", "--no-prompt", "deploy",
                               "--all", "--prefect-file", "infra/prefect.yaml"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        deps = {name: client.read_deployment_by_name(full) for name, full in names.items()}
        try:
            run = client.create_flow_run_from_deployment(deps["training-nightly"].id)
            client.delete_flow_run(run.id)
            form = deps["training-nightly"].parameter_openapi_schema["definitions"]
            trigger = retrain_trigger("mnist-mlp", RetrainTrigger(retrain_alerts=5))
            (automation,) = client.read_automations_by_name(trigger.name)
        finally:
            for dep in deps.values():
                client.delete_deployment(dep.id)
    trigger.set_deployment_id(deps["training-nightly"].id)
    assert automation.trigger == trigger.as_automation().trigger and automation.enabled
    assert [a.deployment_id for a in automation.actions] == [deps["training-nightly"].id]
    expected = json.loads(json.dumps(deployment_defaults()))
    # the nightly retraining takes every feedback set recorded for the task (its one non-default)
    assert run.parameters == {**expected["training"], "recorded_feedback": True}
    assert run.parameters["train"]["epochs"] == TrainConfig().epochs
    assert deps["hyperparameter-sweep"].parameters == expected["sweep"]
    assert deps["inference-hourly"].parameters["job"]["fail_on_drift"] is True
    assert "mean" not in form["MLPConfig"]["properties"]


def test_what_serve_registers_comes_back_as_the_same_configs():
    """`mnistops serve` gives its deployments the options as JSON (what Prefect shows for each run);
    the flows build the same configs back from them."""
    from flows.inference import batch_inference
    from flows.options import parameters_json, pipeline_parameters
    from flows.training import training_pipeline

    params = pipeline_parameters(_subparser("serve").parse_args(["--epochs", "3", "--hidden", "32,16", "--nproc", "2"]))
    stored = parameters_json(params)
    assert "mean" not in stored["model"] and "log_dir" not in stored["launch"]
    assert training_pipeline.validate_parameters(stored) == {**params, "training_id": None, "feedback": None,
                                                             "recorded_feedback": False}
    job = JobConfig(input=Path("inbox"), output=Path("out"), fail_on_drift=True)
    assert batch_inference.validate_parameters(parameters_json({"job": job, "inbox": True}))["job"] == job
