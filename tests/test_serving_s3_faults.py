"""Two store faults of the batch job, against real loopback servers (issue 23, "Bad input and faults"):
access denied, on a moto server that enforces IAM; and the S3 endpoint killed in the middle of a
multipart upload, through a TCP proxy process that is SIGKILLed. Each: one line naming the URL,
exit 1, nothing at the destination, and a ledger from which a rerun scores the input exactly once.
The job killed mid-upload and the first refusal are real processes (`mnistops infer`, `python -m
serving`); the other runs of the command line, each with a user's keys, run its main in this
process (tests/serving_main.py): one error line and exit code each, as a process reports them."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest

from serving_main import serving_main
from s3_server import CREDENTIALS, S3Server, s3, start_server, stop_server  # noqa: F401 (the fixture)
from serving_fixtures import digits, save_model

REPO = Path(__file__).resolve().parents[1]
QUIET = {"ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
REGION = CREDENTIALS["AWS_DEFAULT_REGION"]
# One try per request: botocore's retries of a refused connection only make the dead endpoint's
# failure slower (~25 s instead of <1 s), not different.
ONE_TRY = {"AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    save_model(path)
    return path


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def one_error(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr
    return lines[0]


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env={**env, **QUIET, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)


def serving(model: Path, *args: str) -> list[str]:
    """The arguments of `python -m serving` (its main's are those after the third)."""
    return [sys.executable, "-m", "serving", "--model", str(model), "--no-track", "--device", "cpu", *args]


def ledger(client, bucket: str) -> dict[str, str]:
    """The ledger's records and claims under scored/ledger/ (not its digests/ index nor its FORMAT):
    name -> content."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="scored/ledger/")
    return {o["Key"].rsplit("/", 1)[1]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode()
            for page in pages for o in page.get("Contents", [])
            if "/digests/" not in o["Key"] and not o["Key"].endswith("/FORMAT")}


# --- access denied ---------------------------------------------------------------------------------


class IamS3:
    """A moto server that checks every request's signature and IAM policies (moto's
    INITIAL_NO_AUTH_ACTION_COUNT, set to 0 through /moto-api/reset-auth once an administrator
    exists): the keys of a user without the rights get S3's own AccessDenied."""

    def __init__(self, server: S3Server, admin: tuple[str, str]):
        self.server, self.endpoint, self.admin = server, server.endpoint, admin

    def client(self, service: str = "s3"):
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.admin[0], aws_secret_access_key=self.admin[1])

    def user(self, statements: list[dict]) -> dict[str, str]:
        """A new IAM user with these policy statements: the environment of a process using its keys."""
        iam, name = self.client("iam"), f"u-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        if statements:
            iam.put_user_policy(UserName=name, PolicyName="p",
                                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return self.server.env(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])


@pytest.fixture(scope="module")
def iam_s3() -> Iterator[IamS3]:
    server = start_server()  # its own: enforcing IAM is a setting of the whole server
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name=REGION,
                           aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        # from here on every request is authenticated and authorised (text/plain: Flask must not parse it as a form)
        urllib.request.urlopen(urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth", data=b"0",
                                                      headers={"Content-Type": "text/plain"}), timeout=10).close()
        yield IamS3(server, (key["AccessKeyId"], key["SecretAccessKey"]))
    finally:
        stop_server(server.process)


def test_access_denied_is_one_line_and_a_rerun_with_rights_scores_the_input(iam_s3: IamS3, model: Path, tmp_path: Path,
                                                                             capfd, monkeypatch) -> None:
    s3c = iam_s3.client()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3c.create_bucket(Bucket=bucket)
    s3c.put_object(Bucket=bucket, Key="inbox/a.npy", Body=npy_bytes(digits(6, seed=7)))
    arn = f"arn:aws:s3:::{bucket}"
    read = {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": [arn, f"{arn}/*"]}
    # reads everything and may keep the ledger, but may not write outputs: denied at the upload
    reader = iam_s3.user([read, {"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
                                 "Resource": f"{arn}/scored/ledger/*"}])
    inbox = ("--inbox", f"s3://{bucket}/inbox", "--output", f"s3://{bucket}/scored")

    # one job: scored, then refused at its destination
    out = f"s3://{bucket}/scored/x.parquet"
    r = run([str(Path(sys.executable).parent / "mnistops"), "infer", "--input", f"s3://{bucket}/inbox/a.npy",
             "--output", out, "--model", str(model), "--no-track", "--device", "cpu"], reader, tmp_path)
    assert r.returncode == 1, r.stderr
    assert one_error(r).endswith(f"{out}: writing failed: access denied")
    assert [o["Key"] for o in s3c.list_objects_v2(Bucket=bucket).get("Contents", [])] == ["inbox/a.npy"]

    # the inbox: the lease is taken and released, the output refused, no record
    monkeypatch.chdir(tmp_path)
    r = serving_main(capfd, *serving(model, *inbox)[3:], env=reader)
    assert r.returncode == 1, r.stderr
    line = one_error(r)
    assert f"s3://{bucket}/scored/a.npy." in line and line.endswith(".parquet: writing failed: access denied"), line
    after_denied = ledger(s3c, bucket)
    claims = sorted(after_denied)
    assert len(claims) == 2 and all(".claim-00000" in c for c in claims), claims  # taken, released
    assert json.loads(after_denied[claims[1]])["expires"] == 0.0  # released: free for the next worker at once
    assert not [o["Key"] for o in s3c.list_objects_v2(Bucket=bucket, Prefix="scored/").get("Contents", [])
                if "/ledger/" not in o["Key"]]
    assert s3c.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    # no rights at all: refused before anything is read or claimed
    r = serving_main(capfd, *serving(model, *inbox)[3:], env=iam_s3.user([]))
    assert r.returncode == 1, r.stderr
    assert one_error(r).endswith(f"s3://{bucket}/inbox: listing the bucket failed: access denied")
    assert ledger(s3c, bucket) == after_denied

    # a key the store does not know: its reason is in the line
    r = serving_main(capfd, *serving(model, *inbox)[3:], env=iam_s3.server.env(
        AWS_ACCESS_KEY_ID="AKIAUNKNOWNKEY000000", AWS_SECRET_ACCESS_KEY="wrong-secret-key-x9"))
    assert r.returncode == 1, r.stderr
    assert one_error(r).endswith("listing the bucket failed: access denied (The AWS Access Key Id you provided "
                                 "does not exist in our records.)")
    assert "wrong-secret-key-x9" not in r.stderr + r.stdout

    # the same inbox with the rights to write: scored once, one record
    writer = iam_s3.user([{"Effect": "Allow", "Action": "s3:*", "Resource": [arn, f"{arn}/*"]}])
    r = serving_main(capfd, *serving(model, *inbox)[3:], env=writer)
    assert r.returncode == 0, r.stderr
    assert [Path(x["input"]).name for x in json.loads(r.stdout)["scored"]] == ["a.npy"]
    records = [json.loads(v) for k, v in ledger(s3c, bucket).items() if k.endswith(".json")]
    assert [(x["input"], x["status"], len(x["history"])) for x in records] == [("a.npy", "scored", 1)]
    keys = [o["Key"] for o in s3c.list_objects_v2(Bucket=bucket, Prefix="scored/").get("Contents", [])
            if "/ledger/" not in o["Key"]]
    assert len(keys) == 2 and keys[0].endswith(".parquet") and keys[1].endswith(".parquet.manifest.json")


# --- the endpoint killed mid-upload ----------------------------------------------------------------

# Outputs of 2 x 8 MiB or more go up in 8 MiB parts (common.storage.upload); a CSV row with the ten
# probabilities is ~135 bytes, so 140,000 images make ~18 MiB: three parts.
BIG = 140_000


def test_the_endpoint_killed_mid_upload_leaves_nothing_and_a_rerun_scores_once(s3: S3Server, model: Path,
                                                                              tmp_path: Path, capfd) -> None:
    bucket = s3.bucket()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    np.save(inbox / "big.npy", np.zeros((BIG, 28, 28), np.uint8))
    args = serving(model, "--inbox", str(inbox), "--output", f"s3://{bucket}/scored", "--format", "csv",
                   "--all-probabilities")
    proxy = subprocess.Popen([sys.executable, str(REPO / "tests" / "tcp_proxy.py"), s3.endpoint.rsplit(":", 1)[1],
                              "--stall-on", "partNumber="], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{proxy.stdout.readline().split()[1]}"
        job = subprocess.Popen(args, cwd=tmp_path, env={**s3.env(AWS_ENDPOINT_URL=endpoint), **ONE_TRY, **QUIET,
                                                        "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while not select.select([proxy.stdout], [], [], 1.0)[0]:  # until an UploadPart request is half sent
                assert job.poll() is None, f"the job ended before any multipart upload: {job.communicate()}"
            assert proxy.stdout.readline().strip() == "stalled"
            os.kill(proxy.pid, signal.SIGKILL)  # the endpoint dies: connections cut, the port refuses
            stdout, stderr = job.communicate(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    finally:
        if proxy.poll() is None:
            proxy.kill()
        proxy.wait()
    r = subprocess.CompletedProcess(args, job.returncode, stdout, stderr)
    assert r.returncode == 1, r.stderr
    line = one_error(r)
    assert line.endswith(f".csv: writing failed: the store is unreachable (AWS_ENDPOINT_URL={endpoint})"), line
    assert f"s3://{bucket}/scored/big.npy." in line

    c = s3.client()  # moto directly
    output = line.split(": writing failed")[0].split(" ")[-1][len(f"s3://{bucket}/"):]
    assert [k for k in s3.keys(bucket) if "/ledger/" not in k] == []  # nothing at the destination, no temporary key
    # the abort could not reach a dead endpoint: the upload stays open until the next upload of the destination
    tmp_name = f"scored/.{output.rsplit('/', 1)[1]}."
    assert [u.startswith(tmp_name) and u.endswith(".tmp") for u in s3.uploads(bucket)] == [True]
    assert not [k for k in ledger(c, bucket) if k.endswith(".json")]  # no record: not scored

    # the endpoint back (the store itself): the input is taken over (its worker is gone) and scored once
    again = serving_main(capfd, *args[3:], env=ONE_TRY)
    assert again.returncode == 0, again.stderr
    assert [(Path(x["input"]).name, x["records"]) for x in json.loads(again.stdout)["scored"]] == [("big.npy", BIG)]
    assert [k for k in s3.keys(bucket) if "/ledger/" not in k] == [output, output + ".manifest.json"]
    assert s3.uploads(bucket) == []  # the failed upload aborted
    head = c.get_object(Bucket=bucket, Key=output, Range="bytes=0-200")["Body"].read().decode()
    assert head.startswith('"id","prediction","probability","prob_0"')
    assert c.head_object(Bucket=bucket, Key=output)["ContentLength"] > 16 << 20  # it was a multipart upload
    records = [json.loads(v) for k, v in ledger(c, bucket).items() if k.endswith(".json")]
    assert [(x["input"], x["status"], len(x["history"])) for x in records] == [("big.npy", "scored", 1)]
    shutil.rmtree(inbox)  # 110 MB
