"""MNISTOPS_DATA_SOURCE as an object-store prefix holding the four IDX files: `mnistops prepare-data`
reads them from the loopback S3 server (tests/s3_server.py), checked against the same pinned digests
as any source. `mnistops run` obtains its data through the same call (flows.options.data_config, then
nn_core.data.prepare_dataset in the pipeline's prepare-data task), so a training is not needed here to
show that a bucket's files become the cache it trains from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from s3_server import S3Server, s3  # noqa: F401 (the fixture)
from stores import home_with_store

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"]


def mnistops(s3: S3Server, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    # A home whose store exists already: every command but infer makes one on a new home first (5-9 s
    # of CPU migrating it), which has nothing to do with the data.
    full = {**s3.env(), "MNISTOPS_HOME": str(home_with_store(tmp_path / "home")),
            "MNISTOPS_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO), **env}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MNISTOPS_ARTIFACT_ROOT"):
        full.pop(key, None)  # the embedded defaults under the home
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=full, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)


def test_the_data_source_in_the_bucket_becomes_the_verified_cache(s3: S3Server, mnist, mnist_source: Path,
                                                                  tmp_path: Path) -> None:
    bucket = s3.bucket()
    for name in FILES:
        s3.client().upload_file(str(mnist_source / name), bucket, f"mnist/{name}")
    r = mnistops(s3, tmp_path, "prepare-data", MNISTOPS_DATA_SOURCE=f"s3://{bucket}/mnist/")
    assert r.returncode == 0, r.stdout + r.stderr
    out = dict(line.split(None, 1) for line in r.stdout.splitlines())
    # the pinned digest of MNIST, the same as from the local files (the session's `mnist`)
    assert out["digest"] == mnist.digest
    assert out["cache"] == f"{tmp_path / 'data' / 'mnist.pt'} (written)"
    assert (tmp_path / "data" / "mnist.pt").is_file()
    assert out["splits"] == "  ".join(f"{k}={v}" for k, v in mnist.split_sizes.items())


def test_a_prefix_without_the_files_is_one_line_naming_it(s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key="mnist/README", Body=b"not the files")
    r = mnistops(s3, tmp_path, "prepare-data", MNISTOPS_DATA_SOURCE=f"s3://{bucket}/mnist/")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert any(f"s3://{bucket}/mnist/train-images-idx3-ubyte(.gz): missing" in line for line in errors), r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "data").glob("*.pt")) if (tmp_path / "data").exists() else True
