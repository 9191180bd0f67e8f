"""MNISTOPS_DATA_SOURCE as an object-store prefix holding the four IDX files: `mnistops run` and
`prepare-data` read them from the loopback S3 server (tests/s3_server.py), checked against the same
pinned digests as any source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from s3_server import S3Server, s3  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"]


def mnistops(s3: S3Server, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**s3.env(), "MNISTOPS_HOME": str(tmp_path / "home"), "MNISTOPS_DATA_DIR": str(tmp_path / "data"),
            "PYTHONPATH": str(REPO), **env}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MNISTOPS_ARTIFACT_ROOT"):
        full.pop(key, None)  # the embedded defaults under the home
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=full, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)


def test_run_with_its_data_source_in_the_bucket(s3: S3Server, mnist_source: Path, tmp_path: Path) -> None:
    bucket = s3.bucket()
    for name in FILES:
        s3.client().upload_file(str(mnist_source / name), bucket, f"mnist/{name}")
    r = mnistops(s3, tmp_path, "run", "--epochs", "1", "--no-inference", MNISTOPS_DATA_SOURCE=f"s3://{bucket}/mnist/")
    assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: the gate rejected it, a normal outcome
    assert (tmp_path / "data" / "mnist.pt").is_file()  # the cache, built from the bucket's files


def test_a_prefix_without_the_files_is_one_line_naming_it(s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="mnist/README", Body=b"not the files")
    r = mnistops(s3, tmp_path, "prepare-data", MNISTOPS_DATA_SOURCE=f"s3://{bucket}/mnist/")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert any(f"s3://{bucket}/mnist/train-images-idx3-ubyte(.gz): missing" in line for line in errors), r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "data").glob("*.pt")) if (tmp_path / "data").exists() else True
