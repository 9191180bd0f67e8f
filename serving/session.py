"""The onnxruntime session: provider choice, thread settings and the model contract check.

onnxruntime-gpu lists CUDAExecutionProvider (and TensorRT) as available even on a machine without a
GPU, and a session asking for CUDA there falls back to the CPU with a burst of C++ error lines. So the
provider is decided here, from the presence of a GPU, and checked on the session afterwards.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from pathlib import Path

import onnxruntime as ort

from common.resources import usable_cores
from serving.config import Device
from common.errors import DeviceError, ModelSourceError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
# Optional: each image's pixel total and central-box sum (B, 2), which the drift check then takes from
# the same run instead of a pass of its own over the pixels (nn_core/export.py's models have it).
SUMS_NAME = "pixel_sums"


@functools.lru_cache(maxsize=1)  # a property of the machine; nvidia-smi takes a while to answer
def gpu_present() -> bool:
    """True when an NVIDIA GPU is visible to this process (a device node, or `nvidia-smi -L` lists one)."""
    if any(Path("/dev").glob("nvidia[0-9]*")):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


cpu_threads = usable_cores  # CPUs this process may run on (its affinity mask)


def plan_threads(
    cuda: bool, streams: int | None = None, threads: int | None = None, reserve: int = 0
) -> tuple[int, int]:
    """(concurrent runs, intra-op threads per run). On CPU, batches of a small MLP run better side by
    side, one thread each, than one at a time on all threads: onnxruntime's intra-op parallelism has a
    fixed cost per operator that a 784x50 Gemm does not repay (on 2 cores: ~1.4x the throughput).
    `reserve` CPUs are left to the reader when decoding is the bottleneck (gzip, images).
    On CUDA one stream of runs keeps the GPU busy; more only contend for it."""
    cpus = max(1, cpu_threads() - reserve)
    if streams is None:
        streams = 1 if cuda else max(1, min(4, cpus // (threads or 1)))
    if threads is None:
        threads = max(1, cpus // streams)
    return streams, threads


def gpu_usable() -> bool:
    """A GPU is present and this onnxruntime has the CUDA provider (which alone proves nothing)."""
    return CUDA in ort.get_available_providers() and gpu_present()


def _wants_cuda(device: Device) -> bool:
    if device == "cpu":
        return False
    usable = gpu_usable()
    if device == "cuda" and not usable:
        raise DeviceError(
            "--device cuda: no usable GPU (no /dev/nvidia* device and no GPU listed by nvidia-smi, "
            f"or onnxruntime {ort.__version__} was built without CUDA); use --device auto or cpu"
        )
    return usable


def cuda_provider_options(device_id: int = 0) -> dict[str, str]:
    """The CUDA execution provider's options, from this one place for every CUDA session (the batch
    job, the gate's parity check, the GPU acceptance run).

    - `device_id`: explicit, so that a process given one GPU of several (a sweep trial) uses that one.
    - `use_tf32` off: with TF32, float32 Gemm inputs are rounded to a 10-bit mantissa (logits differ
      from PyTorch's float32 by ~1e-3), and parity on the serving GPU would then be measured against a
      different arithmetic than the one PyTorch and the CPU provider use. This MLP is nowhere near
      compute-bound on a GPU, so full float32 costs nothing measurable.
    - `do_copy_in_default_stream`: onnxruntime's default, stated: copies and kernels on one stream,
      so a run's input copy is ordered before its kernels without extra synchronisation.
    """
    if device_id < 0:
        raise ValueError(f"CUDA device id {device_id}: expected >= 0")
    return {"device_id": str(device_id), "use_tf32": "0", "do_copy_in_default_stream": "1"}


def session_providers(cuda: bool, device_id: int = 0) -> list:
    """The `providers` argument of an InferenceSession: CUDA with its options (CPU as onnxruntime's
    fallback for any node CUDA lacks), or the CPU alone."""
    if not cuda:
        return [CPU]
    return [(CUDA, cuda_provider_options(device_id)), CPU]


def create_session(
    model_path: Path, device: Device = "auto", threads: int | None = None, device_id: int = 0
) -> ort.InferenceSession:
    """A session on the chosen device, checked against the serving contract.

    `threads`: intra-op threads of one run, default the CPUs this process may use. The inter-op pool
    stays at one thread: the graph is a chain, there is nothing to run side by side within a run.
    `device_id`: the GPU to run on when the session uses CUDA (see cuda_provider_options).
    The session may be run from several threads at once (`session.run` releases the GIL).
    """
    # Warnings (e.g. which nodes went to which provider) are noise for a batch job; errors stay.
    ort.set_default_logger_severity(3)
    cuda = _wants_cuda(device)
    if cuda:
        try:
            # Loads the CUDA and cuDNN libraries that the nvidia-* pip wheels ship, so onnxruntime-gpu
            # finds them without LD_LIBRARY_PATH.
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001  # a failed preload shows up as a CPU session below
            log.warning("onnxruntime.preload_dlls() failed: %s", e)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # Busy-waiting workers between runs take the CPU that the reader and writer threads need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = session_providers(cuda, device_id)
    try:
        session = ort.InferenceSession(str(model_path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for an invalid model
        raise ModelSourceError(f"{model_path}: onnxruntime cannot load the model ({e})") from e
    used = session.get_providers()[0]
    if device == "cuda" and used != CUDA:
        raise DeviceError(f"--device cuda: the session runs on {used}, not CUDA (see the errors above)")
    if cuda and used != CUDA:
        log.warning("a GPU is present but CUDA could not be used; running on %s", used)
    check_contract(session, model_path)
    log.info("onnxruntime %s session on %s", ort.__version__, used)
    return session


def provider(session: ort.InferenceSession) -> str:
    """The provider that runs the graph (the first one the session kept)."""
    return session.get_providers()[0]


def check_contract(session: ort.InferenceSession, model_path: Path) -> None:
    """The serving contract: one input `pixels` uint8 [batch, 28, 28], an output `probabilities`
    float [batch, 10], and optionally `pixel_sums` float [batch, 2]."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ModelSourceError(
            f"{model_path}: model inputs [{got}], expected one input `{INPUT_NAME}` "
            "tensor(uint8) [batch, 28, 28]"
        )
    if list(inputs[0].shape[1:]) != [28, 28]:
        raise ModelSourceError(f"{model_path}: input shape {inputs[0].shape}, expected [batch, 28, 28]")
    outputs = {o.name: o for o in session.get_outputs()}
    out = outputs.get(OUTPUT_NAME)
    if out is None or out.type != "tensor(float)" or (out.shape and out.shape[-1] != 10):
        raise ModelSourceError(
            f"{model_path}: outputs {sorted(outputs)}, expected `{OUTPUT_NAME}` tensor(float) [batch, 10]"
        )
    sums = outputs.get(SUMS_NAME)
    if sums is not None and (sums.type != "tensor(float)" or (sums.shape and sums.shape[-1] != 2)):
        raise ModelSourceError(f"{model_path}: output `{SUMS_NAME}` is {sums.type} {sums.shape}, expected "
                               "tensor(float) [batch, 2] (each image's pixel total and central 20x20 sum)")


def has_pixel_sums(session: ort.InferenceSession) -> bool:
    return any(o.name == SUMS_NAME for o in session.get_outputs())
