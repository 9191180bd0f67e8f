"""The batch job and its inbox on an object store: `python -m serving` against the loopback S3 server
(tests/s3_server.py), through the standard AWS settings only; what a command reports without needing
a process of its own (its one error line for a bad store) through its main in this process
(tests/serving_main.py). Workers with homes of their own sharing one bucket inbox: tests/test_k8s_scoring.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from serving_main import serving_main
from s3_server import S3Server, s3  # noqa: F401 (the fixture)
from serving_fixtures import digits, save_model, write_idx

REPO = Path(__file__).resolve().parents[1]
QUIET = {"ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    save_model(path)
    return path


def put(s3: S3Server, bucket: str, key: str, data: bytes) -> None:
    s3.client().put_object(Bucket=bucket, Key=key, Body=data)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def serving(s3: S3Server, model: Path, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", "--model", str(model), "--no-track", "--device", "cpu",
                           *args], cwd=cwd, env={**(env or s3.env()), **QUIET, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)


def options(model: Path) -> tuple[str, ...]:
    return ("--model", str(model), "--no-track", "--device", "cpu")


def one_error(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr
    return lines[0]


def three_inputs(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    """An IDX file, a .npy and an image folder with labels.csv, under inbox/."""
    write_idx(tmp_path / "b.idx", digits(30, seed=2))
    put(s3, bucket, "inbox/b-images-idx3-ubyte", (tmp_path / "b.idx").read_bytes())
    put(s3, bucket, "inbox/a.npy", npy_bytes(digits(20, seed=1)))
    for i, a in enumerate(digits(4, seed=3)):
        put(s3, bucket, f"inbox/scans/{i}.png", png_bytes(a))
    put(s3, bucket, "inbox/scans/labels.csv", b"file,label\n0.png,1\n1.png,2\n2.png,3\n3.png,4\n")
    put(s3, bucket, "inbox/.c.npy.part", b"an upload in progress")


def test_inbox_in_a_bucket_scored_once_then_only_what_is_new_or_replaced(s3: S3Server, model: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """The command scores every kind of input once; a rerun downloads no object already scored (only
    the folder, whose objects carry no single version: it is read every time), and scores a new
    object and one replaced under the same name and size, one download each into a spool that holds
    one input at a time."""
    from common import storage
    from serving.inbox import run_inbox
    from serving.job import JobConfig

    bucket = s3.bucket()
    three_inputs(s3, bucket, tmp_path)
    inbox, out = f"s3://{bucket}/inbox", f"s3://{bucket}/scored"
    r = serving(s3, model, "--inbox", inbox + "/", "--output", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    names = ("a.npy", "b-images-idx3-ubyte", "scans")
    assert sorted(x["input"] for x in s["scored"]) == [f"{inbox}/{n}" for n in names]
    assert {Path(x["input"]).name: x["records"] for x in s["scored"]} == {"a.npy": 20, "b-images-idx3-ubyte": 30,
                                                                         "scans": 4}
    keys = s3.keys(bucket, "scored/")
    outputs = [k for k in keys if k.endswith(".parquet")]
    assert len(outputs) == 3 and not [k for k in keys if k.endswith(".tmp") or "/." in k]
    assert len(s3.records(bucket, "scored")) == 3
    scans = next(k for k in outputs if k.startswith("scored/scans."))
    table = pq.read_table(io.BytesIO(s3.client().get_object(Bucket=bucket, Key=scans)["Body"].read()))
    assert table.column("id").to_pylist() == ["0.png", "1.png", "2.png", "3.png"]
    assert table.column("label").to_pylist() == [1, 2, 3, 4]
    manifest = json.loads(s3.client().get_object(Bucket=bucket, Key=scans + ".manifest.json")["Body"].read())
    assert manifest["input"]["path"] == f"{inbox}/scans"
    assert manifest["output"]["path"] == f"s3://{bucket}/{scans}"

    job = JobConfig(input=inbox, output=out, model=str(model), track=False, device="cpu")
    fetched: list[str] = []
    fetch = storage.fetch

    def spied(url: str, dest: Path) -> Path:
        assert list(dest.parent.iterdir()) == [], "the spool holds one input at a time"
        fetched.append(url)
        return fetch(url, dest)

    monkeypatch.setattr(storage, "fetch", spied)
    again = run_inbox(inbox, out, job)
    assert again.scored == [] and len(again.already) == 3 and fetched == [f"{inbox}/scans"]
    fetched.clear()

    put(s3, bucket, "inbox/a.npy", npy_bytes(digits(20, seed=3)))  # replaced: same name and size
    put(s3, bucket, "inbox/c.npy", npy_bytes(digits(5, seed=9)))  # new
    third = run_inbox(inbox, out, job)
    assert sorted(str(x.input_path) for x in third.scored) == [f"{inbox}/a.npy", f"{inbox}/c.npy"]
    assert sorted(fetched) == [f"{inbox}/a.npy", f"{inbox}/c.npy", f"{inbox}/scans"]
    assert len(s3.records(bucket, "scored")) == 5
    ledger_format = s3.client().get_object(Bucket=bucket, Key="scored/ledger/FORMAT")["Body"].read()
    assert json.loads(ledger_format) == {"digest": "blake3"}

    # a ledger begun before BLAKE3 (SHA-256 keys, no FORMAT) keeps SHA-256 in a bucket too
    put(s3, bucket, "legacy/ledger/FORMAT", b'{"digest": "sha256"}')
    assert len(run_inbox(inbox, f"s3://{bucket}/legacy", job).scored) == 4
    s3.client().delete_object(Bucket=bucket, Key="legacy/ledger/FORMAT")  # as the version before left it
    assert run_inbox(inbox, f"s3://{bucket}/legacy", job).scored == []
    ledger_format = s3.client().get_object(Bucket=bucket, Key="legacy/ledger/FORMAT")["Body"].read()
    assert json.loads(ledger_format) == {"digest": "sha256"}


def test_one_job_from_and_to_the_bucket(s3: S3Server, model: Path, tmp_path: Path, capfd) -> None:
    bucket = s3.bucket()
    put(s3, bucket, "data/x.npy", npy_bytes(digits(50, seed=4)))
    put(s3, bucket, "data/y.npy", npy_bytes(np.arange(50) % 10))
    out = f"s3://{bucket}/results/p.csv"
    r = serving(s3, model, "--input", f"s3://{bucket}/data/x.npy", "--labels", f"s3://{bucket}/data/y.npy",
                "--output", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output"] == out
    assert s3.keys(bucket, "results/") == ["results/p.csv", "results/p.csv.manifest.json"]
    body = s3.client().get_object(Bucket=bucket, Key="results/p.csv")["Body"].read().decode()
    assert len(body.splitlines()) == 51 and body.startswith('"id","prediction","probability","label","correct"')
    manifest = json.loads(s3.client().get_object(Bucket=bucket, Key="results/p.csv.manifest.json")["Body"].read())
    assert manifest["labels"]["path"] == f"s3://{bucket}/data/y.npy" and manifest["counts"]["predicted"] == 50
    # never clobber: an existing output only with --overwrite
    again = serving_main(capfd, "--input", f"s3://{bucket}/data/x.npy", "--output", out, *options(model))
    assert again.returncode == 1 and one_error(again).endswith(f"{out}: already exists; pass --overwrite to replace it")
    assert s3.client().get_object(Bucket=bucket, Key="results/p.csv")["Body"].read().decode() == body


def test_bad_stores_are_one_line_naming_the_url(s3: S3Server, model: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    bucket = s3.bucket()
    put(s3, bucket, "x.npy", npy_bytes(digits(5)))
    good_in = f"s3://{bucket}/x.npy"
    no_creds = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    closed = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens on port 9 (discard)
    cases = [
        (("--input", "s3://no-such-bucket-x1/x.npy", "--output", "o1.parquet"), None,
         "s3://no-such-bucket-x1/x.npy: listing the bucket failed: not found"),
        (("--input", f"s3://{bucket}/nope.npy", "--output", "o2.parquet"), None,
         f"s3://{bucket}/nope.npy: no such file or folder"),
        (("--inbox", "s3://no-such-bucket-x2/in", "--output", "out3"), None,
         "s3://no-such-bucket-x2/in: listing the bucket failed: not found"),
        (("--input", good_in, "--output", "s3://no-such-bucket-x3/o.parquet"), None,
         "s3://no-such-bucket-x3/o.parquet: listing the bucket failed: not found"),
        (("--input", good_in, "--output", "o5.parquet"), no_creds,
         f"{good_in}: listing the bucket failed: no credentials"),
        (("--input", good_in, "--output", "o6.parquet"), closed,
         f"{good_in}: listing the bucket failed: the store is unreachable (AWS_ENDPOINT_URL=http://127.0.0.1:9)"),
        (("--input", "s3://AKIDEXAMPLE:wJalrXUtnFEMI@no-such-bucket-x4/x.npy", "--output", "o7.parquet"), None,
         "s3://no-such-bucket-x4/x.npy: listing the bucket failed"),
    ]
    monkeypatch.chdir(tmp_path)
    for args, env, expected in cases:
        r = serving_main(capfd, *args, *options(model), env=env)
        assert r.returncode == 1, (args, r.stderr)
        line = one_error(r)
        assert expected in line, (args, line)
        assert "wJalrXUtnFEMI" not in r.stderr + r.stdout
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))
    assert s3.keys(bucket) == ["x.npy"]


def test_an_object_deleted_between_listing_and_reading(s3: S3Server, tmp_path: Path) -> None:
    from common import storage

    bucket = s3.bucket()
    put(s3, bucket, "inbox/gone.npy", npy_bytes(digits(2)))
    listed = [e["name"] for e in storage.listing(f"s3://{bucket}/inbox")]
    assert listed == ["gone.npy"]
    s3.client().delete_object(Bucket=bucket, Key="inbox/gone.npy")
    with pytest.raises(storage.StoreError, match=rf"^s3://{bucket}/inbox/gone\.npy: reading failed: not found"):
        storage.fetch(f"s3://{bucket}/inbox/gone.npy", tmp_path / "gone.npy")
    assert not (tmp_path / "gone.npy").exists()


def test_an_upload_lands_whole_or_not_at_all(s3: S3Server, tmp_path: Path) -> None:
    """A 12 MiB upload leaves only its destination (no temporary key, no open multipart upload); one
    that fails is one line naming the destination."""
    from common import storage

    bucket = s3.bucket()
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes())
    storage.upload(big, f"s3://{bucket}/out/big.bin")
    assert s3.keys(bucket) == ["out/big.bin"] and s3.uploads(bucket) == []
    with pytest.raises(storage.StoreError, match=r"^s3://no-such-bucket-x5/out/big\.bin: writing failed: not found"):
        storage.upload(big, "s3://no-such-bucket-x5/out/big.bin")


def test_the_ledger_lease_is_taken_over_only_when_expired(s3: S3Server, model: Path, tmp_path: Path) -> None:
    """A claim of a live worker elsewhere keeps an input busy; once its lease has expired (its worker
    killed) the next worker takes it over and records it once."""
    from serving.inbox import Lease, run_inbox
    from serving.job import JobConfig
    from serving.readers import content_digest

    bucket = s3.bucket()
    put(s3, bucket, "inbox/a.npy", npy_bytes(digits(7, seed=5)))
    (tmp_path / "a.npy").write_bytes(npy_bytes(digits(7, seed=5)))
    digest = content_digest(tmp_path / "a.npy")
    elsewhere = {"host": "another-machine", "pid": "1", "token": "t"}
    ledger = f"s3://{bucket}/out/ledger"
    held = Lease(ledger, digest, 3600.0, elsewhere)
    assert held._create(0, 4e9)  # a live lease, far in the future
    cfg = JobConfig(input=tmp_path, output=tmp_path, model=str(model), track=False, device="cpu")
    r = run_inbox(f"s3://{bucket}/inbox", f"s3://{bucket}/out", cfg)
    assert r.scored == [] and r.busy == ["a.npy"]
    assert held._create(1, 1.0)  # the same worker's next generation, expired long ago: it died
    r = run_inbox(f"s3://{bucket}/inbox", f"s3://{bucket}/out", cfg)
    assert [Path(str(x.input_path)).name for x in r.scored] == ["a.npy"]
    claims = [k.rsplit("/", 1)[1] for k in s3.keys(bucket, "out/ledger/") if ".claim-" in k]
    assert claims == [f"{digest}.claim-00000{k}" for k in range(4)]  # 2 taken over, 3 released
    assert not held._create(2, 4e9)  # a generation that exists can never be created twice
