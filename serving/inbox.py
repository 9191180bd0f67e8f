"""Inbox mode: score every input of a folder or bucket prefix that has not been scored yet, exactly
once per content, by any number of workers on any number of machines.

    INBOX/ (a folder or s3://bucket/prefix/)   OUTDIR/ (a folder or a URL)
      batch-17.npy                 batch-17.npy.<sha12>.parquet (+ .manifest.json)
      scans/  (image folder)       scans.<sha12>.parquet (+ .manifest.json)
      README.txt  (ignored)        ledger/<digest>.json            one record per scored input content
                                   ledger/<digest>.claim-<k>       the leases taken on it, k = 0, 1, ...
                                   ledger/digests/<sha256>.json    an entry's identity -> its digest
                                   ledger/FORMAT                   the digests' algorithm (JSON)

Inputs are the non-hidden entries of INBOX: IDX image files (gzipped or not), `.npy` arrays, and
folders of images. Anything else is ignored and listed. A symbolic link is never an input and never
followed (whoever can write to the inbox could point it at /etc/shadow or another user's folder): it
is listed under `links_not_followed`, and an entry swapped for a link after the listing is refused
when it is opened (O_NOFOLLOW; links inside an image folder likewise, see serving.readers).
Uploaders should write under a hidden name (a leading dot) and rename when complete, so a
half-copied file is never taken for an input. An input in a bucket is copied to a private temporary
folder in blocks (memory stays flat) when its bytes are needed, scored from there, and removed (the
folder holds one input at a time).

The ledger is plain objects created with a conditional write (common.storage.create: S3's
`If-None-Match: *`, a hard link on a local folder, both failing when the name exists), the same
mechanism on a local folder and in a bucket, with no lock server and no shared file system:
- a claim is a lease: worker W takes input D by creating `D.claim-<k+1>` where `D.claim-<k>` is the
  newest claim and has expired (or k = -1). Creation is conditional, so of the workers that race
  for one generation exactly one wins; the others skip D as busy. The holder renews the lease every
  LEASE_SECONDS / 3 by creating the next generation itself; if that fails, another worker took the
  input over (W stalled past its lease) and both may finish it: the record decides (below). A lease expires
  LEASE_SECONDS after it was taken, or at once when its holder released it or is known dead (the
  same host, boot and PID namespace, and its process gone: a job killed on this machine does not
  hold its inputs for the lease's length). Expiry is judged by the clocks of the workers, which must
  agree to well within the lease.
- the record `D.json` is created conditionally, only after the output and its manifest are at
  their destination: one record per input content, ever, whoever scored it. The job checks that the
  bytes it scored are D's: an entry rewritten after its digest was taken gets no output and no
  record (it is reported as failed), and the next run scores its new content.
Digests are BLAKE3 (common.digests). A ledger says which algorithm its keys are in (`FORMAT`,
created conditionally by its first worker, so workers starting together agree); a ledger without one
that already holds records was begun before 2026-12-05, with SHA-256, and keeps SHA-256, so that its
records go on matching their inputs. Every worker of one inbox must run a version that reads it.
So: **exactly once** - the ledger record of an input, and the input's appearance in one run's
`scored` list where the record was written; **at least once** - the scoring itself and the writing of
its output: a worker that dies (or stalls past its lease) after writing the output but before the
record has it written again by the next worker, under the same name (replaced whole, never half);
a worker that finds a finished output whose manifest carries the input's digest records it instead
of scoring it again.
`rescore` scores recorded inputs again with the current model (same output name, replaced whole; the
record is then rewritten under the claim, keeping the history).

Knowing an input's digest costs a read of all of it (and a download from a bucket), and a rerun, or
each of N workers, would read every input again only to find its record. So the ledger also keeps
`digests/<sha256 of the entry's identity>.json`: the digest an entry had when it was read, under what
identifies its content without reading it: a bucket object's name, size, ETag and modification time;
a local file's name, device, inode, size and the nanosecond modification and change times (ctime,
which no user can set, moves with every write), taken only for a file untouched for SETTLED_S (so a
write within one timestamp tick cannot go unseen). Folders are read every time. Workers start at
different places in the inbox (`worker=(w, n)`), so each reads its own part first.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import digests, idx, storage
from common.digests import Algorithm
from common.errors import DriftAlert, InputChanged, InputError, OutputError
from common.owner import Owner, boot_id, owner_alive, pid_namespace
from common.processes import start_time
from serving.job import Expected, JobConfig, JobResult, LoadedModel, load_model, run_job
from serving.readers import content_digest
from serving.writers import manifest_path

log = logging.getLogger(__name__)

LEDGER = "ledger"
FORMAT = "FORMAT"  # ledger/FORMAT: {"digest": <algorithm>} (not a .json: a glob of the records misses it)
LEASE_SECONDS = 600.0  # a claim's life without renewal; renewed every third of it while scoring
DIGESTS = "digests"  # ledger/digests/: an entry's identity -> its content digest
SETTLED_S = 2.0  # a local file unchanged this long has its digest remembered


@dataclass
class InboxResult:
    inbox: Path | str
    output: Path | str
    scored: list[JobResult] = field(default_factory=list)
    already: list[dict[str, str]] = field(default_factory=list)  # recorded before (or a duplicate)
    busy: list[str] = field(default_factory=list)  # being scored by another job right now
    failed: list[dict[str, str]] = field(default_factory=list)  # bad input: recorded, not retried
    ignored: list[str] = field(default_factory=list)  # entries that are not inputs
    links: list[str] = field(default_factory=list)  # symbolic links: never followed

    @property
    def drift_alerts(self) -> list[JobResult]:
        return [r for r in self.scored if r.drift.alert]

    def summary(self) -> dict[str, Any]:
        return {
            "inbox": storage.shown(self.inbox), "output": storage.shown(self.output),
            "scored": [{"input": storage.shown(r.input_path), "output": storage.shown(r.output), "records": r.records,
                        "predicted": r.predicted, "accuracy": r.accuracy, "drift": r.drift.status,
                        "model_version": r.model.version, "mlflow_run_id": r.mlflow_run_id}
                       for r in self.scored],
            "already_scored": self.already, "in_progress_elsewhere": self.busy, "failed": self.failed,
            "ignored": self.ignored, "links_not_followed": self.links,
        }


def _name(location: Path | str | None) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def merged(results: list[InboxResult]) -> InboxResult:
    """One result of several workers that ran on one inbox side by side (a fan-out): every input
    once. An input one worker scored (or found failing) is that worker's; the others saw it busy,
    or recorded by another worker, and that is not reported again. Inputs no worker settled stay busy
    (held by a worker outside this run)."""
    first = results[0]
    out = InboxResult(first.inbox, first.output, ignored=first.ignored, links=first.links)
    out.scored = [r for res in results for r in res.scored]
    names: set[str] = {_name(r.input_path) for r in out.scored}
    for f in (f for res in results for f in res.failed):
        if f["input"] not in names:
            out.failed.append(f)
            names.add(f["input"])
    for a in (a for res in results for a in res.already):
        if a["input"] not in names:
            out.already.append(a)
            names.add(a["input"])
    out.busy = sorted({b for res in results for b in res.busy} - names)
    return out


def is_input(path: Path) -> bool:
    """A folder, a .npy array of images (2-D or 3-D), or an IDX images file (by its first bytes,
    gzipped or not). IDX labels files, 1-D arrays and anything else are not inputs."""
    if path.is_dir():
        return True
    if path.suffix.lower() == ".npy":
        import numpy as np

        try:  # a labels array (1-D) beside an images array is not an input; a broken file is one
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (ValueError, OSError, EOFError):
            return True
        return len(shape) in (2, 3)
    try:
        with idx.open_idx(path) as f:
            head = f.read(4)
    except (OSError, EOFError):
        return False
    return len(head) == 4 and int.from_bytes(head, "big") == idx.IMAGES_MAGIC


def list_inbox(inbox: Path) -> tuple[list[Path], list[str], list[str]]:
    """(inputs, ignored names, symbolic links), in name order; hidden entries are none of them."""
    try:
        entries = sorted((e for e in inbox.iterdir() if not e.name.startswith(".")), key=lambda p: p.name)
    except OSError as e:
        raise InputError(f"{inbox}: unreadable inbox folder ({e.strerror or e})") from e
    links = [p.name for p in entries if p.is_symlink()]
    inputs = [p for p in entries if p.name not in links and is_input(p)]
    return inputs, [p.name for p in entries if p not in inputs and p.name not in links], links


# --- the lease -------------------------------------------------------------------------------------


def owner_identity() -> dict[str, str]:
    """Who holds a claim: this process as common.owner names it (its pidns in /proc's `pid:[N]` form),
    and a token of this run."""
    pid, ns = os.getpid(), pid_namespace()
    return {"host": socket.gethostname(), "boot": boot_id(), "pidns": f"pid:[{ns}]" if ns else "", "pid": str(pid),
            "start": start_time(pid) or "", "token": uuid.uuid4().hex}


def _known_dead(owner: dict[str, str]) -> bool:
    """The holder ran on this machine, in this PID namespace, and its process is gone (a zombie too,
    or the pid now belongs to a younger process): common.owner.owner_alive's judgement. On any other
    machine nothing is known: the lease decides."""
    try:
        held = Owner(str(owner.get("host", "")), int(owner["pid"]), str(owner.get("start", "")),
                     str(owner.get("boot", "")), str(owner.get("pidns", "")).partition("[")[2].rstrip("]"))
    except (KeyError, TypeError, ValueError):
        return False
    return owner_alive(str(held)) is False


class Lease:
    """A worker's claim on one input (see the module doc): `take()` once, then `release()`; `lost`
    is set when another worker took the input over."""

    def __init__(self, ledger: str, digest: str, seconds: float, owner: dict[str, str]):
        self.prefix = storage.join(ledger, f"{digest}.claim-")
        self.seconds, self.owner = seconds, owner
        self.generation = -1
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _newest(self) -> tuple[int, dict[str, Any] | None]:
        names = storage.glob(self.prefix)
        gens = [int(n.rsplit("-", 1)[1]) for n in names if n.rsplit("-", 1)[1].isdigit()]
        if not gens:
            return -1, None
        k = max(gens)
        data = storage.read_bytes(f"{self.prefix}{k:06d}")
        return k, json.loads(data) if data else None

    def _create(self, k: int, expires: float) -> bool:
        body = {"owner": self.owner, "expires": expires, "taken": time.time()}
        return storage.create(f"{self.prefix}{k:06d}", json.dumps(body).encode())

    def take(self) -> bool:
        k, claim = self._newest()
        if claim is not None and claim["expires"] > time.time() and not _known_dead(claim["owner"]):
            return False
        if not self._create(k + 1, time.time() + self.seconds):
            return False  # another worker took this generation first
        self.generation = k + 1
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            if not self._create(self.generation + 1, time.time() + self.seconds):
                self.lost.set()  # taken over: this worker must not record the input
                return
            self.generation += 1

    def release(self) -> None:
        """Stop renewing; the input is free at once for the next worker (a generation that expired
        already), unless it was taken over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set():
            try:
                self._create(self.generation + 1, 0.0)
            except storage.StoreError as e:  # the lease then runs out by itself
                log.warning("inbox: could not release %s: %s", self.prefix, e)


# --- the ledger ------------------------------------------------------------------------------------


def _read_record(url: str) -> dict[str, Any] | None:
    data = storage.read_bytes(url)
    return json.loads(data) if data is not None else None


def _encoded(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _output_for(out_dir: str, name: str, digest: str, fmt: str) -> str:
    return storage.join(out_dir, f"{name}.{digest[:12]}.{fmt}")


def _finished_output(output: str, digest: str, algorithm: Algorithm) -> dict[str, Any] | None:
    """The manifest of a finished scoring of `digest` at `output`, if one is there (a job killed after
    its output was in place but before its ledger record)."""
    if storage.is_url(output):
        data = storage.read_bytes(output + ".manifest.json")
        if data is None or not storage.exists(output):
            return None
    else:
        m = manifest_path(Path(output))
        if not (Path(output).is_file() and m.is_file()):
            return None
        data = m.read_bytes()
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    return manifest if manifest.get("input", {}).get(algorithm) == digest else None


def _checked_locations(inbox: Path | str, out_dir: Path | str) -> tuple[Path | str, str]:
    """(the inbox: a resolved folder or a URL, the output: a folder path or a URL, as text)."""
    if storage.is_url(inbox):
        storage.check_bucket(str(inbox))  # a missing bucket is an error; an empty prefix an empty inbox
        inbox = str(inbox).rstrip("/")
    else:
        inbox = storage.local_path(inbox).resolve()
        if not inbox.is_dir():
            raise InputError(f"{inbox}: no such inbox folder")
    if storage.is_url(out_dir):
        storage.check_bucket(str(out_dir))
        out = str(out_dir).rstrip("/")
        if isinstance(inbox, str) and (out == inbox or out.startswith(inbox + "/")):
            raise OutputError(f"{storage.shown(out)}: inside the inbox {storage.shown(inbox)}; its outputs would "
                              "become inputs")
        return inbox, out
    out_path = storage.local_path(out_dir).resolve()
    if out_path.exists() and not out_path.is_dir():
        raise OutputError(f"{out_path}: the inbox's output must be a folder, and this is a file")
    if isinstance(inbox, Path):
        if out_path == inbox or out_path.is_relative_to(inbox):
            raise OutputError(f"{out_path}: inside the inbox {inbox}; its outputs would become inputs")
        if inbox.is_relative_to(out_path):
            raise OutputError(f"{inbox}: the inbox lies inside the output folder {out_path}")
    return inbox, str(out_path)


@dataclass
class _Scoring:
    """What an inbox run carries from one input to the next (the model is loaded once, when needed)."""

    job: JobConfig  # the settings; input and output are set per input
    out_dir: str
    fmt: str
    rescore: bool
    lease_seconds: float
    result: InboxResult
    owner: dict[str, str] = field(default_factory=owner_identity)
    loaded: LoadedModel | None = None
    _algorithm: Algorithm | None = None

    def ledger(self, name: str) -> str:
        return storage.join(storage.join(self.out_dir, LEDGER), name)

    @property
    def algorithm(self) -> Algorithm:
        """The ledger's digest algorithm, settled when the first input needs it (an empty inbox
        writes nothing)."""
        if self._algorithm is None:
            self._algorithm = ledger_algorithm(self.out_dir)
        return self._algorithm


def ledger_algorithm(out_dir: str) -> Algorithm:
    """The digest algorithm of the ledger in `out_dir` (the module doc): its FORMAT's, or, for a
    ledger without one, SHA-256 if it holds records and BLAKE3 if not, then written down."""
    url = storage.join(storage.join(out_dir, LEDGER), FORMAT)
    while True:
        data = storage.read_bytes(url)
        if data is not None:
            try:
                algorithm = json.loads(data).get("digest")
            except (ValueError, AttributeError):
                algorithm = None
            if algorithm not in digests.ALGORITHMS:
                raise OutputError(f"{storage.shown(url)}: not a ledger format this version reads; expected "
                                  f'{{"digest": one of {list(digests.ALGORITHMS)}}}')
            return algorithm
        begun = any(n.endswith(".json") and digests.is_hex_digest(n[: -len(".json")])
                    for n in storage.glob(storage.join(storage.join(out_dir, LEDGER), "")))
        algorithm = digests.LEGACY if begun else digests.DEFAULT
        if storage.create(url, _encoded({"digest": algorithm})):
            return algorithm  # else another worker wrote it first: read what it decided


@dataclass
class _Entry:
    name: str  # in the inbox
    source: str  # how it is shown: the path, or the URL
    path: Path | None  # readable here: the inbox's own entry, or its copy from a bucket once fetched
    identity: str | None = None  # names its content without reading it (see the module doc); None: read it


def _identity(path: Path) -> str | None:
    """A settled local file's identity; None for a folder, a file written within SETTLED_S, or one gone
    since the listing (its read then fails, and is reported, like any unreadable input's)."""
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or time.time() - max(st.st_mtime, st.st_ctime) < SETTLED_S:
        return None
    return f"file {path.name} {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def _object_identity(name: str, size: int, version: str | None) -> str | None:
    """A bucket object's identity, from its listing or a HEAD request; None where the store names no version."""
    return f"object {name} {size} {version}" if version else None


def _index_url(s: _Scoring, identity: str) -> str:
    return s.ledger(f"{DIGESTS}/{hashlib.sha256(identity.encode()).hexdigest()}.json")


def _known_digest(s: _Scoring, e: _Entry) -> str | None:
    """The digest the ledger remembers for this entry's identity, if any."""
    if e.identity is None:
        return None
    try:
        data = storage.read_bytes(_index_url(s, e.identity))
        entry = json.loads(data) if data else None
    except (storage.StoreError, ValueError):
        return None  # unreadable: read the input instead
    ok = isinstance(entry, dict) and entry.get("identity") == e.identity and digests.is_hex_digest(
        entry.get(s.algorithm))
    return entry[s.algorithm] if ok else None


def _remember_digest(s: _Scoring, e: _Entry, digest: str) -> None:
    """Remembered only when the entry's identity is still the one listed after its bytes were read:
    an entry replaced meanwhile is read again by its next reader."""
    if e.identity is None:
        return
    try:
        if storage.is_url(e.source):
            if _object_identity(e.name, e.path.stat().st_size, storage.version(e.source)) != e.identity:
                return
        elif _identity(e.path) != e.identity:
            return
        storage.create(_index_url(s, e.identity), _encoded({"identity": e.identity, s.algorithm: digest}))
    except (storage.StoreError, OSError) as err:  # only a saving lost
        log.warning("inbox: could not remember the digest of %s: %s", e.source, err)


def _readable(e: _Entry, spool: Path, result: InboxResult) -> bool:
    """The entry's bytes here (a bucket's object copied into the spool); False when it cannot be read
    (recorded as failed: the next run tries again) or is not an input (ignored)."""
    if e.path is not None:
        return True
    try:
        local = storage.fetch(e.source, spool / e.name)
    except storage.StoreError as err:  # deleted since the listing, or unreadable: the next run retries it
        result.failed.append({"input": e.name, "error": str(err)})
        return False
    if not is_input(local):
        result.ignored.append(e.name)
        return False
    e.path = local
    return True


def _expected(e: _Entry, digest: str, algorithm: Algorithm) -> Expected:
    """What the job must find in the entry: `digest`'s content. A settled local file is vouched for
    by its identity, unchanged from the listing to the end of its scoring (a write moves its change
    time, a replacement its inode), instead of by hashing its bytes a second time; anything else
    (a folder, a file written within SETTLED_S, a bucket object's copy) is hashed again as it is read."""
    if e.identity is None or storage.is_url(e.source):
        return Expected(digest, algorithm)
    return Expected(digest, algorithm, unchanged=lambda: _identity(e.path) == e.identity)


def _score_claimed(s: _Scoring, e: _Entry, digest: str) -> None:
    """One input this worker holds the lease on: skipped when it was scored, recovered when a killed
    job had finished its output, else scored (or recorded as failed)."""
    record_url = s.ledger(f"{digest}.json")
    record = _read_record(record_url)
    if record is not None and not s.rescore:
        s.result.already.append({"input": e.name, s.algorithm: digest, "status": record["status"],
                                 "output": record.get("output") or ""})
        return
    # a rescoring replaces the recorded output, whichever name the content has now
    output = record["output"] if record and record.get("output") else _output_for(s.out_dir, e.name, digest, s.fmt)
    history = (record or {}).get("history", [])
    finished = _finished_output(output, digest, s.algorithm) if record is None else None
    if finished is not None:  # scored by a job that died before recording it
        _put_record(s, e, digest, record_url, _record(s, e.name, digest, "scored", output, finished, history),
                    record)
        s.result.already.append({"input": e.name, s.algorithm: digest, "status": "recovered", "output": output})
        return
    try:
        if e.path.is_symlink():  # swapped for a link since the listing: not followed (the module doc)
            raise InputError(f"{e.path}: a symbolic link (since the inbox was listed); links are not followed")
        if s.loaded is None:
            s.loaded = load_model(s.job)
        res = run_job(dataclasses.replace(s.job, input=e.path, output=output), s.loaded,
                      source=e.source if storage.is_url(e.source) else None,
                      expect=_expected(e, digest, s.algorithm))
    except InputChanged as err:  # rewritten since its digest: claimed under content it no longer has
        s.result.failed.append({"input": e.name, s.algorithm: digest, "error": str(err)})
        log.warning("inbox: %s; the next run scores it as it is then", err)
        return
    except InputError as err:
        failed = {s.algorithm: digest, "input": e.name, "status": "failed", "error": str(err), "finished": _now(),
                  "history": history}
        _put_record(s, e, digest, record_url, failed, record)
        s.result.failed.append({"input": e.name, s.algorithm: digest, "error": str(err)})
        log.warning("inbox: %s", err)
        return
    if _put_record(s, e, digest, record_url,
                   _record(s, e.name, digest, "scored", output, res.manifest_data, history), record):
        s.result.scored.append(res)


def _put_record(s: _Scoring, e: _Entry, digest: str, url: str, new: dict[str, Any],
                old: dict[str, Any] | None) -> bool:
    """The ledger record written: created once (conditionally), or rewritten by a rescoring. False
    when another worker recorded the input first (it took the lease over): its record stands."""
    if old is not None:
        storage.write_bytes(url, _encoded(new))
        return True
    if storage.create(url, _encoded(new)):
        return True
    s.result.already.append({"input": e.name, s.algorithm: digest, "status": "recorded by another worker"})
    return False


def _entries(inbox: Path | str, result: InboxResult) -> list[_Entry]:
    """The inbox's inputs, in name order. A bucket's objects are listed, not read: each is copied into
    the spool when its digest or its scoring needs the bytes (one download for both)."""
    if isinstance(inbox, Path):
        inputs, result.ignored, result.links = list_inbox(inbox)
        return [_Entry(p.name, str(p), p, _identity(p)) for p in inputs]
    out = []
    for item in storage.listing(inbox):
        if item["name"].startswith("."):
            continue
        version = item.get("version") if item["type"] == "file" else None
        out.append(_Entry(item["name"], storage.join(inbox, item["name"]), None,
                          _object_identity(item["name"], item["size"], version)))
    return out


def run_inbox(inbox: Path | str, out_dir: Path | str, template: JobConfig, rescore: bool = False,
              lease_seconds: float = LEASE_SECONDS, worker: tuple[int, int] = (0, 1)) -> InboxResult:
    """Score every not-yet-scored input of `inbox` into `out_dir` (see the module doc); each may be a
    folder or a URL. `template` holds the job settings; its input and output are set per input. Bad
    inputs are recorded as failed (not retried until their content changes) and do not stop the
    others; with `template.fail_on_drift`, any drift alert raises DriftAlert at the end. Worker w of n
    (a fan-out) starts at the w/n-th input and goes round."""
    inbox, out = _checked_locations(inbox, out_dir)
    result = InboxResult(inbox, out)
    fmt = template.format or "parquet"
    s = _Scoring(dataclasses.replace(template, fail_on_drift=False, overwrite=True, format=fmt), out, fmt,
                 rescore, lease_seconds, result)
    entries = _entries(inbox, result)
    w, n = worker
    first = len(entries) * w // n
    with tempfile.TemporaryDirectory(prefix="mnistops-inbox-") as spool:
        seen: dict[str, str] = {}
        for e in entries[first:] + entries[:first]:
            try:
                _one(s, e, seen, Path(spool))
            finally:  # the spool holds one input at a time, whatever the inbox's size
                if e.path is not None and storage.is_url(e.source):
                    shutil.rmtree(e.path) if e.path.is_dir() else e.path.unlink(missing_ok=True)
    log.info("inbox %s: %d scored, %d already scored, %d in progress elsewhere, %d failed, %d ignored",
             storage.shown(inbox), len(result.scored), len(result.already), len(result.busy), len(result.failed),
             len(result.ignored))
    if template.fail_on_drift and result.drift_alerts:
        names = ", ".join(Path(str(r.input_path)).name for r in result.drift_alerts)
        raise DriftAlert(f"{storage.shown(inbox)}: drift alert on {len(result.drift_alerts)} input(s): {names} "
                         "(predictions written; see their manifests)", result)
    return result


def _one(s: _Scoring, e: _Entry, seen: dict[str, str], spool: Path) -> None:
    digest = _known_digest(s, e)
    if digest is None:
        if not _readable(e, spool, s.result):
            return
        try:
            digest = content_digest(e.path, s.algorithm)
        except OSError as err:
            s.result.failed.append({"input": e.name, "error": f"{e.source}: unreadable ({err.strerror or err})"})
            return
        _remember_digest(s, e, digest)
    if digest in seen:
        s.result.already.append({"input": e.name, s.algorithm: digest, "same_as": seen[digest]})
        return
    seen[digest] = e.name
    record = _read_record(s.ledger(f"{digest}.json"))
    if record is not None and not s.rescore:  # the common case of a rerun: no lease needed to skip it
        s.result.already.append({"input": e.name, s.algorithm: digest, "status": record["status"],
                                 "output": record.get("output") or ""})
        return
    lease = Lease(storage.join(s.out_dir, LEDGER), digest, s.lease_seconds, s.owner)
    if not lease.take():
        s.result.busy.append(e.name)
        return
    try:
        if _readable(e, spool, s.result):
            _score_claimed(s, e, digest)
    finally:
        lease.release()
    if lease.lost.is_set():
        log.warning("inbox: %s was taken over by another worker while this one scored it", e.name)


def _record(s: _Scoring, name: str, digest: str, status: str, output: str, manifest: dict[str, Any],
            history: list[dict[str, Any]]) -> dict[str, Any]:
    entry = {
        "output": output, "manifest": output + ".manifest.json",
        "model": manifest.get("model", {}).get("uri"), "model_version": manifest.get("model", {}).get("version"),
        "drift": (manifest.get("drift") or {}).get("status"), "records": manifest.get("counts", {}).get("records"),
        "finished": manifest.get("finished") or _now(), "mlflow_run_id": manifest.get("mlflow_run_id"),
    }
    return {s.algorithm: digest, "input": name, "status": status, **entry, "history": [*history, entry]}
