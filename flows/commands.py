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
    import os

    from serving import cli as serving_cli
    from serving.errors import ServingError

    try:
        serving_cli.validate(args)
        if os.environ.get("PREFECT_API_URL"):
            from flows.inference import batch_inference

            s = batch_inference(**inference_parameters(args))
        else:
            s = serving_cli.run(args)
    except ServingError as e:
        return serving_cli.report_error("mnistops infer", e)
    print(json.dumps(s, indent=2, default=str))
    return serving_cli.exit_code("mnistops infer", s)


def inference_parameters(args) -> dict:
    """The batch-inference flow's parameters from `infer`'s arguments."""
    return {
        "input": str(args.input) if args.input is not None else None,
        "inbox": str(args.inbox) if args.inbox is not None else None,
        "output": str(args.output) + ("/" if args.inbox is not None else ""),
        "model": args.model, "labels": str(args.labels) if args.labels else None,
        "batch_size": args.batch_size, "device": args.device, "on_error": args.on_error,
        "format": args.format, "all_probabilities": args.all_probabilities, "threads": args.threads,
        "streams": args.streams, "track": args.track, "overwrite": args.overwrite, "rescore": args.rescore,
        "fail_on_drift": args.fail_on_drift, "drift_reference": args.drift_reference,
    }


def cmd_sweep(args) -> int:
    from flows import ownership, prefect_api
    from flows.options import data_source_of
    from serving.errors import EXIT_OK, EXIT_REJECTED
    from flows.sweep import hyperparameter_sweep
    from nn_core.sweep import load_spec

    grid = {}
    if args.config:
        spec = load_spec(args.config)  # checked before anything started (_check_sweep)
        grid = {"hidden": [list(h) for h in spec.hidden], "lr": list(spec.lr), "batch_size": list(spec.batch_size),
                "epochs": list(spec.epochs), "sample": spec.sample, "seed": spec.seed}
    for key in ("hidden", "lr", "batch_size", "epochs"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    if args.sample:
        grid["sample"] = args.sample
    grid = {k: v for k, v in grid.items() if v is not None}
    prefect_api.wait_ready()
    with ownership.owned_flow_runs():
        result = hyperparameter_sweep(grid=grid, concurrency=args.concurrency, dataset=args.dataset,
                                      data_source=data_source_of(args), data_dir=args.data_dir, seed=args.seed,
                                      nproc=args.nproc, device=args.device, gate_threshold=args.threshold,
                                      gate_margin=args.margin, model_name=args.model_name, experiment=args.experiment)
    for t in sorted(result.trials, key=lambda t: -t["val_accuracy"]):
        print(f"{t['name']:32s} val {t['val_accuracy']:.4f}  test {t['test_accuracy']:.4f}  run {t['run_id']}")
    r = result.release
    print(f"\nbest: {result.best['name']} -> {r.model_name} version {r.version}: "
          f"{'promoted to champion' if r.promoted else 'NOT promoted'} ({r.reason})")
    return EXIT_OK if r.promoted else EXIT_REJECTED


def cmd_serve(args) -> int:
    from flows import prefect_api
    from flows.options import pipeline_kwargs
    from serving.errors import EXIT_OK
    from flows.deployments import deployments
    from flows.settings import configure
    from nn_core.registry import default_model_name

    cfg = configure()
    # The hourly job scores what arrives in the inbox, once per input content, and fails its flow run
    # on a drift alert so that it shows in Prefect.
    inbox = Path(args.infer_inbox or cfg.home / "inbox")
    output = Path(args.infer_output or cfg.outputs_dir / "scheduled")
    inbox.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    deps = deployments(
        args.training_cron, args.inference_cron, pipeline_kwargs(args),
        {"inbox": str(inbox), "output": str(output),
         "model": f"models:/{args.model_name or default_model_name(args.dataset)}@champion", "fail_on_drift": True},
    )
    prefect_api.wait_ready()
    print(f"serving deployments {[d.name for d in deps]} (training '{args.training_cron}', "
          f"inference '{args.inference_cron}'); Ctrl-C stops", flush=True)
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
    from flows.options import CommandError, check_data
    from nn_core.sweep import load_spec

    check_data(args)
    if args.config is not None:
        try:
            load_spec(args.config)  # parsed again by cmd_sweep; this read is cheap and torch-free
        except ValueError as e:
            raise CommandError(str(e)) from None


def _check_serve(args) -> None:
    from flows.options import check_training

    check_training(args)
    if args.infer_inbox is not None and Path(args.infer_inbox).exists() and not Path(args.infer_inbox).is_dir():
        raise ValueError(f"--infer-inbox {args.infer_inbox}: not a folder")


def add(command) -> None:
    from flows.options import NON_NEGATIVE, POSITIVE, check_infer, data_args, float_in, gate_args, hidden_sizes, train_args
    from flows.settings import INFERENCE_CRON, TRAINING_CRON
    from serving.cli import add_infer_arguments

    p = command("infer", cmd_infer, "batch inference with onnxruntime: predictions and a manifest, written "
                                    "atomically, with a drift check (a Prefect flow when PREFECT_API_URL is set)",
                check_infer)
    add_infer_arguments(p)

    p = command("sweep", cmd_sweep, "hyperparameter sweep: nested MLflow runs, a comparison, the best config gated",
                _check_sweep)
    p.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="sweep file with lists under hidden, lr, batch_size, epochs (and optional sample, seed)")
    p.add_argument("--hidden", type=hidden_sizes, nargs="+", default=None, help="hidden sizes to try, e.g. 50 100 128,64")
    p.add_argument("--lr", type=float_in(0, low_open=True), nargs="+", default=None, help="learning rates to try")
    p.add_argument("--batch-size", type=POSITIVE, nargs="+", default=None, help="batch sizes to try")
    p.add_argument("--epochs", type=POSITIVE, nargs="+", default=None, help="epoch counts to try")
    p.add_argument("--sample", type=POSITIVE, default=None, help="train only this many configs drawn at random from the grid")
    p.add_argument("--concurrency", type=POSITIVE, default=1, help="configs trained at the same time")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of every config's training")
    p.add_argument("--experiment", default="mnist-mlp", help="MLflow experiment")
    p.add_argument("--nproc", type=POSITIVE, default=1, help="CPU worker processes per config")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    data_args(p)
    gate_args(p)
    p.set_defaults(prefect_api=True, reap=True)

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
    p.set_defaults(prefect_api=True)
