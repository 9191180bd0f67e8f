"""Screenshots of the MLflow UI over a store, for people to look at (not a test: nothing is asserted).

Starts `mnistops ui` on a free port of 127.0.0.1 over the store of MNISTOPS_HOME (or MLFLOW_TRACKING_URI),
finds the training experiment, its newest runs and the registered model, and takes headless-Chromium
screenshots of the experiment, a run, its model metrics, the comparison of the newest runs and the
registry pages. Needs Debian's `chromium` package (`apt-get install chromium`).

    MNISTOPS_HOME=.mnistops .venv/bin/python bench/screenshots.py [--out bench/out/screenshots]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"screenshots: `mnistops ui` exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"screenshots: {url} did not answer within {timeout:.0f} s")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("screenshots: no chromium on PATH (apt-get install chromium)")


class Browser:
    """Headless Chromium driven over the DevTools protocol: navigate, wait in real time for the UI to
    fetch its data and draw its charts (a single-page app keeps loading after the first paint, which
    Chromium's one-shot `--screenshot` does not wait for), then capture the page."""

    def __init__(self, executable: str, profile: Path, size: tuple[int, int] = (1600, 1000)):
        self.size = size
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("screenshots: chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as r:
            ws_url = json.loads(r.read())["webSocketDebuggerUrl"]
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 << 20, open_timeout=20)
        self._id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def shoot(self, url: str, path: Path, settle: float = 8.0) -> Path:
        self.call("Page.navigate", url=url)
        time.sleep(settle)  # the UI fetches runs, metrics and artifacts after the first paint
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def pages(base: str) -> dict[str, str]:
    """The pages worth a look, from what the store holds."""
    from mlflow import MlflowClient

    c = MlflowClient()
    exp = c.get_experiment_by_name("mnist-mlp")
    if exp is None:
        raise SystemExit("screenshots: no experiment 'mnist-mlp' in this store: run `mnistops run` first")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`mnistops.kind` = 'training'",
                         order_by=["attributes.start_time DESC"], max_results=20)
    # The newest pipeline runs first (a sweep's trials are nested under its parent, shown separately).
    runs = sorted(runs, key=lambda r: "mlflow.parentRunId" in r.data.tags)[:5]
    sweeps = c.search_runs([exp.experiment_id], filter_string="tags.`mnistops.kind` = 'sweep'",
                           order_by=["attributes.start_time DESC"], max_results=1)
    # MLflow 3.17's UI opens in its GenAI view unless the link asks for the model-training one.
    ml = "workflowType=machine_learning"
    out = {"experiment": f"{base}/#/experiments/{exp.experiment_id}?{ml}"}
    if runs:
        rid = runs[0].info.run_id
        out["run"] = f"{base}/#/experiments/{exp.experiment_id}/runs/{rid}?{ml}"
        out["run-metrics"] = f"{base}/#/experiments/{exp.experiment_id}/runs/{rid}/model-metrics?{ml}"
    if sweeps:
        out["sweep"] = f"{base}/#/experiments/{exp.experiment_id}/runs/{sweeps[0].info.run_id}?{ml}"
    if len(runs) >= 2:
        ids = json.dumps([r.info.run_id for r in runs])
        query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([exp.experiment_id]),
                                        "workflowType": "machine_learning"})
        out["compare"] = f"{base}/#/compare-runs?{query}"
    models = c.search_registered_models(max_results=5)
    if models:
        name = models[0].name
        out["registry"] = f"{base}/#/models/{urllib.parse.quote(name)}?{ml}"
        latest = max(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        out["version"] = f"{base}/#/models/{urllib.parse.quote(name)}/versions/{latest.version}?{ml}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "screenshots", help="folder for the PNGs")
    p.add_argument("--settle", type=float, default=8.0, help="seconds each page gets to load its data")
    a = p.parse_args()
    browser = _chromium()
    a.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    sys.path.insert(0, str(ROOT))
    from flows.settings import configure

    configure()  # the same store `mnistops ui` opens
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=os.getcwd(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    browser_ = None
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(f"{base}/health", ui)
        profile = a.out / ".chromium-profile"
        shutil.rmtree(profile, ignore_errors=True)
        profile.mkdir()
        browser_ = Browser(browser, profile)
        for name, url in pages(base).items():
            path = browser_.shoot(url, a.out / f"mlflow-{name}.png", settle=a.settle)
            print(f"{path}  <- {url}")
    finally:
        if browser_ is not None:
            browser_.close()
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
        shutil.rmtree(a.out / ".chromium-profile", ignore_errors=True)


if __name__ == "__main__":
    main()
