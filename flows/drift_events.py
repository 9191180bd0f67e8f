"""A drift alert as a Prefect event, and the trigger that retrains after K of them in a window.

    batch job -> drift alert -> event `mnistops.drift.alert` (resource: the model version)
      -> the training deployment's trigger: K such events of the model within W seconds
      -> a run of the training deployment (the retraining, with its default parameters)

The event is emitted by the batch-inference flow, once per alerting batch, where a Prefect API is
configured (PREFECT_API_URL, or the command's own temporary API): there it reaches the server that
evaluates the trigger. With none configured, emitting is a no-op: Prefect's emit_event would
otherwise start its ephemeral API just to send one event that nobody listens to.

The trigger is Prefect's own deployment trigger (an automation owned by the deployment, evaluated by
the server's reactive-triggers service), declared where the deployment is: `mnistops serve`
(flows/deployments.py) and infra/prefect.yaml's `triggers:` (whose K and window come from the build
step, from the same settings). Nothing here polls or schedules.

Prefect-free at import: RetrainTrigger is a command-line config, parsed before Prefect loads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from common.fields import add_arguments, check, from_args, setting

ALERT_EVENT = "mnistops.drift.alert"
MODEL_LABEL, VERSION_LABEL = "mnistops.model.name", "mnistops.model.version"


def resource(model: str, version: str) -> dict[str, str]:
    """The model version as a Prefect resource: its id, a display name, and labels to match on."""
    return {"prefect.resource.id": f"mnistops.model.{model}.v{version}",
            "prefect.resource.name": f"{model} version {version}",
            MODEL_LABEL: model, VERSION_LABEL: str(version)}


def payload(result) -> dict[str, Any]:
    """The figures of an alerting batch (serving.job.JobResult), as the monitoring record keeps them."""
    stats = result.drift.statistics
    return {"input": str(result.input_path or ""), "records": result.predicted,
            "exceed_fraction": stats.get("exceed_fraction"), "class_tv": stats.get("class_tv"),
            "mean_confidence": result.mean_confidence, "accuracy": result.accuracy,
            "status": result.drift.status, "reason": result.drift.reason,
            "mlflow_run_id": result.mlflow_run_id, "monitor_run_id": result.monitor_run_id}


def api_configured() -> bool:
    """Whether this process talks to a Prefect API of its own choosing (a server, or the command's
    temporary API), rather than Prefect's ephemeral default that emit_event would start."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is not None


def emit_alert(result):
    """The event of an alerting batch of a registered version; None when none was sent (no Prefect
    API configured, or a local model file: there is no version to retrain)."""
    if not (result.drift.alert and result.model.name and result.model.version) or not api_configured():
        return None
    from prefect.events import emit_event

    return emit_event(ALERT_EVENT, resource=resource(result.model.name, result.model.version),
                      payload=payload(result))


@dataclass(frozen=True)
class RetrainTrigger:
    """When drift alerts run the retraining (the training deployment), besides its schedule."""

    # 3 in 3 hours: three hourly scheduled runs in a row that alert, or three alerting inputs of one
    # inbox run; a single odd batch (the alarm's false-alarm rate is at most 0.2%) retrains nothing.
    retrain_alerts: int = setting(3, "drift alerts of the model's versions that run the training deployment "
                                     "at once (K; 0: drift never triggers a retraining)", ge=0, metavar="K")
    retrain_window: int = setting(3 * 3600, "the window the K alerts must fall in, in seconds", ge=1,
                                  metavar="SECONDS")

    def __post_init__(self):
        check(self)


def from_environment() -> RetrainTrigger:
    """The settings as MNISTOPS_RETRAIN_ALERTS / MNISTOPS_RETRAIN_WINDOW (or the defaults) give them:
    what infra/prefect.yaml's build step deploys. Parsed like the options (a bad value names the
    variable)."""
    parser = argparse.ArgumentParser(prog="mnistops", add_help=False)
    add_arguments(parser, RetrainTrigger)
    return from_args(RetrainTrigger, parser.parse_args([]))


def trigger_spec(model: str, cfg: RetrainTrigger) -> dict[str, Any]:
    """The trigger as infra/prefect.yaml writes it: Reactive, K events `mnistops.drift.alert` of any
    version of `model` within the window (one model's alerts are counted together: the champion may
    change between them; `for_each` would count each version apart). K = 0 disables it rather than
    leaving it out, so that serving or deploying again replaces an enabled one (Prefect recreates a
    deployment's triggers each time)."""
    return {"name": f"retrain {model} after {cfg.retrain_alerts} drift alert(s) in {cfg.retrain_window} s",
            "enabled": cfg.retrain_alerts > 0, "posture": "Reactive", "expect": [ALERT_EVENT],
            "match": {MODEL_LABEL: model}, "threshold": max(cfg.retrain_alerts, 1), "within": cfg.retrain_window}


def retrain_trigger(model: str, cfg: RetrainTrigger):
    """The training deployment's trigger, as `mnistops serve` declares it."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(**trigger_spec(model, cfg))


def add_options(parser) -> None:
    add_arguments(parser.add_argument_group("retraining on drift (the training deployment's trigger)"),
                  RetrainTrigger)
