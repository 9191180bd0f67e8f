"""What ties a Prefect flow run and its MLflow runs together, as their users look for it:

- `mlflow_context_tags`: the MLflow run's "Source" (the command, or the Prefect deployment as a JOB)
  and the Prefect flow run it came from (id, and its UI address when there is a UI).
- `link_mlflow_run`: a link artifact on the Prefect flow run that opens the MLflow run.
- `forward_worker_logs`: the DDP workers' output (child processes) into the task run's logs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
from pathlib import Path

from common.experiments import run_context_tags

PREFECT_FLOW_RUN_ID_TAG = "prefect.flow_run_id"
PREFECT_FLOW_RUN_URL_TAG = "prefect.flow_run_url"


def _command() -> str | None:
    """`mnistops <command>` when this process is the `mnistops` command line."""
    argv = sys.argv
    exe = Path(argv[0]).name if argv else ""
    if exe == "mnistops" or argv[0].endswith(("flows/cli.py", "flows.cli")):
        words = [a for a in argv[1:] if not a.startswith("-")]
        return f"mnistops {words[0]}" if words else "mnistops"
    return None


def prefect_flow_run() -> tuple[str | None, str | None, str | None, str | None]:
    """(flow run id, its UI address or None, flow name, deployment name or None) of the current flow
    run; all None outside one."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None, None, None, None
    from prefect.settings import PREFECT_UI_URL

    run = ctx.flow_run
    ui = PREFECT_UI_URL.value()
    url = f"{ui.rstrip('/')}/runs/flow-run/{run.id}" if ui else None
    deployment = None
    if run.deployment_id is not None:
        from prefect.runtime import deployment as rt_deployment

        deployment = rt_deployment.name
    return str(run.id), url, ctx.flow.name if ctx.flow else None, deployment


def mlflow_context_tags(default_source: str) -> dict[str, str]:
    """Standard MLflow context tags plus the Prefect flow run. Source: `flow/deployment` with type JOB
    for a deployment's run (a schedule or a worker started it), else the command, else the flow."""
    run_id, url, flow_name, deployment = prefect_flow_run()
    if deployment:
        tags = run_context_tags(f"{flow_name}/{deployment}", "JOB")
    else:
        tags = run_context_tags(_command() or flow_name or default_source, "LOCAL")
    if run_id:
        tags[PREFECT_FLOW_RUN_ID_TAG] = run_id
    if url:
        tags[PREFECT_FLOW_RUN_URL_TAG] = url
    return tags


def prefect_note() -> str:
    """A sentence for an MLflow run's description that links back to the Prefect flow run."""
    run_id, url, flow_name, deployment = prefect_flow_run()
    if run_id is None:
        return ""
    what = f"{flow_name}/{deployment}" if deployment else flow_name
    return f"Prefect flow run: [{what} {run_id}]({url})." if url else f"Prefect flow run: {what} `{run_id}`."


def link_mlflow_run(url: str | None, key: str, text: str) -> None:
    """A link artifact on the current Prefect run that opens the MLflow run (Artifacts tab)."""
    if not url:
        return
    from prefect.artifacts import create_link_artifact

    create_link_artifact(link=url, link_text=text, key=key, description=text)


def _rank_of(path: Path) -> str:
    # <log_dir>/<run>/attempt_<n>/<local rank>/stdout.log
    return f"rank {path.parent.name}" + (f" ({path.parent.parent.name})" if path.parent.parent.name != "attempt_0" else "")


def _level(path: Path, text: str) -> int:
    """stderr carries Python's log lines as well as errors: only what says it is one is a warning."""
    if path.name == "stderr.log" and any(w in text for w in ("Traceback", "Error", "ERROR", "WARNING", "Warning")):
        return logging.WARNING
    return logging.INFO


@contextlib.contextmanager
def forward_worker_logs(log_dir: Path, logger: logging.Logger | logging.LoggerAdapter, poll: float = 0.25):
    """Follow every worker's stdout/stderr file under `log_dir` (torch's per-rank files, restarts
    included) and log each complete line: at INFO, warnings and errors at WARNING. Everything written is
    forwarded, also after the workers end (the last read runs when the block exits)."""
    stop = threading.Event()
    offsets: dict[Path, int] = {}
    partial: dict[Path, bytes] = {}

    def drain() -> None:
        for path in sorted(log_dir.glob("*/attempt_*/*/std*.log")):
            try:
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            offsets[path] = offsets.get(path, 0) + len(data)
            *lines, rest = (partial.pop(path, b"") + data).split(b"\n")
            if rest:
                partial[path] = rest
            for line in lines:
                text = line.decode(errors="replace").rstrip()
                if text:
                    logger.log(_level(path, text), "[%s] %s", _rank_of(path), text)

    def follow() -> None:
        while not stop.wait(poll):
            drain()

    # In this context's copy: the follower logs through Prefect's run logger, whose client must see
    # the same settings (the configured API) as the task run; a bare thread starts with none of them.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(follow,), name="worker-logs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drain()
        for path, rest in partial.items():  # a last line without its newline
            logger.info("[%s] %s", _rank_of(path), rest.decode(errors="replace").rstrip())
