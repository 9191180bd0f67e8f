"""The commands that run Prefect flows over the batch job, the sweep and the schedules (added to
the parser by flows.cli.build_parser)."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_infer(args) -> int:
    """A one-shot job costs what it does: on the embedded default (no PREFECT_API_URL) the job runs
    directly, without starting Prefect's temporary server for one flow run (~8 s); with a Prefect API
    configured it runs as the `batch-inference` flow, visible there. Either way its arguments and
    input paths are checked first, before onnxruntime, torch or prefect are imported."""
    from common.settings import env
    from serving import cli as serving_cli
    from common.errors import ServingError

    try:
        serving_cli.validate(args)
        if env("PREFECT_API_URL"):  # set by our temporary API too (--workers > 1: see _check_infer)
            from flows import ownership, prefect_api
            from flows.fanout import FanOut
            from flows.inference import batch_inference
            from common.fields import from_args

            prefect_api.wait_ready()
            with ownership.owned_flow_runs():
                s = batch_inference(serving_cli.config_from_args(args), inbox=args.inbox is not None,
                                    rescore=args.rescore, fan_out=from_args(FanOut, args))
        else:
            s = serving_cli.run(args)
    except ServingError as e:
        return serving_cli.report_error("mnistops infer", e)
    print(json.dumps(s, indent=2, default=str))
    return serving_cli.exit_code("mnistops infer", s)


def _check_infer(args) -> None:
    """infer's files, then --workers: only with --inbox, and bounded by this machine (one line, exit
    2). A fan-out runs as Prefect tasks on Dask, so without a Prefect API it starts the temporary one
    (booting while the rest loads)."""
    from flows.fanout import FanOut, usage_problem
    from flows.options import UsageError, check_infer
    from common.fields import from_args

    check_infer(args)
    fan = from_args(FanOut, args)
    if problem := usage_problem(fan, args.inbox is not None):
        raise UsageError(problem)
    if fan.workers > 1:
        args.prefect_api = True


def _grid(args):
    """The sweep file's grid (or the default one), with the axes given as options on top."""
    from dataclasses import replace

    from nn_core.sweep import AXES, SweepSpec, load_spec

    spec = load_spec(args.config) if args.config else SweepSpec()  # checked before anything started
    overrides = {k: getattr(args, f"grid_{k}") for k in AXES if getattr(args, f"grid_{k}") is not None}
    if args.sample:
        overrides["sample"] = args.sample
    return replace(spec, **overrides)


def cmd_sweep(args) -> int:
    from common.settings import loading

    with loading():
        from flows import ownership, prefect_api
        from flows.options import pipeline_parameters
        from flows.sweep import hyperparameter_sweep
        from common.errors import EXIT_OK, EXIT_REJECTED

    grid = _grid(args)
    prefect_api.wait_ready()
    with ownership.owned_flow_runs():
        result = hyperparameter_sweep(grid=grid, concurrency=args.concurrency, **pipeline_parameters(args))
    for t in sorted(result.trials, key=lambda t: -t["val_accuracy"]):
        print(f"{t['name']:32s} val {t['val_accuracy']:.4f}  test {t['test_accuracy']:.4f}  run {t['run_id']}")
    r = result.release
    print(f"\nbest: {result.best['name']} -> {r.model_name} version {r.version}: "
          f"{'promoted to champion' if r.promoted else 'NOT promoted'} ({r.reason})")
    return EXIT_OK if r.promoted else EXIT_REJECTED


def cmd_serve(args) -> int:
    from flows import prefect_api
    from flows.deployments import deployments
    from flows.drift_events import RetrainTrigger, retrain_trigger
    from flows.options import parameters_json, pipeline_parameters
    from common.fields import from_args
    from flows.settings import configure
    from serving.config import JobConfig
    from common.errors import EXIT_OK

    cfg = configure()
    # The hourly job scores what arrives in the inbox, once per input content, and fails its flow run
    # on a drift alert so that it shows in Prefect.
    inbox = Path(args.infer_inbox or cfg.home / "inbox")
    output = Path(args.infer_output or cfg.outputs_dir / "scheduled")
    inbox.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    params = pipeline_parameters(args)
    model = params["gate"].model_for(params["data"].dataset)
    champion = f"models:/{model}@champion"
    # As JSON, the form's fields only: what Prefect shows as a run's parameters and offers to change.
    job = JobConfig(input=inbox, output=output, model=champion, fail_on_drift=True)
    # The nightly retraining takes every feedback set recorded for the task (serving/feedback.py), and
    # runs also when K drift alerts come within the window (flows/drift_events.py).
    deps = deployments(args.training_cron, args.inference_cron, parameters_json({**params, "recorded_feedback": True}),
                       parameters_json({"job": job, "inbox": True}),
                       [retrain_trigger(model, from_args(RetrainTrigger, args))])
    prefect_api.wait_ready()
    trigger = deps[0].triggers[0]
    print(f"serving deployments {[d.name for d in deps]} (training '{args.training_cron}', "
          f"inference '{args.inference_cron}'; {trigger.name if trigger.enabled else 'no retraining on drift'}); "
          "Ctrl-C stops", flush=True)
    _serve(deps)
    return EXIT_OK


def _serve(deps) -> None:
    """prefect.serve, except that a SIGTERM ends the command with 143, not 0: Prefect's runner takes
    SIGTERM over (it pauses the schedules, cancels the flow runs in flight, then returns normally),
    so the signal is recorded on the way through."""
    import asyncio
    import signal

    from prefect.runner import Runner

    from flows.options import Stopped

    class _Runner(Runner):
        stopped_by: int | None = None

        def handle_sigterm(self, *args, **kwargs) -> None:
            self.stopped_by = signal.SIGTERM
            super().handle_sigterm(*args, **kwargs)

    runner = _Runner(pause_on_shutdown=True)
    for d in deps:
        runner.add_deployment(d)
    try:
        asyncio.run(runner.start())
    except SystemExit:  # a SIGTERM before the runner had started
        if runner.stopped_by is None:
            raise
    if runner.stopped_by is not None:
        raise Stopped(runner.stopped_by)


def _check_sweep(args) -> None:
    from flows.options import CommandError, check_data, check_machine

    check_data(args)
    try:
        grid = _grid(args)  # built again by cmd_sweep; this read is cheap and torch-free
    except ValueError as e:
        raise CommandError(str(e)) from None
    check_machine(args, list(grid.batch_size), trainings=min(args.concurrency, len(grid.points())))


def _check_serve(args) -> None:
    from flows.options import check_training

    check_training(args)
    if args.infer_inbox is not None and Path(args.infer_inbox).exists() and not Path(args.infer_inbox).is_dir():
        raise ValueError(f"--infer-inbox {args.infer_inbox}: not a folder")


def add(command) -> None:
    from flows.fanout import FanOut
    from flows.options import POSITIVE, data_args, gate_args, train_args
    from nn_core.config import MLPConfig, TrainConfig
    from nn_core.sweep import MODEL_AXES, AXES
    from serving.cli import add_infer_arguments
    from common.fields import add_arguments

    p = command("infer", cmd_infer, "batch inference with onnxruntime: predictions and a manifest, written "
                                    "atomically, with a drift check (a Prefect flow when PREFECT_API_URL is set)",
                _check_infer)
    add_infer_arguments(p)
    p.set_defaults(reap=True)  # a killed job's run is marked KILLED by the next job (flows.ownership)
    add_arguments(p.add_argument_group("fan-out (with --inbox)"), FanOut)

    p = command("sweep", cmd_sweep, "hyperparameter sweep: nested MLflow runs, a comparison, the best config gated",
                _check_sweep)
    g = p.add_argument_group("grid (each option takes the values to try; default: the sweep file's, else the "
                             "training's default)")
    g.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="sweep file with lists under hidden, lr, batch_size, epochs (and optional sample, seed)")
    grid = dict(nargs="+", defaults=dict.fromkeys(AXES), dest_prefix="grid_")
    add_arguments(g, MLPConfig, only=MODEL_AXES, **grid)
    add_arguments(g, TrainConfig, only=[a for a in AXES if a not in MODEL_AXES], **grid)
    g.add_argument("--sample", type=POSITIVE, default=None, help="train only this many configs drawn at random from the grid")
    g.add_argument("--concurrency", type=POSITIVE, default=1, help="configs trained at the same time")
    train_args(p, exclude=AXES)
    data_args(p)
    gate_args(p)
    p.set_defaults(prefect_api=True, reap=True)
    _serve_command(command)


def _serve_command(command) -> None:
    from flows.drift_events import add_options
    from flows.options import data_args, gate_args, train_args
    from flows.settings import INFERENCE_CRON, TRAINING_CRON

    p = command("serve", cmd_serve, "serve the scheduled deployments (nightly training, hourly inference) "
                                    "from this process against the configured Prefect API", _check_serve)
    p.add_argument("--training-cron", default=TRAINING_CRON, help="cron schedule of the training pipeline")
    p.add_argument("--inference-cron", default=INFERENCE_CRON, help="cron schedule of the batch inference")
    p.add_argument("--infer-inbox", default=None, metavar="DIR",
                   help="inbox of the scheduled batch inference: every new input in it is scored once "
                        "(default: MNISTOPS_HOME/inbox)")
    p.add_argument("--infer-output", default=None, metavar="DIR",
                   help="folder of its predictions, manifests and ledger (default: MNISTOPS_HOME/outputs/scheduled)")
    data_args(p)
    train_args(p)
    gate_args(p)
    add_options(p)
    p.set_defaults(prefect_api=True)
