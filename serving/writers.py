"""Prediction files (Parquet or CSV) and their JSON manifest, written atomically.

The predictions stream chunk by chunk into a temporary file in the target folder (same file system,
so the final `os.replace` is atomic); only a finished job renames it into place. A killed job leaves
its temporary file behind (nothing runs on SIGKILL): the temp name carries the writer's pid, and the
next job writing the same output removes temp files whose process is gone.

Columns, each saying what it is: `id` (record index, or for a folder the file's path relative to it),
`prediction` (the predicted class), `probability` (of that class), `ood_score` (how unlike the
training data the record is, when the model has a drift reference; see `serving.drift`), with true
labels `label` and `correct` (prediction == label), and with `all_probabilities` `prob_0` .. `prob_9`.

CSV cells are untrusted text (an image's file name is whatever the uploader chose): a text cell that a
spreadsheet would evaluate as a formula (it begins with `=`, `+`, `-`, `@`, a tab or a carriage
return, e.g. `=HYPERLINK(...)`) is written with a leading single quote, and every text cell is
quoted, as OWASP recommends against CSV injection. Parquet keeps the names as they are (no
spreadsheet evaluates Parquet).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from common.errors import OutputError
from common.processes import start_time
from serving.defaults import FORMATS, Format  # noqa: F401 (re-exported)

ROW_GROUP_ROWS = 65_536
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what Excel, LibreOffice and Sheets evaluate


def csv_safe(cells: list[str]) -> list[str]:
    """Text cells made inert for a spreadsheet (OWASP's CSV-injection rule): a leading `'`
    before a cell that would be read as a formula; the CSV writer quotes every text cell."""
    return [f"'{c}" if c.startswith(FORMULA_STARTS) else c for c in cells]


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temp files of `target` (and its manifest) left by processes that no longer run."""
    removed = []
    for t in (target, manifest_path(target)):
        pattern = re.compile(rf"^\.{re.escape(t.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp$")
        if not t.parent.is_dir():
            continue
        for p in t.parent.iterdir():
            m = pattern.match(p.name)
            if m and start_time(int(m[1])) is None:  # its process gone (or a zombie)
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """An OSError while writing `target` (a full disk: ENOSPC; a file-size limit: EFBIG; a read-only
    file system) as one OutputError naming it: pyarrow's own messages name no file."""
    try:
        yield
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        if e.errno is None and "No space left" in str(e):  # pyarrow keeps the errno in its text only
            why = os.strerror(errno.ENOSPC)
        raise OutputError(f"{target}: could not be written ({why}); nothing was left there") from e


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Columns:
    """Which optional columns a predictions file has."""

    id_type: pa.DataType
    ood_score: bool = False
    labels: bool = False
    all_probabilities: bool = False


def schema(cols: Columns) -> pa.Schema:
    fields = [pa.field("id", cols.id_type), pa.field("prediction", pa.int64()),
              pa.field("probability", pa.float32())]
    if cols.ood_score:
        fields.append(pa.field("ood_score", pa.float32()))
    if cols.labels:
        fields += [pa.field("label", pa.int64()), pa.field("correct", pa.bool_())]
    if cols.all_probabilities:
        fields += [pa.field(f"prob_{k}", pa.float32()) for k in range(10)]
    return pa.schema(fields)


@dataclass
class Batch:
    """One chunk of predictions: ids (B,), prediction (B,), probability (B,), and the optional
    ood_score (B,), label (B,), probabilities (B, 10)."""

    ids: np.ndarray | list[str]
    prediction: np.ndarray
    probability: np.ndarray
    ood_score: np.ndarray | None = None
    label: np.ndarray | None = None
    probabilities: np.ndarray | None = None


class PredictionWriter:
    """Streams prediction chunks to a temp file; `commit()` renames it into place, and leaving the
    `with` block without a commit (an exception) deletes it."""

    def __init__(self, path: Path, fmt: Format, cols: Columns):
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}, expected one of {FORMATS}")
        self.path = path
        self.fmt = fmt
        self.cols = cols
        self.schema = schema(cols)
        self.rows = 0
        self.tmp = temp_path(path)
        self._committed = False
        self._writer: pq.ParquetWriter | pa_csv.CSVWriter | None
        self._pending: list[Batch] = []
        self._pending_rows = 0
        try:
            with writing(path):
                self._open()
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def _open(self) -> None:
        if self.fmt == "parquet":
            # Dictionary encoding only for the small-valued columns; probabilities hardly repeat.
            self._writer = pq.ParquetWriter(
                self.tmp, self.schema, compression="snappy",
                use_dictionary=[c for c in ("prediction", "label") if c in self.schema.names],
            )
        else:
            # pyarrow's default quoting ("needed") quotes every text cell, numbers bare
            self._writer = pa_csv.CSVWriter(str(self.tmp), self.schema)

    def write(self, batch: Batch) -> None:
        """One chunk. Chunks are gathered into row groups of ROW_GROUP_ROWS: Parquet readers want big
        row groups, and one pyarrow write per 1024-image batch costs as much as a tenth of the
        inference."""
        assert self._writer is not None, "write after close/abort"
        for name, want in (("ood_score", self.cols.ood_score), ("label", self.cols.labels),
                           ("probabilities", self.cols.all_probabilities)):
            if want and getattr(batch, name) is None:
                raise ValueError(f"this writer was opened with {name}: pass it")
        self._pending.append(batch)
        self._pending_rows += len(batch.prediction)
        self.rows += len(batch.prediction)
        if self._pending_rows >= ROW_GROUP_ROWS:
            with writing(self.path):
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        assert self._writer is not None
        parts, self._pending, self._pending_rows = self._pending, [], 0

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(b, name) for b in parts])

        id_type = self.cols.id_type
        if pa.types.is_string(id_type):
            names = [i for b in parts for i in b.ids]
            ids = pa.array(csv_safe(names) if self.fmt == "csv" else names, type=id_type)
        else:
            ids = pa.array(cat("ids"), type=id_type)
        columns: list[Any] = [
            ids,
            pa.array(cat("prediction"), type=pa.int64()),
            pa.array(cat("probability"), type=pa.float32()),
        ]
        if self.cols.ood_score:
            columns.append(pa.array(cat("ood_score"), type=pa.float32()))
        if self.cols.labels:
            label = cat("label")
            columns += [pa.array(label, type=pa.int64()), pa.array(label == cat("prediction"))]
        if self.cols.all_probabilities:
            probs = cat("probabilities")  # (rows, 10)
            columns += [pa.array(np.ascontiguousarray(probs[:, k])) for k in range(10)]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def close(self) -> None:
        """Finish the temp file and put it on disk; `commit()` then only renames."""
        assert self._writer is not None, "close twice"
        with writing(self.path):
            self._flush()
            self._writer.close()
            self._writer = None
            _fsync(self.tmp)  # the data is on disk before the name says it is complete

    def commit(self) -> Path:
        if self._writer is not None:
            self.close()
        with writing(self.path):
            os.replace(self.tmp, self.path)
        self._committed = True
        return self.path

    def abort(self) -> None:
        """Drop the temp file (no-op after a commit)."""
        if self._committed:
            return
        try:
            if self._writer is not None:
                # the file is dropped anyway; a second failure (the disk is still full) must not
                # replace the error that says which output could not be written
                with contextlib.suppress(OSError):
                    self._writer.close()
        finally:
            self._writer = None
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


def write_json_temp(path: Path, obj: dict[str, Any]) -> Path:
    """`obj` as JSON in a temp file beside `path`, on disk; the caller renames it into place."""
    tmp = temp_path(path)
    try:
        with writing(path), open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp

