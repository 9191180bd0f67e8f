"""The commands that run Prefect flows over the batch job, the sweep and the schedules (added to
the parser by flows.cli.build_parser)."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_infer(args) -> int:
    from flows.cli import EXIT_OK
    from flows.inference import batch_inference
    from serving.cli import config_from_args

    cfg = config_from_args(args)  # the serving job's own validation, before any flow starts
    s = batch_inference(input=str(cfg.input), output=str(cfg.output), model=cfg.model,
                        labels=str(cfg.labels) if cfg.labels else None, batch_size=cfg.batch_size,
                        device=cfg.device, on_error=cfg.on_error, format=cfg.format,
                        all_probabilities=cfg.all_probabilities, threads=cfg.threads, streams=cfg.streams,
                        track=cfg.track)
    print(json.dumps(s, indent=2, default=str))
    return EXIT_OK


def cmd_sweep(args) -> int:
    from flows import ownership, prefect_api
    from flows.cli import EXIT_OK, EXIT_REJECTED, _data_source
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
                                      data_source=_data_source(args), data_dir=args.data_dir, seed=args.seed,
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
    from flows.cli import EXIT_OK, _data_source, _pipeline_kwargs
    from flows.deployments import deployments
    from flows.inference import export_test_split
    from flows.settings import configure
    from nn_core.data import prepare
    from nn_core.datasets import get_spec

    cfg = configure()
    infer_input, infer_labels = args.infer_input, args.infer_labels
    if infer_input is None:  # default: the held-out test split, so the schedule has something to score
        prepared = prepare(get_spec(args.dataset), _data_source(args), Path(args.data_dir) if args.data_dir else None)
        images, labels = export_test_split(args.dataset, str(prepared.cache_path.parent), cfg.outputs_dir / "inputs")
        infer_input, infer_labels = str(images), str(labels)
    output = args.infer_output or str(cfg.outputs_dir / "scheduled") + "/"
    Path(output).mkdir(parents=True, exist_ok=True) if output.endswith("/") else None
    deps = deployments(
        args.training_cron, args.inference_cron, _pipeline_kwargs(args),
        {"input": str(infer_input), "output": output, "labels": str(infer_labels) if infer_labels else None,
         "model": f"models:/{args.model_name}@champion"},
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

    from flows.cli import Stopped

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
    from flows.cli import CommandError, _check_data
    from nn_core.sweep import load_spec

    _check_data(args)
    if args.config is not None:
        try:
            load_spec(args.config)  # parsed again by cmd_sweep; this read is cheap and torch-free
        except ValueError as e:
            raise CommandError(str(e)) from None


def _check_serve(args) -> None:
    from flows.cli import _check_file, _check_training

    _check_training(args)
    _check_file(args.infer_input, "--infer-input")
    _check_file(args.infer_labels, "--infer-labels")


def add(command) -> None:
    from flows.cli import NON_NEGATIVE, POSITIVE, _check_infer, _data_args, _float_in, _gate_args, _hidden, _train_args
    from flows.settings import INFERENCE_CRON, TRAINING_CRON
    from serving.cli import add_infer_arguments

    p = command("infer", cmd_infer, "batch inference with onnxruntime (as a Prefect flow): predictions and a "
                                    "manifest, written atomically", _check_infer)
    add_infer_arguments(p)

    p = command("sweep", cmd_sweep, "hyperparameter sweep: nested MLflow runs, a comparison, the best config gated",
                _check_sweep)
    p.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="sweep file with lists under hidden, lr, batch_size, epochs (and optional sample, seed)")
    p.add_argument("--hidden", type=_hidden, nargs="+", default=None, help="hidden sizes to try, e.g. 50 100 128,64")
    p.add_argument("--lr", type=_float_in(0, low_open=True), nargs="+", default=None, help="learning rates to try")
    p.add_argument("--batch-size", type=POSITIVE, nargs="+", default=None, help="batch sizes to try")
    p.add_argument("--epochs", type=POSITIVE, nargs="+", default=None, help="epoch counts to try")
    p.add_argument("--sample", type=POSITIVE, default=None, help="train only this many configs drawn at random from the grid")
    p.add_argument("--concurrency", type=POSITIVE, default=1, help="configs trained at the same time")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of every config's training")
    p.add_argument("--experiment", default="mnist-mlp", help="MLflow experiment")
    p.add_argument("--nproc", type=POSITIVE, default=1, help="CPU worker processes per config")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    _data_args(p)
    _gate_args(p)
    p.set_defaults(prefect_api=True, reap=True)

    p = command("serve", cmd_serve, "serve the scheduled deployments (nightly training, hourly inference) "
                                    "from this process against the configured Prefect API", _check_serve)
    p.add_argument("--training-cron", default=TRAINING_CRON, help="cron schedule of the training pipeline")
    p.add_argument("--inference-cron", default=INFERENCE_CRON, help="cron schedule of the batch inference")
    p.add_argument("--infer-input", default=None, help="input of the scheduled batch inference (default: the test split)")
    p.add_argument("--infer-labels", default=None, help="labels for that input (reports accuracy)")
    p.add_argument("--infer-output", default=None, help="file, or folder (ending in /) for one timestamped file per run "
                                                        "(default: MNISTOPS_HOME/outputs/scheduled/)")
    _data_args(p)
    _train_args(p)
    _gate_args(p)
    p.set_defaults(prefect_api=True)
