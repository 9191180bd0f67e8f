"""ONNX export, parity, the model registry and the promotion gate, on models trained on real MNIST."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
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
        (0.97, True, 0.98, GateConfig(), False, "worse than the champion"),
        (0.975, True, 0.98, GateConfig(margin=0.01), True, "not worse than the champion"),
        (0.98, True, 0.98, GateConfig(), True, "not worse"),
        (0.97, True, None, GateConfig(threshold=0.975), False, "< threshold 0.9750"),
    ],
)
def test_gate_rule(acc, parity, champ, cfg, accepted, why):
    ok, reason = decide(acc, parity, champ, cfg)
    assert ok is accepted and why in reason


def test_gate_config_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        GateConfig(threshold=96)


# ---------------------------------------------------------------------------------------------
# Real MNIST: three models of different quality, trained once for this module


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root}/mlflow.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MNISTOPS_ARTIFACT_ROOT", str(root / "mlartifacts"))
    mlflow.set_tracking_uri(uri)
    yield root
    mlflow.set_tracking_uri(None)
    mp.undo()


def _train(mnist, root: Path, name: str, **cfg) -> TrainResult:
    job = TrainJob(data_path=str(mnist.cache_path), out_dir=str(root / name), train=TrainConfig(**cfg),
                   tracking=TrackingConfig(training_id=name, experiment="registry-test"))
    with ddp_context("cpu") as env:
        train(job, env)
    return TrainResult.read(root / name)


@pytest.fixture(scope="module")
def models(mnist, store):
    return {
        "weak": _train(mnist, store, "weak", epochs=1, lr=1e-5),  # a few hundred tiny steps
        "medium": _train(mnist, store, "medium", epochs=3),
        "good": _train(mnist, store, "good", epochs=10),
    }


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
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    s = load_splits(mnist.cache_path)
    sess = onnx_session(path)
    for n in (1, 7, 10_000):
        logits, probs = sess.run(None, {"pixels": s.val_images[:n].numpy()})
        assert logits.shape == probs.shape == (n, 10) and logits.dtype == np.float32
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


@pytest.mark.e2e
@pytest.mark.slow
def test_tampered_export_fails_parity_and_is_never_registered(models, mnist, tmp_path):
    model, _ = load_model(models["good"].checkpoint)
    path = export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).ndim == 2)
    w = numpy_helper.to_array(init).copy()
    w.flat[123] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(path))
    s = load_splits(mnist.cache_path)
    report = check_parity(model, path, s.val_images, s.val_labels)
    assert not report.passed and "max |logit diff|" in report.reason and report.max_abs_diff > 1e-4
    before = mlflow.MlflowClient().search_model_versions("name = 'mnist-mlp'")
    with pytest.raises(ValueError, match="parity failed"):
        registry.register_candidate(models["good"].run_id, path, report, "mnist-mlp", s.val_images[:2].numpy(), {})
    assert len(mlflow.MlflowClient().search_model_versions("name = 'mnist-mlp'")) == len(before)


def _candidate(result: TrainResult, mnist, cfg=GateConfig()):
    exported = export_and_check(result, mnist.cache_path)
    assert exported.parity.passed, exported.parity.reason
    version = register(result, exported, mnist.cache_path, "mnist-mlp")
    return version, gate_and_record(result, exported, version, mnist.cache_path, "mnist-mlp", cfg)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_gate_over_a_sequence_of_candidates(models, mnist):
    c = tracking.client()
    # 1. a weak model is registered, rejected, and no champion appears
    v1, d1 = _candidate(models["weak"], mnist)
    assert not d1.accepted and "< threshold" in d1.reason and _champion() is None
    mv = c.get_model_version("mnist-mlp", v1)
    assert mv.tags["promotion"] == "rejected" and "threshold" in mv.tags["promotion.reason"]
    assert c.get_run(models["weak"].run_id).data.tags["promotion"] == "rejected"

    # 2. a decent model becomes champion
    v2, d2 = _candidate(models["medium"], mnist)
    assert d2.accepted and _champion() == v2

    # 3. the weak model again: rejected, the champion does not move
    v3, d3 = _candidate(models["weak"], mnist)
    assert not d3.accepted and _champion() == v2

    # 4. a better model replaces the champion
    v4, d4 = _candidate(models["good"], mnist)
    assert d4.accepted and _champion() == v4
    assert d4.champion_version == v2 and d4.champion_val_accuracy < d4.val_accuracy

    # 5. worse than the champion: rejected (margin 0) ... unless the margin allows it
    v5, d5 = _candidate(models["medium"], mnist)
    assert not d5.accepted and "worse than the champion" in d5.reason and _champion() == v4
    assert c.get_model_version("mnist-mlp", v5).tags["promotion.champion_version"] == v4
    gap = d5.champion_val_accuracy - d5.val_accuracy
    _, d6 = _candidate(models["medium"], mnist, GateConfig(margin=gap + 0.001))
    assert d6.accepted

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
def test_an_error_between_registration_and_promotion_leaves_the_alias(models, mnist, monkeypatch):
    before = _champion()
    if before is None:
        v, d = _candidate(models["good"], mnist)
        before = v
    exported = export_and_check(models["good"], mnist.cache_path)
    version = register(models["good"], exported, mnist.cache_path, "mnist-mlp")

    def boom(*a, **k):
        raise RuntimeError("injected failure before the alias moves")

    monkeypatch.setattr(registry, "decide", boom)
    with pytest.raises(RuntimeError, match="injected"):
        gate_and_record(models["good"], exported, version, mnist.cache_path, "mnist-mlp", GateConfig())
    assert _champion() == before
    assert tracking.client().get_model_version("mnist-mlp", version).tags["promotion"] == "pending"
