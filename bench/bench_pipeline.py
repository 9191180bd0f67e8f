"""The pipeline's orchestration cost: the wall time of `mnistops run` (a fresh process, Prefect's
temporary local API, MLflow's embedded store) against the sum of its stages' own times, measured by
calling the same library functions directly, without Prefect, in this process.

Targets, printed side by side from one run: the `train` stage <= 2 s more than its epochs and
evaluations; export + parity <= 1.5 s; `mnistops run` wall <= 1.5x the sum of its stages.

Where the start-up went (profiled with cProfile and -X importtime on the 2-core machine, 2026-11-29):

- `train`, before: the elastic launcher spawned a fresh Python for one worker, which imported torch
  and MLflow again and went through a c10d rendezvous and a TCP store (~5.5 s fixed, STACK_NOTES).
  Now a one-process CPU training without restarts runs train() in a gloo group of one in the calling
  process (nn_core.launch.train_in_process): the same code path, no spawn, no rendezvous. nproc > 1,
  --max-restarts > 0, multi-node and CUDA still go through the launcher.
- `train`, what is left besides epochs and evaluations: opening the MLflow SQLite store (importing
  MLflow's SQLAlchemy store, and for a new store its Alembic migrations: ~2.5 s of the 5.8 s on a
  fresh store under load); the first torch.optim.Adam call imports torch._dynamo (~1-2.8 s: the
  optimizer's methods are wrapped in torch._disable_dynamo, which imports it on first call; ONNX
  export needs it too, so in `mnistops run` it is paid once); the three PNG plots (matplotlib import
  and savefig, ~1.5-5 s under load); the dataset input's mirror URL imports torchvision when no
  data source is given (~0.7 s).
- export + parity: the torch.export-based exporter costs ~11 s cold (importing torch.export,
  onnxscript and the dynamo tracer) and ~3.5 s warm; `optimize=False` saves ~1 s but gives a
  different graph (a Shape/Squeeze/Concat chain for the reshape), and the TorchScript exporter is
  deprecated and also differs: neither gives the same graph, so the exporter is unchanged. Parity
  itself is ~0.5 s.
- the rest of the wall: Prefect's temporary API server (10-27 s on 2 cores; issue 11 starts our own
  early in the background) and the CLI's imports (torch ~3.7 s, MLflow ~1.6 s under load).

Measured again on the quiet 2-core machine (2026-12-01), `mnistops run` on a new home, 24.2 s wall:
imports 3.2 s; the new home's Prefect API migrating its database, 3.8 s idle after the imports; the
new MLflow store's migrations (~1.4 s) and the exporter's first run (~0.8 s more than a warm one)
inside the stages; Prefect's own bookkeeping, ~0.15 s per task run and ~1 s per flow run; and, at
exit, 1.9 s of Python's final garbage collection over every object the libraries had made. Now: the
store is created while the API boots (flows.cli.main, right after starting it), the exporter is
warmed up in that wait (flows.cli._while_prefect_boots: only then, as it is idle time), and the objects alive at exit are frozen out of the final collection
(serving.settings.skip_final_collection): 16.5 s. Left: the imports, the API's boot, Prefect's
per-run costs; in the train stage, importing torch._dynamo on the optimizer's first use (~0.9 s, once
per process: the exporter needs it too) and drawing the four plots (~1 s).
Timings on a shared 2-core machine vary by 2-10x with the load of other work; compare ratios from
one run, never figures from different runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import mnist, row


def stages(data_dir: Path) -> dict[str, float]:
    from flows.inference import export_test_split
    from nn_core import tracking
    from nn_core.data import prepare
    from nn_core.datasets import MNIST
    from nn_core.launch import LaunchSpec, launch_training, new_training_id
    from nn_core.release import export_and_check, gate_and_record, register
    from nn_core.registry import GateConfig
    from nn_core.train import TrackingConfig, TrainJob
    from serving.job import JobConfig, run_job

    times = {}

    def timed(name, fn, *a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        times[name] = time.perf_counter() - t
        return out

    home = Path(os.environ["MNISTOPS_HOME"])
    # `mnistops run` opens (on a new home: creates) the store while its Prefect API boots, before training.
    timed("open the MLflow store (new: create it)", tracking.ensure_experiment, "mnist-mlp")
    prepared = timed("prepare data (verified cache reused)", prepare, MNIST, os.environ.get("MNISTOPS_DATA_SOURCE"), data_dir)
    tid = new_training_id()
    job = TrainJob(data_path=str(prepared.cache_path), out_dir=str(home / "runs" / tid),
                   tracking=TrackingConfig(training_id=tid), data_source=os.environ.get("MNISTOPS_DATA_SOURCE"))
    result = timed("train (1 CPU process: in-process)", launch_training, job, LaunchSpec())
    times["_train_work"] = result.metrics["train_seconds"] + result.metrics["eval_seconds"]
    exported = timed("export + parity", export_and_check, result, prepared.cache_path)
    version = timed("register", register, result, exported, prepared.cache_path, "mnist-mlp")
    timed("gate + model card", gate_and_record, result, exported, version, prepared.cache_path, "mnist-mlp", GateConfig())
    images, labels = export_test_split("mnist", str(data_dir), home / "inputs")
    timed("batch inference over the test set", run_job, JobConfig(input=images, output=home / "p.parquet", labels=labels))
    return times


def main() -> dict:
    prepared = mnist()
    data_dir = prepared.cache_path.parent
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        env = {**os.environ, "MNISTOPS_HOME": str(Path(a) / "home"), "MNISTOPS_DATA_DIR": str(data_dir),
               "PREFECT_HOME": str(Path(a) / "prefect")}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("PREFECT_API_URL", None)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "run"], env=env, cwd=a, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t

        os.environ["MNISTOPS_HOME"] = str(Path(b) / "home")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{b}/mlflow.db"
        os.environ["MNISTOPS_ARTIFACT_ROOT"] = str(Path(b) / "mlartifacts")
        times = stages(data_dir)
    work = times.pop("_train_work")
    total = sum(times.values())
    train_s = next(v for k, v in times.items() if k.startswith("train"))
    export_s = times["export + parity"]
    print("pipeline: `mnistops run` against its stages run directly")
    for name, seconds in times.items():
        row(name, seconds, "s")
    row("sum of the stages", total, "s")
    row("`mnistops run`, wall time of the whole command", wall, "s")
    row("orchestration and start-up overhead", wall - total, "s", f"({(wall - total) / wall:.0%} of the wall time)")
    print("targets")
    row("train stage: its epochs and evaluations", work, "s")
    row("train stage minus them, target <= 2", train_s - work, "s", _verdict(train_s - work <= 2))
    row("export + parity, target <= 1.5", export_s, "s", _verdict(export_s <= 1.5))
    row("`mnistops run` wall / sum of stages, target <= 1.5", wall / total, "x", _verdict(wall / total <= 1.5))
    return {"stages": times, "sum": total, "wall": wall, "train_work": work}


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


if __name__ == "__main__":
    main()
