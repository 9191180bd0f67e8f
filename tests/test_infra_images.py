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
from stores import experiment_id

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
    assert sources == {"README.md", "pyproject.toml", "common", "serving"}
    # What could not run without an engine is the system-user step, nothing else.
    assert image.skipped and all("useradd" in s for s in image.skipped), image.skipped
    assert image.user == "10001"


# Run by the image's Python, once: what each import raises (None: it imported), and what is installed.
_IMPORTS_AND_DISTRIBUTIONS = """
import importlib, importlib.metadata as m, json
def outcome(module):
    try:
        importlib.import_module(module)
    except Exception as e:
        return type(e).__name__ + ": " + str(e)
print(json.dumps({"imports": {mod: outcome(mod) for mod in ("torch", "prefect", "nn_core", "flows", "mlflow.server")},
                  "installed": [d.metadata["Name"].lower() for d in m.distributions()]}))
"""


def test_torch_prefect_and_the_training_code_are_not_installed(image):
    done = image.python(_IMPORTS_AND_DISTRIBUTIONS)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for module, error in found["imports"].items():
        assert error is not None, f"{module} imports in the inference image"
        assert error.startswith("ModuleNotFoundError"), error
    # One ONNX runtime, the CPU one: the `serving` extra.
    names = set(found["installed"])
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names


def test_the_entrypoint_starts(image):
    done = image.run()  # ENTRYPOINT + the default CMD (--help)
    assert done.returncode == 0, done.stderr
    assert "--input" in done.stdout and "--model" in done.stdout


def _check_output(out: Path, weights: dict, x: np.ndarray) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pydict()
    expected = reference_probabilities(weights, x).argmax(axis=1)
    assert table["prediction"] == expected.tolist()
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
            exp = experiment_id("image-test")
            weights = mlp_weights(seed=3)
            with mlflow.start_run(experiment_id=exp):
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


def test_the_gpu_variant_resolves_to_the_gpu_runtime_only(tmp_path):
    """`--build-arg RUNTIME=gpu` installs GBs of CUDA wheels, which CI cannot use: pip's resolver (a
    dry run of the file's own dependency line, no GPU needed) says what it would install:
    onnxruntime-gpu with its CUDA/cuDNN wheels, never the CPU onnxruntime beside it, no torch."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), _dependency_install(INFERENCE, {"RUNTIME": "gpu"})],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert {"nvidia-cudnn-cu13", "nvidia-cuda-runtime", "nvidia-cublas"} <= names
    assert not names & {"torch", "prefect", "mlflow"}


def test_the_training_install_has_one_runtime():
    """The training image installs `.[train,gpu,server]`, CI's `make setup` `.[train,gpu,test]` (the
    same but for the server/test extras), for real: the environment running this test has the GPU
    runtime, whose CUDA wheels are torch's own, and not the CPU one beside it."""
    import importlib.metadata as md

    names = {d.metadata["Name"].lower() for d in md.distributions()}
    assert "torch" in names
    assert ("onnxruntime" in names) + ("onnxruntime-gpu" in names) == 1, "two onnxruntime packages in one venv"
