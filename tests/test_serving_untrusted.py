"""Inputs treated as untrusted, through the real CLI on real files: symbolic links in an inbox or an
image folder are never followed, CSV cells a spreadsheet would evaluate are neutralised, a labels.csv
naming one file twice is refused, and a full disk under --output is one line naming the file with
nothing left behind."""

from __future__ import annotations

import contextlib
import blake3
import json
import os
import re
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving_fixtures import digits, save_model, write_idx

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    save_model(path)
    return path


def serving(model: Path, *args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", "--model", str(model), "--no-track", "--device", "cpu",
                           *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180, **kw)


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr
    return [line for line in r.stderr.splitlines() if "error:" in line]


def pngs(folder: Path, names: list[str], seed: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in zip(names, digits(len(names), seed=seed)):
        Image.fromarray(a).save(folder / name, format="PNG")


def test_inbox_links_are_listed_and_never_followed(model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    pngs(outside / "private", ["p0.png", "p1.png"])
    np.save(outside / "secret.npy", digits(5, seed=9))
    os.mkfifo(outside / "fifo")  # opening it would block for ever: a followed link hangs the job
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    np.save(inbox / "real.npy", digits(6, seed=1))
    for name, target in [("folder", outside / "private"), ("secret.npy", outside / "secret.npy"),
                         ("passwd", Path("/etc/passwd")), ("shadow", Path("/etc/shadow")),
                         ("fifo", outside / "fifo")]:
        (inbox / name).symlink_to(target)
    r = serving(model, "--inbox", str(inbox), "--output", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert [Path(x["input"]).name for x in s["scored"]] == ["real.npy"]
    assert s["links_not_followed"] == ["fifo", "folder", "passwd", "secret.npy", "shadow"]
    assert s["ignored"] == [] and s["failed"] == []
    records = [json.loads(p.read_text()) for p in (out / "ledger").glob("*.json")]
    assert [x["input"] for x in records] == ["real.npy"]
    passwd = blake3.blake3(Path("/etc/passwd").read_bytes()).hexdigest()
    assert not list((out / "ledger").glob(f"{passwd}*"))
    assert [p.name.split(".")[0] for p in out.glob("*.parquet")] == ["real"]


def test_links_inside_an_image_folder_are_not_followed(model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    pngs(outside, ["o.png"], seed=7)
    pngs(outside / "sub", ["s.png"], seed=8)
    folder = tmp_path / "scans"
    pngs(folder, ["a.png", "b.png"])
    (folder / "link.png").symlink_to(outside / "o.png")
    (folder / "linked-dir").symlink_to(outside / "sub")
    (folder / "passwd").symlink_to("/etc/passwd")
    r = serving(model, "--input", str(folder), "--output", "o.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "o.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in rows] == ['"id"', '"a.png"', '"b.png"']
    manifest = json.loads((tmp_path / "o.csv.manifest.json").read_text())
    assert manifest["input"]["links"] == ["link.png", "linked-dir", "passwd"]
    # labels.csv as a link is refused: the labels would come from outside the folder
    (outside / "labels.csv").write_text("file,label\na.png,1\nb.png,2\n")
    (folder / "labels.csv").symlink_to(outside / "labels.csv")
    r = serving(model, "--input", str(folder), "--output", "o2.csv", cwd=tmp_path)
    assert r.returncode == 1
    (line,) = error_lines(r)
    assert re.search(r"scans/labels\.csv: a symbolic link", line), line
    assert not list(tmp_path.glob("o2.csv*")) and not list(tmp_path.glob(".o2.csv*"))


FORMULAS = ["=HYPERLINK(\"evil.example\",\"y\").png", "+1.png", "-2.png", "@SUM(A1).png", "\tt.png"]


def test_csv_cells_a_spreadsheet_would_evaluate_are_neutralised(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    pngs(folder, [*FORMULAS, "plain.png"])
    r = serving(model, "--input", str(folder), "--output", "o.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import csv

    with open(tmp_path / "o.csv", newline="") as f:
        ids = [row[0] for row in csv.reader(f)][1:]
    assert sorted(ids) == sorted(["'" + n for n in FORMULAS] + ["plain.png"])
    raw = (tmp_path / "o.csv").read_text()
    assert '"\'=HYPERLINK(""evil.example"",""y"").png"' in raw  # quoted, inner quotes doubled
    assert not re.search(r'(^|,)"?[=+\-@]', raw, re.M)  # no cell starts a formula
    # Parquet keeps the true names (no spreadsheet evaluates it)
    r = serving(model, "--input", str(folder), "--output", "o.parquet", cwd=tmp_path)
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(tmp_path / "o.parquet").column("id").to_pylist()) == sorted([*FORMULAS, "plain.png"])


def test_labels_csv_naming_a_file_twice_is_one_line(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    pngs(folder, ["a.png", "b.png"])
    (folder / "labels.csv").write_text("file,label\na.png,1\nb.png,2\na.png,7\n")
    r = serving(model, "--input", str(folder), "--output", "o.parquet", cwd=tmp_path)
    assert r.returncode == 1
    (line,) = error_lines(r)
    assert line.endswith("scans/labels.csv: line 4: 'a.png' is named again (first on line 2); "
                         "expected one line per image"), line
    assert not list(tmp_path.glob("*o.parquet*"))


@contextlib.contextmanager
def small_disk(tmp_path: Path):
    """(folder, expected reason, preexec) for a write that runs out of room: a 256 KiB tmpfs when this
    process may mount one (root), else a 256 KiB file-size limit (EFBIG) on the job's process."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", f"tmpfs-{uuid.uuid4().hex[:8]}", str(mount)],
                       capture_output=True)
    if r.returncode != 0:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

        yield mount, "File too large", limit
        return
    try:
        yield mount, "No space left on device", None
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_full_disk_under_output_is_one_line_naming_the_file(model: Path, tmp_path: Path, fmt: str) -> None:
    write_idx(tmp_path / "big-idx3-ubyte", np.resize(digits(1000), (40_000, 28, 28)))
    with small_disk(tmp_path) as (disk, reason, preexec):
        out = disk / f"predictions.{fmt}"
        r = serving(model, "--input", str(tmp_path / "big-idx3-ubyte"), "--output", str(out), "--all-probabilities",
                    cwd=tmp_path, preexec_fn=preexec)
        assert r.returncode == 1, r.stderr
        (line,) = error_lines(r)
        assert f"{out}: could not be written ({reason}); nothing was left there" in line, line
        assert os.listdir(disk) == []  # no output, no manifest, no temp file
