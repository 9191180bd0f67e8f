"""The MLflow model registry and the promotion gate.

A registered model belongs to one task: its first registration records the dataset and its pinned
digest on the registered model. A version's task is read from its run's own record (the params
`dataset`/`dataset_digest`, which MLflow never lets anyone change, and the run's dataset inputs), and
its model must be the one its run logged: version tags are never trusted for it, so a version whose
tags were forged is refused like any other version of another task, `force` included.
A candidate is registered only after it passed parity. The gate is evaluated on the registered ONNX
artifact (what will be served): validation accuracy >= threshold, parity passed (the run's record),
and, on every slice (the task's validation split and the held-out part of each of the task's feedback
sets, serving/feedback.py), not worse than the champion beyond a tolerance: two standard errors of
the paired accuracy difference by default, a fixed margin when one is given (nn_core/slices.py says
why). `force` overrides the threshold and the tolerances, never the task or parity.

The champion rule (`rule_champion`): the champion is the accepted version whose decision is the
latest (`promotion.at`, a counter every decision makes larger than all it read). The alias is only
where that rule's answer is published: every gate reads all decisions, compares the candidate with
the rule's champion, records its decision, then publishes and verifies (`settle`): it re-reads the
decisions and the alias and writes again until both agree. A crash between the record and the
alias write leaves the alias one step behind until the next gate, `promote` or `settle`.

Mutual exclusion (`promotion_lock` here, chosen in flows/promotion.py): on a SQLite store, a file
lock beside the store, which every command on that store takes whatever its Prefect API. Then gates
are serialised: each compares with the champion of all decisions before it. With no lock shared by
every gate (two homes or hosts on one MLflow server and no Prefect server configured), the alias
still converges to the rule once the gates end, and every champion is a version that passed the
gate against the champion it read; two gates that ran at the same time were not compared with each
other, so the later decision wins even if the other candidate was better.

Prefect retries registration and the gate, so both are idempotent: a run's model is registered once,
and a version that carries a decision keeps it. Only "not found" means absent: any other registry
error propagates and the alias stays where it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from nn_core import tracking
from nn_core.config import GateConfig, default_model_name  # noqa: F401 (default_model_name: re-exported)
from nn_core.export import ParityReport, onnx_logits, onnx_session
from nn_core.slices import VALIDATION, Slice, SliceResult, compare, verdict

log = logging.getLogger(__name__)

CHAMPION = "champion"
# Tags on the registered model (not its versions): the task it is bound to.
DATASET_TAG, DIGEST_TAG = "mnistops.dataset", "mnistops.dataset_digest"
PENDING, ACCEPTED, REJECTED, FAILED = "pending", "accepted", "rejected", "failed"
# The version's tags: the decision itself and the figures it compared; the rest is its decision
# record (an artifact of its run, DECISIONS/) and its model card (the description).
PROMOTION, REASON, VAL_ACC = "promotion", "promotion.reason", "promotion.val_accuracy"
CHAMP_VERSION, CHAMP_ACC, AT = "promotion.champion_version", "promotion.champion_val_accuracy", "promotion.at"
DECISIONS = "gate"


class TaskMismatchError(ValueError):
    """A candidate, a version or a validation split of another task than the registered model's.
    Never overridden, `force` included."""


@dataclass(frozen=True)
class Task:
    """What a registered model is bound to: a dataset and the digest of its pinned files."""

    dataset: str
    digest: str

    def tags(self) -> dict[str, str]:
        return {DATASET_TAG: self.dataset, DIGEST_TAG: self.digest}

    def __str__(self) -> str:
        return f"{self.dataset} (dataset digest {self.digest})"


def _code(e: MlflowException) -> str:
    return getattr(e, "error_code", "")


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    model_name: str
    version: str
    val_accuracy: float
    parity_passed: bool
    champion_version: str | None
    champion_val_accuracy: float | None
    threshold: float
    margin: float | None  # None: the statistical tolerance per slice (nn_core/slices.py)
    forced: bool = False
    decided_at: int = 0  # the rule's order of decisions (see rule_champion)
    slices: tuple[dict, ...] = ()  # SliceResult.to_dict() per slice, the validation split first

    @property
    def promotion(self) -> str:
        return ACCEPTED if self.accepted else REJECTED

    def tags(self) -> dict[str, str]:
        """What the version shows: the decision and the figures it compared (the record has the rest)."""
        return {
            PROMOTION: self.promotion,
            REASON: self.reason,
            VAL_ACC: f"{self.val_accuracy:.6f}",
            CHAMP_VERSION: self.champion_version or "none",
            CHAMP_ACC: "none" if self.champion_val_accuracy is None else f"{self.champion_val_accuracy:.6f}",
            AT: str(self.decided_at),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "promotion": self.promotion}

    @classmethod
    def from_dict(cls, d: dict) -> GateDecision:
        return cls(**{k: tuple(d[k]) if k == "slices" else d[k] for k in cls.__dataclass_fields__ if k in d})


def decide(results: list[SliceResult], parity_passed: bool, cfg: GateConfig) -> tuple[bool, str]:
    """The gate's rule, pure: (accepted, reason) from the per-slice comparisons (validation first)."""
    return verdict(results, parity_passed, cfg.threshold)


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in ("onnxruntime-gpu", "onnx", "numpy"):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return reqs


# ---------------------------------------------------------------------------------------------
# The task a registered model is bound to


def _registered_model(model_name: str):
    """The registered model, or None when there is none of that name. Every other error propagates."""
    try:
        return tracking.client().get_registered_model(model_name)
    except MlflowException as e:
        if _code(e) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _version_task(mv) -> Task | None:
    """The task of a version's run (its own record), None when it has no run or the run names none."""
    return run_task(tracking.client().get_run(mv.run_id)) if mv.run_id else None


def _description(model_name: str, task: Task) -> str:
    """What the registry page says of the model: its task, its contract, and what the alias means."""
    return (f"The {task.dataset} MLP as ONNX, bound to that task: every version was trained on and is gated on "
            f"{task.dataset}'s validation split (dataset digest `{task.digest}`); candidates of another dataset "
            "are refused, `mnistops promote --force` included.\n\n"
            "Input `pixels`, uint8 [batch, 28, 28] raw pixels; outputs `logits` and `probabilities`, float32 "
            "[batch, 10]. Each version is a candidate from the training pipeline, its description is its "
            "model card. The `champion` alias marks the version that passed the gate (validation accuracy of "
            "the ONNX model at or above the threshold, ONNX parity, not worse than the previous champion); "
            f"batch inference serves `models:/{model_name}@champion`.")


def _bind(model_name: str, rm, fallback: Task | None) -> Task:
    """The task recorded on `rm`. A registered model from before tasks were recorded is bound to the
    task its versions agree on (or `fallback` when it has none)."""
    tags = rm.tags or {}
    if tags.get(DATASET_TAG) and tags.get(DIGEST_TAG):
        return Task(tags[DATASET_TAG], tags[DIGEST_TAG])
    seen = {t for v in tracking.client().search_model_versions(f"name = '{model_name}'") if (t := _version_task(v))}
    if len(seen) > 1:
        raise TaskMismatchError(
            f"registered model {model_name!r} holds versions of several datasets ({', '.join(sorted(map(str, seen)))}) "
            f"and is bound to none: set its tags {DATASET_TAG} and {DIGEST_TAG} to the task it serves")
    task = next(iter(seen), fallback)
    if task is None:
        raise TaskMismatchError(f"registered model {model_name!r} is bound to no dataset and has no version that names one")
    c = tracking.client()
    for k, v in task.tags().items():
        c.set_registered_model_tag(model_name, k, v)
    if not rm.description:
        c.update_registered_model(model_name, description=_description(model_name, task))
    return task


def _mismatch(model_name: str, bound: Task, other: Task, what: str) -> TaskMismatchError:
    hint = (f"; register it under another name (the default for {other.dataset} is "
            f"{default_model_name(other.dataset)!r})" if other.dataset != bound.dataset else "")
    return TaskMismatchError(f"registered model {model_name!r} is bound to {bound}; {what} is {other}{hint}")


def bound_task(model_name: str) -> Task:
    """The task an existing registered model is bound to (ValueError when there is no such model)."""
    rm = _registered_model(model_name)
    if rm is None:
        raise ValueError(f"no registered model {model_name!r} in {mlflow.get_tracking_uri()}")
    return _bind(model_name, rm, None)


def check_task(model_name: str, task: Task, what: str = "the candidate") -> None:
    """Refuse `task` early (before training) when `model_name` exists and is bound to another task."""
    rm = _registered_model(model_name)
    if rm is not None:
        bound = _bind(model_name, rm, task)
        if bound != task:
            raise _mismatch(model_name, bound, task, what)


def bind_task(model_name: str, task: Task) -> Task:
    """Create `model_name` bound to `task` (its first registration), or check that it is bound to it."""
    c = tracking.client()
    rm = _registered_model(model_name)
    if rm is None:
        try:
            c.create_registered_model(model_name, tags=task.tags(), description=_description(model_name, task))
            return task
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            rm = c.get_registered_model(model_name)  # another pipeline created it first
    bound = _bind(model_name, rm, task)
    if bound != task:
        raise _mismatch(model_name, bound, task, "the candidate")
    return bound


# ---------------------------------------------------------------------------------------------
# Registration


def version_of_run(model_name: str, run_id: str):
    """The version of `model_name` already registered from `run_id`, if any (a run logs one model)."""
    found = tracking.client().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register_candidate(run_id: str, onnx_path: Path, parity: ParityReport, model_name: str,
                       example: np.ndarray, task: Task) -> str:
    """Log the ONNX model on the training run and register it as a new version of `model_name`, which
    must be bound to `task` (the first registration binds it); returns the version. Refuses a model
    that failed parity or belongs to another task, before anything is registered. Idempotent: a run
    already registered (a retry after a failure past the registration) gets its version back."""
    import onnx
    from mlflow.models import infer_signature

    if not parity.passed:
        raise ValueError(f"{onnx_path}: not registered, parity failed: {parity.reason}")
    bind_task(model_name, task)
    existing = version_of_run(model_name, run_id)
    if existing is not None:
        log.info("run %s is already registered as %s version %s", run_id, model_name, existing.version)
        version, decided = str(existing.version), existing.tags.get(PROMOTION)
    else:
        from nn_core.export import onnx_session

        session = onnx_session(onnx_path)
        outputs = session.run(None, {"pixels": example})
        # Named input and outputs, as the ONNX graph and the serving contract call them.
        signature = infer_signature({"pixels": example},
                                    {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)),
                name=model_name,  # the run's Models tab lists it by the registered model's name
                signature=signature,
                input_example={"pixels": example},
                registered_model_name=model_name,
                # Decided at load time by whoever serves it; without this every load tries CUDA first.
                onnx_execution_providers=["CPUExecutionProvider"],
                pip_requirements=_pip_requirements(),
                # One self-contained .onnx file, as exported and parity-checked (MLflow would split the
                # weights into a separate .data file): a download is one file, and serving reads it.
                save_as_external_data=False,
            )
        version, decided = str(info.registered_model_version), None
    if decided is None:  # a decision already recorded by the gate is never reset
        tracking.client().set_model_version_tag(model_name, version, PROMOTION, PENDING)
    return version


# ---------------------------------------------------------------------------------------------
# A version's own record: the task and parity of the run that made it


def run_task(run) -> Task | None:
    """The task a run trained on, from its params (immutable once logged) and its dataset inputs
    (which must all be splits of that dataset with its digest); None when it records none."""
    params = run.data.params
    dataset, digest = params.get("dataset"), params.get("dataset_digest")
    if not dataset or not digest:
        return None
    for di in run.inputs.dataset_inputs if run.inputs else []:
        d = di.dataset
        if _feedback_input(di, dataset):
            continue  # a feedback set of this task it also trained on (its own record: serving/feedback.py)
        if not d.name.startswith(f"{dataset}-") or not digest.startswith(d.digest):
            return Task(f"{dataset} with a dataset input {d.name!r} (digest {d.digest})", digest)
    return Task(dataset, digest)


def _feedback_input(di, dataset: str) -> bool:
    from serving.feedback import CONTEXT

    context = {t.key: t.value for t in di.tags or []}.get("mlflow.data.context")
    return context == CONTEXT and di.dataset.name.startswith(f"{dataset}-feedback-")


def _logged_by_run(mv) -> bool:
    """Whether the version's model is the one its run logged (not another run's model under its name)."""
    source = mv.source or ""
    if not source.startswith("models:/m-"):
        return source.startswith(f"runs:/{mv.run_id}/")
    model = tracking.client().get_logged_model(source.removeprefix("models:/").split("/")[0])
    return model.source_run_id == mv.run_id


def check_version(model_name: str, mv, bound: Task) -> bool:
    """The version's task from its run's own record, which must be `bound`; its model the run's own.
    Returns whether the run records a passed parity check. TaskMismatchError otherwise, which
    nothing overrides."""
    what = f"version {mv.version}"
    if not mv.run_id:
        raise TaskMismatchError(f"registered model {model_name!r}: {what} has no run, so no record of its task")
    run = tracking.client().get_run(mv.run_id)
    task = run_task(run)
    if task is None:
        raise TaskMismatchError(f"registered model {model_name!r}: {what}'s run {mv.run_id} records no dataset "
                                "(params dataset, dataset_digest)")
    if task != bound:
        raise _mismatch(model_name, bound, task, f"{what} (its run {mv.run_id} trained on it)")
    if not _logged_by_run(mv):
        raise TaskMismatchError(f"registered model {model_name!r}: {what}'s model {mv.source} was not logged by "
                                f"its run {mv.run_id}")
    return run.data.tags.get("parity") == "passed"


# ---------------------------------------------------------------------------------------------
# The champion rule


def _at(tags: dict) -> int:
    try:
        return int(tags.get(AT, "-1"))
    except ValueError:
        return -1


def rule_champion(versions, alias: str | None) -> str | None:
    """The champion by the rule: the accepted version with the latest decision. Decisions made
    before decisions were ordered (no `promotion.at`) rank below every ordered one, the alias holder
    first among them, so an old store keeps its champion until the next decision."""
    accepted = [v for v in versions if (v.tags or {}).get(PROMOTION) == ACCEPTED]
    if not accepted:
        return None
    best = max(accepted, key=lambda v: (_at(v.tags), str(v.version) == alias, int(v.version)))
    return str(best.version)


def _versions(model_name: str) -> list:
    return tracking.client().search_model_versions(f"name = '{model_name}'")


def champion(model_name: str) -> str | None:
    """The version the alias names; None only when there is no such model or it has no champion alias.

    Read from the registered model's alias map rather than get_model_version_by_alias: for a missing
    alias that raises INVALID_PARAMETER_VALUE (SQL store and REST server alike), the same code as for
    malformed input, while here "absent" is a dict lookup and the one not-found error is
    RESOURCE_DOES_NOT_EXIST for the model itself. Anything else (network, 5xx) propagates: it must
    never read as "no champion yet"."""
    rm = _registered_model(model_name)
    if rm is None:
        return None
    version = (rm.aliases or {}).get(CHAMPION)
    return None if version is None else str(version)


def settle(model_name: str, rounds: int = 20) -> str | None:
    """Publish the rule's champion on the alias and verify it: re-read every decision and the alias
    after each write, until they agree. The function a rollback calls after recording its decision.
    Returns the champion (None: no accepted version; an existing alias is then left as it is)."""
    c = tracking.client()
    for _ in range(rounds):
        alias = champion(model_name)
        wanted = rule_champion(_versions(model_name), alias)
        if wanted is None or wanted == alias:
            return wanted
        c.set_registered_model_alias(model_name, CHAMPION, wanted)
    raise RuntimeError(f"registered model {model_name!r}: the champion alias did not settle after {rounds} "
                       "writes (other gates keep deciding); run `mnistops promote` again")


def version_predictions(model_name: str, version: str, slices: list[Slice]) -> dict[str, np.ndarray]:
    """{slice name: predicted classes} of a registered version's ONNX artifact in onnxruntime."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=tmp))
        session = onnx_session(next(local.rglob("*.onnx")))
        return {s.name: onnx_logits(session, np.ascontiguousarray(s.images)).argmax(1) for s in slices}


def feedback_slices(task: Task) -> list[Slice]:
    """The held-out part of every feedback set recorded for `task`, one slice each."""
    from serving.feedback import FeedbackTask, recorded

    slices = []
    for fs in recorded(FeedbackTask(task.dataset, task.digest), tracking.client()):
        images, labels = fs.holdout_part()
        slices.append(Slice(fs.name, images, labels))
    return slices


def lock_path(model_name: str) -> Path:
    """Beside a SQLite store (every process on that store sees the same file, whatever its Prefect
    API, in any container mounting it); otherwise this machine's temporary folder, keyed by store."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        # Keyed by the model alone: the folder is the store's, however a process spells its path.
        db = Path(uri.removeprefix("sqlite:///"))
        return db.with_name(f"{db.name}.promotion-{hashlib.sha256(model_name.encode()).hexdigest()[:16]}.lock")
    key = hashlib.sha256(f"{uri}|{model_name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mnistops-promotion-{key}.lock"


def shared_by_store() -> bool:
    """Whether lock_path is shared by every process on the store (a SQLite store), not just this machine."""
    return mlflow.get_tracking_uri().startswith("sqlite:///")


@contextlib.contextmanager
def promotion_lock(model_name: str):
    """Serialise read-decisions -> compare -> record -> publish among the gates that share lock_path."""
    with open(lock_path(model_name), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Decision records


def _record_path(version: str) -> str:
    return f"{DECISIONS}/v{version}"


def record_decision(model_name: str, mv, decision: GateDecision, extra: dict | None = None) -> None:
    """The decision record (a JSON artifact of the version's run, one file per decision), then the
    version's tags, the `promotion` marker last: a failure in between leaves the marker as it was, so
    a retry decides again instead of trusting half a record."""
    c = tracking.client()
    body = {**decision.to_dict(), "run_id": mv.run_id, **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"decision-{decision.decided_at}.json"
        path.write_text(json.dumps(body, indent=2, default=str))
        c.log_artifact(mv.run_id, str(path), _record_path(decision.version))
    tags = decision.tags()
    marker = tags.pop(PROMOTION)
    for k, v in tags.items():
        c.set_model_version_tag(model_name, decision.version, k, v)
    c.set_model_version_tag(model_name, decision.version, PROMOTION, marker)


def recorded_decision(model_name: str, mv) -> GateDecision:
    """The decision recorded for a version: its record, named by the version's `promotion.at`."""
    at = _at(mv.tags)
    if at < 0:
        return _legacy_decision(model_name, mv)
    uri = f"runs:/{mv.run_id}/{_record_path(str(mv.version))}/decision-{at}.json"
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        return GateDecision.from_dict(json.loads(Path(local).read_text()))


def _legacy_decision(model_name: str, mv) -> GateDecision:
    """A decision recorded before decision records existed: all of it was in the version's tags."""
    t = mv.tags
    champ = t.get(CHAMP_VERSION, "none")
    acc = t.get(CHAMP_ACC, "none")
    return GateDecision(t[PROMOTION] == ACCEPTED, t.get(REASON, ""), model_name, str(mv.version),
                        float(t.get(VAL_ACC, "nan")), t.get("parity_passed") == "true",
                        None if champ == "none" else champ, None if acc == "none" else float(acc),
                        float(t.get("promotion.threshold", "nan")), float(t.get("promotion.margin", "nan")))


def next_at(versions) -> int:
    """A decision's place in the rule's order: after every decision read (and the clock, so that
    gates that share no lock still order their decisions roughly by time)."""
    return max([int(time.time() * 1000), *[_at(v.tags) + 1 for v in versions]])


def mark_failed(model_name: str, version: str, reason: str) -> None:
    """A version that can never be decided (its registration was cut short beyond repair): `failed`."""
    c = tracking.client()
    c.set_model_version_tag(model_name, version, REASON, reason)
    c.set_model_version_tag(model_name, version, AT, str(next_at(_versions(model_name))))
    c.set_model_version_tag(model_name, version, PROMOTION, FAILED)


def undecided(tags: dict) -> bool:
    return (tags or {}).get(PROMOTION) not in (ACCEPTED, REJECTED, FAILED)


def abandoned_versions(model_name: str) -> list:
    """Versions without a decision whose registering command is gone: their run's owner process is
    dead on this host, or the run has no owner (made by hand). A version whose owner lives elsewhere
    or is still running is being registered or gated: left alone."""
    from nn_core import reaping

    found = []
    for mv in _versions(model_name):
        if not undecided(mv.tags):
            continue
        owner = tracking.client().get_run(mv.run_id).data.tags.get(reaping.OWNER_TAG) if mv.run_id else None
        if owner is None or reaping.owner_alive(owner) is False:
            found.append(mv)
    return sorted(found, key=lambda v: int(v.version))


# ---------------------------------------------------------------------------------------------
# The gate


def gate(model_name: str, version: str, val_images: np.ndarray, val_labels: np.ndarray,
         cfg: GateConfig, force: bool = False, *, task: Task, lock=promotion_lock,
         decide_again: bool = False, extra: dict | None = None,
         feedback: list[Slice] | None = None) -> GateDecision:
    """Decide on `version`, record the decision and publish the rule's champion (`settle`). The
    split must be the registered model's own task's (`task` names it) and so must the version's run:
    TaskMismatchError otherwise, whatever `force` says. `force` overrides the threshold and the
    tolerances only. The slices are the validation split and `feedback` (default: the held-out part
    of every feedback set recorded for the task, read under the lock). A version that already carries
    a decision keeps it (a retried gate changes nothing) unless `decide_again` (a promotion asked for
    by hand). `lock` serialises promotions."""
    version = str(version)
    bound = bound_task(model_name)
    if task != bound:
        raise _mismatch(model_name, bound, task, "the validation split given to the gate")
    c = tracking.client()
    with lock(model_name):
        mv = c.get_model_version(model_name, version)  # read under the lock: another attempt may have decided
        if (mv.tags or {}).get(PROMOTION) == FAILED:
            raise ValueError(f"registered model {model_name!r} version {version} is marked failed "
                             f"({mv.tags.get(REASON, 'no reason recorded')}); it is never gated")
        parity_ok = check_version(model_name, mv, bound)
        if not undecided(mv.tags) and not decide_again:
            decision = recorded_decision(model_name, mv)
        else:
            slices = [Slice(VALIDATION, val_images, val_labels),
                      *(feedback_slices(bound) if feedback is None else feedback)]
            decision = _decide(model_name, mv, parity_ok, slices, cfg, force)
            record_decision(model_name, mv, decision, extra)
        settle(model_name)
    tracking.log_tags(mv.run_id, {**decision.tags(), "registered_version": version})
    return decision


def _decide(model_name: str, mv, parity_ok: bool, slices: list[Slice], cfg: GateConfig,
            force: bool) -> GateDecision:
    """The candidate against the rule's champion of every decision recorded so far, slice by slice."""
    version = str(mv.version)
    versions = _versions(model_name)
    current = rule_champion(versions, champion(model_name))
    at = next_at(versions)
    candidate = version_predictions(model_name, version, slices)
    if current == version and parity_ok:  # asked by hand to promote the champion itself
        results = [compare(s.name, s.labels, candidate[s.name], candidate[s.name], cfg.margin) for s in slices]
        acc = results[0].candidate_accuracy
        return GateDecision(True, f"version {version} is already the champion", model_name, version,
                            acc, parity_ok, version, acc, cfg.threshold, cfg.margin, False, at,
                            tuple(r.to_dict() for r in results))
    champ = None if current is None else version_predictions(model_name, current, slices)
    results = [compare(s.name, s.labels, candidate[s.name], None if champ is None else champ[s.name], cfg.margin)
               for s in slices]
    accepted, reason = decide(results, parity_ok, cfg)
    forced = force and not accepted and parity_ok  # parity is never overridden
    if forced:
        accepted, reason = True, f"forced by hand despite: {reason}"
    val = results[0]
    return GateDecision(accepted, reason, model_name, version, val.candidate_accuracy, parity_ok, current,
                        val.champion_accuracy, cfg.threshold, cfg.margin, forced, at,
                        tuple(r.to_dict() for r in results))
