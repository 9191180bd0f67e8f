"""Scheduled deployments of the training pipeline and the batch inference flow; `mnistops serve`
(flows/commands.py) serves them from one process against whatever Prefect API is configured.
Nothing here runs at import."""

from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from flows.inference import batch_inference
from flows.ownership import FLOW_TAGS
from flows.settings import INFERENCE_CRON, TRAINING_CRON  # noqa: F401 (the defaults, re-exported)
from flows.training import training_pipeline

TRAINING_DEPLOYMENT, INFERENCE_DEPLOYMENT = "training-nightly", "inference-hourly"


# One run at a time per deployment, as in infra/prefect.yaml: a training that outlasts its interval
# (or a backlog after downtime) queues instead of starting a second one on the same GPU and files.
CONCURRENCY_LIMIT = 1


def deployments(training_cron: str, inference_cron: str, training_parameters: dict,
                inference_parameters: dict, training_triggers: list | None = None) -> list[RunnerDeployment]:
    """`training_triggers`: what runs the training besides its schedule (the drift trigger,
    flows.drift_events)."""
    return [
        training_pipeline.to_deployment(name=TRAINING_DEPLOYMENT, cron=training_cron,
                                        parameters=training_parameters, tags=list(FLOW_TAGS[training_pipeline.name]),
                                        concurrency_limit=CONCURRENCY_LIMIT, triggers=training_triggers,
                                        description="Nightly: data -> DDP training -> ONNX -> gate -> champion"),
        batch_inference.to_deployment(name=INFERENCE_DEPLOYMENT, cron=inference_cron,
                                      parameters=inference_parameters, tags=list(FLOW_TAGS[batch_inference.name]),
                                      concurrency_limit=CONCURRENCY_LIMIT,
                                      description="Hourly: the champion over the configured input"),
    ]

