"""The hyperparameter sweep flow: each config trained as its own MLflow run nested under one parent
run, a comparison, then the best config's model through the same export, parity and gate path."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import settings
from flows.training import PipelineResult, obtain_data, publish, release, train_job, train_model
from nn_core import tracking
from nn_core.launch import LaunchSpec, TrainResult
from nn_core.registry import GateConfig
from nn_core.distributed import cuda_device_count
from nn_core.sweep import SweepPoint, assign_devices, spec_from_mapping


@dataclass(frozen=True)
class SweepResult:
    parent_run_id: str
    trials: list[dict]  # one per config: its settings, run id and accuracies
    best: dict
    release: PipelineResult


def _comparison_table(trials: list[dict]) -> str:
    rows = sorted(trials, key=lambda t: -t["val_accuracy"])
    lines = ["| rank | config | val acc | test acc | train s | run |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {t['name']} | {t['val_accuracy']:.4f} | {t['test_accuracy']:.4f} | "
              f"{t['train_seconds']:.1f} | `{t['run_id']}` |" for i, t in enumerate(rows, 1)]
    return "\n".join(lines)


def _comparison_chart(trials: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(trials)), 4), dpi=100)
    ax.bar([t["name"] for t in trials], [100 * t["val_accuracy"] for t in trials], color="tab:blue")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(min(100 * t["val_accuracy"] for t in trials) - 1, 100)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@flow(name="hyperparameter-sweep", log_prints=True)
def hyperparameter_sweep(
    grid: dict | None = None,
    concurrency: int = 1,
    dataset: str = "mnist",
    data_source: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    schedule: str = "cosine",
    nproc: int = 1,
    device: str = "auto",
    gate_threshold: float = 0.96,
    gate_margin: float = 0.0,
    model_name: str = "mnist-mlp",
    experiment: str = "mnist-mlp",
) -> SweepResult:
    """`grid` has lists under hidden, lr, batch_size and epochs, and optionally sample and seed."""
    settings.configure()
    points = spec_from_mapping(grid or {}).points()
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    prepared = obtain_data(dataset, data_source, data_dir)
    # Trials side by side share the GPUs out instead of each claiming all of them.
    slots = assign_devices(cuda_device_count(device), concurrency)
    c = tracking.client()
    parent = c.create_run(tracking.ensure_experiment(experiment), run_name=f"sweep-{len(points)}-configs",
                          tags={"mnistops.kind": "sweep", "dataset_digest": prepared.digest})
    parent_id = parent.info.run_id
    tracking.log_params(parent_id, {"configs": len(points), "concurrency": concurrency, "seed": seed, "dataset": dataset})
    try:
        results: list[tuple[SweepPoint, TrainResult, str]] = []
        for start in range(0, len(points), concurrency):  # bounded concurrency: one wave at a time
            wave = points[start : start + concurrency]
            jobs = [train_job(prepared, hidden=list(p.hidden), epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                              weight_decay=0.0, schedule=schedule, seed=seed, data_source=data_source,
                              experiment=experiment, parent_run_id=parent_id, run_name=p.name())
                    for p in wave]
            futures = [train_model.submit(job, LaunchSpec(nproc=nproc, device=device, devices=slots[i]))
                       for i, job in enumerate(jobs)]
            results += [(p, f.result(), job.tracking.training_id) for p, f, job in zip(wave, futures, jobs)]

        trials = [{**p.to_dict(), "name": p.name(), "run_id": r.run_id, "val_accuracy": r.val_accuracy,
                   "test_accuracy": r.test_accuracy, "train_seconds": r.metrics["train_seconds"]}
                  for p, r, _ in results]
        for i, t in enumerate(trials):
            tracking.log_metrics(parent_id, {"trial_val_accuracy": t["val_accuracy"], "trial_test_accuracy": t["test_accuracy"]}, step=i)
        best_i = max(range(len(trials)), key=lambda i: trials[i]["val_accuracy"])
        best_point, best_result, best_tid = results[best_i]
        tracking.log_metrics(parent_id, {"best_val_accuracy": trials[best_i]["val_accuracy"]})
        tracking.log_tags(parent_id, {"best_run_id": best_result.run_id, "best_config": best_point.name()})
        table = _comparison_table(trials)
        with tempfile.TemporaryDirectory() as tmp:
            _comparison_chart(trials, Path(tmp) / "sweep_comparison.png")
            (Path(tmp) / "sweep_comparison.md").write_text(table + "\n")
            for f in Path(tmp).iterdir():
                c.log_artifact(parent_id, str(f))
        create_markdown_artifact(key="sweep-comparison", markdown=f"# Sweep: {len(trials)} configs\n\n{table}\n",
                                 description=f"best: {best_point.name()}")
        get_run_logger().info("best config %s: val acc %.4f", best_point.name(), best_result.val_accuracy)

        outcome = release(best_result, prepared, model_name, GateConfig(gate_threshold, gate_margin), best_tid, experiment)
        publish(outcome)
        tracking.log_tags(parent_id, {"best_version": str(outcome.version), "promotion": "accepted" if outcome.promoted else "rejected"})
        tracking.end_run(parent_id, "FINISHED")
    except BaseException:
        tracking.end_run(parent_id, "FAILED")
        raise
    return SweepResult(parent_run_id=parent_id, trials=trials, best=trials[best_i], release=outcome)
