"""The drift alarm on real files: a reference profile computed from real MNIST (and stored with a
registered version), `ok` for the MNIST test set in every faithful form (IDX, PNG, JPEG, RGB,
resized), `alert` for Fashion-MNIST and for noise, the `ood_score` column, --fail-on-drift's exit
code, and the statistical helpers against brute force. Images framed or not: the resized test set
scores within 0.3 points of the IDX accuracy; a raw digit is still centred."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from needs import missing
from PIL import Image

from common import idx
from serving import drift
from common.errors import DriftAlert
from serving.images import mnist_pixels
from serving.job import JobConfig, run_job
from trained_model import digit_weights, read, train_images
from serving_fixtures import mlp_onnx, write_idx
from stores import experiment_id

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
FASHION = Path(os.environ.get("MNISTOPS_FASHION_SOURCE", "/usr/share/datasets/fashion-mnist"))


# --- the statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p", [(1, 0.03), (20, 0.03), (200, 0.1), (1000, 0.03)])
def test_binomial_tail_matches_brute_force(n: int, p: float) -> None:
    from fractions import Fraction

    q = Fraction(p).limit_denominator(1000)  # exact rational arithmetic: no underflow
    for k in sorted({0, 1, 2, n // 10, n // 3, n}):
        exact = float(sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k, n + 1)))
        assert drift.binomial_sf(k, n, p) == pytest.approx(exact, rel=1e-9)


def test_chi_square_tail_known_values() -> None:
    # scipy.stats.chi2.isf(q, 9) for q = 0.5, 0.05, 0.01, 0.001
    for x, q in [(8.342832692252, 0.5), (16.918977604620, 0.05), (21.665994333462, 0.01), (27.877164871256, 0.001)]:
        assert drift.chi2_sf_9(x) == pytest.approx(q, rel=1e-9)


# --- real data ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(mnist_source: Path, tmp_path_factory: pytest.TempPathFactory):
    """A model trained on real MNIST (one epoch, ~94%), its drift reference, and the test set."""
    x = train_images(mnist_source)
    d = tmp_path_factory.mktemp("drift")
    onnx.save(mlp_onnx(digit_weights(mnist_source)), str(d / "m.onnx"))
    ref = drift.compute_reference(d / "m.onnx", x[:50_000], x[50_000:])
    (d / "reference.json").write_text(json.dumps(ref.to_dict()))
    test_x = read(mnist_source, "t10k-images-idx3-ubyte", idx.IMAGES_MAGIC)
    test_y = read(mnist_source, "t10k-labels-idx1-ubyte", idx.LABELS_MAGIC)
    return {"dir": d, "model": d / "m.onnx", "reference": d / "reference.json", "x": test_x, "y": test_y}


@pytest.fixture(scope="module")
def fashion() -> np.ndarray:
    f = FASHION / "t10k-images-idx3-ubyte.gz"
    if not f.is_file():
        missing(f"no Fashion-MNIST at {FASHION} (infra/scripts/ensure-test-data.sh, or set MNISTOPS_FASHION_SOURCE)")
    return idx.read_idx(f, magic=idx.IMAGES_MAGIC)


def job(trained, inp: Path, out: Path, **kw) -> JobConfig:
    return JobConfig(input=inp, output=out, model=str(trained["model"]), drift_reference=str(trained["reference"]),
                     track=False, device="cpu", **kw)


def _folder(d: Path, x: np.ndarray, size: int, mode: str, fmt: str, y: np.ndarray | None = None) -> Path:
    d.mkdir()
    ext = "jpg" if fmt == "JPEG" else "png"
    for i, a in enumerate(x):
        im = Image.fromarray(a)
        if size != 28:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        im.convert(mode).save(d / f"{i:05d}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    if y is not None:
        (d / "labels.csv").write_text("file,label\n" + "".join(f"{i:05d}.{ext},{v}\n" for i, v in enumerate(y)))
    return d


@pytest.mark.e2e
@pytest.mark.slow
def test_mnist_test_set_in_every_faithful_form_is_ok(trained, tmp_path: Path) -> None:
    x, y = trained["x"], trained["y"]
    write_idx(tmp_path / "t.idx", x)
    write_idx(tmp_path / "y.idx", y)
    base = run_job(job(trained, tmp_path / "t.idx", tmp_path / "idx.parquet", labels=tmp_path / "y.idx"))
    assert base.drift.status == "ok", base.drift.reason
    assert base.accuracy > 0.9
    t = pq.read_table(base.output)
    assert t.column_names == ["id", "prediction", "probability", "ood_score", "label", "correct"]
    m = json.loads(base.manifest.read_text())
    assert m["drift"]["status"] == "ok" and m["drift"]["reference"] == str(trained["reference"])
    assert set(m["drift"]["statistics"]) >= {"exceed_fraction", "exceed_p_value", "class_tv", "median_confidence"}
    assert m["drift"]["thresholds"]["tolerated_exceed_fraction"] == drift.TOLERANCE
    # Each size (28: no resizing; 56 and 100: enlarged), mode and format at least once; the whole test
    # set each time: the 0.3-point bound is on it.
    forms = [(56, "RGB", "PNG"), (100, "L", "JPEG"), (28, "RGB", "JPEG")]
    for size, mode, fmt in forms:
        d = _folder(tmp_path / f"{size}-{mode}-{fmt}", x, size, mode, fmt, y)
        res = run_job(job(trained, d, tmp_path / f"{d.name}.parquet"))
        assert res.drift.status == "ok", (d.name, res.drift.reason)
        assert abs(res.accuracy - base.accuracy) <= 0.003, (d.name, res.accuracy, base.accuracy)  # only resized


@pytest.mark.e2e
def test_fashion_and_noise_alert(trained, fashion: np.ndarray, tmp_path: Path) -> None:
    write_idx(tmp_path / "fashion.idx", fashion[:1000])
    res = run_job(job(trained, tmp_path / "fashion.idx", tmp_path / "f.parquet"))
    assert res.drift.status == "alert" and "99th percentile" in res.drift.reason
    png = run_job(job(trained, _folder(tmp_path / "fpng", fashion[:300], 56, "RGB", "PNG"), tmp_path / "fp.parquet"))
    assert png.drift.status == "alert"
    noise = np.random.default_rng(0).integers(0, 256, (500, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "noise.npy", noise)
    res_noise = run_job(job(trained, tmp_path / "noise.npy", tmp_path / "n.parquet"))
    assert res_noise.drift.status == "alert"
    write_idx(tmp_path / "digits.idx", trained["x"][:1000])
    ok = run_job(job(trained, tmp_path / "digits.idx", tmp_path / "d.parquet"))
    assert ok.drift.status == "ok"
    # per record: the ood_score ranks digits below clothing and noise
    med = {name: float(np.median(pq.read_table(r.output)["ood_score"].to_numpy())) for name, r in
           (("digits", ok), ("fashion", res), ("noise", res_noise))}
    assert med["digits"] < 1.0 < med["fashion"] < med["noise"], med


@pytest.mark.e2e
def test_fail_on_drift_exit_code(trained, fashion: np.ndarray, tmp_path: Path) -> None:
    write_idx(tmp_path / "fashion.idx", fashion[:500])
    write_idx(tmp_path / "digits.idx", trained["x"][:500])
    base = [sys.executable, "-m", "serving", "--model", str(trained["model"]), "--drift-reference",
            str(trained["reference"]), "--no-track", "--device", "cpu", "--fail-on-drift"]
    r = subprocess.run([*base, "--input", str(tmp_path / "fashion.idx"), "--output", str(tmp_path / "f.parquet")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "drift alert" in errors[0] and "Traceback" not in r.stderr
    assert json.loads(r.stdout)["drift"] == "alert"
    assert (tmp_path / "f.parquet").is_file() and (tmp_path / "f.parquet.manifest.json").is_file()  # the evidence
    # digits pass: no alert raised, so no exit 4 (the same run_job under the command's main)
    ok = run_job(job(trained, tmp_path / "digits.idx", tmp_path / "d.parquet", fail_on_drift=True))
    assert ok.drift.status == "ok" and ok.output.is_file()
    with pytest.raises(DriftAlert):  # the library raises it too, after writing
        run_job(job(trained, tmp_path / "fashion.idx", tmp_path / "f2.parquet", fail_on_drift=True))
    assert (tmp_path / "f2.parquet").is_file()


@pytest.mark.e2e
def test_reference_stored_with_the_version_and_used_by_the_job(trained, fashion, tmp_path: Path, mlflow_store) -> None:
    import mlflow
    import mlflow.onnx
    from mlflow import MlflowClient

    exp = experiment_id("training")
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.onnx.log_model(onnx.load(str(trained["model"])), name="model", registered_model_name="mnist-mlp",
                              onnx_execution_providers=["CPUExecutionProvider"], pip_requirements=["onnxruntime"])
    x = train_images(Path(os.environ["MNISTOPS_DATA_SOURCE"]).resolve())
    uri = drift.store_reference("mnist-mlp", "1", run.info.run_id, trained["model"], x[:50_000], x[50_000:])
    client = MlflowClient()
    assert client.get_model_version("mnist-mlp", "1").tags[drift.VERSION_TAG] == uri
    assert [a.path for a in client.list_artifacts(run.info.run_id, "drift")] == ["drift/reference.json"]

    write_idx(tmp_path / "fashion.idx", fashion[:1000])
    res = run_job(JobConfig(input=tmp_path / "fashion.idx", output=tmp_path / "f.parquet", model="models:/mnist-mlp/1",
                            device="cpu"))
    assert res.drift.status == "alert" and res.drift.reference == uri
    job_run = client.get_run(res.mlflow_run_id)
    assert job_run.data.tags["drift.status"] == "alert"
    assert job_run.data.metrics["drift/alert"] == 1.0 and job_run.data.metrics["drift/exceed_fraction"] > 0.5
    assert "ood_score" in pq.read_table(res.output).column_names


# --- images framed or not ---------------------------------------------------------------------------


def test_raw_digit_off_centre_on_a_large_canvas_is_still_centred() -> None:
    a = np.full((200, 200), 235, dtype=np.uint8)  # paper
    a[20:80, 130:150] = 15  # a dark stroke in the top right corner
    out = mnist_pixels(Image.fromarray(a))
    ys, xs = np.nonzero(out > 0)
    assert ys.max() - ys.min() + 1 in (20, 21)  # scaled so the longer side is 20
    w = out.astype(float)
    cy = (w.sum(axis=1) * np.arange(28)).sum() / w.sum()
    cx = (w.sum(axis=0) * np.arange(28)).sum() / w.sum()
    assert abs(cy - 13.5) <= 0.6 and abs(cx - 13.5) <= 0.6 and out[0].max() == 0


def test_framed_digit_is_only_resized() -> None:
    a = np.zeros((28, 28), dtype=np.uint8)
    a[4:24, 11:17] = 255  # a "1" framed the MNIST way, off its centre of mass by nothing
    big = Image.fromarray(a).resize((56, 56), Image.Resampling.NEAREST)
    out = mnist_pixels(big)
    ys, xs = np.nonzero(out > 127)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 23, 11, 16)  # where it was: not re-cropped
    assert np.abs(out.astype(int) - a).max() <= 40  # only the edges soften


def _with_pixel_sums(model: Path, out: Path, width: int = 2) -> Path:
    """`model` plus the optional `pixel_sums` output, as nn_core/export.py makes it: one MatMul of the
    cast, flattened pixels by a (784, 2) matrix of ones and of the central 20x20 box. `width` 3 makes
    an output of the wrong shape."""
    proto = onnx.load(str(model))
    box = np.zeros((28, 28), np.float32)
    box[4:24, 4:24] = 1.0
    weights = np.stack([np.ones(784, np.float32), box.ravel(), *([np.zeros(784, np.float32)] * (width - 2))], axis=1)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(weights, "sum_weights"))
    proto.graph.node.append(onnx.helper.make_node("MatMul", ["x_flat", "sum_weights"], ["pixel_sums"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("pixel_sums", onnx.TensorProto.FLOAT, ["batch", width]))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


@pytest.mark.e2e
def test_the_models_pixel_sums_give_the_drift_check_the_numpy_pass_gives(trained, fashion, tmp_path: Path) -> None:
    from common.errors import ModelSourceError

    x = np.concatenate([trained["x"][:3000], fashion[:1000]])  # records of every kind, both tails
    np.save(tmp_path / "x.npy", x)
    plain = run_job(job(trained, tmp_path / "x.npy", tmp_path / "plain.parquet"))
    summed_model = _with_pixel_sums(trained["model"], tmp_path / "summed.onnx")
    summed = run_job(dataclasses.replace(job(trained, tmp_path / "x.npy", tmp_path / "summed.parquet"),
                                         model=str(summed_model)))
    assert plain.drift.status == summed.drift.status == "alert"
    assert summed.drift.statistics == plain.drift.statistics
    a, b = (pq.read_table(r.output) for r in (plain, summed))
    assert a["ood_score"].equals(b["ood_score"]) and a["prediction"].equals(b["prediction"])
    wrong = _with_pixel_sums(trained["model"], tmp_path / "wrong.onnx", width=3)
    with pytest.raises(ModelSourceError, match=r"wrong\.onnx: output `pixel_sums` is tensor\(float\) \['batch', 3\]"):
        run_job(dataclasses.replace(job(trained, tmp_path / "x.npy", tmp_path / "w.parquet"), model=str(wrong)))
    assert not (tmp_path / "w.parquet").exists()
