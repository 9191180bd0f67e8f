"""Whether the servers a command talks to answer, asked once when it starts, so that a server that
cannot be reached is reported as such, naming the setting that points at it, within seconds.

Without this, MLflow's client retries a refused connection 7 times with a backoff factor of 2
(~250 s) and the caller then sees an MlflowException like any other: `infer` reported "not found in
the model registry" after four minutes. The check here waits out a short blip (a server restarting)
and then fails in one line; `bound_mlflow_retries` shortens MLflow's own retries for what happens
later in the command (a server gone mid-run) to ~15 s, unless the user set them.

Standard library only (torch-, prefect- and mlflow-free): `python -m serving` uses it too.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from common import settings
from common.errors import ServingError
from common.storage import redact_url

WAIT_S = 10.0  # how long a server that does not answer is waited for: a restart, not an outage
CONNECT_TIMEOUT_S = 3.0
# MLflow's own request settings (mlflow/environment_variables.py), as this project's defaults: 4
# retries with backoff factor 1 wait 1+2+4+8 s (plus up to 1 s of jitter each) instead of 7 retries
# with factor 2 (~250 s); a request that hangs is given up after 30 s instead of 120. An explicit
# setting wins.
MLFLOW_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class ServerUnreachable(ServingError, ConnectionError):
    """A configured server did not answer: the message names the setting and the address (without
    credentials). Exit code 1, like any other error."""


def bound_mlflow_retries() -> None:
    for key, value in MLFLOW_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _why(e: BaseException) -> str:
    reason = getattr(e, "reason", e)
    text = getattr(reason, "strerror", None) or str(reason)
    return text.lower() if text else type(e).__name__


def tls_context(insecure_env: str, ca_env: str):
    """The TLS the client itself will use, from its own settings (MLflow's MLFLOW_TRACKING_INSECURE_TLS
    and MLFLOW_TRACKING_SERVER_CERT_PATH, Prefect's PREFECT_API_TLS_INSECURE_SKIP_VERIFY and
    PREFECT_API_SSL_CERT_FILE): a server it trusts is not reported as unreachable."""
    import ssl

    context = ssl.create_default_context(cafile=settings.env(ca_env) or None)
    if (settings.env(insecure_env) or "").lower() in ("1", "true", "yes"):  # what the user asked the client to do
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _answers(url: str, timeout: float, context=None) -> str | None:
    """None when something answers HTTP at `url`; else why not. Any answer below 500 counts, a 401
    or a 404 too: the server is there, and the command's own requests decide the rest."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context if url.startswith("https") else None):
            return None
    except urllib.error.HTTPError as e:
        return None if e.code < 500 else f"it answers HTTP {e.code}"
    except (OSError, ValueError) as e:  # refused, timed out, unknown host, a malformed address
        return _why(e)


def check_reachable(url: str, setting: str, what: str, health: str = "health", wait_s: float = WAIT_S,
                    context=None) -> None:
    """Raise ServerUnreachable unless the server at `url` answers within `wait_s` (asked again
    after 0.5, 1, 2, 4 s: a blip is waited out)."""
    shown = redact_url(url)
    probe = f"{shown.rstrip('/')}/{health}"  # any answer counts, so no credentials are sent
    start = time.monotonic()
    deadline, delay, tries = start + wait_s, 0.5, 0
    while True:
        left = deadline - time.monotonic()
        why, tries = _answers(probe, max(0.5, min(CONNECT_TIMEOUT_S, left)), context), tries + 1
        if why is None:
            return
        if time.monotonic() + delay > deadline:
            raise ServerUnreachable(f"{setting}={shown}: {what} cannot be reached ({why}; asked {tries} times "
                                    f"in {time.monotonic() - start:.0f} s)")
        time.sleep(delay)
        delay = min(2 * delay, 4.0)


def tracking_server() -> str | None:
    """MLFLOW_TRACKING_URI when it names an HTTP server (a database or a folder needs no check)."""
    uri = settings.env("MLFLOW_TRACKING_URI", "")
    return uri if uri.startswith(("http://", "https://")) else None


def check_mlflow(wait_s: float = WAIT_S) -> None:
    """For a command about to use MLflow: its retries bounded, and an HTTP tracking server that does
    not answer reported now (ServerUnreachable) rather than after minutes of retries."""
    bound_mlflow_retries()
    uri = tracking_server()
    if uri is not None:
        check_reachable(uri, "MLFLOW_TRACKING_URI", "the MLflow tracking server", wait_s=wait_s,
                        context=tls_context("MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH"))
