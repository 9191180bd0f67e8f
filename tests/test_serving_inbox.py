"""Batch inference as teams run it: outputs that explain themselves (labels.csv folders), outputs that
never clobber, the shared exit codes, and the inbox (each input content scored exactly once, also
with two jobs at once and after a killed job)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.errors import OutputError
from serving.inbox import run_inbox
from serving.job import JobConfig, run_job
from serving_fixtures import digits, reference_probabilities, save_model, write_idx
from stores import home_with_store

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    return path, save_model(path)


def cfg(model: tuple[Path, dict], inp: Path, out: Path, **kw) -> JobConfig:
    return JobConfig(input=inp, output=out, model=str(model[0]), track=False, device="cpu", **kw)


def files(folder: Path) -> list[str]:
    """The files under `folder`, less the ledger's leases (claim generations), its index of digests
    and its FORMAT (see serving.inbox)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and ".claim-" not in p.name and "digests" not in p.parts
                  and p.name != "FORMAT")


# --- outputs that explain themselves ------------------------------------------------------------------


def test_folder_with_labels_csv_subfolders_and_other_files(model, tmp_path: Path) -> None:
    x = digits(6)
    pred = reference_probabilities(model[1], x).argmax(axis=1)
    d = tmp_path / "scans"
    (d / "batch2").mkdir(parents=True)
    names = ["a.png", "b.png", "c.jpg", "batch2/d.png", "batch2/e.png", "f.png"]
    for name, a in zip(names, x):
        Image.fromarray(a).save(d / name, **({"quality": 100} if name.endswith(".jpg") else {}))
    (d / "README.md").write_text("scanned on Monday")
    (d / "batch2" / "notes.json").write_text("{}")
    (d / ".uploading.png").write_bytes(b"hidden: not an input")
    truth = {n: int(p) for n, p in zip(names, pred)}
    truth["b.png"] = (truth["b.png"] + 1) % 10  # one wrong prediction
    (d / "labels.csv").write_text("file,label\n" + "".join(f"{n},{truth[n]}\n" for n in reversed(names)))

    res = run_job(cfg(model, d, tmp_path / "out.parquet"))
    t = pq.read_table(res.output).to_pydict()
    order = sorted(names)
    assert list(t) == ["id", "prediction", "probability", "label", "correct"]
    assert t["id"] == order  # paths relative to the folder, in path order
    assert t["label"] == [truth[n] for n in order]  # the true labels, matched by file name
    assert t["correct"] == [n != "b.png" for n in order]
    assert res.accuracy == pytest.approx(5 / 6)
    m = json.loads(res.manifest.read_text())
    assert m["input"]["ignored"] == ["README.md", "batch2/notes.json"]
    assert m["labels"]["path"] == str(d / "labels.csv")
    assert m["output"]["columns"] == ["id", "prediction", "probability", "label", "correct"]


def test_all_probabilities_columns(model, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits(7))
    res = run_job(cfg(model, tmp_path / "x.npy", tmp_path / "p.parquet", all_probabilities=True))
    t = pq.read_table(res.output)
    assert t.column_names == ["id", "prediction", "probability"] + [f"prob_{k}" for k in range(10)]
    np.testing.assert_allclose(np.stack([t[f"prob_{k}"].to_numpy() for k in range(10)], 1),
                               reference_probabilities(model[1], digits(7)), atol=1e-5)


# --- never clobber ---------------------------------------------------------------------------------


def test_outputs_never_clobber_inputs(model, tmp_path: Path) -> None:
    x = digits(5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(5))
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(x[0]).save(d / "0.png")
    (d / "labels.csv").write_text("file,label\n0.png,3\n")
    before = {p: p.read_bytes() for p in (tmp_path / "x.npy", tmp_path / "y.npy", model[0], d / "labels.csv")}
    cases = [
        (tmp_path / "x.npy", tmp_path / "x.npy", {}, "refusing to write over the input"),
        (tmp_path / "x.npy", tmp_path / "y.npy", {"labels": tmp_path / "y.npy"}, "refusing to write over the input"),
        (tmp_path / "x.npy", model[0], {}, "refusing to write over the input"),
        (d, d / "labels.csv", {}, "refusing to write over the input"),
        (d, d / "preds.parquet", {}, "inside the input folder"),
        (tmp_path / "x.npy", tmp_path / "x.npy" / "p.parquet", {}, r"x\.npy is a file, not a folder"),
        (tmp_path / "x.npy", d, {}, "is a folder, expected a file path"),
    ]
    for inp, out, kw, message in cases:
        for overwrite in (False, True):  # --overwrite never makes an input writable
            with pytest.raises(OutputError, match=message):
                run_job(cfg(model, inp, out, overwrite=overwrite, **kw))
    assert {p: p.read_bytes() for p in before} == before
    assert files(d) == ["0.png", "labels.csv"]


def test_existing_output_replaced_only_with_overwrite(model, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits(5))
    out = tmp_path / "p.parquet"
    run_job(cfg(model, tmp_path / "x.npy", out))
    first = out.read_bytes()
    np.save(tmp_path / "x.npy", digits(8, seed=3))
    with pytest.raises(OutputError, match=r"p\.parquet: already exists; pass --overwrite"):
        run_job(cfg(model, tmp_path / "x.npy", out))
    assert out.read_bytes() == first
    (tmp_path / "q.parquet.manifest.json").write_text("someone's file")  # the manifest counts too
    with pytest.raises(OutputError, match=r"q\.parquet\.manifest\.json: already exists"):
        run_job(cfg(model, tmp_path / "x.npy", tmp_path / "q.parquet"))
    assert run_job(cfg(model, tmp_path / "x.npy", out, overwrite=True)).predicted == 8
    assert pq.read_table(out).num_rows == 8


# --- exit codes shared by `python -m serving` and `mnistops infer` ---------------------------------


@pytest.mark.parametrize("cmd", [[sys.executable, "-m", "serving"], [sys.executable, "-m", "flows.cli", "infer"]],
                         ids=["python -m serving", "mnistops infer"])
def test_exit_codes_and_one_line(model, tmp_path: Path, cmd: list[str]) -> None:
    """Each exit code once per command: 1 for an input refused on its contents, 2 for a usage error, 0
    for a job, tracked in the default store (MNISTOPS_HOME/mlflow.db). Which inputs and outputs are
    refused, and with what message, is checked on the job itself (tests/test_serving_job.py, the never
    clobber tests above); a missing input refused before anything is imported,
    test_infer_validates_before_importing_torch_or_prefect."""
    from mlflow import MlflowClient

    np.save(tmp_path / "x.npy", digits(3))
    np.save(tmp_path / "bad.npy", np.zeros((2, 10), np.uint8))
    home = home_with_store(tmp_path / "home")  # made already: the job's run must land in it
    env = {**ENV, "MNISTOPS_HOME": str(home)}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MNISTOPS_ARTIFACT_ROOT"):
        env.pop(key, None)
    base = ["--model", str(model[0]), "--device", "cpu"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)

    cases = [
        (["--input", str(tmp_path / "bad.npy"), "--output", "o1.parquet", *base], 1, r"bad\.npy: array of shape \(2, 10\)"),
        (["--input", str(tmp_path / "x.npy"), "--output", "o3.parquet", "--device", "tpu"], 2, "invalid choice"),
    ]
    for args, code, pattern in cases:
        r = run(*args)
        assert r.returncode == code, (args, r.stderr)
        errors = [line for line in r.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and re.search(pattern, errors[0]), r.stderr
        assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("o*.parquet*"))
    # a good job: the same default store as `mnistops` (MNISTOPS_HOME/mlflow.db), run without Prefect
    r = run("--input", str(tmp_path / "x.npy"), "--output", "ok.parquet", *base)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["predicted"] == 3
    run_ = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert run_.info.status == "FINISHED" and run_.data.metrics["predicted"] == 3
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert list((home / "mlartifacts").rglob("ok.parquet.manifest.json"))  # its artifacts under the home


def test_infer_validates_before_importing_torch_or_prefect(tmp_path: Path) -> None:
    code = (
        "import sys; from flows.cli import main; "
        f"rc = main(['infer', '--input', {str(tmp_path / 'nope.npy')!r}, '--output', {str(tmp_path / 'o.parquet')!r}]); "
        "bad = sorted(m for m in ('torch', 'prefect', 'onnxruntime') if m in sys.modules); print(rc, bad)"
    )
    env = {**ENV, "MNISTOPS_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split("\n")[0] == "1 []", (r.stdout, r.stderr)
    assert "nope.npy: no such file or folder" in r.stderr


# --- the inbox --------------------------------------------------------------------------------------


def make_inbox(root: Path) -> Path:
    inbox = root / "inbox"
    (inbox / "scans").mkdir(parents=True)
    np.save(inbox / "a.npy", digits(20, seed=1))
    write_idx(inbox / "b-images-idx3-ubyte.gz", digits(30, seed=2), gz=True)
    for i, a in enumerate(digits(4, seed=3)):
        Image.fromarray(a).save(inbox / "scans" / f"{i}.png")
    np.save(inbox / "a-labels.npy", np.arange(20) % 10)  # 1-D: labels, not an input
    (inbox / "README.txt").write_text("drop files here")
    (inbox / ".b.npy.part").write_bytes(b"an upload in progress")
    return inbox


def test_inbox_scores_each_input_once(model, tmp_path: Path) -> None:
    inbox, out = make_inbox(tmp_path), tmp_path / "out"
    r1 = run_inbox(inbox, out, cfg(model, inbox, out))
    assert sorted(r.input_path.name for r in r1.scored) == ["a.npy", "b-images-idx3-ubyte.gz", "scans"]
    assert sorted(r1.ignored) == ["README.txt", "a-labels.npy"]
    assert {r.input_path.name: pq.read_table(r.output).num_rows for r in r1.scored} == {
        "a.npy": 20, "b-images-idx3-ubyte.gz": 30, "scans": 4}
    ledger = sorted((out / "ledger").glob("*.json"))
    assert len(ledger) == 3
    for r in r1.scored:
        record = json.loads((out / "ledger" / f"{r.input_digest}.json").read_text())
        assert record["status"] == "scored" and record["output"] == str(r.output) and len(record["history"]) == 1
    outputs = files(out)

    r2 = run_inbox(inbox, out, cfg(model, inbox, out))  # nothing new
    assert r2.scored == [] and len(r2.already) == 3 and files(out) == outputs

    np.save(inbox / "c.npy", digits(5, seed=9))
    (inbox / "a-copy.npy").write_bytes((inbox / "a.npy").read_bytes())  # same content, another name
    r3 = run_inbox(inbox, out, cfg(model, inbox, out))
    assert [r.input_path.name for r in r3.scored] == ["c.npy"]
    assert {"input": "a-copy.npy"}.items() <= next(a for a in r3.already if a["input"] == "a-copy.npy").items()
    assert len(files(out)) == len(outputs) + 3  # c's predictions, manifest and ledger record

    r4 = run_inbox(inbox, out, cfg(model, inbox, out), rescore=True)  # everything again, same files
    assert len(r4.scored) == 4 and len(files(out)) == len(outputs) + 3
    record = json.loads((out / "ledger" / f"{r1.scored[0].input_digest}.json").read_text())
    assert len(record["history"]) == 2


def test_a_new_ledger_keys_by_blake3_and_one_begun_with_sha256_keeps_it(model, tmp_path: Path) -> None:
    """Ledgers written before BLAKE3 (SHA-256 records, index and manifests, no FORMAT) go on matching
    their inputs: a rerun scores none of them again, and a new input is keyed the ledger's way."""
    inbox, out = make_inbox(tmp_path), tmp_path / "out"
    run_inbox(inbox, out, cfg(model, inbox, out))
    assert json.loads((out / "ledger" / "FORMAT").read_text()) == {"digest": "blake3"}
    a = blake3.blake3((inbox / "a.npy").read_bytes()).hexdigest()
    assert json.loads((out / "ledger" / f"{a}.json").read_text())["blake3"] == a  # b3sum's digest

    old, legacy = tmp_path / "old", tmp_path / "old" / "ledger"
    legacy.mkdir(parents=True)
    (legacy / "FORMAT").write_text('{"digest": "sha256"}')
    first = run_inbox(inbox, old, cfg(model, inbox, old))
    assert len(first.scored) == 3 and {r.digest_algorithm for r in first.scored} == {"sha256"}
    (legacy / "FORMAT").unlink()  # now as the version before BLAKE3 left it
    a_sha = hashlib.sha256((inbox / "a.npy").read_bytes()).hexdigest()
    assert json.loads((legacy / f"{a_sha}.json").read_text())["sha256"] == a_sha

    again = run_inbox(inbox, old, cfg(model, inbox, old))
    assert again.scored == [] and len(again.already) == 3
    assert json.loads((legacy / "FORMAT").read_text()) == {"digest": "sha256"}
    np.save(inbox / "c.npy", digits(5, seed=9))
    new = run_inbox(inbox, old, cfg(model, inbox, old))
    assert [r.input_path.name for r in new.scored] == ["c.npy"]
    c_sha = hashlib.sha256((inbox / "c.npy").read_bytes()).hexdigest()
    assert json.loads(Path(str(new.scored[0].manifest)).read_text())["input"]["sha256"] == c_sha
    assert (legacy / f"{c_sha}.json").is_file()


def test_workers_agree_on_a_new_ledgers_algorithm_and_an_unknown_one_is_refused(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    from common import storage
    from serving import inbox as inbox_module

    out = tmp_path / "out"
    listed = storage.glob

    def another_worker_decides_meanwhile(prefix: str) -> list[str]:
        found = listed(prefix)
        (out / "ledger").mkdir(parents=True, exist_ok=True)
        (out / "ledger" / "FORMAT").write_text('{"digest": "sha256"}')  # its create wins the race
        return found

    monkeypatch.setattr(storage, "glob", another_worker_decides_meanwhile)
    assert inbox_module.ledger_algorithm(str(out)) == "sha256"  # what the first writer decided
    monkeypatch.setattr(storage, "glob", listed)
    assert inbox_module.ledger_algorithm(str(tmp_path / "fresh")) == "blake3"

    (out / "ledger" / "FORMAT").write_text('{"digest": "md5"}')
    with pytest.raises(OutputError, match=r"ledger/FORMAT: not a ledger format this version reads; expected"):
        inbox_module.ledger_algorithm(str(out))


def test_a_rerun_reads_no_settled_file_again_and_a_rewritten_one_is_read(model, tmp_path: Path, monkeypatch) -> None:
    from serving import inbox as inbox_module

    inbox, out = make_inbox(tmp_path), tmp_path / "out"
    monkeypatch.setattr(inbox_module, "SETTLED_S", 3600.0)  # every file just written: none remembered
    run_inbox(inbox, out, cfg(model, inbox, out))
    assert not (out / "ledger" / "digests").exists()

    read: list[str] = []
    digest = inbox_module.content_digest
    monkeypatch.setattr(inbox_module, "content_digest", lambda p, *a: read.append(p.name) or digest(p, *a))
    monkeypatch.setattr(inbox_module, "SETTLED_S", 0.0)
    again = run_inbox(inbox, out, cfg(model, inbox, out))  # reads each once more, and remembers the files
    assert again.scored == [] and sorted(read) == ["a.npy", "b-images-idx3-ubyte.gz", "scans"]
    index = [json.loads(p.read_text()) for p in (out / "ledger" / "digests").glob("*.json")]
    assert sorted(e["blake3"] for e in index) == sorted(digest(inbox / n) for n in ("a.npy", "b-images-idx3-ubyte.gz"))

    read.clear()
    third = run_inbox(inbox, out, cfg(model, inbox, out))
    assert third.scored == [] and len(third.already) == 3 and read == ["scans"]  # a folder is read every time

    read.clear()
    np.save(inbox / "a.npy", digits(20, seed=77))  # rewritten in place: same name and size, new content
    fourth = run_inbox(inbox, out, cfg(model, inbox, out))
    assert [r.input_path.name for r in fourth.scored] == ["a.npy"] and sorted(read) == ["a.npy", "scans"]


def test_an_input_deleted_after_the_listing_is_reported_and_the_others_scored(model, tmp_path: Path,
                                                                              monkeypatch) -> None:
    from serving import inbox as inbox_module

    inbox, out = make_inbox(tmp_path), tmp_path / "out"
    listed = inbox_module.list_inbox

    def list_then_delete(folder: Path):
        found = listed(folder)
        (folder / "a.npy").unlink()  # another process removes it between the listing and the read
        return found

    monkeypatch.setattr(inbox_module, "list_inbox", list_then_delete)
    r = run_inbox(inbox, out, cfg(model, inbox, out))
    assert sorted(x.input_path.name for x in r.scored) == ["b-images-idx3-ubyte.gz", "scans"]
    assert [f["input"] for f in r.failed] == ["a.npy"] and "unreadable" in r.failed[0]["error"]


@pytest.mark.parametrize("settled", [False, True], ids=["hashed-again", "vouched-by-identity"])
def test_an_input_rewritten_after_its_digest_gets_no_output_and_no_record(model, tmp_path: Path, monkeypatch,
                                                                           settled: bool) -> None:
    """Either way the job knows what it read: a file just written is hashed again as it is scored; a
    settled one is not, and its identity (inode, size, times) must be the listing's once it is read."""
    from serving import inbox as inbox_module

    inbox, out = make_inbox(tmp_path), tmp_path / "out"
    if settled:
        monkeypatch.setattr(inbox_module, "SETTLED_S", 0.0)
        os.utime(inbox / "a.npy", (time.time() - 60, time.time() - 60))  # a rewrite moves its mtime, whatever the tick
    digest = inbox_module.content_digest

    def digest_then_rewrite(path: Path, *a) -> str:
        d = digest(path, *a)
        if path.name == "a.npy":  # an uploader rewrites it in place between its digest and its scoring
            np.save(path, digits(20, seed=42))
        return d

    monkeypatch.setattr(inbox_module, "content_digest", digest_then_rewrite)
    r = run_inbox(inbox, out, cfg(model, inbox, out))
    assert sorted(x.input_path.name for x in r.scored) == ["b-images-idx3-ubyte.gz", "scans"]
    assert [f["input"] for f in r.failed] == ["a.npy"] and "changed while it was scored" in r.failed[0]["error"]
    assert not [f for f in files(out) if f.startswith("a.npy")]  # no output, no manifest, no temp file
    assert not (out / "ledger" / f"{r.failed[0]['blake3']}.json").exists()  # its old content is not recorded

    monkeypatch.setattr(inbox_module, "content_digest", digest)
    again = run_inbox(inbox, out, cfg(model, inbox, out))  # the new content, scored once
    assert [x.input_path.name for x in again.scored] == ["a.npy"] and again.failed == []
    assert again.scored[0].input_digest == digest(inbox / "a.npy")


def test_worker_w_of_n_starts_at_its_share_of_the_inbox(model, tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(4):
        np.save(inbox / f"d{i}.npy", digits(3, seed=i))
    r = run_inbox(inbox, out, cfg(model, inbox, out), worker=(1, 2))
    assert [x.input_path.name for x in r.scored] == ["d2.npy", "d3.npy", "d0.npy", "d1.npy"]


def test_inbox_bad_input_is_recorded_and_does_not_stop_the_others(model, tmp_path: Path) -> None:
    inbox, out = make_inbox(tmp_path), tmp_path / "out"
    np.save(inbox / "broken.npy", np.zeros((3, 30), np.uint8))
    r = run_inbox(inbox, out, cfg(model, inbox, out))
    assert len(r.scored) == 3 and [f["input"] for f in r.failed] == ["broken.npy"]
    assert "array of shape (3, 30)" in r.failed[0]["error"]
    again = run_inbox(inbox, out, cfg(model, inbox, out))  # not retried until its content changes
    assert again.failed == [] and any(a.get("status") == "failed" for a in again.already)
    from serving import cli

    assert cli.exit_code("t", r.summary()) == 1 and cli.exit_code("t", again.summary()) == 0


def test_inbox_and_output_folders_checked(model, tmp_path: Path) -> None:
    inbox = make_inbox(tmp_path)
    with pytest.raises(OutputError, match="inside the inbox"):
        run_inbox(inbox, inbox / "out", cfg(model, inbox, inbox / "out"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="must be a folder"):
        run_inbox(inbox, tmp_path / "file", cfg(model, inbox, tmp_path / "file"))


def test_output_of_a_job_killed_before_its_ledger_record_is_not_scored_twice(model, tmp_path: Path) -> None:
    inbox, out = make_inbox(tmp_path), tmp_path / "out"
    r1 = run_inbox(inbox, out, cfg(model, inbox, out))
    victim = r1.scored[0]
    (out / "ledger" / f"{victim.input_digest}.json").unlink()  # as if killed right after the rename
    mtime = victim.output.stat().st_mtime_ns
    r2 = run_inbox(inbox, out, cfg(model, inbox, out))
    assert r2.scored == [] and [a["status"] for a in r2.already].count("recovered") == 1
    assert victim.output.stat().st_mtime_ns == mtime  # not rewritten
    assert json.loads((out / "ledger" / f"{victim.input_digest}.json").read_text())["status"] == "scored"


def _inbox_cmd(model: Path, inbox: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "serving", "--inbox", str(inbox), "--output", str(out), "--model", str(model),
            "--no-track", "--device", "cpu", *extra]


def _big_inbox(root: Path, n_big: int) -> Path:
    inbox = root / "inbox"
    inbox.mkdir()
    np.save(inbox / "a-small.npy", digits(10, seed=1))
    np.save(inbox / "b-big.npy", np.resize(digits(1000), (n_big, 28, 28)))
    np.save(inbox / "c-small.npy", digits(10, seed=2))
    return inbox


def _assert_each_scored_once(inbox: Path, out: Path) -> None:
    names = sorted(p.name for p in inbox.iterdir())
    preds = sorted(p.name for p in out.glob("*.parquet"))
    assert [p.split(".npy.")[0] + ".npy" for p in preds] == names  # one predictions file per input
    assert not list(out.glob(".*.tmp"))  # no temp file left
    for p in out.glob("*.parquet"):
        m = json.loads(Path(str(p) + ".manifest.json").read_text())
        assert pq.read_table(p).num_rows == m["counts"]["predicted"] == np.load(inbox / Path(m["input"]["path"]).name, mmap_mode="r").shape[0]
    records = [json.loads(p.read_text()) for p in (out / "ledger").glob("*.json")]
    assert sorted(r["input"] for r in records) == names
    assert all(r["status"] == "scored" and len(r["history"]) == 1 for r in records)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_killed_inbox_job_resumes_without_duplicates(model, tmp_path: Path, reaped: bool) -> None:
    """A zombie (killed, not yet reaped by its parent: a container's init may never reap it) holds
    nothing either."""
    inbox, out = _big_inbox(tmp_path, 150_000), tmp_path / "out"
    # batch size 4: the big input takes seconds, so the job is killed while writing it
    proc = subprocess.Popen(_inbox_cmd(model[0], inbox, out, "--batch-size", "4"), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list(out.glob(".b-big.npy.*.tmp")) if out.exists() else []
            if temps and temps[0].stat().st_size > 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        if reaped:
            proc.wait(timeout=30)
        else:
            deadline = time.monotonic() + 30
            while _state(proc.pid) != "Z":  # dead, and not reaped: this process is its parent
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert len(list(out.glob("*.parquet"))) == 1  # a-small was done; b-big was not
        # the next run (here, in this process) takes over the dead job's claim on b-big at once
        rerun = run_inbox(inbox, out, cfg(model, inbox, out))
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert sorted(r.input_path.name for r in rerun.scored) == ["b-big.npy", "c-small.npy"]
    _assert_each_scored_once(inbox, out)


def test_two_inbox_jobs_at_once_score_each_input_once(model, tmp_path: Path) -> None:
    inbox, out = _big_inbox(tmp_path, 60_000), tmp_path / "out"
    for i in range(4):
        np.save(inbox / f"d{i}.npy", digits(200, seed=10 + i))
    procs = [subprocess.Popen(_inbox_cmd(model[0], inbox, out, "--batch-size", "64"), cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    scored = [Path(r["input"]).name for o, _ in outs for r in json.loads(o)["scored"]]
    assert sorted(scored) == sorted(p.name for p in inbox.iterdir())  # each by exactly one job
    _assert_each_scored_once(inbox, out)
