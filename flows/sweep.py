"""The hyperparameter sweep flow: each config trained as its own MLflow run nested under one parent
run, a comparison, then the best config's model through the same export, parity and gate path."""

from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import settings
from flows.observability import link_mlflow_run, mlflow_context_tags, prefect_note
from flows.ownership import untagged_task_runs
from flows.training import PipelineResult, obtain_data, publish, refuse_other_task, release, train_job, train_model
from nn_core import metrics as M
from nn_core import reaping, tracking
from nn_core.config import DataConfig, GateConfig, LaunchSpec, MLPConfig, TrainConfig, default_experiment
from nn_core.distributed import cuda_device_count
from nn_core.launch import TrainResult, check_launch
from nn_core.sweep import SweepPoint, SweepSpec, assign_devices


@dataclass(frozen=True)
class SweepResult:
    parent_run_id: str
    trials: list[dict]  # one per config: its settings, run id and accuracies
    best: dict
    release: PipelineResult


def _comparison_table(trials: list[dict], run_url=None) -> str:
    """Markdown, best first; with `run_url(run_id)`, each run id links to its MLflow run."""
    def run(t: dict) -> str:
        return f"[{t['run_id']}]({run_url(t['run_id'])})" if run_url else f"`{t['run_id']}`"

    rows = sorted(trials, key=lambda t: -t["val_accuracy"])
    lines = ["| rank | config | val acc | test acc | train s | MLflow run |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {t['name']} | {t['val_accuracy']:.4f} | {t['test_accuracy']:.4f} | "
              f"{t['train_seconds']:.1f} | {run(t)} |" for i, t in enumerate(rows, 1)]
    return "\n".join(lines)


def _trials_table(trials: list[dict]) -> dict[str, list]:
    """The trials as columns for MLflow's log_table (the run's Artifacts tab shows it as a table)."""
    rows = sorted(trials, key=lambda t: -t["val_accuracy"])
    return {
        "rank": list(range(1, len(rows) + 1)),
        "config": [t["name"] for t in rows],
        "hidden": ["x".join(map(str, t["hidden"])) for t in rows],
        "lr": [t["lr"] for t in rows],
        "batch_size": [t["batch_size"] for t in rows],
        "epochs": [t["epochs"] for t in rows],
        "val_accuracy": [t["val_accuracy"] for t in rows],
        "test_accuracy": [t["test_accuracy"] for t in rows],
        "train_seconds": [t["train_seconds"] for t in rows],
        "run_id": [t["run_id"] for t in rows],
    }


def _grid_params(spec) -> dict[str, str]:
    """The searched grid, one param per axis (the values tried, in order)."""
    return {
        "grid.hidden": " | ".join("x".join(map(str, h)) for h in spec.hidden),
        "grid.lr": ", ".join(f"{v:g}" for v in spec.lr),
        "grid.batch_size": ", ".join(map(str, spec.batch_size)),
        "grid.epochs": ", ".join(map(str, spec.epochs)),
        "grid.sample": "all" if spec.sample is None else str(spec.sample),
        "grid.seed": str(spec.seed),
    }


def _comparison_chart(trials: list[dict], path: Path) -> Path:
    """Validation and test accuracy per config, best first, each bar labelled with its value. The axis
    starts at a round figure well below the worst config, so a one-point gap looks like one point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = sorted(trials, key=lambda t: -t["val_accuracy"])
    x, width = np.arange(len(rows)), 0.4
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(rows)), 4.5), dpi=100)
    for offset, key, name, colour in ((-width / 2, "val_accuracy", "validation", "tab:orange"),
                                      (width / 2, "test_accuracy", "test", "tab:purple")):
        bars = ax.bar(x + offset, [100 * t[key] for t in rows], width, label=name, color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    worst = min(100 * min(t["val_accuracy"], t["test_accuracy"]) for t in rows)
    ax.set_ylim(max(0.0, 10 * np.floor(worst / 10) - 10), 101)
    ax.set_xticks(x, [t["name"] for t in rows], rotation=30, ha="right")
    ax.set(xlabel="config (best first)", ylabel="accuracy (%)", title=f"Sweep: {len(rows)} configs")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _sweep_note(spec, trials: list[dict], best: dict, outcome: PipelineResult) -> str:
    grid = "; ".join(f"{k.removeprefix('grid.')} {v}" for k, v in _grid_params(spec).items() if k != "grid.seed")
    verdict = (f"registered as {outcome.model_name} version {outcome.version}, "
               f"{'promoted to champion' if outcome.promoted else 'not promoted'} ({outcome.reason})"
               if outcome.version else outcome.reason)
    return (f"Sweep of {len(trials)} configs over the grid ({grid}). Best: {best['name']} with validation "
            f"accuracy {best['val_accuracy']:.2%} (test {best['test_accuracy']:.2%}); {verdict}. The trials are "
            f"the nested runs and the table trials.json.")


def _start_parent(spec: SweepSpec, points: list[SweepPoint], concurrency: int, data: DataConfig, train: TrainConfig,
                  prepared, experiment: str) -> tuple[str, str]:
    """The sweep's parent run with its grid as params: (run id, its MLflow UI address)."""
    c = tracking.client()
    parent = c.create_run(tracking.ensure_experiment(experiment, description=tracking.TRAINING_EXPERIMENT_DESCRIPTION),
                          run_name=f"{prepared.name}-sweep-{len(points)}-configs",
                          tags={**mlflow_context_tags("hyperparameter-sweep"), "mnistops.kind": "sweep",
                                "dataset_digest": prepared.digest,
                                # if this process dies mid-sweep, the next command marks the run KILLED
                                reaping.OWNER_TAG: reaping.owner_id(os.getpid())})
    parent_id = parent.info.run_id
    tracking.log_params(parent_id, {"configs": len(points), "concurrency": concurrency, "seed": train.seed,
                                    "dataset": data.dataset, "schedule": train.schedule, **_grid_params(spec)})
    url = settings.run_url(parent.info.experiment_id, parent_id)
    link_mlflow_run(url, "mlflow-sweep-run", f"MLflow parent run of the sweep ({len(points)} configs)")
    return parent_id, url


def _train_all(points: list[SweepPoint], concurrency: int, prepared, data: DataConfig, model: MLPConfig,
               train: TrainConfig, launch: LaunchSpec, experiment: str, parent_id: str) -> list[tuple]:
    """Every point trained as a nested run, `concurrency` at a time: [(point, result, training id)]."""
    # Trials side by side share the GPUs out instead of each claiming all of them.
    slots = assign_devices(cuda_device_count(launch.device), concurrency)
    results = []
    for start in range(0, len(points), concurrency):  # bounded concurrency: one wave at a time
        wave = points[start : start + concurrency]
        jobs = [train_job(prepared, *p.apply(model, train), experiment, data_source=data.data_source,
                          parent_run_id=parent_id, run_name=p.name()) for p in wave]
        futures = [train_model.submit(job, replace(launch, devices=slots[i])) for i, job in enumerate(jobs)]
        results += [(p, f.result(), job.tracking.training_id) for p, f, job in zip(wave, futures, jobs)]
    return results


def _trial(p: SweepPoint, r: TrainResult) -> dict:
    return {**p.to_dict(), "name": p.name(), "run_id": r.run_id, "val_accuracy": r.val_accuracy,
            "test_accuracy": r.test_accuracy, "train_seconds": r.metrics["train_seconds"]}


def _publish_comparison(parent_id: str, parent_url: str, trials: list[dict], best: dict) -> None:
    """The trials on the parent run (a table, a chart, markdown) and as a Prefect artifact."""
    c = tracking.client()
    # The trials are rows of a table, not a series: their order means nothing on a chart's x axis.
    c.log_table(parent_id, data=_trials_table(trials), artifact_file="trials.json")
    tracking.log_metrics(parent_id, {M.SWEEP_BEST_VAL_ACCURACY: best["val_accuracy"]})
    tracking.log_tags(parent_id, {"best_run_id": best["run_id"], "best_config": best["name"]})
    experiment_id = c.get_run(parent_id).info.experiment_id
    linked = _comparison_table(trials, lambda rid: settings.run_url(experiment_id, rid))
    with tempfile.TemporaryDirectory() as tmp:
        _comparison_chart(trials, Path(tmp) / "sweep_comparison.png")
        (Path(tmp) / "sweep_comparison.md").write_text(_comparison_table(trials) + "\n")
        for f in Path(tmp).iterdir():
            c.log_artifact(parent_id, str(f))
    create_markdown_artifact(key="sweep-comparison", markdown=f"# Sweep: {len(trials)} configs\n\n{linked}\n\n"
                             f"MLflow parent run: [{parent_id}]({parent_url})\n", description=f"best: {best['name']}")


def _check_request(grid: SweepSpec, concurrency: int, data: DataConfig, launch: LaunchSpec) -> None:
    """Before anything starts: a concurrency below 1, or trials at once beyond this machine's cores or
    memory (nn_core.machine), or a batch size beyond the training split, is one line and no worker."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    check_launch(launch, grid.batch_size, data.dataset, trainings=min(concurrency, len(grid.points())))


def _interruption(error: BaseException) -> str | None:
    """The signal that stopped the sweep, if one did: an exception in the chain that is no Exception
    (Ctrl-C, our Stopped, Prefect's TerminationSignal, which its engine raises in place of ours while a
    flow runs), or the command's stop flag when a trial's failure got here first."""
    from nn_core.train import STOPPING

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return "SIGINT"
        if not isinstance(seen, Exception):
            sig = getattr(seen, "signum", None) or getattr(seen, "signal", None)
            return signal.Signals(sig).name if isinstance(sig, int) else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return "a signal" if STOPPING.is_set() else None


def _end_interrupted_or_failed(parent_id: str, error: BaseException) -> None:
    """A sweep stopped by a signal ends KILLED like its trials (resumable, not broken), with the
    reason; any other error ends it FAILED."""
    what = _interruption(error)
    if what is not None:
        tracking.log_tags(parent_id, {reaping.KILLED_REASON_TAG: f"interrupted by {what} before the sweep finished"})
        tracking.end_run(parent_id, "KILLED")
    else:
        tracking.end_run(parent_id, "FAILED")


@flow(name="hyperparameter-sweep", log_prints=True)
def hyperparameter_sweep(
    grid: SweepSpec = SweepSpec(),
    concurrency: int = 1,
    data: DataConfig = DataConfig(),
    model: MLPConfig = MLPConfig(),
    train: TrainConfig = TrainConfig(),
    launch: LaunchSpec = LaunchSpec(),
    gate: GateConfig = GateConfig(),
    experiment: str | None = None,
) -> SweepResult:
    """Train every config of a grid as a nested MLflow run, compare them, gate the best one.

    Args:
        grid: Lists of values for hidden, lr, batch_size and epochs (every combination is one config),
            optionally sample (train only that many, drawn at random) and seed (of the draw).
        concurrency: Configs trained at the same time.
        data: Which dataset, where its four IDX files come from, where the verified cache lives.
        model: The base model config; each config's hidden sizes replace its own.
        train: The base training config (seed, schedule, weight decay); each config's lr, batch size and
            epochs replace its own.
        launch: How each config's DDP workers start (with several GPUs, each config gets its share).
        gate: The registered model the best config competes for, and what it takes to become champion.
        experiment: MLflow experiment of the parent and trial runs (default: DATASET-mlp, the task's own).
    """
    _check_request(grid, concurrency, data, launch)
    settings.configure()
    points, experiment = grid.points(), experiment or default_experiment(data.dataset)
    with untagged_task_runs():
        model_name = gate.model_for(data.dataset)
        prepared = obtain_data(data)
        refuse_other_task(model_name, prepared)
        parent_id, parent_url = _start_parent(grid, points, concurrency, data, train, prepared, experiment)
        try:
            results = _train_all(points, concurrency, prepared, data, model, train, launch, experiment, parent_id)
            trials = [_trial(p, r) for p, r, _ in results]
            best_i = max(range(len(trials)), key=lambda i: trials[i]["val_accuracy"])
            _publish_comparison(parent_id, parent_url, trials, trials[best_i])
            _, best_result, best_tid = results[best_i]
            get_run_logger().info("best config %s: val acc %.4f", trials[best_i]["name"], best_result.val_accuracy)
            outcome = release(best_result, prepared, model_name, gate, best_tid, experiment)
            publish(outcome)
            tracking.log_tags(parent_id, {"best_version": str(outcome.version),
                                          "promotion": "accepted" if outcome.promoted else "rejected"})
            tracking.set_note(parent_id, _sweep_note(grid, trials, trials[best_i], outcome) + " " + prefect_note())
            tracking.end_run(parent_id, "FINISHED")
        except BaseException as e:
            _end_interrupted_or_failed(parent_id, e)
            raise
        return SweepResult(parent_run_id=parent_id, trials=trials, best=trials[best_i], release=outcome)
