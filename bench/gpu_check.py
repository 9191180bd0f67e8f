"""The GPU acceptance run (`make gpu-check`): one command that proves the CUDA path and measures it,
in under 5 minutes on a CUDA machine. Without a GPU that torch can use it prints one line and exits 0.
Where torch has the GPU but onnxruntime has no CUDA provider (the CPU `onnxruntime` package, as on a
bare CUDA image: bench/device/README.md), step 1 runs and steps 2 and 3 are one failed check naming why.

On a CUDA machine, into a temporary MNISTOPS_HOME and MLflow store (nothing of the user's touched):

1. training: the DDP training on every GPU with nccl, through the real launcher (`launch_training`)
   and release path (export -> parity -> register -> gate), to the gate. Checks: world size = the GPU
   count, backend nccl, device cuda, the gate accepted. Figures: the median epoch, its ratio to the
   20 ms target (one H200-class GPU; with several GPUs a one-GPU training is run as well, for the
   target) and to the epoch floor measured on the same GPU in this run (bench/floor.py).
2. parity: the exported model on onnxruntime's CUDA provider (serving's options: TF32 off) against
   PyTorch on CUDA (TF32 off) and on the CPU, over the validation split and at batch sizes 1, 7 and
   10,000; and that the gate's own parity figures came from the CUDA provider.
3. batch throughput on the CUDA provider, images/s over the same N MNIST-like images: the batch job
   (`run_job`, .npy in, Parquet out), the bare session (`session.run` on an in-memory array), the bare
   session with IO binding from pinned host buffers (copy of the next batch overlapping the current
   run), and the host-to-device copy bound measured in the same run (pinned host -> GPU copy of the
   images: no inference path can beat it). Target: the job >= 50% of the copy bound.

Writes every figure to bench/out/gpu.json and a table on stdout. Exit status: 1 when a check fails
(training not on every GPU with nccl, gate rejected, parity failed), else 0; a missed performance
target is printed as MISSED and recorded, not an error (the figures are what the run is for).

    .venv/bin/python bench/gpu_check.py [--images 1000000] [--out bench/out/gpu.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from common.atomic import atomic_path  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "out" / "gpu.json"
EPOCH_TARGET_S = 0.020
COPY_BOUND_TARGET = 0.50
MODEL_NAME = "gpu-check-mlp"
EXPERIMENT = "gpu-check"
QUIET = {"ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
         "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@dataclass(frozen=True)
class Row:
    """One line of the report. kind `check`: must hold (a failure fails the run); `target`: a
    performance target (reported met / MISSED); `figure`: a measurement without a target."""

    name: str
    value: float | str
    unit: str = ""
    target: str = ""
    ok: bool | None = None
    kind: str = "figure"

    def verdict(self) -> str:
        if self.ok is None:
            return ""
        if self.kind == "check":
            return "ok" if self.ok else "FAILED"
        return "met" if self.ok else "MISSED"


# ---------------------------------------------------------------------------------------------
# The report (pure: tested on any machine)


def format_table(rows: list[Row]) -> str:
    def value(r: Row) -> str:
        if isinstance(r.value, str):
            return r.value
        return f"{r.value:,.0f}" if abs(r.value) >= 1000 else f"{r.value:.4g}"

    width = max([len(r.name) for r in rows] + [10])
    lines = [f"{'':{width}s}  {'value':>14s}  {'unit':10s}  {'target':18s}  verdict"]
    lines += [f"{r.name:{width}s}  {value(r):>14s}  {r.unit:10s}  {r.target:18s}  {r.verdict()}" for r in rows]
    return "\n".join(lines)


def failed_checks(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.kind == "check" and not r.ok]


def write_report(report: dict, rows: list[Row], path: Path) -> str:
    """Write the figures (`report` plus the rows) to `path` as JSON, atomically; return the table."""
    doc = {**report, "rows": [{**asdict(r), "verdict": r.verdict()} for r in rows],
           "failed_checks": [r.name for r in failed_checks(rows)]}
    with atomic_path(Path(path), suffix=".json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return format_table(rows)


# ---------------------------------------------------------------------------------------------
# Whether there is anything to check


def no_gpu_reason() -> str | None:
    """Why this machine cannot train on CUDA, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def no_provider_reason() -> str | None:
    """Why onnxruntime cannot run on this machine's GPU, or None when it can. Without its CUDA
    provider (the CPU `onnxruntime` package installed instead of `onnxruntime-gpu`, as on a bare
    CUDA image) the training is still checked and measured; parity and throughput on the CUDA
    provider cannot be, and that is a failed check, not a reason to measure nothing."""
    import onnxruntime as ort

    from serving.session import gpu_usable

    if gpu_usable():
        return None
    return f"onnxruntime {ort.__version__} has no usable CUDA provider (providers: {', '.join(ort.get_available_providers())})"


def provider_steps(missing: str | None) -> tuple[tuple[str, ...], list[Row]]:
    """The steps that need onnxruntime's CUDA provider, and the rows that stand for them without it:
    (steps to run, rows)."""
    if missing is None:
        return ("parity", "throughput"), []
    return (), [Row("onnxruntime's CUDA provider (steps 2 and 3)", missing, "", "usable", False, "check")]


def machine() -> dict:
    import onnxruntime as ort
    import torch

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "python": platform.python_version(),
    }


def data_source() -> str | None:
    """MNISTOPS_DATA_SOURCE, else a shared/data/mnist folder beside or above the checkout (as CI has)."""
    if os.environ.get("MNISTOPS_DATA_SOURCE"):
        return os.environ["MNISTOPS_DATA_SOURCE"]
    for base in (ROOT, ROOT.parent):
        if (base / "shared" / "data" / "mnist").is_dir():
            return str(base / "shared" / "data" / "mnist")
    return None


# ---------------------------------------------------------------------------------------------
# 1. Training to the gate


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _train_on(home: Path, prepared, devices: tuple[int, ...] | None, graphs: bool = True):
    """One training through the real launcher on `devices` (None: every GPU), a one-GPU training's
    forward and backward graphed unless `graphs` is False (nn_core.captured): (its result, its wall
    seconds). One node: the launcher returns the result (it hosts rank 0)."""
    from nn_core.captured import ENV
    from nn_core.launch import LaunchSpec, launch_training, new_training_id
    from nn_core.train import TrackingConfig, TrainJob

    tid = new_training_id()
    job = TrainJob(data_path=str(prepared.cache_path), out_dir=str(home / "runs" / tid),
                   tracking=TrackingConfig(training_id=tid, experiment=EXPERIMENT),
                   data_source=os.environ.get("MNISTOPS_DATA_SOURCE"))
    before = os.environ.get(ENV)
    os.environ[ENV] = "1" if graphs else "0"  # the spawned workers read it
    try:
        t = time.perf_counter()
        result = launch_training(job, LaunchSpec(device="cuda", devices=devices))
        if result is None:  # only a node without rank 0 gets None; this one node has every rank
            raise RuntimeError(f"training {tid} reported no result on this node")
        return result, time.perf_counter() - t
    finally:
        if before is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = before


def _release(result, cache: Path):
    """The release path, to the gate: export -> parity -> register -> gate. (exported, version,
    decision)."""
    from nn_core.registry import GateConfig
    from nn_core.release import export_and_check, gate_and_record, register

    exported = export_and_check(result, cache)
    version = register(result, exported, cache, MODEL_NAME)
    decision = gate_and_record(result, exported, version, cache, MODEL_NAME, GateConfig())
    return exported, version, decision


def training(home: Path, prepared, gpus: int) -> tuple[dict, list[Row]]:
    from floor import epoch_floor

    result, wall = _train_on(home, prepared, None)  # every GPU
    t = time.perf_counter()
    exported, version, decision = _release(result, prepared.cache_path)
    release_s = time.perf_counter() - t
    m = result.metrics
    epoch_all = _median(m["epoch_seconds"])
    one = result if gpus == 1 else _train_on(home, prepared, (0,))[0]
    eager = _train_on(home, prepared, (0,), graphs=False)[0]  # the same one-GPU training, steps eager
    epoch_one = _median(one.metrics["epoch_seconds"])
    floor = epoch_floor(device="cuda:0", epochs=5)
    figures = {
        "world_size": m["world_size"], "backend": m["backend"], "device": m["device"],
        "epoch_seconds_all_gpus": m["epoch_seconds"], "epoch_seconds_one_gpu": one.metrics["epoch_seconds"],
        "epoch_median_s_all_gpus": epoch_all, "epoch_median_s_one_gpu": epoch_one, "floor_epoch_s_one_gpu": floor,
        "step_mode_one_gpu": one.metrics.get("step_mode", "?"), "step_mode_eager_run": eager.metrics.get("step_mode", "?"),
        "epoch_seconds_one_gpu_eager": eager.metrics["epoch_seconds"],
        "epoch_median_s_one_gpu_eager": _median(eager.metrics["epoch_seconds"]),
        "val_accuracy_one_gpu": one.val_accuracy, "val_accuracy_one_gpu_eager": eager.val_accuracy,
        "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
        "train_wall_s": wall, "release_s": release_s, "gate": decision.to_dict(), "version": version,
        "gate_parity": exported.parity.to_dict(), "run_id": result.run_id,
        "checkpoint": str(result.checkpoint), "onnx_path": str(exported.onnx_path),
    }
    return figures, training_rows(figures, decision, exported, gpus)


def training_rows(f: dict, decision, exported, gpus: int) -> list[Row]:
    """Step 1's rows, from its figures (`training`), the gate's decision and the exported model."""
    epoch_all, epoch_one, floor = f["epoch_median_s_all_gpus"], f["epoch_median_s_one_gpu"], f["floor_epoch_s_one_gpu"]
    return [
        Row("training: world size = GPUs", f["world_size"], "", f"= {gpus}", f["world_size"] == gpus, "check"),
        Row("training: backend", f["backend"], "", "nccl", f["backend"] == "nccl", "check"),
        Row("training: device", f["device"], "", "cuda", f["device"] == "cuda", "check"),
        Row("training: validation accuracy", f["val_accuracy"], "", ">= 0.96", f["val_accuracy"] >= 0.96, "check"),
        Row("gate", decision.promotion, "", "accepted", decision.accepted, "check"),
        Row("gate's parity provider", exported.parity.provider, "", "CUDA",
            exported.parity.provider == "CUDAExecutionProvider", "check"),
        Row(f"epoch (median), {gpus} GPU(s)", epoch_all * 1e3, "ms"),
        Row("epoch (median), one GPU", epoch_one * 1e3, "ms", f"<= {EPOCH_TARGET_S * 1e3:.0f} ms",
            epoch_one <= EPOCH_TARGET_S, "target"),
        Row("epoch one GPU / 20 ms target", epoch_one / EPOCH_TARGET_S, "x", "<= 1", epoch_one <= EPOCH_TARGET_S, "target"),
        Row("training step, one GPU", f["step_mode_one_gpu"], "", "cuda-graph",
            f["step_mode_one_gpu"] == "cuda-graph", "target"),
        Row("epoch (median), one GPU, steps eager", f["epoch_median_s_one_gpu_eager"] * 1e3, "ms"),
        Row("epoch eager / epoch one GPU", f["epoch_median_s_one_gpu_eager"] / epoch_one, "x"),
        Row("validation accuracy, one GPU: graph, eager", f"{f['val_accuracy_one_gpu']:.4f}, "
            f"{f['val_accuracy_one_gpu_eager']:.4f}", "", ">= 0.96 both",
            min(f["val_accuracy_one_gpu"], f["val_accuracy_one_gpu_eager"]) >= 0.96, "check"),
        Row("floor epoch, one GPU (bench/floor.py)", floor * 1e3, "ms"),
        Row("epoch one GPU / floor", epoch_one / floor, "x"),
        Row("launch_training wall (start-up included)", f["train_wall_s"], "s"),
        Row("export + parity + register + gate", f["release_s"], "s"),
    ]


# ---------------------------------------------------------------------------------------------
# 2. Parity on the CUDA provider


def parity(checkpoint: Path, onnx_path: Path, cache: Path) -> tuple[dict, list[Row]]:
    from nn_core.checkpoint import load_model
    from nn_core.data import load_splits
    from nn_core.export import check_parity
    from serving.session import create_session

    model, _ = load_model(checkpoint)
    s = load_splits(cache)
    session = create_session(onnx_path, "cuda")
    reports = {dev: check_parity(model, onnx_path, s.val_images, s.val_labels, session=session, torch_device=dev)
               for dev in ("cuda", "cpu")}
    rows = []
    for dev, r in reports.items():
        rows.append(Row(f"parity CUDA EP vs torch {dev}: max |diff|", r.max_abs_diff, "", f"<= {r.tolerance:g}",
                        r.passed, "check"))
        rows.append(Row(f"parity CUDA EP vs torch {dev}: argmax agreement", r.argmax_agreement, "", "= 1",
                        r.argmax_agreement == 1.0, "check"))
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    rows.append(Row("CUDA EP option use_tf32", options.get("use_tf32", "?"), "", "0", options.get("use_tf32") == "0", "check"))
    return {dev: r.to_dict() for dev, r in reports.items()} | {"cuda_provider_options": options}, rows


# ---------------------------------------------------------------------------------------------
# 3. Batch throughput on the CUDA provider


def _best_rate(n: int, fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm up: the CUDA context, cuBLAS handles, memory arenas, the page cache
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), rates


def copy_bound(pinned, repeats: int = 5) -> float:
    """Seconds to copy the whole pinned host array to the GPU (median): the host-to-device bound."""
    import torch

    dst = torch.empty_like(pinned, device="cuda")
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def _io_buffers(n: int, batch: int, dev):
    """IO binding's buffers: two device input and two device output batches (the run of one batch
    overlaps the copy of the next), and a pinned host array for all n outputs."""
    import torch

    ins = [torch.empty((batch, 28, 28), dtype=torch.uint8, device=dev) for _ in range(2)]
    outs = [torch.empty((batch, 10), dtype=torch.float32, device=dev) for _ in range(2)]
    host_out = torch.empty((n, 10), dtype=torch.float32).pin_memory()
    return ins, outs, host_out


def _copy_on(stream, dst, src):
    """Issue the copy of `src` into `dst` on `stream`, not blocking; return the event recorded after it
    on that stream (done when the copy is)."""
    import torch

    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
    return ev


def iobinding_runner(session, pinned, batch: int, device_id: int = 0) -> Callable[[], object]:
    """Run every batch of the pinned host array through `session` with IO binding: two device input
    buffers, the next batch's host-to-device copy issued on a side stream before the current run, so
    the copy overlaps the run; outputs stay on the device and go back to a pinned host array on the
    same side stream."""
    import numpy as np
    import torch

    from serving.session import INPUT_NAME, OUTPUT_NAME

    n = len(pinned)
    dev = torch.device("cuda", device_id)
    ins, outs, host_out = _io_buffers(n, batch, dev)
    copies = torch.cuda.Stream(dev)
    binding = session.io_binding()

    def h2d(j: int) -> torch.cuda.Event:
        s = j * batch
        k = min(batch, n - s)
        return _copy_on(copies, ins[j % 2][:k], pinned[s : s + k])

    def run() -> torch.Tensor:
        steps = -(-n // batch)
        ready = h2d(0)
        for j in range(steps):
            s = j * batch
            k = min(batch, n - s)
            ready.synchronize()  # batch j is on the device (onnxruntime runs on its own stream)
            if j + 1 < steps:
                ready = h2d(j + 1)  # overlaps the run below
            binding.bind_input(INPUT_NAME, "cuda", device_id, np.uint8, (k, 28, 28), ins[j % 2].data_ptr())
            binding.bind_output(OUTPUT_NAME, "cuda", device_id, np.float32, (k, 10), outs[j % 2].data_ptr())
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()  # the outputs are complete before they are copied back
            with torch.cuda.stream(copies):
                host_out[s : s + k].copy_(outs[j % 2][:k], non_blocking=True)
        copies.synchronize()
        return host_out

    return run


def _bare_runner(session, x, batch: int) -> Callable[[], None]:
    """Every batch of the in-memory array `x` through `session.run`."""
    from serving.session import INPUT_NAME, OUTPUT_NAME

    def bare() -> None:
        for s in range(0, len(x), batch):
            session.run([OUTPUT_NAME], {INPUT_NAME: x[s : s + batch]})

    return bare


def _same_outputs(session, fast: Callable[[], object], x, batch: int) -> bool:
    """Whether the IO-binding path (`fast`) computes what the plain run computes (first three batches)."""
    import numpy as np

    from serving.session import INPUT_NAME, OUTPUT_NAME

    n = len(x)
    ref = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[s : s + batch]})[0]
                          for s in range(0, min(n, 3 * batch), batch)])
    return bool(np.allclose(fast()[: len(ref)].numpy(), ref, atol=1e-6))


def throughput(onnx_path: Path, tmp: Path, n: int, repeats: int) -> tuple[dict, list[Row]]:
    import numpy as np
    import torch

    from bench_inference import mnist_like
    from serving.job import CUDA_BATCH_SIZE, JobConfig, run_job
    from serving.session import create_session

    x = mnist_like(n)
    npy = tmp / "images.npy"
    np.save(npy, x)
    session = create_session(onnx_path, "cuda")
    bs = CUDA_BATCH_SIZE
    pinned = torch.from_numpy(x).pin_memory()
    bound_s = copy_bound(pinned)
    bound = n / bound_s
    bare = _bare_runner(session, x, bs)
    fast = iobinding_runner(session, pinned, bs)
    same = _same_outputs(session, fast, x, bs)
    job_cfg = JobConfig(input=npy, output=tmp / "predictions.parquet", model=str(onnx_path), device="cuda", track=False)
    providers = []

    def job() -> None:
        providers.append(run_job(job_cfg).provider)

    rates = {name: _best_rate(n, fn, repeats) for name, fn in
             {"job": job, "bare": bare, "iobinding": fast}.items()}
    med = {k: v[0] for k, v in rates.items()}
    figures = {"images": n, "batch_size": bs, "copy_bound_s": bound_s, "copy_bound_images_per_s": bound,
               "copy_bound_gb_per_s": x.nbytes / bound_s / 1e9, "images_per_s": med,
               "runs": {k: v[1] for k, v in rates.items()}, "job_provider": providers[-1]}
    return figures, throughput_rows(figures, same)


def throughput_rows(f: dict, same: bool) -> list[Row]:
    """Step 3's rows, from its figures (`throughput`) and whether IO binding computes the plain run's
    output."""
    med, bound, provider = f["images_per_s"], f["copy_bound_images_per_s"], f["job_provider"]
    return [
        Row("job provider", provider, "", "CUDA", provider == "CUDAExecutionProvider", "check"),
        Row("IO binding output = plain run output", "yes" if same else "no", "", "yes", same, "check"),
        Row("host-to-device copy bound (pinned)", bound, "img/s", f"{f['copy_bound_gb_per_s']:.1f} GB/s"),
        Row("bare session, CUDA EP", med["bare"], "img/s"),
        Row("bare session, IO binding + pinned", med["iobinding"], "img/s"),
        Row("batch job (.npy -> Parquet), CUDA EP", med["job"], "img/s"),
        Row("job / bare session", med["job"] / med["bare"], "x"),
        Row("IO binding / copy bound", med["iobinding"] / bound, "x"),
        Row("job / copy bound", med["job"] / bound, "x", f">= {COPY_BOUND_TARGET:.0%}",
            med["job"] / bound >= COPY_BOUND_TARGET, "target"),
    ]


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1_000_000, help="images of the throughput input")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per throughput candidate (median)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the figures go (JSON)")
    return p.parse_args(argv)


def use_private_store(tmp: Path) -> None:
    """MNISTOPS_HOME, the MLflow store and the artifact root, all in `tmp`."""
    # A private store: the run touches none of the user's runs, models or aliases.
    os.environ["MNISTOPS_HOME"] = str(tmp / "home")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MNISTOPS_ARTIFACT_ROOT"] = str(tmp / "mlartifacts")
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


def run_steps(report: dict, tmp: Path, prepared, gpus: int, images: int, repeats: int) -> list[Row]:
    """Steps 1 to 3 in order, each one's figures into `report` under its name (a later step reads an
    earlier one's there); the rows of all three (steps 2 and 3 only with onnxruntime's CUDA provider)."""
    missing = no_provider_reason()
    wanted, rows = provider_steps(missing)
    steps = {
        "training": lambda: training(tmp / "home", prepared, gpus),
        "parity": lambda: parity(Path(report["training"]["checkpoint"]), Path(report["training"]["onnx_path"]),
                                 prepared.cache_path),
        "throughput": lambda: throughput(Path(report["training"]["onnx_path"]), tmp, images, repeats),
    }
    for name in ("training", *wanted):
        t = time.perf_counter()
        report[name], step_rows = steps[name]()
        rows += step_rows
        print(f"  {name} done in {time.perf_counter() - t:.1f} s", flush=True)
    if missing is not None:
        print(f"  parity and throughput on the CUDA provider skipped: {missing}", flush=True)
        report["parity"] = report["throughput"] = {"skipped": missing}
    return rows


def finish(report: dict, rows: list[Row], out: Path) -> int:
    """Write and print the report; the exit status (1 when a check failed)."""
    print(write_report(report, rows, out))
    print(f"figures: {out}")
    failed = failed_checks(rows)
    if failed:
        print(f"gpu-check FAILED: {', '.join(r.name for r in failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)

    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: no usable CUDA GPU on this machine ({reason}); nothing to check", flush=True)
        return 0

    import torch

    from nn_core.data import prepare
    from nn_core.datasets import MNIST

    gpus = torch.cuda.device_count()
    report: dict = {"machine": machine()}
    print(f"gpu-check on {gpus} x {report['machine']['gpus'][0]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mnistops-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        use_private_store(tmp)
        src = data_source()
        if src:
            os.environ["MNISTOPS_DATA_SOURCE"] = src
        prepared = prepare(MNIST, src, Path(os.environ.get("MNISTOPS_DATA_DIR") or tmp / "data"))
        rows = run_steps(report, tmp, prepared, gpus, a.images, a.repeats)
    return finish(report, rows, a.out)


if __name__ == "__main__":
    sys.exit(main())
