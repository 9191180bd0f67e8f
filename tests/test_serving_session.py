"""The onnxruntime session of the batch job: provider choice and check, the model contract, threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from common.errors import DeviceError, ModelSourceError
from serving.session import CPU, CUDA, create_session, gpu_present, gpu_usable, plan_threads, provider
from serving_fixtures import digits, reference_probabilities, save_model

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not gpu_present()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    return path, save_model(path)


def test_gpu_detection_matches_the_machine() -> None:
    """What serving decides without torch agrees with torch's CUDA runtime on the same machine, GPU or
    not; on a CPU-only machine onnxruntime-gpu still lists CUDA (the trap), yet no GPU is usable."""
    import onnxruntime
    torch = pytest.importorskip("torch")

    has_gpu = torch.cuda.device_count() > 0
    assert gpu_present() is has_gpu
    assert gpu_usable() is (has_gpu and CUDA in onnxruntime.get_available_providers())


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_cpu_session_predicts(model: tuple[Path, dict], device: str) -> None:
    path, weights = model
    session = create_session(path, device, threads=1)  # type: ignore[arg-type]
    expected = CUDA if (device == "auto" and gpu_usable()) else CPU
    assert provider(session) == expected
    x = digits(64)
    probs = session.run(["probabilities"], {"pixels": x})[0]
    np.testing.assert_allclose(probs, reference_probabilities(weights, x), atol=1e-5)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present: cuda must work here")
def test_cuda_requested_without_gpu_is_a_clear_error(model: tuple[Path, dict]) -> None:
    with pytest.raises(DeviceError, match=r"--device cuda: no usable GPU .*use --device auto or cpu"):
        create_session(model[0], "cuda")


@pytest.mark.skipif(NO_GPU, reason="needs a GPU")
def test_cuda_on_a_gpu_machine(model: tuple[Path, dict]) -> None:
    session = create_session(model[0], "cuda")
    assert provider(session) == CUDA


def test_no_error_spam_on_cpu_only_machine(model: tuple[Path, dict]) -> None:
    """onnxruntime-gpu prints C++ error lines when CUDA is tried without a GPU; auto must not try."""
    code = (
        "import numpy as np; from serving.session import create_session, provider; "
        f"s = create_session({str(model[0])!r}, 'auto'); "
        "s.run(['probabilities'], {'pixels': np.zeros((3, 28, 28), np.uint8)}); print(provider(s))"
    )
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (CUDA if gpu_usable() else CPU)
    if not gpu_usable():
        assert out.stderr == ""


def _model_with(path: Path, input_type: int, input_name: str = "pixels", output_name: str = "probabilities") -> Path:
    nodes = [
        helper.make_node("Cast", [input_name], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "shape"], ["flat"]),
        helper.make_node("Softmax", ["flat"], [output_name], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(input_name, input_type, ["batch", 28, 28])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 784])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_contract_violations(tmp_path: Path) -> None:
    f = _model_with(tmp_path / "float_in.onnx", TensorProto.FLOAT)
    with pytest.raises(ModelSourceError, match=r"float_in\.onnx: model inputs \[pixels tensor\(float\).*expected one input `pixels` tensor\(uint8\)"):
        create_session(f, "cpu")
    f = _model_with(tmp_path / "named.onnx", TensorProto.UINT8, input_name="x")
    with pytest.raises(ModelSourceError, match=r"named\.onnx: model inputs \[x tensor\(uint8\)"):
        create_session(f, "cpu")
    f = _model_with(tmp_path / "out.onnx", TensorProto.UINT8, output_name="scores")
    with pytest.raises(ModelSourceError, match=r"out\.onnx: outputs \['scores'\], expected `probabilities`"):
        create_session(f, "cpu")
    f = _model_with(tmp_path / "wide.onnx", TensorProto.UINT8)
    with pytest.raises(ModelSourceError, match=r"wide\.onnx: outputs \['probabilities'\].*\[batch, 10\]"):
        create_session(f, "cpu")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelSourceError, match=r"junk\.onnx: onnxruntime cannot load the model"):
        create_session(tmp_path / "junk.onnx", "cpu")


def test_thread_plan() -> None:
    cpus = len(os.sched_getaffinity(0))
    streams, threads = plan_threads(cuda=False)
    assert streams >= 1 and threads >= 1 and streams * threads <= max(cpus, streams)
    assert plan_threads(cuda=True)[0] == 1  # one stream keeps a GPU busy
    assert plan_threads(cuda=False, streams=3, threads=2) == (3, 2)
    assert plan_threads(cuda=False, threads=cpus) == (1, cpus)
