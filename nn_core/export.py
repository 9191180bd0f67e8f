"""ONNX export of the trained MLP and the parity check against PyTorch.

Exporter: torch.export-based (`dynamo=True`). For this MLP it gives the simplest correct graph
(Reshape, Cast, Gemm, Relu, Gemm, Softmax, and one MatMul on the cast pixels for the drift check's
sums: 7 nodes, the batch reshape folded), where the deprecated TorchScript exporter adds a
Shape/Gather/Unsqueeze/Concat chain for the same reshape.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export import Dim

from common.atomic import atomic_path
from nn_core.model import MLP, MLPConfig, build_model

OPSET = 20
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities", "pixel_sums")
PARITY_BATCH_SIZES = (1, 7, 10_000)
PARITY_TOLERANCE = 1e-4


def folded_first_layer(model: MLP) -> torch.nn.Linear:
    """The model's first Linear with its input normalisation folded in: ((x - mean) / std) W' + b
    = x (W' / std) + (b - (mean / std) W' 1), computed in float64 and rounded once to float32. The
    served graph then multiplies the raw pixels directly: no Sub and Div, each a (B, 784) float32
    temporary that onnxruntime writes and reads again, which took a fifth of the session's time
    (bench/bench_inference.py's bare session, 1.2 M images: 0.55 s -> 0.44 s on 2 cores)."""
    first = model.layers[0]
    assert isinstance(first, torch.nn.Linear), "the MLP starts with a Linear"
    w = first.weight.detach().double()
    mean, std = float(model.mean), float(model.std)
    folded = copy.deepcopy(first)  # not a new Linear: its initialisation would draw from torch's generator
    with torch.no_grad():
        folded.weight.copy_((w / std).float())
        folded.bias.copy_((first.bias.detach().double() - (mean / std) * w.sum(dim=1)).float())
    return folded


class ServingModel(torch.nn.Module):
    """What is served: raw uint8 pixels in; logits, probabilities and the pixel sums of the drift
    check out. The first layer takes the raw pixels (`folded_first_layer`); the parity check
    compares the result with the trained model as it is. `pixel_sums` (B, 2): each image's total and
    the sum of its central 20x20 box, the two pixel features of serving/drift.py, computed here in the
    same onnxruntime pass as the prediction instead of a second pass over the pixels in numpy (which
    cost the batch job more than a quarter of the session's time). Exact in float32: the sums are
    integers below 2**24."""

    def __init__(self, model: MLP):
        super().__init__()
        self.first = folded_first_layer(model)
        self.rest = model.layers[1:]
        box = torch.zeros(28, 28)
        box[4:24, 4:24] = 1.0
        self.register_buffer("sum_weights", torch.stack([torch.ones(784), box.flatten()], dim=1))  # (784, 2)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = pixels.reshape(-1, 784).to(torch.float32)  # (B, 784) raw 0..255
        logits = self.rest(self.first(x))  # (B, 10)
        sums = x @ self.sum_weights  # one small MatMul on the same cast pixels
        return logits, torch.softmax(logits, dim=1), sums


def export_onnx(model: MLP, path: Path) -> Path:
    """Write `model` as ONNX (uint8 [batch, 28, 28] -> float32 [batch, 10] x2 and [batch, 2]), checked,
    atomically."""
    example = torch.zeros(7, 28, 28, dtype=torch.uint8)
    with atomic_path(path, suffix=".onnx") as tmp:
        torch.onnx.export(
            ServingModel(model.cpu()).eval(),
            (example,),
            tmp,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamo=True,
            external_data=False,  # one self-contained file (the registry keeps it so: nn_core.registry)
            dynamic_shapes={"pixels": {0: Dim("batch")}},
            opset_version=OPSET,
            verbose=False,
        )
        onnx.checker.check_model(onnx.load(tmp), full_check=True)  # a model that fails is never put in place
    return Path(path)


def warm_up() -> None:
    """Export a one-unit MLP and throw it away: the exporter's first run in a process pays for its
    imports and operator registry (~0.8 s here), and the real export after this one does not."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(build_model(MLPConfig(hidden=(1,)), seed=0), Path(tmp) / "warm-up.onnx")


def onnx_session(path: Path, device: str = "auto"):
    """An onnxruntime session on the provider the model will be served on: serving's own session
    (CUDA with its options, TF32 off, when a GPU is usable here; else the CPU), so that the parity
    and gate figures describe what the batch job will run."""
    from serving.session import create_session

    return create_session(Path(path), device)  # type: ignore[arg-type]


def onnx_logits(session, images: np.ndarray, batch_size: int = 10_000) -> np.ndarray:
    out = [session.run(["logits"], {INPUT_NAME: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    argmax_agreement: float
    torch_accuracy: float
    onnx_accuracy: float
    batch_max_abs_diff: dict  # batch size -> max |diff| of logits at that batch size
    tolerance: float
    passed: bool
    reason: str
    provider: str = "CPUExecutionProvider"  # where onnxruntime ran: the serving side's provider
    torch_device: str = "cpu"  # where the PyTorch reference ran

    def metrics(self) -> dict[str, float]:
        """The run's `parity/` figures (logged once); the per-batch-size figures are in the card."""
        from nn_core import metrics as M

        return {M.PARITY_MAX_ABS_DIFF: self.max_abs_diff, M.PARITY_ARGMAX_AGREEMENT: self.argmax_agreement,
                M.PARITY_ONNX_VAL_ACCURACY: self.onnx_accuracy}

    def tags(self) -> dict[str, str]:
        """Which arithmetic the figures compare (a string: not a metric)."""
        return {"parity.provider": self.provider, "parity.torch_device": self.torch_device}

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def check_parity(model: MLP, onnx_path: Path, images: torch.Tensor, labels: torch.Tensor,
                 tolerance: float = PARITY_TOLERANCE, device: str = "auto", torch_device: str = "cpu",
                 session=None) -> ParityReport:
    """Compare onnxruntime with PyTorch on the whole split and at batch sizes 1, 7 and 10,000.

    onnxruntime runs on `device` (auto: the provider the batch job would use here), or in `session`
    when given; PyTorch runs on `torch_device` in float32 (TF32 off on CUDA)."""
    from serving.session import provider

    dev = torch.device(torch_device)
    model = model.to(dev).eval()
    x, y = images.cpu(), labels.cpu().numpy()
    session = session if session is not None else onnx_session(onnx_path, device)
    with _no_tf32():
        def ref_logits(xb: torch.Tensor) -> np.ndarray:
            return model(xb.to(dev)).cpu().numpy()

        ref = np.concatenate([ref_logits(x[i : i + 10_000]) for i in range(0, len(x), 10_000)])
        got = onnx_logits(session, x.numpy())
        per_batch = {b: float(np.abs(ref_logits(x[:b]) - session.run(["logits"], {INPUT_NAME: x[:b].numpy()})[0]).max())
                     for b in PARITY_BATCH_SIZES}
    diff = float(np.abs(ref - got).max())
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    torch_acc = float((ref.argmax(1) == y).mean())
    onnx_acc = float((got.argmax(1) == y).mean())
    failures = []
    if diff > tolerance:
        failures.append(f"max |logit diff| {diff:.3g} > {tolerance:g}")
    if any(d > tolerance for d in per_batch.values()):
        failures.append(f"batch-size diffs {per_batch} exceed {tolerance:g}")
    if agreement < 1.0:
        failures.append(f"argmax agreement {agreement:.4%} < 100%")
    if onnx_acc != torch_acc:
        failures.append(f"ONNX accuracy {onnx_acc:.4f} != PyTorch accuracy {torch_acc:.4f}")
    return ParityReport(
        max_abs_diff=diff, argmax_agreement=agreement, torch_accuracy=torch_acc, onnx_accuracy=onnx_acc,
        batch_max_abs_diff=per_batch, tolerance=tolerance, passed=not failures,
        reason="; ".join(failures) or "parity passed", provider=provider(session), torch_device=str(dev),
    )


@contextlib.contextmanager
def _no_tf32():
    """PyTorch's CUDA float32 matmuls in full float32 for the reference (TF32 would round the inputs
    to a 10-bit mantissa); restores the caller's settings. No effect on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
