"""A loopback S3 server for tests: moto's server mode (`moto_server`, the emulator s3fs's own CI uses),
a real HTTP endpoint on 127.0.0.1 spoken to exactly as S3 is, through the standard settings
(AWS_ENDPOINT_URL and the AWS credential variables). No request is mocked in-process.

Import the fixture into a test module: `from s3_server import s3  # noqa: F401`."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.settings import environ_restored

# The test keys moto accepts (any pair does); a test that needs "no credentials" drops them.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
               "AWS_DEFAULT_REGION": "us-east-1"}
ISOLATED = {  # nothing from the machine's own AWS set-up: no profile files, no instance metadata
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials", "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that uses this server through the standard chain."""
        return {**os.environ, **ISOLATED, **CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, **extra}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def bucket(self) -> str:
        """A new, empty bucket of this test's own."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def records(self, bucket: str, out: str) -> list[str]:
        """The keys of the inbox ledger's records under the output prefix `out` (one per input content)."""
        prefix = f"{out}/ledger/"
        return [k for k in self.keys(bucket, prefix) if re.fullmatch(r"[0-9a-f]{64}\.json", k[len(prefix):])]

    def uploads(self, bucket: str) -> list[str]:
        """Multipart uploads begun and neither completed nor aborted."""
        return [u["Key"] for u in self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def start_server(env: dict[str, str] | None = None, timeout: float = 60.0) -> S3Server:
    """`moto_server` on a free loopback port, once it answers HTTP."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not installed: pip install 'moto[server]' (the test extra)")
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return S3Server(endpoint, proc)
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_server(proc)
                log.seek(0)
                raise RuntimeError(f"moto_server did not start: {log.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One loopback S3 server for the session; this process's environment points at it too (for
    fsspec and boto3 calls made by the tests themselves), and is restored afterwards."""
    server = start_server()
    try:
        with environ_restored((*CREDENTIALS, *ISOLATED, "AWS_ENDPOINT_URL")):
            os.environ.update({**ISOLATED, **CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint})
            yield server
    finally:
        stop_server(server.process)


def _stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the server's process group (its uvicorn workers too), SIGKILL what is left after
    `grace`, and reap the leader."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            proc.poll()  # reap the leader so that the group can empty
            time.sleep(0.1)
        else:
            continue
        break
    proc.wait(timeout=grace)


@contextmanager
def mlflow_server_on_s3(server: S3Server, destination: str, backend_uri: str, log: Path,
                        timeout: float = 180) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 keeping its artifacts at `destination` (s3://BUCKET/PREFIX) on the
    loopback S3 server, proxied (`--serve-artifacts`): clients upload and download through the
    tracking server and need no S3 credentials, as in infra/compose.yaml. Yields its URL."""
    port = _free_port()
    env = {**server.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # job runners: unused extra processes
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [exe, "server", "--backend-store-uri", backend_uri, "--artifacts-destination", destination,
           "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # one group: one killpg reaches its workers
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        _stop_group(proc)
