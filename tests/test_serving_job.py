"""The batch job end to end: every input kind, outputs and manifest, bad input leaving nothing behind,
--on-error skip, the registry URI against a real MLflow store, the CLI, import isolation, a killed
job, and (with MNISTOPS_DATA_SOURCE) the real MNIST test set."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import numpy as np
import pyarrow.parquet as pq
import pytest
from needs import missing
from PIL import Image

from serving import cli
from common.errors import BeyondMachineError, InputError, ModelSourceError
from serving.job import (BATCH_IMAGE_BYTES, BATCH_MEMORY_SHARE, EXPERIMENT, STREAM_IMAGE_BYTES, JobConfig,
                         check_batch_fits, run_job)
from serving.readers import open_images
from serving_fixtures import (
    BAD_INPUTS,
    digits,
    make_bad_inputs,
    mlp_onnx,
    mlp_weights,
    reference_probabilities,
    save_model,
    write_idx,
)
from trained_model import digit_weights
from stores import experiment_id

REPO = Path(__file__).resolve().parents[1]
ENV = {"ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    return path, save_model(path)


def job(model: tuple[Path, dict], inp: Path, out: Path, **kw) -> JobConfig:
    return JobConfig(input=inp, output=out, model=str(model[0]), track=False, device="cpu", **kw)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def write_input(kind: str, tmp: Path, x: np.ndarray) -> Path:
    if kind == "npy":
        np.save(tmp / "x.npy", x)
        return tmp / "x.npy"
    if kind == "npy_flat_float01":
        np.save(tmp / "x.npy", (x.reshape(len(x), 784) / 255.0).astype(np.float32))
        return tmp / "x.npy"
    if kind == "npy_float255":
        np.save(tmp / "x.npy", x.astype(np.float64))
        return tmp / "x.npy"
    if kind in ("idx", "idx.gz"):
        return write_idx(tmp / f"x.{kind}", x, gz=kind == "idx.gz")
    d = tmp / "imgs"
    d.mkdir()
    for i, a in enumerate(x):
        Image.fromarray(a).save(d / f"img{i:03d}.png")
    return d


# --- every input kind, outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["npy", "npy_flat_float01", "npy_float255", "idx", "idx.gz", "folder"])
def test_every_input_kind(model: tuple[Path, dict], tmp_path: Path, kind: str) -> None:
    x = digits(50)
    inp = write_input(kind, tmp_path, x)
    out = tmp_path / "out" / "pred.parquet"
    res = run_job(job(model, inp, out, batch_size=16))

    ref = reference_probabilities(model[1], x)
    t = pq.read_table(out)
    assert t.column_names == ["id", "prediction", "probability"]  # no labels, no drift reference
    assert t.num_rows == res.predicted == res.records == 50
    np.testing.assert_array_equal(t["prediction"].to_numpy(), ref.argmax(axis=1))
    np.testing.assert_allclose(t["probability"].to_numpy(), ref.max(axis=1), atol=1e-5)
    ids = t["id"].to_pylist()
    assert ids == ([f"img{i:03d}.png" for i in range(50)] if kind == "folder" else list(range(50)))
    assert len(set(ref.argmax(axis=1))) > 1  # the check above can tell classes apart

    m = json.loads(res.manifest.read_text())
    assert res.manifest == out.with_name("pred.parquet.manifest.json")
    assert m["provider"] == res.provider == "CPUExecutionProvider"
    assert m["model"]["uri"] == str(model[0]) and m["model"]["version"] is None
    assert m["counts"] == {"records": 50, "predicted": 50, "skipped": 0}
    assert m["input"]["blake3"] == res.input_digest == open_digest(inp)  # b3sum's
    assert m["throughput_img_per_s"] > 0 and m["accuracy"] is None
    assert m["output"]["columns"] == ["id", "prediction", "probability"]
    assert m["drift"]["status"] == "unavailable" and "--drift-reference" in m["drift"]["reason"]
    assert leftovers(out.parent) == ["pred.parquet", "pred.parquet.manifest.json"]  # no temp files


def open_digest(inp: Path) -> str:
    if inp.is_dir():
        listing = "".join(
            f"{blake3.blake3((inp / n).read_bytes()).hexdigest()}  {n}\n" for n in sorted(os.listdir(inp))
        )
        return blake3.blake3(listing.encode()).hexdigest()
    return blake3.blake3(inp.read_bytes()).hexdigest()


def test_csv_all_probabilities_and_accuracy(model: tuple[Path, dict], tmp_path: Path) -> None:
    x = digits(40)
    ref = reference_probabilities(model[1], x)
    y = ref.argmax(axis=1)
    y[:10] = (y[:10] + 1) % 10  # 10 of 40 wrong: accuracy 0.75
    np.save(tmp_path / "x.npy", x)
    write_idx(tmp_path / "y.idx.gz", y.astype(np.uint8), gz=True)
    out = tmp_path / "pred.csv"  # the suffix picks csv
    res = run_job(job(model, tmp_path / "x.npy", out, labels=tmp_path / "y.idx.gz", all_probabilities=True))
    assert res.accuracy == pytest.approx(0.75)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["id", "prediction", "probability", "label", "correct"] + [f"prob_{k}" for k in range(10)]
    probs = np.array([[float(r[f"prob_{k}"]) for k in range(10)] for r in rows])
    np.testing.assert_allclose(probs, ref, atol=1e-5)
    assert [int(r["prediction"]) for r in rows] == list(ref.argmax(axis=1))
    assert [int(r["label"]) for r in rows] == list(y)  # the true label, not the prediction
    assert [r["correct"] for r in rows] == ["false"] * 10 + ["true"] * 30
    m = json.loads(res.manifest.read_text())
    assert m["accuracy"] == pytest.approx(0.75) and m["output"]["format"] == "csv"
    assert m["labels"]["blake3"] == blake3.blake3((tmp_path / "y.idx.gz").read_bytes()).hexdigest()


def test_format_flag_overrides_suffix(model: tuple[Path, dict], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits(5))
    res = run_job(job(model, tmp_path / "x.npy", tmp_path / "p.out", format="parquet"))
    assert pq.read_table(res.output).num_rows == 5


# --- bad input: a clear error, nothing left behind ----------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return make_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_leaves_nothing(
    model: tuple[Path, dict], bad_inputs: dict[str, tuple[Path, str]], tmp_path: Path, name: str
) -> None:
    path, pattern = bad_inputs[name]
    out = tmp_path / "out" / "pred.parquet"
    with pytest.raises(InputError, match=pattern):
        run_job(job(model, path, out, batch_size=2))  # small batches: some fail after writing began
    assert leftovers(out.parent) == []


def test_failure_midway_removes_temp_and_keeps_previous_output(model: tuple[Path, dict], tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, a in enumerate(digits(9)):
        Image.fromarray(a).save(d / f"{i}.png")
    out = tmp_path / "out" / "pred.parquet"
    run_job(job(model, d, out))
    before = out.read_bytes(), (out.parent / "pred.parquet.manifest.json").read_bytes()
    (d / "zz_last.png").write_bytes(b"\x89PNG broken")  # sorts last: fails after 4 chunks were written
    with pytest.raises(InputError, match=r"zz_last\.png: (not a PNG|unreadable image)"):
        run_job(job(model, d, out, batch_size=2, overwrite=True))
    assert leftovers(out.parent) == ["pred.parquet", "pred.parquet.manifest.json"]
    assert (out.read_bytes(), (out.parent / "pred.parquet.manifest.json").read_bytes()) == before


def test_a_batch_beyond_the_machine_s_memory_is_refused_before_anything_is_written(
        model: tuple[Path, dict], tmp_path: Path) -> None:
    """A batch size whose buffers exceed what the machine has is one line and exit 2, with nothing
    written; the same batch on an input of a few images is fine (the chunks are never larger than the
    input)."""
    per_image = BATCH_IMAGE_BYTES + 2 * STREAM_IMAGE_BYTES
    # beyond the bound whatever memory other processes free meanwhile: half of all the machine has
    total = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)[1]) * 1024
    n = int(BATCH_MEMORY_SHARE * total // per_image) + 1000
    # an (n, 28, 28) .npy of zeros: its header is all the bound reads; sparse where the file system can
    np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(n, 28, 28)).flush()
    out = tmp_path / "out" / "p.parquet"
    cmd = [sys.executable, "-m", "serving", "--input", str(tmp_path / "big.npy"), "--output", str(out), "--model",
           str(model[0]), "--no-track", "--device", "cpu", "--streams", "2", "--batch-size", str(n)]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"python -m serving: error: --batch-size {n}: ~") and "expected at most" in line, line
    assert not out.parent.exists()
    with pytest.raises(BeyondMachineError, match="expected at most"):
        check_batch_fits(10_000, 10_000, 2, 100 * per_image)
    check_batch_fits(10_000, 50, 2, 100 * per_image)  # 50 records: one chunk of 50, whatever the batch size
    check_batch_fits(10_000, 10_000, 2, None)  # no figure: nothing to bound by


def test_label_count_mismatch(model: tuple[Path, dict], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits(8))
    np.save(tmp_path / "y.npy", np.zeros(7, dtype=np.int64))
    out = tmp_path / "out" / "p.parquet"
    with pytest.raises(InputError, match=r"y\.npy: 7 labels, but .*x\.npy has 8 records"):
        run_job(job(model, tmp_path / "x.npy", out, labels=tmp_path / "y.npy"))
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 3, 4, 5, 6, 11]))
    with pytest.raises(InputError, match=r"y\.npy: label 11 at record 7, expected 0\.\.9"):
        run_job(job(model, tmp_path / "x.npy", out, labels=tmp_path / "y.npy", batch_size=3))
    assert leftovers(out.parent) == []


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits(2))
    with pytest.raises(ModelSourceError, match=r"nope\.onnx: no such ONNX file"):
        run_job(JobConfig(input=tmp_path / "x.npy", output=tmp_path / "p.parquet", model=str(tmp_path / "nope.onnx"), track=False))
    assert leftovers(tmp_path) == ["x.npy"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_writer_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    from serving import writers

    monkeypatch.setattr(writers, "ROW_GROUP_ROWS", 5)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=13).astype(np.float32)
    out = tmp_path / f"p.{fmt}"
    cols = writers.Columns(pa.string(), all_probabilities=True)
    with writers.PredictionWriter(out, fmt, cols) as w:  # type: ignore[arg-type]
        for s in range(0, 13, 3):
            part = probs[s : s + 3]
            label = part.argmax(axis=1)
            w.write(writers.Batch([f"f{i}.png" for i in range(s, s + len(part))], label, part.max(axis=1),
                                  probabilities=part))
        assert w.rows == 13 and leftovers(tmp_path) == [w.tmp.name]  # nothing at the final name yet
        w.commit()
    t = pq.read_table(out) if fmt == "parquet" else pa_csv.read_csv(out)
    if fmt == "parquet":
        assert pq.ParquetFile(out).num_row_groups == 3  # 6 + 6 + 1 rows: chunks gathered to >= 5
    assert t["id"].to_pylist() == [f"f{i}.png" for i in range(13)]
    np.testing.assert_array_equal(t["prediction"].to_numpy(), probs.argmax(axis=1))
    np.testing.assert_allclose(np.stack([t[f"prob_{k}"].to_numpy() for k in range(10)], axis=1), probs, rtol=1e-6)
    assert leftovers(tmp_path) == [out.name]


def test_stale_temp_files_of_dead_jobs_only_are_removed(tmp_path: Path) -> None:
    from serving.writers import remove_stale_temps

    out = tmp_path / "p.parquet"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".p.parquet.{dead.stdout.strip()}.0123abcd.tmp"
    stale_manifest = tmp_path / f".p.parquet.manifest.json.{dead.stdout.strip()}.0123abcd.tmp"
    live = tmp_path / f".p.parquet.{os.getpid()}.89abcdef.tmp"  # a job still running (this process)
    other = tmp_path / f".q.parquet.{dead.stdout.strip()}.0123abcd.tmp"  # another output's
    for p in (stale, stale_manifest, live, other):
        p.write_bytes(b"x")
    assert sorted(remove_stale_temps(out)) == sorted([stale, stale_manifest])
    assert leftovers(tmp_path) == sorted([live.name, other.name])


# --- --on-error skip ----------------------------------------------------------------------------------


def test_skip_bad_images_listed_in_manifest(model: tuple[Path, dict], tmp_path: Path) -> None:
    x = digits(10)
    d = tmp_path / "imgs"
    d.mkdir()
    for i, a in enumerate(x):
        Image.fromarray(a).save(d / f"{i}.png")
    (d / "3.png").write_bytes(b"not an image")
    (d / "notes.txt").write_text("a stray file: not an image, ignored and listed")
    y = reference_probabilities(model[1], x).argmax(axis=1)
    np.save(tmp_path / "y.npy", y)  # labels follow the sorted image files
    out = tmp_path / "p.parquet"
    res = run_job(job(model, d, out, on_error="skip", labels=tmp_path / "y.npy", batch_size=4))
    t = pq.read_table(out)
    kept = [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert t["id"].to_pylist() == [f"{i}.png" for i in kept]
    np.testing.assert_array_equal(t["label"].to_numpy(), y[kept])
    assert t["correct"].to_pylist() == [True] * 9
    assert res.accuracy == 1.0 and res.predicted == 9 and res.records == 10
    m = json.loads(res.manifest.read_text())
    assert m["counts"] == {"records": 10, "predicted": 9, "skipped": 1}
    assert [(s["index"], s["id"]) for s in m["skipped"]] == [(3, "3.png")]
    assert "not a PNG or JPEG image" in m["skipped"][0]["reason"]
    assert m["input"]["ignored"] == ["notes.txt"]


def test_skip_nan_records(model: tuple[Path, dict], tmp_path: Path) -> None:
    x = digits(12)
    f = x.reshape(12, 784).astype(np.float32)
    f[[2, 9], 0] = np.nan
    np.save(tmp_path / "x.npy", f)
    res = run_job(job(model, tmp_path / "x.npy", tmp_path / "p.parquet", on_error="skip", batch_size=5))
    t = pq.read_table(res.output)
    keep = [i for i in range(12) if i not in (2, 9)]
    assert t["id"].to_pylist() == keep
    np.testing.assert_array_equal(t["prediction"].to_numpy(), reference_probabilities(model[1], x[keep]).argmax(axis=1))
    assert [s.index for s in res.skipped] == [2, 9]
    assert json.loads(res.manifest.read_text())["skipped"][1]["id"] == "9"


# --- the registry URI and tracking against a real MLflow store ----------------------------------------


def test_registry_uri_and_tracking(model: tuple[Path, dict], tmp_path: Path, mlflow_store: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    onnx_model = onnx.load(str(model[0]))
    exp = experiment_id("training")
    with mlflow.start_run(experiment_id=exp):
        mlflow.onnx.log_model(onnx_model, name="model", registered_model_name="mnist-mlp",
                              onnx_execution_providers=["CPUExecutionProvider"], pip_requirements=["onnxruntime"])
    with mlflow.start_run(experiment_id=exp) as run2:  # version 2: different weights, the champion
        w2 = mlp_weights(seed=7)
        mlflow.onnx.log_model(mlp_onnx(w2), name="model", registered_model_name="mnist-mlp",
                              onnx_execution_providers=["CPUExecutionProvider"], pip_requirements=["onnxruntime"])
    client = MlflowClient()
    client.set_registered_model_alias("mnist-mlp", "champion", "2")

    x = digits(30)
    np.save(tmp_path / "x.npy", x)
    y = reference_probabilities(w2, x).argmax(axis=1)
    np.save(tmp_path / "y.npy", y)
    res = run_job(JobConfig(input=tmp_path / "x.npy", output=tmp_path / "p.parquet", labels=tmp_path / "y.npy"))

    assert (res.model.uri, res.model.name, res.model.version) == ("models:/mnist-mlp@champion", "mnist-mlp", "2")
    assert res.model.run_id == run2.info.run_id
    np.testing.assert_array_equal(pq.read_table(res.output)["prediction"].to_numpy(), y)  # version 2's weights
    assert res.accuracy == 1.0
    m = json.loads(res.manifest.read_text())
    assert m["model"]["version"] == "2" and m["mlflow_run_id"] == res.mlflow_run_id
    assert m["model"]["path"] is None  # the download folder is gone

    run = client.get_run(res.mlflow_run_id)
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.info.status == "FINISHED"
    assert run.data.params["model_version"] == "2" and run.data.params["model_uri"] == "models:/mnist-mlp@champion"
    assert run.data.params["input_digest"] == f"blake3:{res.input_digest}"  # names its algorithm
    assert run.data.metrics["accuracy"] == 1.0 and run.data.metrics["predicted"] == 30
    assert run.data.metrics["throughput_img_per_s"] > 0
    assert run.data.tags["provider"] == "CPUExecutionProvider"
    assert [a.path for a in client.list_artifacts(res.mlflow_run_id)] == ["p.parquet.manifest.json"]
    stored = list((tmp_path / "mlartifacts" / EXPERIMENT).rglob("p.parquet.manifest.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == m  # under MNISTOPS_ARTIFACT_ROOT

    # an explicit version, and a failing job recorded as a FAILED run
    res1 = run_job(JobConfig(input=tmp_path / "x.npy", output=tmp_path / "p1.parquet", model="models:/mnist-mlp/1"))
    assert res1.model.version == "1"
    np.save(tmp_path / "bad.npy", np.full((3, 784), np.nan, dtype=np.float32))
    with pytest.raises(InputError):
        run_job(JobConfig(input=tmp_path / "bad.npy", output=tmp_path / "p2.parquet", model="models:/mnist-mlp/1"))
    runs = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.status == "FAILED" and "record 0 has NaN" in runs[0].data.tags["error"]
    with pytest.raises(ModelSourceError, match=r"models:/mnist-mlp@nope: not found in the model registry"):
        run_job(JobConfig(input=tmp_path / "x.npy", output=tmp_path / "p3.parquet", model="models:/mnist-mlp@nope"))
    assert not (tmp_path / "p2.parquet").exists() and not (tmp_path / "p3.parquet").exists()


# --- the CLI --------------------------------------------------------------------------------------------


def test_cli_arguments_and_config(tmp_path: Path) -> None:
    parser = cli.add_infer_arguments(argparse.ArgumentParser())
    assert all(a.help for a in parser._actions)  # every option documented
    args = parser.parse_args([
        "--input", "in.npy", "--output", "o.csv", "--batch-size", "64", "--labels", "y.npy",
        "--device", "cpu", "--on-error", "skip", "--format", "csv", "--all-probabilities", "--no-track",
    ])
    cfg = cli.config_from_args(args)
    assert cfg == JobConfig(
        input=Path("in.npy"), output=Path("o.csv"), batch_size=64, labels=Path("y.npy"), device="cpu",
        on_error="skip", format="csv", all_probabilities=True, track=False,
    )
    defaults = cli.config_from_args(parser.parse_args(["--input", "a", "--output", "b"]))
    assert defaults.model == "models:/mnist-mlp@champion" and defaults.device == "auto"
    assert defaults.on_error == "fail" and defaults.output_format() == "parquet" and defaults.track
    with pytest.raises(SystemExit):
        parser.parse_args(["--input", "a", "--output", "b", "--device", "tpu"])


def test_cli_main(model: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", digits(6))
    rc = cli.main(["--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "p.parquet"),
                   "--model", str(model[0]), "--no-track", "--device", "cpu"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["predicted"] == 6 and summary["provider"] == "CPUExecutionProvider"
    np.save(tmp_path / "bad.npy", np.zeros((2, 10), np.uint8))
    rc = cli.main(["--input", str(tmp_path / "bad.npy"), "--output", str(tmp_path / "q.parquet"),
                   "--model", str(model[0]), "--no-track"])
    assert rc == 1  # bad input: the same exit code as `mnistops infer` (common.errors)
    assert "bad.npy: array of shape (2, 10), expected (N, 28, 28) or (N, 784)" in capsys.readouterr().err
    assert not (tmp_path / "q.parquet").exists()


# --- separate processes -------------------------------------------------------------------------------


def test_serving_imports_neither_torch_nor_prefect(model: tuple[Path, dict], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits(4))
    code = (
        "import sys; from pathlib import Path; import serving.job, serving.cli, serving.readers, "
        "serving.writers, serving.session, serving.model_source, serving.images, common.errors, serving.inbox, "
        "serving.drift, common.settings; "
        "from serving.job import JobConfig, run_job; "
        f"run_job(JobConfig(input=Path({str(tmp_path / 'x.npy')!r}), output=Path({str(tmp_path / 'p.parquet')!r}), "
        f"model={str(model[0])!r}, track=False)); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect', 'torchvision') "
        "or m == 'nn_core.model'); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **ENV},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_job_leaves_no_output_and_rerun_succeeds(
    model: tuple[Path, dict], tmp_path: Path, sig: signal.Signals
) -> None:
    n = 150_000
    np.save(tmp_path / "x.npy", np.resize(digits(1000), (n, 28, 28)))
    out = tmp_path / "out" / "p.parquet"
    cmd = [sys.executable, "-m", "serving", "--input", str(tmp_path / "x.npy"), "--output", str(out),
           "--model", str(model[0]), "--no-track", "--device", "cpu"]
    # batch size 4: tens of thousands of small steps, so the job is mid-way for a second or more
    # after its first row group (65,536 rows) reached the temp file
    # SIGINT at its default, as in a terminal: a shell's background job (CI started that way) hands it
    # on ignored, and Python then leaves Ctrl-C ignored
    proc = subprocess.Popen([*cmd, "--batch-size", "4"], cwd=REPO, env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        temps: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list(out.parent.glob(".p.parquet.*.tmp")) if out.parent.exists() else []
            if temps and temps[0].stat().st_size > 4:  # more than the Parquet magic: rows written
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
        assert temps and temps[0].stat().st_size > 4, "the job never started writing"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        rc = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() and not (out.parent / "p.parquet.manifest.json").exists()
    if sig != signal.SIGKILL:  # SIGTERM and Ctrl-C unwind: one line, the temp file removed
        assert rc == 128 + sig
        assert err.strip().splitlines()[-1] == f"python -m serving: interrupted ({sig.name}), stopped cleanly"
        assert "Traceback" not in err
        assert leftovers(out.parent) == []
        return
    assert rc == -signal.SIGKILL
    assert [p.name for p in out.parent.iterdir()] == [temps[0].name]  # nothing runs on SIGKILL
    # the next job (here, in this process) removes the dead job's temp file and writes the output
    rerun = run_job(job(model, tmp_path / "x.npy", out))
    assert rerun.predicted == n and pq.read_table(out).num_rows == n
    assert leftovers(out.parent) == ["p.parquet", "p.parquet.manifest.json"]  # a stale temp is gone


# --- the real MNIST test set ------------------------------------------------------------------------


@pytest.mark.e2e
def test_real_mnist_test_set(tmp_path: Path, mnist_source: Path) -> None:
    import onnx

    from common import idx

    src = mnist_source
    test_images, test_labels = src / "t10k-images-idx3-ubyte.gz", src / "t10k-labels-idx1-ubyte.gz"
    if not test_images.is_file():
        missing(f"{src} has no gzipped MNIST IDX files")
    weights = digit_weights(src)
    onnx.save(mlp_onnx(weights), str(tmp_path / "m.onnx"))
    res = run_job(JobConfig(input=test_images, output=tmp_path / "p.parquet", labels=test_labels,
                            model=str(tmp_path / "m.onnx"), track=False))
    x = idx.read_idx(test_images, magic=idx.IMAGES_MAGIC)
    y = idx.read_idx(test_labels, magic=idx.LABELS_MAGIC)
    expected = float((reference_probabilities(weights, x).argmax(axis=1) == y).mean())
    assert res.records == res.predicted == 10_000
    assert res.accuracy == pytest.approx(expected, abs=2e-4) and res.accuracy > 0.90
    assert res.input_digest == blake3.blake3(test_images.read_bytes()).hexdigest()
    assert json.loads(res.manifest.read_text())["accuracy"] == res.accuracy
    assert open_images(test_images).count == 10_000
