"""ONNX export of the trained MLP and the parity check against PyTorch.

Exporter: torch.export-based (`dynamo=True`). For this MLP it gives the simplest correct graph
(Reshape, Cast, Sub, Div, Gemm, Relu, Gemm, Softmax: 8 nodes, the batch reshape folded), where the
deprecated TorchScript exporter adds a Shape/Gather/Unsqueeze/Concat chain for the same reshape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export import Dim

from serving.atomic import atomic_path
from nn_core.model import MLP

OPSET = 20
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")
PARITY_BATCH_SIZES = (1, 7, 10_000)
PARITY_TOLERANCE = 1e-4


class ServingModel(torch.nn.Module):
    """What is served: raw uint8 pixels in, logits and probabilities out."""

    def __init__(self, model: MLP):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(pixels)  # (B, 10)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(model: MLP, path: Path) -> Path:
    """Write `model` as ONNX (uint8 [batch, 28, 28] -> float32 [batch, 10] x2), checked, atomically."""
    example = torch.zeros(7, 28, 28, dtype=torch.uint8)
    with atomic_path(path, suffix=".onnx") as tmp:
        torch.onnx.export(
            ServingModel(model.cpu()).eval(),
            (example,),
            tmp,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamo=True,
            external_data=False,  # one self-contained file: what the registry stores and serving reads
            dynamic_shapes={"pixels": {0: Dim("batch")}},
            opset_version=OPSET,
            verbose=False,
        )
        onnx.checker.check_model(onnx.load(tmp), full_check=True)  # a model that fails is never put in place
    return Path(path)


def onnx_session(path: Path):
    """A CPU onnxruntime session for checks (parity and gate figures do not depend on the device)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_logits(session, images: np.ndarray, batch_size: int = 10_000) -> np.ndarray:
    out = [session.run(["logits"], {INPUT_NAME: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    return float((onnx_logits(onnx_session(path), images).argmax(1) == labels).mean())


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

    def metrics(self) -> dict[str, float]:
        """The run's `parity/` figures (logged once); the per-batch-size figures are in the card."""
        from nn_core import metrics as M

        return {M.PARITY_MAX_ABS_DIFF: self.max_abs_diff, M.PARITY_ARGMAX_AGREEMENT: self.argmax_agreement,
                M.PARITY_ONNX_VAL_ACCURACY: self.onnx_accuracy}

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def check_parity(model: MLP, onnx_path: Path, images: torch.Tensor, labels: torch.Tensor,
                 tolerance: float = PARITY_TOLERANCE) -> ParityReport:
    """Compare onnxruntime with PyTorch on the whole split and at batch sizes 1, 7 and 10,000."""
    model = model.cpu().eval()
    x, y = images.cpu(), labels.cpu().numpy()
    session = onnx_session(onnx_path)
    ref = model(x).numpy()
    got = onnx_logits(session, x.numpy())
    diff = float(np.abs(ref - got).max())
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    torch_acc = float((ref.argmax(1) == y).mean())
    onnx_acc = float((got.argmax(1) == y).mean())
    per_batch = {}
    for b in PARITY_BATCH_SIZES:
        xb = x[:b]
        per_batch[b] = float(np.abs(model(xb).numpy() - session.run(["logits"], {INPUT_NAME: xb.numpy()})[0]).max())
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
        reason="; ".join(failures) or "parity passed",
    )
