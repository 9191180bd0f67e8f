"""The kit that takes `make gpu-check` to an air-gapped GPU host, which has no package index and takes
64 MiB a transfer (bench/device/): onnxruntime-gpu's wheel travels in parts over several transfers
and must come out whole, or the check must say what is missing. Downloading and installing need the
index and that host; the splitting, staging and putting together run here on real files."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device" / "gpu-check.sh"


def _wheels():
    spec = importlib.util.spec_from_file_location("device_wheels", REPO / "bench" / "device" / "wheels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_wheels"] = module
    spec.loader.exec_module(module)
    return module


def _wheel(tmp_path: Path, size: int = 1000) -> Path:
    w = tmp_path / "onnxruntime_gpu-1.31.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    w.write_bytes(os.urandom(size))
    return w


def test_the_wheel_is_split_into_parts_that_fit_their_transfers(tmp_path):
    w = _wheels()
    wheel = _wheel(tmp_path)
    parts = w.split(wheel, tmp_path / "ort", last_at_most=150, part_at_most=300)
    sizes = [p.stat().st_size for p in parts]
    assert sizes[-1] == 150 and all(s <= 300 for s in sizes[:-1]) and len(parts) == 4
    assert b"".join(p.read_bytes() for p in parts) == wheel.read_bytes()
    sums = (tmp_path / "ort" / "SHA256SUMS").read_text().splitlines()
    assert [line.split()[1] for line in sums] == ["part-00", "part-01", "part-02", "part-03", wheel.name]
    assert w.split(wheel, tmp_path / "small", last_at_most=5000) == [tmp_path / "small" / "part-00"]
    with pytest.raises(ValueError, match="no room"):
        w.split(wheel, tmp_path / "none", last_at_most=0)


def test_the_image_packages_are_not_carried():
    w = _wheels()
    have = w.image_packages()
    assert {"torch", "onnxscript", "python-dateutil", "pyarrow"} <= have and "mlflow" not in have
    assert w.wheel_name("python_dateutil-2.9.0.post0-py2.py3-none-any.whl") == "python-dateutil"
    assert w.wheel_name("mlflow_skinny-3.17.2-py3-none-any.whl") == "mlflow-skinny"


def test_a_folder_without_mnist_is_refused_before_anything_is_fetched(tmp_path, capsys):
    w = _wheels()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"x")  # one of four
    assert w.main(["--mnist", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"wheels.py: --mnist {tmp_path}: expected MNIST's four IDX files") and "\n" not in err
    assert "train-labels-idx1-ubyte" in err and "train-images-idx3-ubyte," not in err
    assert not list(REPO.glob(".whl.partial-*"))


def _call(tree: Path, stage: Path, verb: str, carried: list[Path]) -> subprocess.CompletedProcess:
    """One transfer: a fresh copy of the checkout holding only the carried files, then the script."""
    if tree.exists():
        shutil.rmtree(tree)
    (tree / "bench" / "device").mkdir(parents=True)
    shutil.copy2(SCRIPT, tree / "bench" / "device" / SCRIPT.name)
    (tree / ".whl" / "ort").mkdir(parents=True)
    for f in carried:
        shutil.copy2(f, tree / ".whl" / "ort" / f.name)
    return subprocess.run(["bash", str(tree / "bench" / "device" / SCRIPT.name), verb], capture_output=True,
                          text=True, check=False, env={**os.environ, "MNISTOPS_STAGE": str(stage)}, timeout=60)


def test_parts_staged_over_several_transfers_come_out_as_the_wheel(tmp_path):
    wheel = _wheel(tmp_path)
    ort = tmp_path / "ort"
    parts = _wheels().split(wheel, ort, last_at_most=150, part_at_most=300)
    stage, tree = tmp_path / "stage", tmp_path / "tree"
    for p in parts[:-1]:
        r = _call(tree, stage, "stage", [p])
        assert r.returncode == 0 and p.name in r.stdout, r.stderr
    _call(tree, stage, "stage", [ort / "SHA256SUMS"])  # the last part left behind
    missing = _call(tree, stage, "assemble", [])
    assert missing.returncode == 1 and f"{parts[-1].name} was not staged" in missing.stderr
    _call(tree, stage, "stage", [parts[-1], ort / "SHA256SUMS"])
    r = _call(tree, stage, "assemble", [])
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == wheel.read_bytes()


def test_a_damaged_part_is_refused_and_no_wheel_is_left(tmp_path):
    wheel = _wheel(tmp_path)
    ort = tmp_path / "ort"
    parts = _wheels().split(wheel, ort, last_at_most=400)
    parts[0].write_bytes(parts[0].read_bytes()[:-1] + b"x")
    _call(tmp_path / "tree", tmp_path / "stage", "stage", [*parts, ort / "SHA256SUMS"])
    r = _call(tmp_path / "tree", tmp_path / "stage", "assemble", [])
    assert r.returncode == 1 and "does not match" in r.stderr
    assert not (tmp_path / "stage" / wheel.name).exists()
    assert _call(tmp_path / "tree", tmp_path / "stage", "nonsense", []).returncode == 2
