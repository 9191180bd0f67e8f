"""Inbox mode: score every input of a folder that has not been scored yet, exactly once per content.

    INBOX/                      OUTDIR/
      batch-17.npy                batch-17.npy.<sha12>.parquet (+ .manifest.json)
      scans/  (image folder)      scans.<sha12>.parquet (+ .manifest.json)
      README.txt  (ignored)       ledger/<sha256>.json   one record per scored input content
                                  ledger/<sha256>.lock   the claim while it is being scored

Inputs are the non-hidden entries of INBOX: IDX image files (gzipped or not), `.npy` arrays, and
folders of images. Anything else is ignored and listed. A symbolic link is never an input and never
followed (whoever can write to the inbox could point it at /etc/shadow or another user's folder): it
is listed under `links_not_followed`, and an entry swapped for a link after the listing is refused
when it is opened (O_NOFOLLOW; links inside an image folder likewise, see serving.readers). Uploaders should write under a hidden name
(a leading dot) and rename when complete, so a half-copied file is never taken for an input.

Exactly once: an input is keyed by the SHA-256 of its content (a renamed or re-uploaded copy is not
scored again). For each one the job takes an exclusive, non-blocking `flock` on its lock file, then
looks for its ledger record: present -> already scored; absent -> scored into its own output name,
the output and manifest renamed into place, and only then the ledger record written (atomically),
before the lock is released. So:
- two jobs at once never score the same input: the second finds it locked (skips it, the first is on
  it) or finds its record;
- a job killed mid-way releases its locks (the kernel drops them with the process) and wrote no
  record: the next run scores the input again into the same name, replacing nothing but a stale
  temporary file; a job killed between the output's rename and the record finds the finished output
  (its manifest carries the digest) and records it instead of scoring it twice.
`rescore` scores recorded inputs again with the current model (same output name, replaced
atomically; the ledger keeps the history).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import idx
from common.atomic import atomic_path
from common.errors import DriftAlert, InputError, OutputError
from serving.job import JobConfig, JobResult, LoadedModel, load_model, run_job
from serving.readers import content_digest
from serving.writers import manifest_path, writing

log = logging.getLogger(__name__)

LEDGER = "ledger"


@dataclass
class InboxResult:
    inbox: Path
    output: Path
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
            "inbox": str(self.inbox), "output": str(self.output),
            "scored": [{"input": str(r.input_path), "output": str(r.output), "records": r.records,
                        "predicted": r.predicted, "accuracy": r.accuracy, "drift": r.drift.status,
                        "model_version": r.model.version, "mlflow_run_id": r.mlflow_run_id}
                       for r in self.scored],
            "already_scored": self.already, "in_progress_elsewhere": self.busy, "failed": self.failed,
            "ignored": self.ignored, "links_not_followed": self.links,
        }


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


@contextlib.contextmanager
def claim(lock: Path) -> Iterator[bool]:
    """An exclusive claim on one input for this process: True when taken, False when another job
    holds it. The kernel releases it when the process ends, however it ends."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    with writing(path), atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _output_for(out_dir: Path, inp: Path, digest: str, fmt: str) -> Path:
    return out_dir / f"{inp.name}.{digest[:12]}.{fmt}"


def _finished_output(output: Path, digest: str) -> dict[str, Any] | None:
    """The manifest of a finished scoring of `digest` at `output`, if one is there (a job killed after
    its output's rename but before its ledger record)."""
    m = manifest_path(output)
    if not (output.is_file() and m.is_file()):
        return None
    try:
        manifest = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("input", {}).get("sha256") == digest else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _checked_folders(inbox: Path, out_dir: Path) -> tuple[Path, Path]:
    inbox, out_dir = Path(inbox).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if not inbox.is_dir():
        raise InputError(f"{inbox}: no such inbox folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: the inbox's output must be a folder, and this is a file")
    if out_dir == inbox or out_dir.is_relative_to(inbox):
        raise OutputError(f"{out_dir}: inside the inbox {inbox}; its outputs would become inputs")
    if inbox.is_relative_to(out_dir):
        raise OutputError(f"{inbox}: the inbox lies inside the output folder {out_dir}")
    return inbox, out_dir


@dataclass
class _Scoring:
    """What an inbox run carries from one input to the next (the model is loaded once, when needed)."""

    job: JobConfig  # the settings; input and output are set per input
    out_dir: Path
    fmt: str
    rescore: bool
    result: InboxResult
    loaded: LoadedModel | None = None


def _score_claimed(s: _Scoring, inp: Path, digest: str, record_path: Path) -> None:
    """One input whose ledger entry this job holds: skipped when it was scored, recovered when a
    killed job had finished its output, else scored (or recorded as failed)."""
    record = _read_record(record_path)
    if record is not None and not s.rescore:
        s.result.already.append({"input": inp.name, "sha256": digest, "status": record["status"],
                                 "output": record.get("output") or ""})
        return
    # a rescoring replaces the recorded output, whichever name the content has now
    output = Path(record["output"]) if record and record.get("output") else _output_for(s.out_dir, inp, digest, s.fmt)
    history = (record or {}).get("history", [])
    finished = _finished_output(output, digest) if record is None else None
    if finished is not None:  # scored by a job that died before recording it
        _write_record(record_path, _record(inp, digest, "scored", output, finished, history))
        s.result.already.append({"input": inp.name, "sha256": digest, "status": "recovered", "output": str(output)})
        return
    try:
        if inp.is_symlink():  # swapped for a link since the listing: not followed (the module doc)
            raise InputError(f"{inp}: a symbolic link (since the inbox was listed); links are not followed")
        if s.loaded is None:
            s.loaded = load_model(s.job)
        res = run_job(dataclasses.replace(s.job, input=inp, output=output), s.loaded)
    except InputError as e:
        _write_record(record_path, {"sha256": digest, "input": inp.name, "status": "failed",
                                    "error": str(e), "finished": _now(), "history": history})
        s.result.failed.append({"input": inp.name, "sha256": digest, "error": str(e)})
        log.warning("inbox: %s", e)
        return
    manifest = json.loads(res.manifest.read_text())
    _write_record(record_path, _record(inp, digest, "scored", output, manifest, history))
    s.result.scored.append(res)


def run_inbox(inbox: Path, out_dir: Path, template: JobConfig, rescore: bool = False) -> InboxResult:
    """Score every not-yet-scored input of `inbox` into `out_dir` (see the module doc). `template`
    holds the job settings; its input and output are set per input. Bad inputs are recorded as failed
    (not retried until their content changes) and do not stop the others; with
    `template.fail_on_drift`, any drift alert raises DriftAlert at the end, after every input."""
    inbox, out_dir = _checked_folders(inbox, out_dir)
    inputs, ignored, links = list_inbox(inbox)
    result = InboxResult(inbox, out_dir, ignored=ignored, links=links)
    fmt = template.format or "parquet"
    s = _Scoring(dataclasses.replace(template, fail_on_drift=False, overwrite=True, format=fmt), out_dir, fmt,
                 rescore, result)
    ledger, seen = out_dir / LEDGER, {}
    for inp in inputs:
        try:
            digest = content_digest(inp)
        except OSError as e:
            result.failed.append({"input": inp.name, "error": f"{inp}: unreadable ({e.strerror or e})"})
            continue
        if digest in seen:
            result.already.append({"input": inp.name, "sha256": digest, "same_as": seen[digest]})
            continue
        seen[digest] = inp.name
        with claim(ledger / f"{digest}.lock") as mine:
            if mine:
                _score_claimed(s, inp, digest, ledger / f"{digest}.json")
            else:
                result.busy.append(inp.name)
    log.info("inbox %s: %d scored, %d already scored, %d in progress elsewhere, %d failed, %d ignored",
             inbox, len(result.scored), len(result.already), len(result.busy), len(result.failed),
             len(result.ignored))
    if template.fail_on_drift and result.drift_alerts:
        names = ", ".join(r.input_path.name for r in result.drift_alerts)
        raise DriftAlert(f"{inbox}: drift alert on {len(result.drift_alerts)} input(s): {names} "
                         "(predictions written; see their manifests)", result)
    return result


def _record(inp: Path, digest: str, status: str, output: Path, manifest: dict[str, Any],
            history: list[dict[str, Any]]) -> dict[str, Any]:
    entry = {
        "output": str(output), "manifest": str(manifest_path(output)),
        "model": manifest.get("model", {}).get("uri"), "model_version": manifest.get("model", {}).get("version"),
        "drift": (manifest.get("drift") or {}).get("status"), "records": manifest.get("counts", {}).get("records"),
        "finished": manifest.get("finished") or _now(), "mlflow_run_id": manifest.get("mlflow_run_id"),
    }
    return {"sha256": digest, "input": inp.name, "status": status, **entry, "history": [*history, entry]}
