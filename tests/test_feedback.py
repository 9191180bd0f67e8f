"""Feedback sets (serving/feedback.py) and the gate that checks every slice (nn_core/slices.py): the
statistical tolerance on simulated paired predictions, sets recorded in a real MLflow store and read
back, every bad input refused with one line and nothing recorded, and, on real MNIST, a candidate
trained with a shifted feedback set promoted, and the champion trained without it refused by that
slice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest

from common.errors import InputError
from nn_core.slices import Z, compare, paired_tolerance, verdict
from serving import feedback as fb
from serving_fixtures import write_idx

MNIST_TASK = fb.FeedbackTask("mnist", "a" * 64)


def _fashion_task() -> fb.FeedbackTask:
    from nn_core.data import dataset_digest
    from nn_core.datasets import FASHION_MNIST

    return fb.FeedbackTask("fashion-mnist", dataset_digest({f.role: f.sha256 for f in FASHION_MNIST.files}))


def _records(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def _idx_pair(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "images-idx3-ubyte.gz", x, gz=True)
    write_idx(folder / "labels-idx1-ubyte", y)
    return folder


def _npy_pair(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", x)
    np.save(folder / "labels.npy", y)
    return folder


# ---------------------------------------------------------------------------------------------
# The tolerance, on simulated paired predictions (fast)


def _paired(n: int, disagree: float, p_candidate: float, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two models' predictions on the same records: both right (90%) or both wrong on the
    records they agree on; on a `disagree` share only one is right, the candidate with probability
    `p_candidate` (1/2: equally good, McNemar's null hypothesis)."""
    labels = rng.integers(0, 10, n)
    both = rng.random(n) < 0.9
    split = rng.random(n) < disagree
    cand_wins = rng.random(n) < p_candidate
    cand_ok = np.where(split, cand_wins, both)
    champ_ok = np.where(split, ~cand_wins, both)
    wrong = (labels + 1) % 10
    return labels, np.where(cand_ok, labels, wrong), np.where(champ_ok, labels, wrong)


def test_noise_neither_rejects_an_equal_model_nor_promotes_a_worse_one():
    rng = np.random.default_rng(0)
    trials, n, d = 400, 2_000, 0.04
    # Equally good: refused on ~2.3% of draws (one-sided, 2 SE); a fixed margin of 0 refuses ~45%.
    equal = [_paired(n, d, 0.5, rng) for _ in range(trials)]
    assert np.mean([not compare("s", *p, None).passed for p in equal]) < 0.05
    assert np.mean([not compare("s", *p, 0.0).passed for p in equal]) > 0.3
    # Worse by 4 SE (the expected deficit d * (1 - 2p) = 4 * sqrt(d * n) / n): refused on ~98.7%.
    p_worse = 0.5 - 2 / np.sqrt(d * n)
    worse = [_paired(n, d, p_worse, rng) for _ in range(trials)]
    assert np.mean([not compare("s", *p, None).passed for p in worse]) > 0.95


def test_the_tolerance_is_two_paired_standard_errors_or_the_margin():
    labels = np.zeros(100, dtype=np.int64)
    champ = np.zeros(100, dtype=np.int64)  # right everywhere
    cand = champ.copy()
    cand[:9] = 1  # wrong on 9: b = 9, c = 0 -> tolerance 2 * 3 / 100
    assert paired_tolerance(cand == labels, champ == labels) == pytest.approx(Z * 3 / 100)
    r = compare("feedback-x", labels, cand, champ, None)
    assert r.tolerance == pytest.approx(0.06) and not r.passed and "beyond the tolerance 0.0600" in r.reason
    assert compare("feedback-x", labels, cand, champ, 0.1).passed  # a fixed margin replaces it
    ok, reason = verdict([compare("validation", labels, champ, champ, None), r], True, 0.9)
    assert not ok and "worse than the champion on feedback-x" in reason
    ok, reason = verdict([compare("validation", labels, champ, None, None)], True, 0.9)
    assert ok and "no champion yet" in reason
    assert verdict([compare("validation", labels, cand, None, None)], True, 0.95)[1].endswith("< threshold 0.9500")
    assert verdict([compare("validation", labels, champ, None, None)], False, 0.5) == (False, "ONNX parity check failed")


def test_the_split_is_decided_by_the_content():
    x, y = _records(50)
    a = fb.make_set(fb.Labelled(x, y, "a"), MNIST_TASK)
    b = fb.make_set(fb.Labelled(x.copy(), y.copy(), "b"), MNIST_TASK)
    assert a.digest == b.digest and np.array_equal(a.holdout, b.holdout) and len(a.holdout) == 10
    moved = fb.make_set(fb.Labelled(x, (y + 1) % 10, "c"), MNIST_TASK)  # other labels: another set
    assert moved.digest != a.digest
    train_x, _ = a.training_part()
    assert len(train_x) == 40 and not set(a.holdout) & set(np.flatnonzero(a._train_mask()))


# ---------------------------------------------------------------------------------------------
# Recorded in a real MLflow store (one per module: each test looks at its own sets only)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from stores import store_for_module

    root = tmp_path_factory.mktemp("feedback")
    with store_for_module(root):
        yield root




def _runs_of(digest: str) -> list:
    exp = mlflow.MlflowClient().get_experiment_by_name(fb.EXPERIMENT)
    return mlflow.MlflowClient().search_runs([exp.experiment_id], f"tags.`{fb.DIGEST_TAG}` = '{digest}'")


def test_a_set_is_recorded_once_whatever_its_form_and_read_back(store, tmp_path):
    x, y = _records(30)
    (first,) = fb.offer([str(_idx_pair(tmp_path / "idx", x, y))], MNIST_TASK)
    (again,) = fb.offer([str(_npy_pair(tmp_path / "npy", x, y))], MNIST_TASK)  # the same records as .npy
    assert again.digest == first.digest and again.run_id == first.run_id and len(_runs_of(first.digest)) == 1
    (back,) = fb.recorded(MNIST_TASK)
    assert back.digest == first.digest and np.array_equal(back.images, x) and np.array_equal(back.labels, y)
    assert np.array_equal(back.holdout, first.holdout)
    run = mlflow.MlflowClient().get_run(first.run_id)
    (di,) = run.inputs.dataset_inputs
    assert di.dataset.name == f"mnist-feedback-{first.digest[:12]}"
    assert {t.key: t.value for t in di.tags}["mlflow.data.context"] == "feedback"
    assert fb.recorded(fb.FeedbackTask("mnist", "b" * 64)) == []


def test_a_set_of_another_task_is_refused(store, tmp_path, fashion_source):
    from common.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

    images = read_idx(fashion_source / "t10k-images-idx3-ubyte.gz", magic=IMAGES_MAGIC)[:40]
    labels = read_idx(fashion_source / "t10k-labels-idx1-ubyte.gz", magic=LABELS_MAGIC)[:40]
    folder = _idx_pair(tmp_path / "fashion", images, labels)
    (recorded,) = fb.offer([str(folder)], _fashion_task())  # scored and recorded for Fashion-MNIST
    good = _npy_pair(tmp_path / "good", *_records(20, seed=1))
    with pytest.raises(fb.FeedbackTaskError, match=rf"{re.escape(str(folder))}: feedback set {recorded.digest[:12]} is "
                                                   r"recorded for fashion-mnist .*expected a labelled input of mnist"):
        fb.offer([str(good), str(folder)], MNIST_TASK)
    # the good one offered beside it was not recorded either
    assert fb.find(fb.digest_of(*_records(20, seed=1))) is None and len(_runs_of(recorded.digest)) == 1


def _bad(kind: str, folder: Path) -> tuple[Path, str]:
    """A labelled input that is wrong in one way, and what its one line must say."""
    x, y = _records(10)
    if kind == "count":
        _idx_pair(folder, x, y[:9])
        return folder, r"labels-idx1-ubyte: 9 labels, but .*images-idx3-ubyte.gz has 10 records"
    if kind == "range":
        _npy_pair(folder, x, np.where(np.arange(10) == 3, 10, y))
        return folder, r"labels.npy: label 10 at record 3, expected 0..9"
    if kind == "csv_range":
        from PIL import Image

        folder.mkdir()
        Image.fromarray(x[0]).save(folder / "a.png")
        Image.fromarray(x[1]).save(folder / "b.png")
        (folder / "labels.csv").write_text("file,label\na.png,1\nb.png,12\n")
        return folder, r"labels.csv: line 3: label '12' for b.png, expected 0..9"
    if kind == "empty_npy":
        _npy_pair(folder, x[:0], y[:0])
        return folder, r"images.npy: empty input \(0 images\)"
    folder.mkdir()
    return folder, r"empty feedback set \(no files\)"


BAD = ["count", "range", "csv_range", "empty_npy", "empty_folder"]


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_set_is_one_line_and_nothing_is_recorded(kind, mlflow_store, tmp_path):
    folder, expected = _bad(kind, tmp_path / kind)
    store = tmp_path / "mlflow.db"  # the fixture's empty store
    before = (store.stat().st_mtime_ns, store.read_bytes())
    with pytest.raises(InputError, match=expected):
        fb.offer([str(folder)], MNIST_TASK)
    assert (store.stat().st_mtime_ns, store.read_bytes()) == before  # refused before the store was written
    assert mlflow.MlflowClient().get_experiment_by_name(fb.EXPERIMENT) is None


@pytest.mark.parametrize("kind", ["count", "empty_folder"])
def test_run_refuses_a_bad_set_before_anything_starts(kind, mlflow_store, tmp_path, capsys):
    from flows.cli import EXIT_ERROR, main

    folder, expected = _bad(kind, tmp_path / kind)
    assert main(["run", "--feedback", str(folder), "--epochs", "1"]) == EXIT_ERROR
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mnistops run: error: --feedback: ") and re.search(expected, line)
    assert not (tmp_path / "home").exists()  # checked before the home, its store or Prefect were made


# ---------------------------------------------------------------------------------------------
# Real MNIST: a shifted feedback set from a batch job, candidates with and without it, the gate


def _candidate(mnist, root: Path, name: str, cfg, feedback: tuple[str, ...] = (), **train_cfg):
    from nn_core.distributed import ddp_context
    from nn_core.launch import TrainResult
    from nn_core.release import export_and_check, gate_and_record, register
    from nn_core.train import TrackingConfig, TrainConfig, TrainJob, train

    job = TrainJob(data_path=str(mnist.cache_path), out_dir=str(root / name), train=TrainConfig(**train_cfg),
                   tracking=TrackingConfig(training_id=name, experiment="feedback-test"), feedback=feedback)
    with ddp_context("cpu") as env:
        train(job, env)
    result = TrainResult.read(root / name)
    exported = export_and_check(result, mnist.cache_path)
    version = register(result, exported, mnist.cache_path, "mnist-mlp")
    return result, version, gate_and_record(result, exported, version, mnist.cache_path, "mnist-mlp", cfg)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_gate_checks_the_feedback_slice(store, mnist, tmp_path):
    from nn_core import registry, tracking
    from nn_core.data import load_splits
    from nn_core.registry import GateConfig
    from serving.drift import load_reference
    from serving.job import JobConfig, run_job

    cfg = GateConfig(threshold=0.9)  # the slices are what this test is about
    c = tracking.client()
    # 1. A champion trained on MNIST alone.
    _, v1, d1 = _candidate(mnist, store, "plain", cfg, epochs=1)
    assert d1.accepted and [s["name"] for s in d1.slices] == ["validation"]

    # 2. Inverted digits arrive with their labels: the batch job scores them with the champion, and
    #    the labelled batch becomes a feedback set of the champion's task.
    s = load_splits(mnist.cache_path)
    shifted = 255 - s.test_images[:3000].numpy()
    np.save(tmp_path / "inverted.npy", shifted)
    np.save(tmp_path / "labels.npy", s.test_labels[:3000].numpy())
    res = run_job(JobConfig(input=tmp_path / "inverted.npy", labels=tmp_path / "labels.npy",
                            output=tmp_path / "scored.parquet", model="models:/mnist-mlp@champion", device="cpu"))
    (fs,) = fb.recorded(fb.FeedbackTask("mnist", mnist.digest))
    assert c.get_run(res.mlflow_run_id).data.tags["feedback.set"] == fs.digest
    assert c.get_run(fs.run_id).data.tags[fb.SCORED_BY_TAG] == f"models:/mnist-mlp/{v1}"
    parts = tuple(fb.write_training_parts([fs], tmp_path / "parts"))

    # 3. A candidate trained with the set's training part: promoted, and far better on its hold-out.
    good, v2, d2 = _candidate(mnist, store, "with-feedback", cfg, parts, epochs=2)
    val, shift = d2.slices
    assert d2.accepted and registry.champion("mnist-mlp") == v2, d2.reason
    assert shift["name"] == fs.name and shift["records"] == 600 and shift["passed"]
    assert shift["candidate_accuracy"] > shift["champion_accuracy"] + 2 * shift["tolerance"]
    assert shift["basis"] == "2 SE (paired)"
    # its run records the set as an input of context feedback and is still of the task
    mv = c.get_model_version("mnist-mlp", v2)
    assert registry.check_version("mnist-mlp", mv, registry.bound_task("mnist-mlp"))
    run = c.get_run(good.run_id)
    assert run.data.params["feedback"] == fs.digest
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {f"mnist-feedback-{fs.digest[:12]}", "mnist-train"}
    # its drift reference describes what it trained on: the training split and the feedback part
    ref = load_reference(mv.tags["drift.reference"])
    assert ref.sizes["train"] == 50_000 + 2_400
    # the per-slice table is in the decision record and the model card
    record = registry.recorded_decision("mnist-mlp", mv)
    assert record == d2
    card = mv.description
    assert "Gate per slice" in card and fs.name in card and "2 SE (paired)" in card

    # 4. The first champion asked back by hand (`promote`'s gate): refused by the feedback slice.
    d3 = registry.gate("mnist-mlp", v1, s.val_images.numpy(), s.val_labels.numpy(), cfg,
                       task=registry.Task(s.name, s.digest), decide_again=True)
    failed = [x["name"] for x in d3.slices if not x["passed"]]
    assert not d3.accepted and registry.champion("mnist-mlp") == v2
    assert fs.name in failed and f"{fs.name} (" in d3.reason and "worse than the champion on" in d3.reason
    assert json.loads(json.dumps(d3.to_dict()))["slices"][1]["name"] == fs.name


@pytest.mark.e2e
@pytest.mark.slow
def test_run_trains_on_feedback_and_refuses_another_tasks(prefect_env, mlflow_store, mnist, tmp_path, fashion_source):
    """`mnistops run --feedback DIR` through the flow: the set is recorded, trained on and gated on; then
    a Fashion-MNIST set recorded for its own task is refused by the MNIST run, one line, exit 1,
    nothing trained, the champion unchanged."""
    import os
    import subprocess
    import sys

    from nn_core import registry, tracking
    from nn_core.data import load_splits

    s = load_splits(mnist.cache_path)
    good = _npy_pair(tmp_path / "inverted", 255 - s.test_images[:500].numpy(), s.test_labels[:500].numpy())
    env = {**os.environ, "MNISTOPS_DATA_DIR": str(mnist.cache_path.parent)}

    def mnistops(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--epochs", "1", "--threshold", "0.5",
                               "--no-inference", *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=900)

    r = mnistops("--feedback", str(good))
    assert r.returncode == 0, r.stdout + r.stderr
    (fs,) = fb.recorded(fb.FeedbackTask("mnist", mnist.digest))
    mv = tracking.client().get_model_version("mnist-mlp", "1")
    assert tracking.client().get_run(mv.run_id).data.params["feedback"] == fs.digest
    assert [x["name"] for x in registry.recorded_decision("mnist-mlp", mv).slices] == ["validation", fs.name]
    assert f"\"name\": \"{fs.name}\"" in r.stdout  # the outcome printed with its slices

    from common.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

    fashion = _idx_pair(tmp_path / "fashion", read_idx(fashion_source / "t10k-images-idx3-ubyte.gz", magic=IMAGES_MAGIC)[:40],
                        read_idx(fashion_source / "t10k-labels-idx1-ubyte.gz", magic=LABELS_MAGIC)[:40])
    fb.offer([str(fashion)], _fashion_task())  # as a batch job scored by the Fashion-MNIST model records it
    r = mnistops("--feedback", str(fashion))
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("mnistops run: error: ") and f"{fashion}: feedback set " in line
    assert "is recorded for fashion-mnist" in line
    assert registry.champion("mnist-mlp") == "1" and len(tracking.client().search_model_versions("name = 'mnist-mlp'")) == 1
    assert len(tracking.client().search_runs([tracking.client().get_experiment_by_name("mnist-mlp").experiment_id])) == 1
