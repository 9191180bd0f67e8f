"""Drift alarm benchmark (issue 14): its false-alarm rate on random batches of the MNIST test set
(target <= 1% for 1,000-image batches) and its detection rate on batches of Fashion-MNIST and of
noise, for the project's MLP trained on the MNIST training split with the reference profile that
registration stores (serving.drift.compute_reference: training split + validation split).

Each batch goes through the job's own path: the onnxruntime session, then `DriftMonitor` (the
per-record scores and the two tests). Needs MNISTOPS_DATA_SOURCE (the MNIST IDX files) and
Fashion-MNIST in MNISTOPS_FASHION_SOURCE (default /usr/share/datasets/fashion-mnist).

    .venv/bin/python bench/bench_drift.py [--batches 1000] [--batch-size 1000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

from common import idx  # noqa: E402
from serving import drift
from serving.session import INPUT_NAME, OUTPUT_NAME, create_session  # noqa: E402

FAR_TARGET = 0.01


def read(folder: Path, name: str, magic: int) -> np.ndarray:
    for f in (folder / name, folder / f"{name}.gz"):
        if f.is_file():
            return idx.read_idx(f, magic=magic)
    raise SystemExit(f"{folder}: no {name}(.gz)")


def train_model(x: np.ndarray, y: np.ndarray, epochs: int, path: Path) -> None:
    """The project's MLP (nn_core.model, default 784-50-10) trained with Adam, exported to ONNX."""
    import torch

    from nn_core.export import export_onnx
    from nn_core.model import MLPConfig, build_model

    model = build_model(MLPConfig(), 0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(y.astype(np.int64))  # a writable copy
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for b in torch.randperm(len(xt), generator=g).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    export_onnx(model.eval(), path)


def alert_rate(session, ref: drift.Reference, batches: list[np.ndarray]) -> tuple[float, float]:
    """(fraction of batches that alert, mean exceedance fraction)."""
    alerts, exceed = 0, 0.0
    for b in batches:
        probs = session.run([OUTPUT_NAME], {INPUT_NAME: b})[0]
        m = drift.DriftMonitor(ref, "bench")
        m.update(b, probs.max(axis=1), probs.argmax(axis=1))
        r = m.report()
        alerts += r.alert
        exceed += r.statistics["exceed_fraction"]
    return alerts / len(batches), exceed / len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=1000, help="random MNIST test batches for the false-alarm rate")
    p.add_argument("--batch-size", type=int, default=1000, help="images per batch")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the model")
    a = p.parse_args()
    src = Path(os.environ.get("MNISTOPS_DATA_SOURCE") or sys.exit("set MNISTOPS_DATA_SOURCE to the MNIST files"))
    fsrc = Path(os.environ.get("MNISTOPS_FASHION_SOURCE", "/usr/share/datasets/fashion-mnist"))
    x = read(src, "train-images-idx3-ubyte", idx.IMAGES_MAGIC)
    y = read(src, "train-labels-idx1-ubyte", idx.LABELS_MAGIC)
    test = read(src, "t10k-images-idx3-ubyte", idx.IMAGES_MAGIC)
    fashion = read(fsrc, "t10k-images-idx3-ubyte", idx.IMAGES_MAGIC)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        model = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        train_model(x[:50_000], y[:50_000], a.epochs, model)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        ref = drift.compute_reference(model, x[:50_000], x[50_000:])
        t_ref = time.perf_counter() - t
        session = create_session(model, "cpu")
        n = a.batch_size
        mnist_batches = [test[rng.choice(len(test), n, replace=False)] for _ in range(a.batches)]
        small = [test[rng.choice(len(test), 100, replace=False)] for _ in range(a.batches)]
        fashion_batches = [fashion[rng.choice(len(fashion), n, replace=False)] for _ in range(100)]
        noise = [rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for _ in range(20)]
        far, far_exceed = alert_rate(session, ref, mnist_batches)
        far_small, _ = alert_rate(session, ref, small)
        det_fashion, f_exceed = alert_rate(session, ref, fashion_batches)
        det_noise, _ = alert_rate(session, ref, noise)
    print(f"model: {a.epochs} epochs on the first 50,000 training images ({t_train:.1f} s); reference profile "
          f"in {t_ref:.2f} s (score threshold {ref.threshold:.2f}, held-out exceedance {ref.exceed_rate:.2%})")
    print(f"  false-alarm rate, {a.batches} random {n:,}-image batches of the MNIST test set: {far:.2%} "
          f"(target <= {FAR_TARGET:.0%}: {'met' if far <= FAR_TARGET else 'MISSED'}; "
          f"mean exceedance {far_exceed:.2%}, tolerated {drift.TOLERANCE:.0%})")
    print(f"  false-alarm rate, {a.batches} random 100-image batches: {far_small:.2%}")
    print(f"  detection rate, 100 random {n:,}-image Fashion-MNIST batches: {det_fashion:.0%} "
          f"(mean exceedance {f_exceed:.0%})")
    print(f"  detection rate, 20 batches of uniform noise: {det_noise:.0%}")


if __name__ == "__main__":
    main()
