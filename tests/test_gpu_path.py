"""The CUDA path, as far as a CPU machine can run it: the CUDA provider's options, the device share of
each sweep trial and each worker, parity figures that name their provider, the GPU acceptance run's
report writer, and its one-line answer on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nn_core.distributed import gpu_index
from nn_core.launch import LaunchSpec, TrainingError, plan_workers
from nn_core.sweep import assign_devices
from serving.session import CPU, CUDA, create_session, cuda_provider_options, gpu_usable, session_providers

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# CUDA provider options: one place


def test_cuda_provider_options_pin_the_device_and_turn_tf32_off():
    assert cuda_provider_options(3) == {"device_id": "3", "use_tf32": "0", "do_copy_in_default_stream": "1"}
    assert session_providers(cuda=True, device_id=1) == [(CUDA, cuda_provider_options(1)), CPU]
    assert session_providers(cuda=False) == [CPU]
    with pytest.raises(ValueError, match="CUDA device id -1"):
        cuda_provider_options(-1)


def test_the_option_names_are_ones_this_onnxruntime_cuda_provider_knows():
    """onnxruntime rejects an unknown CUDA option only when the provider loads, which needs a GPU; the
    names it knows are in its CUDA provider library, so check them there on any machine."""
    import onnxruntime

    lib = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.exists():
        pytest.skip("this onnxruntime has no CUDA provider library")
    data = lib.read_bytes()
    for name in cuda_provider_options(0):
        assert b"\0" + name.encode() + b"\0" in data, name


@pytest.mark.skipif(not gpu_usable(), reason="needs a GPU")
def test_a_cuda_session_runs_with_these_options(tmp_path):
    from serving_fixtures import save_model

    save_model(tmp_path / "m.onnx")
    s = create_session(tmp_path / "m.onnx", "cuda", device_id=0)
    assert s.get_provider_options()[CUDA]["use_tf32"] == "0"
    assert s.get_provider_options()[CUDA]["device_id"] == "0"


# ---------------------------------------------------------------------------------------------
# Devices: each sweep trial its own GPUs, each worker its GPU


@pytest.mark.parametrize("gpus, concurrency, expected", [
    (0, 3, [None, None, None]),  # no GPU: CPU trials
    (8, 1, [tuple(range(8))]),  # one trial: every GPU
    (8, 2, [(0, 1, 2, 3), (4, 5, 6, 7)]),
    (8, 3, [(0, 1), (2, 3), (4, 5)]),  # equal shares; GPUs 6, 7 idle
    (4, 4, [(0,), (1,), (2,), (3,)]),
    (2, 5, [(0,), (1,), (0,), (1,), (0,)]),  # more trials than GPUs: one each, shared round-robin
])
def test_sweep_trials_get_their_own_gpus(gpus, concurrency, expected):
    slots = assign_devices(gpus, concurrency)
    assert slots == expected
    if 0 < concurrency <= gpus:
        flat = [d for s in slots for d in s]
        assert len(flat) == len(set(flat))  # disjoint


def test_sweep_assignment_rejects_nonsense():
    with pytest.raises(ValueError, match="concurrency"):
        assign_devices(2, 0)
    with pytest.raises(ValueError, match="gpu_count"):
        assign_devices(-1, 1)


def test_workers_per_trial_follow_the_share():
    # a trial given GPUs (2, 3) of 4 starts two workers, local rank i on GPU devices[i]
    assert plan_workers(LaunchSpec(devices=(2, 3)), gpu_count=4, cores=16) == (2, None, "cuda")
    assert [gpu_index(r, (2, 3), 4) for r in range(2)] == [2, 3]
    # no share: one worker per GPU
    assert plan_workers(LaunchSpec(), gpu_count=4, cores=16) == (4, None, "cuda")
    assert [gpu_index(r, None, 4) for r in range(4)] == [0, 1, 2, 3]
    # CPU: nproc processes, the cores shared out; a GPU share means nothing there
    assert plan_workers(LaunchSpec(nproc=2, devices=(1,)), gpu_count=0, cores=8) == (2, 4, "cpu")
    assert plan_workers(LaunchSpec(nproc=2, device="cpu"), gpu_count=4, cores=8) == (2, 4, "cpu")
    # threads the user set (OMP_NUM_THREADS) win over the share: the cores may be busy with other work
    assert plan_workers(LaunchSpec(nproc=2, device="cpu"), gpu_count=0, cores=8, threads=1) == (2, 1, "cpu")
    with pytest.raises(TrainingError, match=r"GPU ids \[1, 4\]: expected distinct ids in 0..3"):
        plan_workers(LaunchSpec(devices=(1, 4)), gpu_count=4, cores=8)
    with pytest.raises(TrainingError, match="distinct"):
        plan_workers(LaunchSpec(devices=(1, 1)), gpu_count=4, cores=8)
    with pytest.raises(TrainingError, match="--device cuda requested but CUDA is not available"):
        plan_workers(LaunchSpec(device="cuda"), gpu_count=0, cores=8)


# ---------------------------------------------------------------------------------------------
# Parity names the provider the model will be served on


@pytest.mark.slow
def test_parity_runs_on_the_serving_provider_and_says_which(tmp_path):
    from nn_core.export import check_parity, export_onnx
    from nn_core.model import MLPConfig, build_model

    model = build_model(MLPConfig(), seed=0)
    path = export_onnx(model, tmp_path / "m.onnx")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (300,), generator=g)
    report = check_parity(model, path, images, labels)
    served = CUDA if gpu_usable() else CPU
    assert report.passed, report.reason
    assert report.provider == served and report.torch_device == "cpu"
    assert report.tags() == {"parity.provider": served, "parity.torch_device": "cpu"}
    assert report.to_dict()["provider"] == served
    forced = check_parity(model, path, images, labels, device="cpu")
    assert forced.provider == CPU and forced.max_abs_diff <= 1e-4


# ---------------------------------------------------------------------------------------------
# The GPU acceptance run: the report, and the one line without a GPU


def test_report_writer_records_every_row_and_what_failed(tmp_path):
    g = _gpu_check()
    rows = [
        g.Row("training: backend", "nccl", "", "nccl", True, "check"),
        g.Row("gate", "rejected", "", "accepted", False, "check"),
        g.Row("epoch (median), one GPU", 23.5, "ms", "<= 20 ms", False, "target"),
        g.Row("bare session, CUDA EP", 12_345_678.9, "img/s"),
    ]
    out = tmp_path / "out" / "gpu.json"
    table = g.write_report({"machine": {"gpus": ["H200"]}}, rows, out)
    doc = json.loads(out.read_text())
    assert doc["machine"] == {"gpus": ["H200"]}
    assert [r["name"] for r in doc["rows"]] == [r.name for r in rows]
    assert [r["verdict"] for r in doc["rows"]] == ["ok", "FAILED", "MISSED", ""]
    assert doc["failed_checks"] == ["gate"]  # a missed target is recorded, not a failed check
    assert [r.name for r in g.failed_checks(rows)] == ["gate"]
    lines = table.splitlines()
    assert len(lines) == 1 + len(rows)
    assert "FAILED" in lines[2] and "MISSED" in lines[3] and "12,345,679" in lines[4]
    assert sorted(p.name for p in out.parent.iterdir()) == ["gpu.json"]  # written atomically


def _training_figures(**over) -> dict:
    f = {"world_size": 1, "backend": "nccl", "device": "cuda", "epoch_median_s_all_gpus": 0.006,
         "epoch_median_s_one_gpu": 0.006, "floor_epoch_s_one_gpu": 0.004, "step_mode_one_gpu": "cuda-graph",
         "epoch_median_s_one_gpu_eager": 0.030, "val_accuracy": 0.972, "val_accuracy_one_gpu": 0.972,
         "val_accuracy_one_gpu_eager": 0.972, "train_wall_s": 12.0, "release_s": 3.0}
    return {**f, **over}


def test_the_training_rows_read_every_figure_the_gpu_run_records():
    """The rows of step 1 come from figures only a GPU produces: built here from figures of the same
    shape, so a missing key or a wrong verdict is found before a device run is spent on it."""
    from types import SimpleNamespace

    g = _gpu_check()
    decision = SimpleNamespace(promotion="accepted", accepted=True)
    exported = SimpleNamespace(parity=SimpleNamespace(provider=CUDA))
    rows = {r.name: r for r in g.training_rows(_training_figures(), decision, exported, gpus=1)}
    assert rows["training step, one GPU"].verdict() == "met"
    assert rows["epoch (median), one GPU"].verdict() == "met"
    assert rows["epoch eager / epoch one GPU"].value == pytest.approx(5.0)
    assert not g.failed_checks(list(rows.values()))
    eager = _training_figures(step_mode_one_gpu="eager (MNISTOPS_CUDA_GRAPHS=0)", epoch_median_s_one_gpu=0.030,
                              val_accuracy_one_gpu_eager=0.95)
    rows = {r.name: r for r in g.training_rows(eager, decision, exported, gpus=1)}
    assert rows["training step, one GPU"].verdict() == "MISSED"  # a target: recorded, not a failure
    assert rows["epoch (median), one GPU"].verdict() == "MISSED"
    assert [r.name for r in g.failed_checks(list(rows.values()))] == ["validation accuracy, one GPU: graph, eager"]
    print(g.format_table(list(rows.values())))


def test_without_onnxruntimes_cuda_provider_the_training_is_still_checked():
    g = _gpu_check()
    assert g.provider_steps(None) == (("parity", "throughput"), [])
    steps, rows = g.provider_steps("onnxruntime 1.30.0 has no usable CUDA provider (providers: CPUExecutionProvider)")
    assert steps == ()
    assert [r.name for r in g.failed_checks(rows)] == ["onnxruntime's CUDA provider (steps 2 and 3)"]
    if not gpu_usable():  # this machine: the reason names the package's providers
        assert "CPUExecutionProvider" in g.no_provider_reason()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: `make gpu-check` runs the real thing")
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "gpu-check: no usable CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check"
    ]
    assert not out.exists()


def test_the_floor_step_computes_the_gradients_autograd_computes():
    """The floor (bench/floor.py) must do an epoch's real arithmetic: its hand-written backward gives
    the model's gradients of the mean cross-entropy."""
    import torch.nn.functional as F

    from nn_core.model import MLPConfig, build_model

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from floor import FloorStep, epoch_floor
    finally:
        sys.path.remove(str(REPO / "bench"))
    cfg = MLPConfig(hidden=(32, 16))
    model = build_model(cfg, seed=0)
    linears = [m for m in model.layers if isinstance(m, torch.nn.Linear)]
    step = FloorStep((784, 32, 16, 10), batch=64, device=torch.device("cpu"), mean=cfg.mean, std=cfg.std, lr=0.0)
    for w, b, lin in zip(step.weights, step.biases, linears):
        w.copy_(lin.weight.detach())
        b.copy_(lin.bias.detach())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 784), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    step(x, y[:, None])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for gw, gb, lin in zip(step.gweights, step.gbiases, linears):
        torch.testing.assert_close(gw, lin.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gb, lin.bias.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(step.loss_sum / 64, loss.detach(), rtol=1e-5, atol=1e-6)
    assert int(step.correct) == int((model(x).argmax(1) == y).sum())
    assert np.isfinite(epoch_floor(n=512, batch=256, epochs=1))


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("3", 3), (" 2 ", 2), ("0", "positive"),
                                             ("two", "positive"), ("1.5", "positive")])
def test_omp_num_threads_is_read_as_torchrun_reads_it(monkeypatch, value, expected):
    from nn_core.launch import threads_set

    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    if isinstance(expected, str):
        with pytest.raises(TrainingError, match=rf"OMP_NUM_THREADS='{value}': expected a positive whole number"):
            threads_set()
    else:
        assert threads_set() == expected
