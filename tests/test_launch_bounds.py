"""What a user asks for is bounded by the machine: --nproc by the usable cores (CPU) or the GPUs, and
by the memory a worker needs; --batch-size by the training split. Beyond that: one line, exit 2,
nothing started, from the command line and from the flows' parameters alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nn_core.config import DataConfig, LaunchSpec, TrainConfig
from nn_core.datasets import get_spec
from nn_core.machine import WORKER_PEAK_RSS, BeyondMachine, Machine, check_request, mem_available, usable_cores

GiB = 2**30
TWO_CORES = Machine(cores=2, gpus=0, mem_available=24 * GiB)  # the development VM


# ---------------------------------------------------------------------------------------------
# The bound itself, on given machine figures


@pytest.mark.parametrize("nproc, device, machine", [
    (2, "auto", TWO_CORES),
    (2, "cpu", Machine(cores=2, gpus=8, mem_available=24 * GiB)),
    (64, "auto", Machine(cores=64, gpus=0, mem_available=64 * WORKER_PEAK_RSS)),
    (1, "cpu", Machine(cores=1, gpus=0, mem_available=WORKER_PEAK_RSS // 4)),  # one worker: always
    (64, "auto", Machine(cores=2, gpus=None, mem_available=GiB)),  # GPUs not counted yet: the launch checks
    (64, "auto", Machine(cores=2, gpus=4, mem_available=24 * GiB)),  # CUDA: one per GPU, --nproc unused
    (64, "cuda", Machine(cores=2, gpus=0, mem_available=GiB)),  # no GPU: the launch refuses --device cuda
    (2, "cpu", Machine(cores=2, gpus=0, mem_available=None)),  # no /proc/meminfo: the cores still bound it
])
def test_requests_within_the_machine_pass(nproc, device, machine):
    check_request(nproc, device, [256], "mnist", machine)


@pytest.mark.parametrize("nproc, device, machine, trainings, devices, expected", [
    (64, "auto", TWO_CORES, 1, None, "--nproc 64: this machine has 2 usable core(s) and memory for ~"),
    (3, "cpu", Machine(cores=2, gpus=8, mem_available=24 * GiB), 1, None, "expected at most 2 worker(s) at once"),
    (8, "cpu", Machine(cores=64, gpus=0, mem_available=3 * WORKER_PEAK_RSS + GiB // 2), 1, None,
     "--nproc 8: this machine has 64 usable core(s) and memory for ~3 worker(s)"),
    (2, "auto", TWO_CORES, 2, None, "--nproc 2 x 2 trainings at once (--concurrency): this machine has 2"),
    (1, "auto", Machine(cores=2, gpus=0, mem_available=WORKER_PEAK_RSS), 2, None, "memory for ~1 worker(s)"),
    (1, "auto", Machine(cores=64, gpus=8, mem_available=2 * WORKER_PEAK_RSS), 1, None,
     "8 CUDA worker(s), one per GPU: this machine has 64 usable core(s) and memory for ~2 worker(s)"),
    (1, "cuda", Machine(cores=64, gpus=8, mem_available=2 * WORKER_PEAK_RSS), 1, (0, 1, 2), "3 CUDA worker(s)"),
])
def test_requests_beyond_the_machine_are_one_usage_line(nproc, device, machine, trainings, devices, expected):
    with pytest.raises(BeyondMachine) as e:
        check_request(nproc, device, [256], "mnist", machine, trainings, devices)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_batch_size_is_bounded_by_the_training_split(dataset):
    size = get_spec(dataset).train_size
    check_request(1, "cpu", [256, size], dataset, TWO_CORES)
    with pytest.raises(BeyondMachine, match=rf"--batch-size {size + 1}: larger than {dataset}'s training split "
                                            rf"\({size:,} images\).*expected at most {size}$"):
        check_request(1, "cpu", [256, size + 1], dataset, TWO_CORES)
    check_request(1, "cpu", [10**9], None, TWO_CORES)  # no dataset known (promote): not checked here


def test_mem_available_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   12345678 kB\n")
    assert mem_available(meminfo) == 12345678 * 1024
    meminfo.write_text("MemTotal:       24576000 kB\n")  # a kernel before 3.14
    assert mem_available(meminfo) is None
    assert mem_available(tmp_path / "absent") is None
    assert mem_available() is None or mem_available() > 0  # this machine's


# ---------------------------------------------------------------------------------------------
# As a user meets it: a real `mnistops` process, exit 2, one line, nothing started or written, and
# torch never imported (the check runs before it).

_PROBE = """
import json, os, sys
from flows.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
with open(os.environ["PROBE"], "w") as f:
    json.dump(sorted(m for m in ("torch", "prefect", "mlflow") if m in sys.modules), f)
sys.exit(code)
"""

TOO_MANY = str(1 << usable_cores().bit_length())  # more than the cores, and a divisor of batch 256


@pytest.mark.parametrize("argv, expected", [
    (["train", "--nproc", TOO_MANY], f"mnistops train: error: --nproc {TOO_MANY}: this machine has {usable_cores()} "
                                     "usable core(s) and memory for ~"),
    (["run", "--nproc", TOO_MANY], f"mnistops run: error: --nproc {TOO_MANY}: this machine has"),
    (["sweep", "--hidden", "50", "--nproc", TOO_MANY], f"mnistops sweep: error: --nproc {TOO_MANY}: this machine"),
    (["serve", "--nproc", TOO_MANY], f"mnistops serve: error: --nproc {TOO_MANY}: this machine"),
    (["train", "--batch-size", "1000000000"], "mnistops train: error: --batch-size 1000000000: larger than "
                                              "mnist's training split (50,000 images)"),
    (["run", "--dataset", "fashion-mnist", "--batch-size", "50001"],
     "mnistops run: error: --batch-size 50001: larger than fashion-mnist's"),
    (["sweep", "--batch-size", "256", "1000000000"], "mnistops sweep: error: --batch-size 1000000000: larger than"),
])
def test_the_command_refuses_before_anything_starts(tmp_path, argv, expected):
    env = {**os.environ, "MNISTOPS_HOME": str(tmp_path / "home"), "MNISTOPS_DATA_DIR": str(tmp_path / "data"),
           "PROBE": str(tmp_path / "imported.json")}
    r = subprocess.run([sys.executable, "-c", _PROBE, *argv, "--device", "cpu"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(expected) and r.stderr.count("\n") == 1, r.stderr
    assert json.loads((tmp_path / "imported.json").read_text()) == []  # refused before torch was imported
    assert not (tmp_path / "home").exists() and not (tmp_path / "data").exists()  # nothing written


# ---------------------------------------------------------------------------------------------
# The flows' parameters (a deployment run): refused at the flow's start, before data or workers.


@pytest.mark.slow
def test_flows_refuse_parameters_beyond_the_machine(tmp_path, monkeypatch, prefect_api):
    from flows.sweep import hyperparameter_sweep
    from flows.training import training_pipeline
    from nn_core.sweep import SweepSpec

    monkeypatch.setenv("MNISTOPS_HOME", str(tmp_path / "home"))
    data = DataConfig(data_dir=str(tmp_path / "data"))
    with pytest.raises(BeyondMachine, match=rf"^--nproc {TOO_MANY}: this machine has {usable_cores()} usable core"):
        training_pipeline(data=data, launch=LaunchSpec(nproc=int(TOO_MANY), device="cpu"))
    with pytest.raises(BeyondMachine, match="^--batch-size 1000000000: larger than mnist's training split"):
        training_pipeline(data=data, train=TrainConfig(batch_size=10**9))
    cores = usable_cores()
    with pytest.raises(BeyondMachine, match=rf"^--nproc 1 x {cores + 1} trainings at once \(--concurrency\)"):
        hyperparameter_sweep(grid=SweepSpec(hidden=tuple((h,) for h in range(8, 8 + cores + 1))),
                             concurrency=cores + 1, data=data, launch=LaunchSpec(device="cpu"))
    with pytest.raises(BeyondMachine, match="^--batch-size 1000000000: larger than mnist's training split"):
        hyperparameter_sweep(grid=SweepSpec(batch_size=(256, 10**9)), data=data)
    assert not (tmp_path / "home" / "runs").exists() and not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------
# The worker's tie to its launcher (nn_core.worker.die_with_parent), with real processes and no torch:
# a launcher that dies takes the worker with it; a worker whose launcher is already gone exits.

_LAUNCHER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import sys, time; from nn_core.worker import die_with_parent; "
                          "die_with_parent(int(sys.argv[1])); print('armed', flush=True); time.sleep(600)",
                          str(os.getpid())], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


def test_a_worker_dies_with_its_launcher_and_refuses_a_dead_one(tmp_path):
    import psutil

    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        pid, armed = launcher.stdout.readline().split()
        assert armed == "armed"
        worker = psutil.Process(int(pid))
        launcher.kill()  # SIGKILL: no handler, no clean-up of its own
        launcher.wait()
        worker.wait(timeout=30)  # its parent-death signal killed it
    finally:
        launcher.kill()
        if worker is not None and worker.is_running():
            worker.kill()
    # Launched by a parent other than the one it was told to die with (that one died before the
    # signal could be armed): it exits at once instead of training for nobody.
    r = subprocess.run([sys.executable, "-c", "import os; from nn_core.worker import die_with_parent; "
                        "die_with_parent(os.getppid() + 1); print('not reached')"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "not reached" not in r.stdout
