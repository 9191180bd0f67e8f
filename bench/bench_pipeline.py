"""The pipeline's orchestration cost: the wall time of `mnistops run` (a fresh process, Prefect's
temporary local API, MLflow's embedded store) against the sum of its stages' own times, measured by
calling the same library functions directly, without Prefect, in this process."""

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
    prepared = timed("prepare data (verified cache reused)", prepare, MNIST, os.environ.get("MNISTOPS_DATA_SOURCE"), data_dir)
    tid = new_training_id()
    job = TrainJob(data_path=str(prepared.cache_path), out_dir=str(home / "runs" / tid),
                   tracking=TrackingConfig(training_id=tid), data_source=os.environ.get("MNISTOPS_DATA_SOURCE"))
    result = timed("train (elastic launch, 1 process)", launch_training, job, LaunchSpec())
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
    total = sum(times.values())
    print("pipeline: `mnistops run` against its stages run directly")
    for name, seconds in times.items():
        row(name, seconds, "s")
    row("sum of the stages", total, "s")
    row("`mnistops run`, wall time of the whole command", wall, "s")
    row("orchestration and start-up overhead", wall - total, "s", f"({(wall - total) / wall:.0%} of the wall time)")
    return {"stages": times, "sum": total, "wall": wall}


if __name__ == "__main__":
    main()
