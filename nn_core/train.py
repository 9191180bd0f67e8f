"""The training loop that runs in every DDP worker. Rank 0 alone logs to MLflow and writes files.

Data path: the cached splits go straight onto the device as tensors; each epoch a seeded permutation
is sharded across ranks; validation counts are all-reduced, so metrics cover exactly every sample.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nn_core import metrics as M
from nn_core import reaping, tracking
from nn_core.captured import capture
from nn_core.checkpoint import CHECKPOINT_NAME, atomic_torch_save, load_checkpoint
from nn_core.config import REPORTING_ONLY, Device, MLPConfig, TrackingConfig, TrainConfig
from nn_core.data import Splits, load_splits
from nn_core.datasets import get_spec, mirrors_for
from nn_core.distributed import DistEnv, all_reduce_sum, broadcast_object, ddp_context
from nn_core.model import BatchLoss, build_model, stats_from
from common.atomic import atomic_path
from common.fields import field_default
from common.experiments import run_context_tags

RESULT_NAME = "result.json"
# Set when the command is being stopped (SIGINT/SIGTERM). A DDP worker process is stopped by its
# signal; a training that runs in the command's own process on another thread (a sweep's trial) sees
# no signal, so it checks this between epochs.
STOPPING = threading.Event()


class TrainingStopped(BaseException):
    """The command is stopping: unwinds like KeyboardInterrupt (the run is resumable, not failed)."""


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, built once at the entry point and pickled to every worker."""

    data_path: str  # the dataset cache file
    out_dir: str  # checkpoint and result.json; rank 0's node
    model: MLPConfig = MLPConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig(training_id="local")
    device: Device = "auto"
    devices: tuple[int, ...] | None = None  # GPU ids of this training (local rank i -> devices[i]); None: all
    threads: int | None = None
    data_source: str | None = None  # recorded with the MLflow dataset input
    # Training parts of feedback sets (serving.feedback.write_training_parts: <digest>.npz files on
    # rank 0's node and every other), trained on beside the dataset's training split.
    feedback: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    total: int
    confusion: np.ndarray  # (10, 10): rows true, columns predicted


# ---------------------------------------------------------------------------------------------
# Small pure steps


def shard_indices(n: int, epoch: int, seed: int, env: DistEnv) -> torch.Tensor:
    """This rank's share of a permutation that depends only on (seed, epoch): every rank computes
    the same permutation and takes every world_size-th index; the tail that does not divide evenly
    is dropped so that all ranks take the same number of steps."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // env.world_size
    return perm[env.rank : per_rank * env.world_size : env.world_size].to(env.device)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    return None


def run_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, images, labels, idx: torch.Tensor,
    batch_size: int, env: DistEnv, per_batch: bool | None = None, full_batch: BatchLoss | None = None,
) -> tuple[torch.Tensor, float]:
    """One pass over this rank's shard. Returns (per-step loss averaged over ranks, train accuracy).

    `full_batch` computes a full batch's (loss, predictions): BatchLoss(model) unless the steps are
    replayed from CUDA graphs (nn_core.captured), whose outputs live in the graph's memory until its
    next call, so both are copied out before it; a partial last batch always runs eagerly.

    The step is what the arithmetic needs and little else (bench/bench_training.py prints its ratio to
    the floor): batches are gathered with index_select (~3x faster than advanced indexing), each when
    it is used (`per_batch`, the default on the CPU: a small copy that stays in cache, ~5 ms an epoch
    less than gathering the shard first) or the whole shard once (on a GPU: two kernel launches a
    step fewer); the two give the same batches. Gradients are dropped by assignment (zero_grad's
    profiler range and grouping cost more than the loop); losses and predictions stay on the device
    (.item() would be a CPU-GPU sync every step) and are compared once at the end."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    eager = BatchLoss(model)
    full_batch = full_batch or eager
    per_batch = env.device.type == "cpu" if per_batch is None else per_batch
    ys = labels.index_select(0, idx)  # the labels in this epoch's order: small, gathered once
    xs = None if per_batch else images.index_select(0, idx)
    preds = torch.empty(len(idx), dtype=torch.int64, device=env.device)
    losses = torch.empty(-(-len(idx) // batch_size), device=env.device)
    for i, start in enumerate(range(0, len(idx), batch_size)):
        end = start + batch_size
        x = images.index_select(0, idx[start:end]) if per_batch else xs[start:end]
        y = ys[start:end]
        loss, preds[start:end] = (full_batch if len(y) == batch_size else eager)(x, y)
        losses[i] = loss.detach()
        for p in params:
            p.grad = None
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    step_losses = all_reduce_sum(losses, env) / env.world_size
    counts = all_reduce_sum(torch.stack([(preds == ys).sum(), torch.tensor(len(idx), device=env.device)]), env)
    return step_losses.cpu(), counts[0].item() / counts[1].item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, env: DistEnv, batch_size: int) -> EvalResult:
    """Exact metrics over all samples: each rank takes a contiguous slice, sums are all-reduced.
    No padding, so no sample is counted twice."""
    model.eval()
    n = len(labels)
    mine = torch.tensor_split(torch.arange(n), env.world_size)[env.rank]
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    confusion = torch.zeros(100, dtype=torch.int64, device=env.device)
    for start in range(0, len(mine), batch_size):
        b = mine[start : start + batch_size].to(env.device)
        logits = model(images[b])
        loss_sum += F.cross_entropy(logits, labels[b], reduction="sum").double()
        confusion += torch.bincount(labels[b] * 10 + logits.argmax(1), minlength=100)
    all_reduce_sum(loss_sum, env)
    all_reduce_sum(confusion, env)
    cm = confusion.view(10, 10).cpu().numpy()
    correct = int(np.trace(cm))
    return EvalResult(loss=loss_sum.item() / n, accuracy=correct / n, correct=correct, total=n, confusion=cm)


def per_class_accuracy(cm: np.ndarray) -> list[float]:
    return [float(cm[i, i] / max(cm[i].sum(), 1)) for i in range(len(cm))]


# ---------------------------------------------------------------------------------------------
# Rank 0's side effects


def with_feedback(splits: Splits, parts: tuple[str, ...]) -> Splits:
    """The splits with each feedback set's training part appended to the training split (images
    (N, 28, 28) uint8, labels (N,) int64); validation and test unchanged."""
    if not parts:
        return splits
    images, labels = [splits.train_images], [splits.train_labels]
    for path in parts:
        with np.load(path, allow_pickle=False) as z:
            images.append(torch.from_numpy(z["images"]).to(splits.train_images.device))
            labels.append(torch.from_numpy(z["labels"].astype(np.int64)).to(splits.train_labels.device))
    return replace(splits, train_images=torch.cat(images), train_labels=torch.cat(labels))


def feedback_digests(parts: tuple[str, ...]) -> list[str]:
    return [Path(p).stem for p in parts]


class RunLogger:
    """Rank 0's MLflow run for this training: created once, found again after a restart."""

    def __init__(self, job: TrainJob, env: DistEnv, splits: Splits, steps_per_epoch: int, model_cfg: MLPConfig):
        t = job.tracking
        tags = {
            # Who and what started it ("Created by", "Source" in the UI); the caller's tags say better.
            **run_context_tags("mnistops train"),
            **t.tags,
            "mnistops.kind": "training",
            "dataset": splits.name,
            "dataset_digest": splits.digest,
            "device": env.device.type,
            "world_size": env.world_size,
            "backend": env.backend or "none",
            "torch_version": torch.__version__,
            "hidden": "x".join(map(str, model_cfg.hidden)),
        }
        if t.parent_run_id:
            tags["mlflow.parentRunId"] = t.parent_run_id
        run_name = t.run_name or default_run_name(job)
        params = {
            # The model as built: mean/std are the training split's, not the config's defaults.
            **tracking.flatten("model", model_cfg.to_dict()),
            **tracking.flatten("train", asdict(job.train)),
            "world_size": env.world_size,
            "dataset": splits.name,
            "dataset_digest": splits.digest,
            # What else it trained on: compared on a resume like every param (a resume without them is refused).
            "feedback": ",".join(feedback_digests(job.feedback)) or "none",
        }
        # Rank 0 is the only process of a training that touches MLflow (two nodes creating a fresh
        # SQLite store at once would race its schema migration).
        tracking.ensure_experiment(t.experiment, description=tracking.TRAINING_EXPERIMENT_DESCRIPTION)
        self.run_id, created = tracking.find_or_create_run(
            t.experiment, t.training_id, run_name, {k: str(v) for k, v in tags.items()},
            params=params, ignore=frozenset({"world_size", *(f"train.{k}" for k in REPORTING_ONLY)}))
        # Whoever runs it now owns it (a resumed run too): a later command reaps it if this owner dies.
        tracking.log_tags(self.run_id, {reaping.OWNER_TAG: reaping.owner_id()})
        self.steps_per_epoch = steps_per_epoch
        # After a restart, what the run already holds: epochs logged before the crash are not repeated.
        self.logged: set[int] = set() if created else tracking.logged_steps(self.run_id, M.VAL_ACCURACY)
        if created:
            tracking.log_params(self.run_id, params)
            tracking.log_dataset_splits(self.run_id, splits, self._source_uri(job, splits))
            if job.feedback:
                tracking.log_feedback_inputs(self.run_id, splits.name, job.feedback)
        self.system_metrics = tracking.start_system_metrics(self.run_id, resume=not created)

    @staticmethod
    def _source_uri(job: TrainJob, splits: Splits) -> str:
        source = job.data_source
        if not source:
            return mirrors_for(get_spec(splits.name))[0]
        return tracking.redact_url(source) if "://" in source else Path(source).resolve().as_uri()

    def _log_epoch(self, h: dict) -> None:
        epoch = h["epoch"]
        tracking.log_series(self.run_id, M.TRAIN_LOSS_STEP, h["step_losses"], first_step=(epoch - 1) * self.steps_per_epoch)
        tracking.log_metrics(self.run_id, {name: h[key] for key, name in M.EPOCH_SERIES.items()}, step=epoch)
        self.logged.add(epoch)

    def sync(self, history: list[dict], *, final: bool = False) -> None:
        """Log every epoch of `history` that MLflow does not have yet. The epochs live in the
        checkpoint, so an unreachable tracking server (after its client's own retries) costs no
        training: they are logged once it answers again. At the end of training it must answer."""
        try:
            for h in history:
                if h["epoch"] not in self.logged:
                    self._log_epoch(h)
        except Exception as e:
            missing = sorted({h["epoch"] for h in history} - self.logged)
            if final:
                raise RuntimeError(f"MLflow run {self.run_id}: epochs {missing} could not be logged ({e}); "
                                   "the trained checkpoint is kept: resume the training to log them") from e
            print(f"warning: MLflow unreachable ({type(e).__name__}); epochs {missing} stay in the checkpoint "
                  "and are logged when it answers again", flush=True)


def default_run_name(job: TrainJob) -> str:
    t = job.train
    # The dataset first (the cache file is named after it: nn_core.data.cache_path), so that runs of
    # different tasks with the same settings tell apart.
    return (f"{Path(job.data_path).stem}-mlp{'x'.join(map(str, job.model.hidden))}-lr{t.lr:g}-bs{t.batch_size}"
            f"-e{t.epochs}-s{t.seed}")


def _write_json_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def result_of(job: TrainJob, env: DistEnv, run_id: str | None, history: list[dict], val: EvalResult,
              test: EvalResult, out_dir: Path, final_eval_seconds: float, step_mode: str = "eager") -> dict:
    """What result.json holds (and the pipeline reads back as TrainResult)."""
    return {
        "run_id": run_id,
        "checkpoint": str(out_dir / CHECKPOINT_NAME),
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "val_per_class_accuracy": per_class_accuracy(val.confusion),
        "test_per_class_accuracy": per_class_accuracy(test.confusion),
        "val_confusion": val.confusion.tolist(),
        "test_confusion": test.confusion.tolist(),
        "epochs": len(history),
        "train_seconds": sum(h["epoch_seconds"] for h in history),
        "epoch_seconds": [h["epoch_seconds"] for h in history],
        # every evaluation of this training (per epoch and final): with train_seconds, the work that
        # the training's wall time is measured against (bench/bench_pipeline.py)
        "eval_seconds": sum(h.get("val_seconds", 0.0) for h in history) + final_eval_seconds,
        "seconds_to_target": seconds_to_target(history, job.train.target_val_accuracy),
        "world_size": env.world_size,
        "device": env.device.type,
        "backend": env.backend or "none",
        "step_mode": step_mode,  # "cuda-graph" or "eager (why)": how this process ran its steps
        "feedback": list(job.feedback),  # the feedback training parts it trained on (the drift reference's too)
    }


def _log_plots(job: TrainJob, logger: RunLogger, history: list[dict], val: EvalResult, test: EvalResult,
               result: dict, classes: list[str]) -> None:
    from nn_core import plots  # matplotlib: only rank 0, only here (~1 s of imports a worker need not pay)

    steps = [x for h in history for x in h["step_losses"]]
    name = job.tracking.run_name or default_run_name(job)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plots.loss_curve(steps, logger.steps_per_epoch, history, tmp / "loss_curve.png", title=f"Training curves: {name}")
        plots.confusion_matrix(val.confusion, classes, f"validation ({val.accuracy:.2%})", tmp / "confusion_matrix_val.png")
        plots.confusion_matrix(test.confusion, classes, f"test ({test.accuracy:.2%})", tmp / "confusion_matrix_test.png")
        plots.per_class_accuracy(result["val_per_class_accuracy"], result["test_per_class_accuracy"], classes,
                                 tmp / "per_class_accuracy.png", title=f"Accuracy per class: {name}")
        for png in tmp.glob("*.png"):
            tracking.client().log_artifact(logger.run_id, str(png), "plots")


def log_final(job: TrainJob, env: DistEnv, logger: RunLogger, history: list[dict], val: EvalResult,
              test: EvalResult, result: dict, out_dir: Path, classes: list[str]) -> None:
    """The run's last epochs, final figures, plots, checkpoint and description; then FINISHED."""
    logger.sync(history, final=True)
    rid = logger.run_id
    # Final figures, logged once (step 0): the runs table and the compare view read them; the
    # per-epoch series already hold the final validation figures as their last points.
    summary = {M.TEST_ACCURACY: test.accuracy, M.TEST_LOSS: test.loss, M.TRAIN_SECONDS: result["train_seconds"]}
    if result["seconds_to_target"] is not None:
        summary[M.SECONDS_TO_TARGET] = result["seconds_to_target"]
    tracking.log_metrics(rid, summary)
    _log_plots(job, logger, history, val, test, result, classes)
    tracking.client().log_artifact(rid, str(out_dir / CHECKPOINT_NAME), "checkpoint")
    tracking.set_note(rid, training_note(job, env, result))
    tracking.stop_system_metrics(logger.system_metrics)
    tracking.end_run(rid, "FINISHED")


def training_note(job: TrainJob, env: DistEnv, result: dict) -> str:
    """The run's one-paragraph description (the UI shows it on the run page): what was trained, how,
    on what, and how well. The pipeline appends the gate's decision once it is known."""
    m, t = job.model, job.train
    layers = "-".join(map(str, (m.in_features, *m.hidden, m.num_classes)))
    to_target = result["seconds_to_target"]
    reached = (f"reached {t.target_val_accuracy:.0%} validation accuracy after {to_target:.1f} s"
               if to_target is not None else f"never reached {t.target_val_accuracy:.0%} validation accuracy")
    return (f"MLP {layers} trained for {result['epochs']} epochs with Adam (lr {t.lr:g}, {t.schedule} schedule, "
            f"weight decay {t.weight_decay:g}, global batch {t.batch_size}, seed {t.seed}) on {env.world_size} x "
            f"{env.device.type} ({env.backend or 'one process'}{_graphed(result)}) on {Path(job.data_path).stem}: validation accuracy {result['val_accuracy']:.2%}, test accuracy "
            f"{result['test_accuracy']:.2%}; {result['train_seconds']:.1f} s of training, {reached}.")


def _graphed(result: dict) -> str:
    return ", steps replayed from a CUDA graph" if result.get("step_mode") == "cuda-graph" else ""


def seconds_to_target(history: list[dict], target: float) -> float | None:
    elapsed = 0.0
    for h in history:
        elapsed += h["epoch_seconds"]
        if h["val_accuracy"] >= target:
            return elapsed
    return None


# ---------------------------------------------------------------------------------------------
# The worker


@dataclass
class TrainState:
    """A training in progress: what one epoch needs and updates, and what a checkpoint saves."""

    model_cfg: MLPConfig
    model: torch.nn.Module  # the raw module: saved, evaluated and exported
    ddp_model: torch.nn.Module  # what the steps run (DDP-wrapped when there are peers)
    optimizer: torch.optim.Optimizer  # its state and hyperparameters: what a checkpoint saves
    scheduler: object | None
    history: list[dict]  # one dict per finished epoch; a resumed training starts with the checkpoint's
    per_rank_batch: int
    steps_per_epoch: int
    full_batch: BatchLoss | None = None  # a full batch's step graphed (nn_core.captured), else None: eager
    step_mode: str = "eager"  # "cuda-graph", or "eager (why not)": reported with the result


def setup(job: TrainJob, env: DistEnv, splits: Splits, ckpt_path: Path) -> TrainState:
    """The model, optimizer and schedule: fresh, or resumed from the checkpoint of this same job.

    Only rank 0 reads the checkpoint; the others get it over the process group, so nodes need no
    shared file system for it as long as rank 0 stays on the node that wrote it (the Kubernetes
    manifests mount a shared volume because a rescheduled pod may move)."""
    cfg = job.train
    ckpt = load_checkpoint(ckpt_path) if env.is_main and ckpt_path.exists() else None
    ckpt = broadcast_object(ckpt, env)
    if ckpt is not None:  # every rank refuses alike, so none is left waiting in a collective
        check_resumable(ckpt, job, splits.digest, ckpt_path)
        model_cfg = MLPConfig.from_dict(ckpt["model_config"])
    else:
        mean, std = stats_from(splits.train_images)
        model_cfg = replace(job.model, mean=mean, std=std)
    model = build_model(model_cfg, cfg.seed).to(env.device)
    # Once per training. Fused: one kernel for all parameters instead of several ops per tensor,
    # which is most of an optimizer step for a model this small. torch documents fused Adam on both
    # devices a training runs on (CUDA, and the CPU since 2.4: the pinned 2.14.1 and a CUDA image's
    # 2.11 alike); on any other, constructing it raises.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    per_rank_batch = cfg.batch_size // env.world_size
    steps_per_epoch = -(-(len(splits.train_labels) // env.world_size) // per_rank_batch)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    history: list[dict] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler_state"])
        history = list(ckpt["history"])
        if env.is_main:
            print(f"resuming from the checkpoint after epoch {len(history)}", flush=True)
    # Load before wrapping: DDP broadcasts rank 0's parameters when it is constructed.
    # DDP only pays off with a peer to sync with: a one-process group skips the per-step all-reduce.
    ddp_model = DDP(model) if env.world_size > 1 else model
    full_batch, step_mode = capture(model, splits.train_images, splits.train_labels, per_rank_batch, env.world_size)
    return TrainState(model_cfg, model, ddp_model, optimizer, scheduler, history, per_rank_batch, steps_per_epoch,
                      full_batch, step_mode)


def epoch_step(epoch: int, job: TrainJob, env: DistEnv, splits: Splits, st: TrainState) -> dict:
    """Train one epoch, then evaluate on the validation split: the epoch's history entry."""
    t0 = time.perf_counter()
    idx = shard_indices(len(splits.train_labels), epoch, job.train.seed, env)
    lr = st.optimizer.param_groups[0]["lr"]
    step_losses, train_acc = run_epoch(st.ddp_model, st.optimizer, st.scheduler, splits.train_images,
                                       splits.train_labels, idx, st.per_rank_batch, env, full_batch=st.full_batch)
    if env.device.type == "cuda":
        torch.cuda.synchronize()  # the epoch's time is the GPU's, not the launch queue's
    seconds = time.perf_counter() - t0
    val = evaluate(st.model, splits.val_images, splits.val_labels, env, job.train.eval_batch_size)
    return {
        "epoch": epoch, "train_loss": float(step_losses.mean()), "train_accuracy": train_acc,
        "val_loss": val.loss, "val_accuracy": val.accuracy, "epoch_seconds": seconds, "lr": lr,
        "step_losses": step_losses.tolist(), "val_seconds": time.perf_counter() - t0 - seconds,
    }


def train(job: TrainJob, env: DistEnv) -> dict | None:
    """Train inside an already set-up process group: set up (or resume) -> epochs -> finish.
    Returns the result on rank 0, None elsewhere."""
    cfg, out_dir = job.train, Path(job.out_dir)
    if cfg.batch_size % env.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {env.world_size}")
    base = load_splits(Path(job.data_path), env.device)
    splits = with_feedback(base, job.feedback)
    ckpt_path = out_dir / CHECKPOINT_NAME
    st = setup(job, env, splits, ckpt_path)
    # The dataset's own splits are logged as its inputs; the feedback parts as theirs.
    logger = RunLogger(job, env, base, st.steps_per_epoch, st.model_cfg) if env.is_main and job.tracking.enabled else None

    for epoch in range(len(st.history) + 1, cfg.epochs + 1):
        if STOPPING.is_set():
            raise TrainingStopped(f"training {job.tracking.training_id} stopped after epoch {epoch - 1}")
        h = epoch_step(epoch, job, env, splits, st)
        st.history.append(h)
        if env.is_main:
            save_checkpoint(ckpt_path, st, cfg, logger.run_id if logger else None, dataset_digest=splits.digest)
            if logger is not None:
                logger.sync(st.history)
            print(f"epoch {epoch}/{cfg.epochs}: train loss {h['train_loss']:.4f}  val loss {h['val_loss']:.4f}  "
                  f"val acc {h['val_accuracy']:.4f}  ({h['epoch_seconds']:.2f} s)", flush=True)

    t0 = time.perf_counter()
    val = evaluate(st.model, splits.val_images, splits.val_labels, env, cfg.eval_batch_size)
    test = evaluate(st.model, splits.test_images, splits.test_labels, env, cfg.eval_batch_size)
    final_eval_seconds = time.perf_counter() - t0
    if not env.is_main:
        return None
    result = result_of(job, env, logger.run_id if logger else None, st.history, val, test, out_dir, final_eval_seconds,
                       st.step_mode)
    if logger is not None:
        log_final(job, env, logger, st.history, val, test, result, out_dir, list(get_spec(splits.name).classes))
    # Last: a result.json means a finished training (never resumed), so it follows the final logging.
    _write_json_atomic(result, out_dir / RESULT_NAME)
    return result


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _config_diffs(section: str, saved: dict, cfg, skip: tuple[str, ...]) -> list[str]:
    """Fields of `cfg` whose value differs from the checkpoint's. A field the checkpoint lacks (added
    to the config after it was written) counts as its default, which is what that training used; a
    field only the checkpoint has (removed since) is not compared."""
    diffs = []
    for f in fields(cfg):
        if f.name in skip:
            continue
        old, new = _plain(saved.get(f.name, field_default(f))), _plain(getattr(cfg, f.name))
        if old != new:
            diffs.append(f"{section}.{f.name} (checkpoint {old}, job {new})")
    return diffs


def resume_mismatches(ckpt: dict, job: TrainJob, dataset_digest: str) -> list[str]:
    """The fields in which a checkpoint differs from the job about to resume it: 'model.hidden
    (checkpoint [50], job [128])'. The model's mean/std come from the data (covered by the digest);
    REPORTING_ONLY fields change no weight."""
    diffs = _config_diffs("model", ckpt.get("model_config", {}), job.model, ("mean", "std"))
    diffs += _config_diffs("train", ckpt.get("train_config", {}), job.train, REPORTING_ONLY)
    if ckpt.get("dataset_digest") != dataset_digest:
        diffs.append(f"dataset_digest (checkpoint {ckpt.get('dataset_digest')}, job {dataset_digest})")
    return diffs


def check_resumable(ckpt: dict, job: TrainJob, dataset_digest: str, path: Path) -> None:
    if diffs := resume_mismatches(ckpt, job, dataset_digest):
        raise tracking.ResumeError(
            f"{path}: checkpoint of another job, not resumed; it differs in {', '.join(diffs)}. "
            "Start a new training under a new id, or resume with the checkpoint's settings")


def save_checkpoint(path: Path, st: TrainState, cfg: TrainConfig, run_id: str | None, dataset_digest: str) -> None:
    atomic_torch_save(
        {
            "model_config": st.model_cfg.to_dict(),
            "train_config": asdict(cfg),
            "dataset_digest": dataset_digest,
            "model_state": st.model.state_dict(),  # the raw module: no DDP "module." prefix
            "optimizer_state": st.optimizer.state_dict(),
            "scheduler_state": st.scheduler.state_dict() if st.scheduler is not None else None,
            "epoch": len(st.history),
            "history": st.history,
            "run_id": run_id,
        },
        path,
    )


def worker_main(job: TrainJob) -> dict | None:
    """What each process that the elastic launcher starts runs, once nn_core.worker has tied it to
    its launcher (the parent-death signal is armed before this module is even imported)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    with ddp_context(job.device, job.devices) as env:
        return train(job, env)
