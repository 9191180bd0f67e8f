"""Inbox throughput (issue 23, point 6), in one run on the same inputs:

1. an inbox in the loopback S3 bucket (moto's server, tests/s3_server.py) against the same inputs in
   a local folder (the first --bucket-inputs of the inbox): one worker, the job's default threads, images/s over the whole inbox run (listing,
   download to the spool, digests, leases, scoring, upload of outputs and ledger records);
2. 1 against 2 workers at one onnxruntime thread each (`infer --workers`: the fan-out subflow on
   Prefect's Dask task runner, serving.inbox's ledger sharing the inputs out) on an inbox of
   --inputs .npy files in a local folder. The local Dask clusters are started once, before the
   clock (so is the temporary Prefect API), as `infer --workers` starts them (flows.fanout's
   LOCAL_CLUSTER and LOCAL_WORKER_CONFIG), and the flow runs send no heartbeats, as `infer`'s on
   its temporary API: the figure is the scoring's scaling, not the start-up's.
   Also the peak RSS of a scoring worker process (what flows/fanout.py's WORKER_MEMORY_MIB bounds);
3. the job with the drift check against the bare onnxruntime session (bench_inference's ceiling:
   the better of onnxruntime's defaults and the job's own settings), and the job without it.

Targets on 2 CPU cores: 2 workers >= 1.6x one; the job with the drift check >= 75% of the bare session.
Every throughput is the median of --repeats runs taken round-robin, so that a burst of load from
elsewhere hits every candidate alike; the load average is printed with them.

    .venv/bin/python bench/bench_fanout.py [--inputs 24] [--images 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the loopback S3 server of the tests

import numpy as np  # noqa: E402

import bench_inference as bi  # noqa: E402
from serving.job import CPU_BATCH_SIZE, JobConfig  # noqa: E402

FANOUT_TARGET, DRIFT_TARGET = 1.6, 0.75


def write_inbox(folder: Path, x: np.ndarray, inputs: int, per: int) -> None:
    """`inputs` .npy files of `per` images each, every one of distinct content (the ledger keys by it)."""
    folder.mkdir(parents=True)
    for i in range(inputs):
        np.save(folder / f"batch-{i:03d}.npy", np.roll(x, i * 7, axis=0)[:per])


def median_rates(runs: dict[str, Callable[[], float]], images: int, repeats: int) -> dict[str, list[float]]:
    """images/s of each run (which returns its own seconds), `repeats` times round-robin."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            rates[name].append(images / fn())
    return rates


def fresh(folder: Path) -> Path:
    """A new empty output folder (a new ledger: every input is scored again)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def bucket_vs_folder(s: bi.Setup, inbox: Path, images: int, repeats: int) -> None:
    from s3_server import CREDENTIALS, ISOLATED, start_server, stop_server
    from serving.inbox import run_inbox

    server = start_server()
    os.environ.update({**ISOLATED, **CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint})
    try:
        bucket = server.bucket()
        for p in sorted(inbox.iterdir()):
            server.client().upload_file(str(p), bucket, f"inbox/{p.name}")
        job = JobConfig(input=inbox, output=inbox, model=str(s.onnx_path), track=False,
                        drift_reference=str(s.reference), batch_size=s.batch_size)
        n = [0]

        def local() -> float:
            t = time.perf_counter()
            run_inbox(inbox, fresh(s.folder / "out-local"), job)
            return time.perf_counter() - t

        def remote() -> float:
            n[0] += 1
            t = time.perf_counter()
            run_inbox(f"s3://{bucket}/inbox", f"s3://{bucket}/out-{n[0]}", job)
            return time.perf_counter() - t

        rates = median_rates({"inbox in a local folder": local, "inbox in the loopback S3 bucket": remote},
                             images, repeats)
    finally:
        stop_server(server.process)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n1. bucket vs folder, one worker ({images:,} images): "
          + ", ".join(f"{k} {v:,.0f}/s" for k, v in med.items())
          + f"; bucket/folder {med['inbox in the loopback S3 bucket'] / med['inbox in a local folder']:.0%}"
          f" (load average {os.getloadavg()[0]:.1f})")


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: VmHWM, the high-water mark of its own memory map (getrusage's
    ru_maxrss would keep the forking parent's peak across the exec of a spawned worker)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def one_vs_two_workers(s: bi.Setup, inbox: Path, images: int, repeats: int) -> None:
    from flows import prefect_api
    from flows.settings import configure

    os.environ["MNISTOPS_HOME"] = str(s.folder / "home")
    configure()
    # Before Prefect is imported (it reads its settings then) and before the clusters (their workers
    # inherit PREFECT_API_URL).
    prefect_api.start(s.folder / "home")
    prefect_api.wait_ready()
    import dask
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.fanout import LOCAL_CLUSTER, LOCAL_WORKER_CONFIG
    from flows.inference import inbox_fan_out
    with dask.config.set(LOCAL_WORKER_CONFIG):  # the clusters `infer --workers K` starts
        clusters = {k: LocalCluster(n_workers=k, **LOCAL_CLUSTER) for k in (1, 2)}
    job = JobConfig(input=inbox, output=inbox, model=str(s.onnx_path), track=False, threads=1, streams=1,
                    drift_reference=str(s.reference), batch_size=s.batch_size)

    def fan(k: int) -> float:
        out = fresh(s.folder / f"out-{k}")
        runner = DaskTaskRunner(address=clusters[k].scheduler_address)
        t = time.perf_counter()
        with prefect_api.without_heartbeats():  # as `mnistops infer` runs its flows on the temporary API
            res = inbox_fan_out.with_options(task_runner=runner)(dataclasses.replace(job, output=out), False, k)
        assert len(res.scored) == len(list(inbox.iterdir())), "every input scored once"
        return time.perf_counter() - t

    try:
        for k in (1, 2):
            fan(k)  # warm up: the workers import onnxruntime and the job on their first task
        rates = median_rates({"1 worker": lambda: fan(1), "2 workers": lambda: fan(2)}, images, repeats)
        with Client(clusters[2].scheduler_address) as c:
            rss = c.run(peak_rss_kib)
    finally:
        for c in clusters.values():
            c.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["2 workers"] / med["1 worker"]
    spread = {k: f"{min(v):,.0f}..{max(v):,.0f}" for k, v in rates.items()}
    print(f"\n2. workers at one thread each, {len(list(inbox.iterdir()))} inputs ({images:,} images): "
          + ", ".join(f"{k} {v:,.0f}/s" for k, v in med.items())
          + f"; 2 vs 1: {ratio:.2f}x (target >= {FANOUT_TARGET}x: {'met' if ratio >= FANOUT_TARGET else 'MISSED'}; "
          f"spread {spread}; load average {os.getloadavg()[0]:.1f})")
    print(f"   peak RSS of a scoring worker process: {', '.join(f'{v / 1024:.0f} MiB' for v in rss.values())}")


def drift_vs_bare(s: bi.Setup, repeats: int) -> None:
    import onnxruntime as ort

    from serving.job import run_job
    from serving.session import create_session

    n, bs = len(s.x), s.batch_size
    plain = ort.InferenceSession(str(s.onnx_path), providers=["CPUExecutionProvider"])
    bare_default, bare_job = bi.bare_runner(plain, s.x, bs), bi.bare_runner(create_session(s.onnx_path, "cpu"), s.x, bs)
    no_drift = JobConfig(input=s.paths["npy"], output=s.out, model=str(s.onnx_path), track=False, batch_size=bs,
                         overwrite=True)
    runs = {"bare session, onnxruntime defaults": (n, bare_default), "bare session, the job's settings": (n, bare_job),
            "job .npy with the drift check": (n, bi.job_runner(s, "npy")),
            "job .npy without a reference": (n, lambda: run_job(no_drift))}
    rates, _ = bi.measure(runs, repeats)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ceiling = max(med["bare session, onnxruntime defaults"], med["bare session, the job's settings"])
    r = med["job .npy with the drift check"] / ceiling
    print(f"\n3. job vs bare session ({n:,} images, batch {bs}): "
          + ", ".join(f"{k} {v:,.0f}/s ({v / ceiling:.0%})" for k, v in med.items())
          + f"; with the drift check {r:.0%} (target >= {DRIFT_TARGET:.0%}: {'met' if r >= DRIFT_TARGET else 'MISSED'};"
          f" load average {os.getloadavg()[0]:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=24, help="inputs in the inbox (>= 20)")
    p.add_argument("--images", type=int, default=50_000,
                   help="images per input (the default makes ~1.2 s of scoring for one worker on 2 cores, "
                        "against a fan-out run's fixed ~0.25 s, its flow and task runs on the Prefect API, which "
                        "the ratio includes; with 4,000, ~0.1 s of scoring, a second worker gains nothing)")
    p.add_argument("--bucket-inputs", type=int, default=6, help="inputs of the bucket-vs-folder inbox")
    p.add_argument("--repeats", type=int, default=3, help="runs per candidate (median reported)")
    p.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE)
    a = p.parse_args()
    for k, v in {"ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        os.environ.setdefault(k, v)
    print(f"{len(os.sched_getaffinity(0))} CPUs; load average before: {os.getloadavg()[0]:.1f} (other work on "
          "the machine skews every figure; compare the ratios of one run)")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        s = bi.prepare(Path(tmp), a.inputs * a.images, 0, a.batch_size)
        inbox = Path(tmp) / "inbox"
        write_inbox(inbox, s.x, a.inputs, a.images)
        total = a.inputs * a.images
        few = Path(tmp) / "inbox-few"  # the bucket's per-input requests are slow on a loaded machine
        few.mkdir()
        for p in sorted(inbox.iterdir())[: a.bucket_inputs]:
            shutil.copy(p, few / p.name)
        bucket_vs_folder(s, few, a.bucket_inputs * a.images, a.repeats)
        one_vs_two_workers(s, inbox, total, a.repeats)
        drift_vs_bare(s, a.repeats)


if __name__ == "__main__":
    main()
