"""The `mnistops` command. Exit codes: 0 success (for run/sweep/promote: the candidate was promoted),
3 the candidate was rejected by the gate (not an error), 1 an error, 2 bad usage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serving.errors import EXIT_ERROR, EXIT_OK, EXIT_REJECTED, EXIT_USAGE  # noqa: E402,F401 (the one table)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden sizes {text!r}: expected integers like 50 or 128,64") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes {text!r}: expected positive integers like 50 or 128,64")
    return sizes


def _data_args(p: argparse.ArgumentParser, dataset_help: str = "which dataset", dataset_default: str | None = "mnist") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=dataset_default, choices=["mnist", "fashion-mnist"], help=dataset_help)
    g.add_argument("--data-source", default=None, metavar="PATH|URL",
                   help="folder or file:// URL with the four IDX files (gzipped or not), or an http(s) mirror; "
                        "default: $MNISTOPS_DATA_SOURCE, else the official mirrors")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the verified cache lives; default: $MNISTOPS_DATA_DIR, else ~/.cache/mnistops")


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--hidden", type=_hidden, default=[50], help="hidden layer sizes, e.g. 50 or 128,64")
    g.add_argument("--epochs", type=int, default=10, help="training epochs")
    g.add_argument("--batch-size", type=int, default=256, help="global batch size (split across processes)")
    g.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    g.add_argument("--schedule", default="cosine", choices=["none", "cosine", "onecycle"], help="learning-rate schedule")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling")
    g.add_argument("--experiment", default="mnist-mlp", help="MLflow experiment")
    l = p.add_argument_group("launch (torch elastic)")
    l.add_argument("--nproc", type=int, default=1, help="CPU worker processes when there is no CUDA (with CUDA: one per GPU)")
    l.add_argument("--max-restarts", type=int, default=0, help="times the launcher restarts failed workers")
    l.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")


def _gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry and gate")
    g.add_argument("--model-name", default=None,
                   help="registered model name (default: DATASET-mlp); bound to the dataset of its first version")
    g.add_argument("--threshold", type=float, default=0.96, help="minimum validation accuracy (ONNX) to promote")
    g.add_argument("--margin", type=float, default=0.0, help="how much worse than the champion a candidate may be")


def _data_source(args) -> str | None:
    import os

    return args.data_source or os.environ.get("MNISTOPS_DATA_SOURCE") or None


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_prepare_data(args) -> int:
    from nn_core.data import prepare
    from nn_core.datasets import get_spec

    p = prepare(get_spec(args.dataset), _data_source(args), Path(args.data_dir) if args.data_dir else None)
    print(f"dataset  {p.name}\ndigest   {p.digest}\ncache    {p.cache_path} ({'reused' if p.reused_cache else 'written'})")
    print("splits   " + "  ".join(f"{k}={v}" for k, v in p.split_sizes.items()))
    return EXIT_OK


def cmd_train(args) -> int:
    from flows.training import train_job
    from nn_core.data import prepare
    from nn_core.datasets import get_spec
    from nn_core.launch import LaunchSpec, launch_training

    prepared = prepare(get_spec(args.dataset), _data_source(args), Path(args.data_dir) if args.data_dir else None)
    job = train_job(prepared, hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed,
                    data_source=_data_source(args), experiment=args.experiment, training_id=args.rdzv_id)
    spec = LaunchSpec(nproc=args.nproc, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                      max_restarts=args.max_restarts, device=args.device)
    result = launch_training(job, spec)
    if result is None:
        print("this node's workers finished; rank 0 (on another node) holds the result")
        return EXIT_OK
    print(f"validation accuracy {result.val_accuracy:.4f}\ntest accuracy       {result.test_accuracy:.4f}")
    print(f"MLflow run          {result.run_id}\ncheckpoint          {result.checkpoint}")
    return EXIT_OK


def _pipeline_kwargs(args) -> dict:
    return dict(dataset=args.dataset, data_source=_data_source(args), data_dir=args.data_dir, hidden=args.hidden,
                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                schedule=args.schedule, seed=args.seed, nproc=args.nproc, max_restarts=args.max_restarts,
                device=args.device, gate_threshold=args.threshold, gate_margin=args.margin,
                model_name=args.model_name, experiment=args.experiment)


def _report(outcome) -> int:
    print(json.dumps(outcome.to_dict(), indent=2, default=str))
    verdict = "promoted to champion" if outcome.promoted else "NOT promoted"
    print(f"\n{outcome.model_name} version {outcome.version}: {verdict} ({outcome.reason})")
    return EXIT_OK if outcome.promoted else EXIT_REJECTED


def cmd_run(args) -> int:
    from flows.training import training_pipeline

    outcome = training_pipeline(**_pipeline_kwargs(args))
    code = _report(outcome)
    if not args.no_inference:
        from flows.inference import score_test_split

        s = score_test_split(dataset=args.dataset, data_dir=args.data_dir, model=f"models:/{outcome.model_name}@champion")
        print(f"batch inference over the test set with {s['model']} (version {s['model_version']}): "
              f"accuracy {s['accuracy']:.4f}, {s['predicted']} predictions in {s['output']}")
    return code


def cmd_models(args) -> int:
    from nn_core import tracking
    from nn_core.registry import bound_task, champion, default_model_name

    c = tracking.client()
    name = args.model_name or default_model_name(args.dataset)
    versions = sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    if not versions:
        print(f"no registered versions of {name!r} in {tracking.mlflow.get_tracking_uri()}")
        return EXIT_OK
    best = champion(name)
    print(f"{name}: bound to {bound_task(name)}")
    print(f"{'version':>7}  {'champion':8}  {'val_acc':>7}  {'test_acc':>8}  {'promotion':9}  run_id")
    for v in versions:
        t = v.tags
        print(f"{v.version:>7}  {'*' if str(v.version) == best else '':8}  {t.get('val_accuracy', '-')[:7]:>7}  "
              f"{t.get('test_accuracy', '-')[:8]:>8}  {t.get('promotion', '-'):9}  {v.run_id}")
    return EXIT_OK


def cmd_promote(args) -> int:
    """The gate by hand, on the registered model's own task: its dataset comes from the registered
    model, never from --dataset (which may only name it); --force overrides figures, never the task."""
    from flows.promotion import promotion_lock
    from nn_core.data import load_splits, prepare
    from nn_core.datasets import get_spec
    from nn_core.registry import GateConfig, Task, TaskMismatchError, bound_task, default_model_name, gate

    name = args.model_name or default_model_name(args.dataset or "mnist")
    task = bound_task(name)
    if args.dataset and args.dataset != task.dataset:
        raise TaskMismatchError(f"registered model {name!r} is bound to {task}; --dataset {args.dataset} "
                                "names another task (its split is never used for this model)")
    prepared = prepare(get_spec(task.dataset), _data_source(args), Path(args.data_dir) if args.data_dir else None)
    s = load_splits(prepared.cache_path)
    decision = gate(name, str(args.version), s.val_images.numpy(), s.val_labels.numpy(),
                    GateConfig(threshold=args.threshold, margin=args.margin), force=args.force,
                    task=Task(s.name, s.digest), lock=promotion_lock, decide_again=True)
    print(f"{name} version {args.version}: {decision.promotion} ({decision.reason})")
    return EXIT_OK if decision.accepted else EXIT_REJECTED


def cmd_ui(args) -> int:
    import os
    import subprocess

    from flows.settings import configure

    cfg = configure()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", cfg.tracking_uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    if os.environ.get("MNISTOPS_ARTIFACT_ROOT"):
        cmd += ["--default-artifact-root", Path(os.environ["MNISTOPS_ARTIFACT_ROOT"]).as_uri()]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {cfg.tracking_uri}); Ctrl-C stops it", flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnistops", formatter_class=_Formatter, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        p.set_defaults(fn=fn)
        return p

    p = command("prepare-data", cmd_prepare_data, "obtain, verify and cache a dataset; print its splits and digest")
    _data_args(p)

    p = command("train", cmd_train, "DDP training only (no Prefect): log to MLflow, write a checkpoint")
    _data_args(p)
    _train_args(p)
    m = p.add_argument_group("multi-node (torchrun's c10d rendezvous)")
    m.add_argument("--nnodes", type=int, default=1, help="number of nodes; each runs this same command")
    m.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="rendezvous address (node 0's host)")
    m.add_argument("--rdzv-id", default=None, help="training id, the same on every node")

    p = command("run", cmd_run, "the training pipeline once: data -> DDP training -> ONNX -> gate -> champion, "
                                "then a batch inference over the test set with the champion")
    _data_args(p)
    _train_args(p)
    _gate_args(p)
    p.add_argument("--no-inference", action="store_true", help="skip the batch inference over the test set")

    p = command("models", cmd_models, "registered versions, their metrics and the champion")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"],
                   help="the task whose registered model to list (DATASET-mlp)")
    p.add_argument("--model-name", default=None, help="registered model name (default: DATASET-mlp)")

    p = command("promote", cmd_promote, "move the champion alias to VERSION through the gate's checks, on the "
                                        "registered model's own validation split")
    p.add_argument("version", type=int, help="registered model version")
    p.add_argument("--force", action="store_true",
                   help="move the alias even when the figures fail the checks (never across datasets)")
    _data_args(p, dataset_help="names the task: the default model name is DATASET-mlp (mnist-mlp without it); "
                               "the split is always the registered model's own dataset's", dataset_default=None)
    _gate_args(p)

    p = command("ui", cmd_ui, "start the MLflow UI over the embedded store (127.0.0.1) and print its address")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=5000, help="port")

    from flows import commands

    commands.add(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.settings import configure, configure_logging

    configure()
    configure_logging()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for users; the traceback is in the log above
        from nn_core.data import DataError

        if not isinstance(e, (DataError, ValueError)):
            import traceback

            traceback.print_exc()
        print(f"mnistops {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
