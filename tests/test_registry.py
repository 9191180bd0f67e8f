"""ONNX export, parity, the model registry and the promotion gate, on models trained on real MNIST."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from onnx import numpy_helper

from nn_core import metrics as M
from nn_core import registry, tracking
from nn_core.checkpoint import load_model
from nn_core.data import load_splits
from nn_core.distributed import ddp_context
from nn_core.export import OPSET, check_parity, export_onnx, onnx_session
from nn_core.launch import TrainResult
from nn_core.registry import CHAMPION, GateConfig, decide
from nn_core.release import export_and_check, gate_and_record, register
from nn_core.train import TrackingConfig, TrainConfig, TrainJob, train


@pytest.mark.parametrize(
    "acc, parity, champ, cfg, accepted, why",
    [
        (0.97, True, None, GateConfig(), True, "no champion yet"),
        (0.95, True, None, GateConfig(), False, "< threshold"),
        (0.99, False, None, GateConfig(), False, "parity"),
        (0.97, True, 0.98, GateConfig(margin=0.0), False, "worse than the champion"),
        (0.975, True, 0.98, GateConfig(margin=0.01), True, "not worse than the champion"),
        (0.98, True, 0.98, GateConfig(), True, "not worse"),
        (0.97, True, None, GateConfig(threshold=0.975), False, "< threshold 0.9750"),
        # the statistical tolerance: 25 disagreements in 1,000 records -> 2 * sqrt(25) / 1,000 = 0.01 ...
        (0.985, True, 0.99, GateConfig(), True, "beyond the tolerance on any of 1 slice"),
        # ... and 35 -> 0.0118, less than the deficit of 0.025
        (0.97, True, 0.995, GateConfig(), False, "worse than the champion on validation"),
    ],
)
def test_gate_rule(acc, parity, champ, cfg, accepted, why):
    """Models as right/wrong patterns on 1,000 validation records: the champion right on its share
    (the first records), the candidate right on its own share counted from the end, so they
    disagree on a known number of records."""
    from nn_core.slices import compare

    n = 1_000
    labels = np.zeros(n, dtype=np.int64)
    cand = np.where(np.arange(n)[::-1] < round(acc * n), 0, 1)
    champ = None if champ is None else np.where(np.arange(n) < round(champ * n), 0, 1)
    ok, reason = decide([compare("validation", labels, cand, champ, cfg.margin)], parity, cfg)
    assert ok is accepted and why in reason


def _record(version: int, promotion: str, at: int | None = None):
    """A version as the registry returns it (MLflow's own entity), with the tags a decision leaves."""
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    tags = {"promotion": promotion, **({} if at is None else {"promotion.at": str(at)})}
    return ModelVersion("m", str(version), 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])


@pytest.mark.parametrize(
    "records, alias, champion",
    [
        ([], None, None),
        ([(1, "rejected", 5), (2, "pending", None), (3, "failed", 9)], None, None),
        ([(1, "accepted", 5), (2, "accepted", 7), (3, "rejected", 9)], "1", "2"),  # the latest accepted decision
        ([(1, "accepted", 9), (2, "accepted", 7)], "2", "1"),  # a rollback: an older version decided last
        ([(1, "accepted", None), (2, "accepted", None)], "1", "1"),  # decisions before `promotion.at`: the alias
        ([(1, "accepted", None), (2, "accepted", 3)], "1", "2"),  # any ordered decision is later
        ([(1, "accepted", 4), (2, "accepted", 4)], "1", "1"),  # a tie (no shared lock): the alias stays
    ],
)
def test_the_champion_rule(records, alias, champion):
    assert registry.rule_champion([_record(*r) for r in records], alias) == champion


def test_the_model_card_tables_are_aligned_text():
    from nn_core.card import _table

    block = _table(["class", "validation"], [["0", "98.00%"], ["10", "9.50%"]]).splitlines()
    assert block == ["```text", "class  validation", "-----  ----------", "    0      98.00%", "   10       9.50%", "```"]


def test_gate_config_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        GateConfig(threshold=96)


# ---------------------------------------------------------------------------------------------
# Real MNIST: three models of different quality, trained once for this module


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from stores import store_for_module

    root = tmp_path_factory.mktemp("registry")
    with store_for_module(root):
        yield root


def _train(mnist, root: Path, name: str, **cfg) -> TrainResult:
    job = TrainJob(data_path=str(mnist.cache_path), out_dir=str(root / name), train=TrainConfig(**cfg),
                   tracking=TrackingConfig(training_id=name, experiment="registry-test"))
    with ddp_context("cpu") as env:
        train(job, env)
    return TrainResult.read(root / name)


# What the gate sequence needs, in as few optimizer steps as give it (measured on real MNIST, the
# same on 1 and 2 threads): "weak" far below the gate (val 0.124), "medium" and "medium_b" above it
# (0.966, seed 1: 0.966) and "good" above both (0.970). Batches of 1024 with a one-cycle schedule get
# there in 147-196 steps; the defaults (batch 256) took 588 and 1,960 steps for the same ordering.
FAST = {"batch_size": 1024, "lr": 3e-2, "schedule": "onecycle"}
CHEAP = {"epochs": 1, "batch_size": 4096}  # 12 steps: a real training whose accuracy does not matter (0.85)


@pytest.fixture(scope="module")
def models(mnist, store):
    found = {
        "weak": _train(mnist, store, "weak", **{**CHEAP, "lr": 1e-5}),
        "medium": _train(mnist, store, "medium", epochs=3, **FAST),
        "medium_b": _train(mnist, store, "medium_b", epochs=3, seed=1, **FAST),
        "good": _train(mnist, store, "good", epochs=4, **FAST),
    }
    acc = {k: r.val_accuracy for k, r in found.items()}
    # The sequence below relies on this order; a change of figures must fail here, naming them.
    assert acc["weak"] < 0.96 <= min(acc["medium"], acc["medium_b"]) and acc["good"] > max(acc["medium"], acc["medium_b"]), acc
    return found


@pytest.fixture(scope="module")
def fashion_model(fashion_source, store, tmp_path_factory):
    """A real Fashion-MNIST candidate (one cheap epoch is enough: only its task matters here)."""
    from nn_core.data import prepare
    from nn_core.datasets import FASHION_MNIST

    fashion = prepare(FASHION_MNIST, str(fashion_source), tmp_path_factory.mktemp("fashion-cache"))
    return fashion, _train(fashion, store, "fashion", **CHEAP)


def _champion(name="mnist-mlp"):
    return registry.champion(name)


@pytest.mark.e2e
@pytest.mark.slow
def test_export_contract_and_batch_sizes(models, mnist, tmp_path):
    model, _ = load_model(models["good"].checkpoint)
    path = export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    (inp,) = proto.graph.input
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 28, 28]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "pixel_sums"]
    # the input normalisation is folded into the first Gemm's weights (nn_core.export.folded_first_layer)
    assert not {"Sub", "Div"} & {n.op_type for n in proto.graph.node}
    s = load_splits(mnist.cache_path)
    sess = onnx_session(path)
    for n in (1, 7, 10_000):
        x = s.val_images[:n].numpy()
        logits, probs, sums = sess.run(None, {"pixels": x})
        assert logits.shape == probs.shape == (n, 10) and logits.dtype == np.float32
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        # the drift check's pixel sums, exactly: each image's total and its central 20x20 box's
        expected = np.stack([x.reshape(n, 784).sum(1), x[:, 4:24, 4:24].sum((1, 2))], axis=1)
        assert sums.dtype == np.float32 and np.array_equal(sums, expected)
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


@pytest.mark.e2e
@pytest.mark.slow
def test_tampered_export_fails_parity_and_is_never_registered(models, mnist, tmp_path):
    model, _ = load_model(models["good"].checkpoint)
    path = export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    first_gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    init = next(i for i in proto.graph.initializer if i.name == first_gemm.input[1])  # the first layer's weights
    w = numpy_helper.to_array(init).copy()
    w.flat[123] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(path))
    s = load_splits(mnist.cache_path)
    report = check_parity(model, path, s.val_images, s.val_labels)
    assert not report.passed and "max |logit diff|" in report.reason and report.max_abs_diff > 1e-4
    before = mlflow.MlflowClient().search_model_versions("name = 'mnist-mlp'")
    with pytest.raises(ValueError, match="parity failed"):
        registry.register_candidate(models["good"].run_id, path, report, "mnist-mlp", s.val_images[:2].numpy(),
                                    registry.Task(s.name, s.digest))
    assert len(mlflow.MlflowClient().search_model_versions("name = 'mnist-mlp'")) == len(before)


def _candidate(result: TrainResult, mnist, cfg=GateConfig()):
    exported = export_and_check(result, mnist.cache_path)
    assert exported.parity.passed, exported.parity.reason
    version = register(result, exported, mnist.cache_path, "mnist-mlp")
    return version, gate_and_record(result, exported, version, mnist.cache_path, "mnist-mlp", cfg)


def _versions(name="mnist-mlp"):
    return sorted(int(v.version) for v in tracking.client().search_model_versions(f"name = '{name}'"))


@pytest.mark.e2e
@pytest.mark.slow
def test_the_gate_over_a_sequence_of_candidates(models, mnist):
    c = tracking.client()
    # 1. a weak model is registered, rejected, and no champion appears; the registered model is now
    #    bound to MNIST (its first registration)
    v1, d1 = _candidate(models["weak"], mnist)
    assert not d1.accepted and "< threshold" in d1.reason and _champion() is None
    mv = c.get_model_version("mnist-mlp", v1)
    assert mv.tags["promotion"] == "rejected" and "threshold" in mv.tags["promotion.reason"]
    assert c.get_run(models["weak"].run_id).data.tags["promotion"] == "rejected"
    # a handful of tags (the decision and what it compared); the rest is in its decision record
    assert set(mv.tags) == {"promotion", "promotion.reason", "promotion.val_accuracy", "promotion.champion_version",
                            "promotion.champion_val_accuracy", "promotion.at", "drift.reference"}
    record = registry.recorded_decision("mnist-mlp", mv)
    assert record == d1 and record.threshold == GateConfig().threshold and not record.forced
    rm = c.get_registered_model("mnist-mlp")
    assert rm.tags[registry.DATASET_TAG] == "mnist" and rm.tags[registry.DIGEST_TAG] == mnist.digest
    assert "mnist" in rm.description and mnist.digest in rm.description

    # 2. a decent model becomes champion
    v2, d2 = _candidate(models["medium"], mnist)
    assert d2.accepted and _champion() == v2 and "no champion yet" in d2.reason

    # 3. the weak run again (a retried register and gate): the same version, its decision unchanged
    tags_before = c.get_model_version("mnist-mlp", v1).tags
    v3, d3 = _candidate(models["weak"], mnist)
    assert v3 == v1 and d3 == d1 and _versions() == [1, 2] and _champion() == v2
    assert c.get_model_version("mnist-mlp", v1).tags == tags_before

    # 4. a better model replaces the champion
    v4, d4 = _candidate(models["good"], mnist)
    assert d4.accepted and _champion() == v4
    assert d4.champion_version == v2 and d4.champion_val_accuracy < d4.val_accuracy

    # 5. worse than the champion: rejected (margin 0) ... unless a promotion by hand allows the margin
    v5, d5 = _candidate(models["medium_b"], mnist)
    assert not d5.accepted and "worse than the champion" in d5.reason and _champion() == v4
    assert c.get_model_version("mnist-mlp", v5).tags["promotion.champion_version"] == v4
    gap = d5.champion_val_accuracy - d5.val_accuracy
    s = load_splits(mnist.cache_path)
    task = registry.Task(s.name, s.digest)
    again = registry.gate("mnist-mlp", v5, s.val_images.numpy(), s.val_labels.numpy(), GateConfig(margin=gap + 0.001), task=task)
    assert again == d5 and _champion() == v4  # the pipeline's gate keeps the recorded decision
    d6 = registry.gate("mnist-mlp", v5, s.val_images.numpy(), s.val_labels.numpy(), GateConfig(margin=gap + 0.001),
                       task=task, decide_again=True)
    assert d6.accepted and _champion() == v5 and c.get_model_version("mnist-mlp", v5).tags["promotion"] == "accepted"

    # --force overrides the threshold and the margin, never parity (read from the run's record)
    c.set_tag(models["weak"].run_id, "parity", "failed: max |logit diff| 1 > 1e-4")
    try:
        d7 = registry.gate("mnist-mlp", v1, s.val_images.numpy(), s.val_labels.numpy(), GateConfig(threshold=0.0),
                           force=True, task=task, decide_again=True)
    finally:
        c.set_tag(models["weak"].run_id, "parity", "passed")
    assert not d7.accepted and d7.reason == "ONNX parity check failed" and _champion() == v5

    # the champion is what `models:/mnist-mlp@champion` serves, and it reproduces its accuracy
    loaded = mlflow.onnx.load_model(f"models:/mnist-mlp@{CHAMPION}")
    s = load_splits(mnist.cache_path)
    import onnxruntime as ort

    sess = ort.InferenceSession(loaded.SerializeToString(), providers=["CPUExecutionProvider"])
    acc = float((sess.run(["logits"], {"pixels": s.val_images.numpy()})[0].argmax(1) == s.val_labels.numpy()).mean())
    assert acc == pytest.approx(d6.val_accuracy, abs=0)

    # the model card is on the run and the version
    card = c.get_model_version("mnist-mlp", v4).description
    assert "Gate decision: ACCEPTED" in card and "Per-class accuracy" in card and "ONNX parity" in card
    assert "model_card.md" in {a.path for a in c.list_artifacts(models["good"].run_id)}
    # parity figures are metrics of the training run
    assert c.get_run(models["good"].run_id).data.metrics[M.PARITY_ARGMAX_AGREEMENT] == 1.0


@pytest.mark.e2e
@pytest.mark.slow
def test_an_error_between_registration_and_promotion_leaves_the_alias(models, mnist, store, monkeypatch):
    before = _champion()
    if before is None:
        v, d = _candidate(models["good"], mnist)
        before = v
    fresh = _train(mnist, store, "fresh", **CHEAP)  # a run never registered: its gate has to decide
    exported = export_and_check(fresh, mnist.cache_path)
    version = register(fresh, exported, mnist.cache_path, "mnist-mlp")

    def boom(*a, **k):
        raise RuntimeError("injected failure before the alias moves")

    monkeypatch.setattr(registry, "decide", boom)
    with pytest.raises(RuntimeError, match="injected"):
        gate_and_record(fresh, exported, version, mnist.cache_path, "mnist-mlp", GateConfig())
    assert _champion() == before
    assert tracking.client().get_model_version("mnist-mlp", version).tags["promotion"] == "pending"


def _fail_once(monkeypatch, method: str, when):
    """Make one real MlflowClient call raise once (when `when(*args)`), as a registry that fails mid-way."""
    real = getattr(mlflow.MlflowClient, method)
    state = {"armed": True}

    def flaky(self, *args, **kwargs):
        if state["armed"] and when(*args):
            state["armed"] = False
            raise mlflow.exceptions.MlflowException("injected: the registry went away", error_code=TEMPORARILY_UNAVAILABLE)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, method, flaky)
    return state


@pytest.mark.e2e
@pytest.mark.slow
def test_retried_register_and_gate_change_nothing(models, mnist, store, monkeypatch):
    """A failure after the version was created, and one after the alias moved: the retries (as Prefect
    makes them) find the version and finish the decision, with no second version, no lost comparison."""
    name = "retry-mlp"
    seed = _train(mnist, store, "retry-seed", **CHEAP)  # above 0.5, below "good"
    exported = export_and_check(seed, mnist.cache_path)
    first = register(seed, exported, mnist.cache_path, name)
    assert gate_and_record(seed, exported, first, mnist.cache_path, name, GateConfig(threshold=0.5)).accepted

    exported = export_and_check(models["good"], mnist.cache_path)
    armed = _fail_once(monkeypatch, "set_model_version_tag", lambda n, v, k, val: k == "drift.reference")
    with pytest.raises(mlflow.exceptions.MlflowException, match="injected"):
        register(models["good"], exported, mnist.cache_path, name)
    assert not armed["armed"] and _versions(name) == [1, 2]  # created, then the failure
    version = register(models["good"], exported, mnist.cache_path, name)  # the retry
    assert version == "2" and _versions(name) == [1, 2]
    assert tracking.client().get_model_version(name, version).tags["promotion"] == "pending"

    armed = _fail_once(monkeypatch, "set_model_version_tag", lambda n, v, k, val: k == "promotion" and val == "accepted")
    with pytest.raises(mlflow.exceptions.MlflowException, match="injected"):
        gate_and_record(models["good"], exported, version, mnist.cache_path, name, GateConfig(threshold=0.5))
    assert not armed["armed"]
    d = gate_and_record(models["good"], exported, version, mnist.cache_path, name, GateConfig(threshold=0.5))
    assert d.accepted and d.champion_version == first and "not worse than the champion" in d.reason
    assert "no champion yet" not in d.reason and registry.champion(name) == version
    tags = tracking.client().get_model_version(name, version).tags
    assert tags["promotion"] == "accepted" and tags["promotion.champion_version"] == first

    # a third attempt (the task retried once more) changes nothing at all
    again = gate_and_record(models["good"], exported, version, mnist.cache_path, name, GateConfig(threshold=0.5))
    assert again == d and tracking.client().get_model_version(name, version).tags == tags
    assert str(registry.version_of_run(name, models["good"].run_id).version) == version


@pytest.mark.e2e
@pytest.mark.slow
def test_champion_is_none_only_when_absent(store, models, mnist):
    assert registry.champion("no-such-model") is None
    tracking.client().create_registered_model("no-alias-mlp")
    assert registry.champion("no-alias-mlp") is None


@pytest.mark.e2e
@pytest.mark.slow
def test_a_candidate_of_another_dataset_is_refused(models, mnist, fashion_model):
    """mnist-mlp is bound to MNIST: a Fashion-MNIST candidate is refused before anything is registered;
    a Fashion-MNIST version that got in anyway (registered by hand, or before models were bound) is
    refused by the gate even with force, and so is another task's split."""
    fashion, result = fashion_model
    c = tracking.client()
    _candidate(models["medium"], mnist)  # mnist-mlp exists and is bound to MNIST
    champion_before, versions_before = _champion(), _versions()
    exported = export_and_check(result, fashion.cache_path)
    with pytest.raises(registry.TaskMismatchError, match="bound to mnist") as e:
        register(result, exported, fashion.cache_path, "mnist-mlp")
    assert "fashion-mnist" in str(e.value) and "'fashion-mnist-mlp'" in str(e.value)
    assert _versions() == versions_before and c.get_registered_model("mnist-mlp").tags[registry.DATASET_TAG] == "mnist"

    # Under its own name it is fine, and that registered model is bound to Fashion-MNIST.
    fv = register(result, exported, fashion.cache_path, "fashion-mnist-mlp")
    assert c.get_registered_model("fashion-mnist-mlp").tags[registry.DIGEST_TAG] == fashion.digest

    # A Fashion-MNIST version inside mnist-mlp, as the registry held them before models were bound.
    src = c.get_model_version("fashion-mnist-mlp", fv)
    stray = c.create_model_version("mnist-mlp", src.source, run_id=result.run_id,
                                   tags={"dataset": "fashion-mnist", "dataset_digest": fashion.digest,
                                         "parity_passed": "true", "promotion": "pending"}).version
    m, f = load_splits(mnist.cache_path), load_splits(fashion.cache_path)
    for split in (m, f):
        with pytest.raises(registry.TaskMismatchError, match="bound to mnist"):
            registry.gate("mnist-mlp", stray, split.val_images.numpy(), split.val_labels.numpy(), GateConfig(threshold=0.0),
                          force=True, task=registry.Task(split.name, split.digest), decide_again=True)
    assert _champion() == champion_before
    assert c.get_model_version("mnist-mlp", stray).tags["promotion"] == "pending"
