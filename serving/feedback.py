"""Feedback sets: labelled inputs kept to train on and to gate with. Torch- and Prefect-free, so the
batch job (serving) makes them where labels arrive, and the training side reads them back.

A feedback set is
- content-addressed: its id is the SHA-256 of its images and labels (`digest_of`), so the same records
  offered twice (an inbox copy, `run --feedback` of the folder a job scored) are one set;
- split once into a training part and a held-out part, decided by the digest alone (`holdout_of`:
  each record's rank by SHA-256(digest:index), no random generator whose stream could change with a
  numpy release) and stored with the set, so every reader sees the same split forever;
- bound to one task (a dataset and its pinned digest), as a registered model is: the task of the
  model version that scored it (its registered model's binding), or the dataset of the `mnistops run`
  that was given it first. Labels 0..9 cannot tell a Fashion-MNIST set from an MNIST one, so the
  record is what decides: a set recorded for one task is refused to every other (`FeedbackTaskError`).
  A set never recorded before is recorded for the task that offers it.

Where they live: one MLflow run per set in the experiment `mnistops-feedback`, tagged with its digest
and task, holding the arrays and the split as one artifact (`feedback/feedback.npz`) and logging the
set as an MLflow dataset with context `feedback`. On a team's MLflow server with artifacts in S3, the
set is then in the bucket beside the models, found through the tracking server by anyone who can
train or gate, with nothing else to share. A set counts only once its run is FINISHED, which is the
last write: a failure before leaves a FAILED run that no reader takes (nothing half-written).
Concurrent recorders of one set may both finish; readers take the earliest run of a digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import idx, storage
from common.errors import InputError
from serving.readers import LABELS_CSV, open_images, open_labels

log = logging.getLogger(__name__)

EXPERIMENT = "mnistops-feedback"
HOLDOUT_FRACTION = 0.2  # of each set's records, held out for the gate (at least 1, and 1 left to train on)
MIN_RECORDS = 2  # one to train on, one held out
CONTEXT = "feedback"  # the MLflow dataset context
DIGEST_TAG, SOURCE_TAG, SCORED_BY_TAG = "mnistops.feedback.digest", "mnistops.feedback.source", "mnistops.feedback.scored_by"
DATASET_TAG, TASK_DIGEST_TAG = "mnistops.dataset", "mnistops.dataset_digest"  # as on a registered model
ARTIFACT_DIR, ARTIFACT_NAME = "feedback", "feedback.npz"
_CHUNK = 4096
_VERSION = b"mnistops feedback set v1\n"


class FeedbackTaskError(InputError):
    """A feedback set offered to another task than the one it is recorded for: never crossed."""


@dataclass(frozen=True)
class FeedbackTask:
    """A dataset and the digest of its pinned files: what a registered model is bound to."""

    dataset: str
    digest: str

    def __str__(self) -> str:
        return f"{self.dataset} (dataset digest {self.digest[:12]}...)"


@dataclass(frozen=True)
class Labelled:
    """Images uint8 (N, 28, 28) and labels int64 (N,) read from one location, and how to name it."""

    images: np.ndarray
    labels: np.ndarray
    where: str


def set_name(digest: str) -> str:
    """A set's name: its slice in the gate, its component in a drift reference."""
    return f"feedback-{digest[:12]}"


@dataclass(frozen=True)
class FeedbackSet:
    digest: str
    task: FeedbackTask
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    holdout: np.ndarray  # sorted indices of the held-out records
    source: str = ""
    run_id: str | None = None

    @property
    def name(self) -> str:
        """The set's slice name in the gate and its MLflow dataset's suffix."""
        return set_name(self.digest)

    def _train_mask(self) -> np.ndarray:
        mask = np.ones(len(self.labels), dtype=bool)
        mask[self.holdout] = False
        return mask

    def training_part(self) -> tuple[np.ndarray, np.ndarray]:
        m = self._train_mask()
        return self.images[m], self.labels[m]

    def holdout_part(self) -> tuple[np.ndarray, np.ndarray]:
        return self.images[self.holdout], self.labels[self.holdout]


# --- content address and split ----------------------------------------------------------------------


def digest_of(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the records themselves (count, pixels, labels): the same records in another file
    format or folder are the same set."""
    h = hashlib.sha256(_VERSION)
    h.update(f"{len(labels)}\n".encode())
    h.update(memoryview(np.ascontiguousarray(images, dtype=np.uint8)).cast("B"))
    h.update(np.asarray(labels, dtype=np.uint8).tobytes())
    return h.hexdigest()


def holdout_of(digest: str, n: int) -> np.ndarray:
    """The held-out records of a set of `n` (sorted indices): the round(20%) whose SHA-256 of
    `digest:index` ranks lowest; at least one, and at least one left to train on."""
    k = min(n - 1, max(1, round(n * HOLDOUT_FRACTION)))
    keys = np.array([int.from_bytes(hashlib.sha256(f"{digest}:{i}".encode()).digest()[:8], "big") for i in range(n)],
                    dtype=np.uint64)
    return np.sort(np.argsort(keys, kind="stable")[:k]).astype(np.int64)


def make_set(labelled: Labelled, task: FeedbackTask) -> FeedbackSet:
    n = len(labelled.labels)
    if n < MIN_RECORDS:
        raise InputError(f"{labelled.where}: {n} labelled record(s); a feedback set needs at least {MIN_RECORDS} "
                         "(one to train on, one held out for the gate)")
    digest = digest_of(labelled.images, labelled.labels)
    return FeedbackSet(digest, task, labelled.images, labelled.labels, holdout_of(digest, n), labelled.where)


# --- reading a labelled input, in any form the batch job reads labels from --------------------------


def read_pair(images: Path, labels: Path | None, where: str | None = None, on_error: str = "fail") -> Labelled:
    """Every (kept) record of an input and its label: an images file with its labels file (IDX or .npy),
    or an image folder with its labels.csv (`labels` None). The batch job's own readers check them:
    a count that differs, a label outside 0..9, an empty input are InputErrors naming the file."""
    reader = open_images(Path(images), on_error=on_error)  # type: ignore[arg-type]
    if labels is None and reader.labels is None:
        raise InputError(f"{images}: no labels (expected a {LABELS_CSV} in the folder, or a labels file beside "
                         "the images)")
    lab = open_labels(Path(labels), reader.count, Path(images)) if labels is not None else None
    xs, ys = [], []
    try:
        for chunk in reader.chunks(_CHUNK):
            if lab is not None:
                y = lab.read(chunk.start, chunk.stop)
                y = y if chunk.keep is None else y[chunk.keep - chunk.start]
            else:
                y = reader.labels[chunk.positions()]
            xs.append(chunk.pixels)
            ys.append(np.asarray(y, dtype=np.int64))
    finally:
        if lab is not None:
            lab.close()
    return Labelled(np.concatenate(xs), np.concatenate(ys), where or str(images))


def _kind(path: Path) -> str | None:
    """'images', 'labels' or None for a file of a feedback folder, by its content."""
    if path.suffix.lower() == ".npy":
        try:
            ndim = np.load(path, mmap_mode="r", allow_pickle=False).ndim
        except (ValueError, OSError, EOFError):
            return "images"  # unreadable: the images reader names what is wrong with it
        return "labels" if ndim == 1 else "images"
    try:
        with idx.open_idx(path) as f:
            head = f.read(4)
    except (OSError, EOFError):
        return None
    magic = int.from_bytes(head, "big") if len(head) == 4 else None
    return {idx.IMAGES_MAGIC: "images", idx.LABELS_MAGIC: "labels"}.get(magic)


EXPECTED = (f"expected a folder of images with a {LABELS_CSV} (file,label), or a folder holding one images file "
            "and one labels file (IDX, gzipped or not, or .npy)")


def read_folder(folder: Path, where: str | None = None) -> Labelled:
    where = where or str(folder)
    if not folder.is_dir():
        raise InputError(f"{where}: not a folder; {EXPECTED}")
    if (folder / LABELS_CSV).exists():
        return read_pair(folder, None, where)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{where}: empty feedback set (no files); {EXPECTED}")
    kinds = {p: _kind(p) for p in files}
    images = [p for p in files if kinds[p] == "images"]
    labels = [p for p in files if kinds[p] == "labels"]
    if len(images) == 1 and len(labels) == 1:
        return read_pair(images[0], labels[0], where)
    if not images and any(p.suffix.lower() in (".png", ".jpg", ".jpeg") for p in files):
        raise InputError(f"{where}: image files but no {LABELS_CSV}; {EXPECTED}")
    raise InputError(f"{where}: {len(images)} images file(s) and {len(labels)} labels file(s); {EXPECTED}")


def read_labelled(location: str | Path) -> Labelled:
    """A feedback location: a local folder, or a URL prefix (s3://...) copied here first."""
    if storage.is_url(location):
        with tempfile.TemporaryDirectory(prefix="mnistops-feedback-") as tmp:
            local = storage.fetch(str(location), Path(tmp) / "set")
            return read_folder(local, storage.shown(str(location)))
    return read_folder(Path(location).expanduser())


# --- the record in MLflow ---------------------------------------------------------------------------


def _client():
    from common.settings import mlflow_client

    return mlflow_client()


def _experiment_id(client) -> str:
    from common.experiments import ensure_experiment

    return ensure_experiment(EXPERIMENT, client, description=(
        "Feedback sets: labelled inputs kept to train on (their training part) and to gate candidates with (their "
        "held-out part), one run per set, tagged with its digest and task (serving/feedback.py)."))


def _runs(client, filter_string: str) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    found, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=f"attributes.status = 'FINISHED' and {filter_string}",
                                  max_results=1000, page_token=token, order_by=["attributes.start_time ASC"])
        found += list(page)
        token = page.token
        if not token:
            return found


def _task_of_run(run) -> FeedbackTask:
    t = run.data.tags
    return FeedbackTask(t[DATASET_TAG], t[TASK_DIGEST_TAG])


def find(digest: str, client=None) -> tuple[str, FeedbackTask] | None:
    """(run id, task) of the recorded set with this digest (the earliest complete one), or None."""
    runs = _runs(client or _client(), f"tags.`{DIGEST_TAG}` = '{digest}'")
    return (runs[0].info.run_id, _task_of_run(runs[0])) if runs else None


def check_task(fs: FeedbackSet, client=None, found: tuple[str, FeedbackTask] | None | bool = False) -> None:
    """Refuse a set already recorded for another task (FeedbackTaskError names both). `found`: what
    `find` answered, when the caller asked already."""
    found = find(fs.digest, client) if found is False else found
    if found is not None and found[1] != fs.task:
        raise FeedbackTaskError(
            f"{fs.source}: feedback set {fs.digest[:12]} is recorded for {found[1]} (MLflow run {found[0]}), "
            f"not for {fs.task}; expected a labelled input of {fs.task.dataset}")


def record(fs: FeedbackSet, scored_by: str | None = None, client=None) -> FeedbackSet:
    """Record `fs` once (idempotent: a set of that digest already recorded for its task is returned as
    recorded; for another task it is refused). Written in the order that leaves nothing half-made: the
    run (RUNNING), its artifact and dataset input, then FINISHED, which is what readers look for."""
    client = client or _client()
    found = find(fs.digest, client)
    check_task(fs, client, found)
    if found is not None:
        return FeedbackSet(fs.digest, fs.task, fs.images, fs.labels, fs.holdout, fs.source, found[0])
    from common.experiments import run_context_tags

    tags = {**run_context_tags("mnistops feedback"), "mnistops.kind": "feedback", DIGEST_TAG: fs.digest,
            DATASET_TAG: fs.task.dataset, TASK_DIGEST_TAG: fs.task.digest, SOURCE_TAG: storage.shown(fs.source)[:5000]}
    if scored_by:
        tags[SCORED_BY_TAG] = scored_by
    run = client.create_run(_experiment_id(client), run_name=fs.name, tags=tags)
    rid = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="mnistops-feedback-") as tmp:
            path = Path(tmp) / ARTIFACT_NAME
            np.savez(path, images=fs.images, labels=fs.labels.astype(np.uint8), holdout=fs.holdout)
            client.log_artifact(rid, str(path), ARTIFACT_DIR)
        client.log_inputs(rid, datasets=[dataset_input(
            fs.task.dataset, fs.digest, profile(fs.labels, holdout=len(fs.holdout), task_digest=fs.task.digest),
            artifact_uri(rid))])
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    log.info("feedback set %s recorded for %s (%d records, %d held out): MLflow run %s", fs.digest[:12], fs.task,
             len(fs.labels), len(fs.holdout), rid)
    return FeedbackSet(fs.digest, fs.task, fs.images, fs.labels, fs.holdout, fs.source, rid)


def profile(labels: np.ndarray, **more) -> dict:
    return {"num_images": len(labels), "label_counts": np.bincount(labels, minlength=10).tolist(), **more}


def dataset_input(dataset: str, digest: str, profile: dict, uri: str):
    """A feedback set as an MLflow dataset input with context `feedback`, named `DATASET-feedback-<digest>`
    (registry.run_task tells it from the task's own splits by that name and context)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entity = Dataset(name=dataset_name(dataset, digest), digest=digest[:36], source_type="mlflow",
                     source=json.dumps({"uri": uri}), profile=json.dumps({**profile, "feedback_sha256": digest}))
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", CONTEXT)])


def dataset_name(dataset: str, digest: str) -> str:
    return f"{dataset}-feedback-{digest[:12]}"


def artifact_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{ARTIFACT_DIR}/{ARTIFACT_NAME}"


def load(run_id: str, client=None) -> FeedbackSet:
    """A recorded set, read back from its run and checked against its digest (content-addressed: an
    artifact changed since it was recorded is refused)."""
    client = client or _client()
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory(prefix="mnistops-feedback-") as tmp:
        local = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{ARTIFACT_NAME}", tmp)
        with np.load(local, allow_pickle=False) as z:
            images, labels, holdout = z["images"], z["labels"].astype(np.int64), z["holdout"].astype(np.int64)
    digest = run.data.tags[DIGEST_TAG]
    if digest_of(images, labels) != digest:
        raise InputError(f"runs:/{run_id}/{ARTIFACT_DIR}/{ARTIFACT_NAME}: content does not match the feedback set's "
                         f"digest {digest[:12]}; the artifact was changed after it was recorded")
    return FeedbackSet(digest, _task_of_run(run), images, labels, holdout, run.data.tags.get(SOURCE_TAG, ""), run_id)


def recorded(task: FeedbackTask, client=None) -> list[FeedbackSet]:
    """Every complete feedback set of `task`, one per digest (its earliest run), oldest first."""
    client = client or _client()
    runs = _runs(client, f"tags.`{DATASET_TAG}` = '{task.dataset}' and tags.`{TASK_DIGEST_TAG}` = '{task.digest}'")
    seen: dict[str, str] = {}
    for r in runs:
        seen.setdefault(r.data.tags[DIGEST_TAG], r.info.run_id)
    return [load(rid, client) for rid in seen.values()]


def offer(locations: list[str], task: FeedbackTask, client=None) -> list[FeedbackSet]:
    """Record the labelled inputs at `locations` as feedback sets of `task`: all are read and checked
    (content, then task) before any is recorded, so a bad one leaves the store as it was."""
    sets = [make_set(read_labelled(loc), task) for loc in locations]  # before the store is even opened
    client = client or _client()
    for fs in sets:
        check_task(fs, client)
    return [record(fs, client=client) for fs in sets]


# --- from a batch job -------------------------------------------------------------------------------


def model_task(model_name: str, client) -> FeedbackTask | None:
    """The task a registered model is bound to (its tags, set by its first registration), or None."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(model_name).tags or {}
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if tags.get(DATASET_TAG) and tags.get(TASK_DIGEST_TAG):
        return FeedbackTask(tags[DATASET_TAG], tags[TASK_DIGEST_TAG])
    return None


def record_job(cfg, model, client, run_id: str, where: str) -> FeedbackSet | None:
    """The feedback set of a labelled batch job (`cfg`: its JobConfig, local paths; `model`: its
    ModelRef), recorded for the task of the registered model that scores it, before the job writes
    anything (a failure here fails the job with nothing written; a retry finds the set recorded). The
    job's run gets the tag `feedback.set` (the digest) or `feedback.none` (why not). A local model
    file has no task, so its batches make no set; a set already recorded for another task is not
    recorded for this one, and the job goes on (scoring another task's data is how drift is seen)."""
    task = model_task(model.name, client) if model.name else None
    if task is None:
        client.set_tag(run_id, "feedback.none", f"the model {model.uri} is bound to no task")
        return None
    fs = make_set(read_pair(cfg.input, cfg.labels, where, cfg.on_error), task)
    try:
        fs = record(fs, scored_by=f"models:/{model.name}/{model.version}", client=client)
    except FeedbackTaskError as e:
        log.warning("%s", e)
        client.set_tag(run_id, "feedback.none", str(e)[:5000])
        return None
    client.set_tag(run_id, "feedback.set", fs.digest)
    return fs


# --- the training part, as files a training worker reads ---------------------------------------------


def write_training_parts(sets: list[FeedbackSet], folder: Path) -> list[str]:
    """Each set's training part as `<folder>/<digest>.npz` (images, labels), written atomically; the
    paths, for the training job. Content-addressed, so rewriting one is harmless. The held-out
    images ride along (`holdout_images`, never trained on): the drift reference's component of the
    set takes the model's confidence on them (serving.drift)."""
    from common.atomic import atomic_path

    paths = []
    for fs in sets:
        path = Path(folder) / f"{fs.digest}.npz"
        images, labels = fs.training_part()
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=labels.astype(np.int64), digest=np.array(fs.digest),
                 holdout_images=fs.holdout_part()[0])
        with atomic_path(path, suffix=".npz") as tmp:
            tmp.write_bytes(buf.getvalue())
        paths.append(str(path))
    return paths
