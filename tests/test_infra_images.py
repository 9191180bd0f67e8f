"""The inference image, run as its Dockerfile describes it, without a container engine: a fresh venv of
the base image's Python gets exactly what infra/docker/inference.Dockerfile copies and installs
(`pip install '.[serving]'`, from PyPI through pip's cache), and its entrypoint `python -m serving`
runs batch jobs there, from an .onnx file and from the registry of a real MLflow server.

This proves that the torch-free install really is one: `import torch` fails in that venv, and
neither nn_core nor flows is there to import.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dockerfile import base_python, build, instructions
from serving_fixtures import digits, mlp_onnx, mlp_weights, reference_probabilities, save_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = ROOT / "infra" / "docker" / "inference.Dockerfile"
MODEL_NAME = "mnist-mlp-image"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """`docker build -f infra/docker/inference.Dockerfile .`, done for real short of the engine."""
    started = time.monotonic()
    img = build(INFERENCE, ROOT, tmp_path_factory.mktemp("inference-image"), python=base_python(INFERENCE))
    # Seen in the test log (-rA or on failure): what the build costs on every CI submission.
    print(f"inference image steps ran in {time.monotonic() - started:.1f} s")
    return img


def test_the_image_copies_only_the_torch_free_code(image):
    code = image.root / "opt" / "mnistops"
    # pip's build leaves build/ and mnistops.egg-info/ beside the sources, as in the image.
    sources = {p.name for p in code.iterdir()} - {"build", "mnistops.egg-info"}
    assert sources == {"README.md", "pyproject.toml", "serving"}
    # What could not run without an engine is the system-user step, nothing else.
    assert image.skipped and all("useradd" in s for s in image.skipped), image.skipped
    assert image.user == "10001"


def test_torch_prefect_and_the_training_code_are_not_installed(image):
    for module in ("torch", "prefect", "nn_core", "flows", "mlflow.server"):
        done = image.python(f"import {module}")
        assert done.returncode != 0, f"{module} imports in the inference image"
        assert "ModuleNotFoundError" in done.stderr, done.stderr
    # One ONNX runtime, the CPU one: the `serving` extra.
    listed = image.python("import importlib.metadata as m, json; "
                          "print(json.dumps([d.metadata['Name'].lower() for d in m.distributions()]))")
    names = set(json.loads(listed.stdout))
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names


def test_the_entrypoint_starts(image):
    done = image.run()  # ENTRYPOINT + the default CMD (--help)
    assert done.returncode == 0, done.stderr
    assert "--input" in done.stdout and "--model" in done.stdout


def _check_output(out: Path, weights: dict, x: np.ndarray) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pydict()
    expected = reference_probabilities(weights, x).argmax(axis=1)
    assert table["label"] == expected.tolist()
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["counts"]["predicted"] == len(x)
    return manifest


def test_batch_job_from_an_onnx_file(image):
    data = image.workdir  # /data: the folder the image owns and documents as the mount point
    weights = save_model(data / "model.onnx")
    x = digits(40)
    np.save(data / "in.npy", x)
    done = image.run(["--model", str(data / "model.onnx"), "--input", "in.npy", "--output", "out.parquet",
                      "--no-track"])
    assert done.returncode == 0, done.stderr
    _check_output(data / "out.parquet", weights, x)


def test_batch_job_from_the_registry_of_an_mlflow_server(image, tmp_path):
    import mlflow
    import mlflow.onnx
    from mlflow import MlflowClient

    from servers import mlflow_server

    with mlflow_server(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts") as url:
        # The training side (this venv, with the full mlflow) logs and registers a model...
        mlflow.set_tracking_uri(url)
        try:
            mlflow.set_experiment("image-test")
            weights = mlp_weights(seed=3)
            with mlflow.start_run():
                info = mlflow.onnx.log_model(mlp_onnx(weights), name="model", registered_model_name=MODEL_NAME,
                                             onnx_execution_providers=["CPUExecutionProvider"],
                                             pip_requirements=["onnxruntime"])
            client = MlflowClient(url)
            client.set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
        finally:
            mlflow.set_tracking_uri(None)

        # ...and the image serves its champion through the server, logging its own run there.
        x = digits(25, seed=5)
        y = reference_probabilities(weights, x).argmax(axis=1)
        np.save(image.workdir / "reg-in.npy", x)
        np.save(image.workdir / "reg-labels.npy", y)
        done = image.run(["--model", f"models:/{MODEL_NAME}@champion", "--input", "reg-in.npy",
                          "--labels", "reg-labels.npy", "--output", "reg-out.parquet"],
                         env={"MLFLOW_TRACKING_URI": url})
        assert done.returncode == 0, done.stderr
        manifest = _check_output(image.workdir / "reg-out.parquet", weights, x)
        assert manifest["accuracy"] == 1.0
        assert manifest["model"]["name"] == MODEL_NAME
        assert str(manifest["model"]["version"]) == str(info.registered_model_version)
        assert manifest["model"]["onnxruntime"].startswith("1.31")
        run = MlflowClient(url).get_run(manifest["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["accuracy"] == 1.0


def _dependency_install(dockerfile: Path, build_args: dict[str, str]) -> str:
    """The requirement of the file's first `pip install` (its dependency layer), ARGs filled in."""
    args = {}
    for ins in instructions(dockerfile):
        if ins.word == "ARG":
            name, _, default = ins.rest.partition("=")
            args[name] = build_args.get(name, default)
        if ins.word == "RUN" and ins.rest.startswith("pip install"):
            (req,) = shlex.split(ins.rest)[2:]
            return req.replace("${", "{").format(**args).replace(".[", f"{ROOT}[", 1)
    raise AssertionError(f"{dockerfile.name} installs nothing")


def test_images_that_cannot_be_built_here_resolve_to_one_runtime(tmp_path):
    """What the images install and CI cannot (GBs of CUDA wheels), resolved by pip itself (a dry run
    of the files' own `pip install` lines, no GPU needed): the GPU inference variant gets
    onnxruntime-gpu with its CUDA/cuDNN wheels and no torch; the training image torch and the same
    runtime, whose CUDA wheels are torch's own. Never the CPU onnxruntime beside the GPU one."""
    cases = {
        "inference-gpu": (INFERENCE, {"RUNTIME": "gpu"}),
        "train": (ROOT / "infra" / "docker" / "train.Dockerfile", {}),
    }
    procs = {}
    for name, (dockerfile, args) in cases.items():  # side by side: each waits mostly on the index
        req = _dependency_install(dockerfile, args)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(tmp_path / f"{name}.json"), req],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    resolved = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        resolved[name] = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                          for i in json.loads((tmp_path / f"{name}.json").read_text())["install"]}
    for name, names in resolved.items():
        assert "onnxruntime-gpu" in names and "onnxruntime" not in names, name
        assert {"nvidia-cudnn-cu13", "nvidia-cuda-runtime", "nvidia-cublas"} <= set(names), name
    assert "torch" not in resolved["inference-gpu"] and "prefect" not in resolved["inference-gpu"]
    assert {"torch", "prefect", "psycopg", "boto3"} <= set(resolved["train"])
