"""The prepare-data task's Prefect cache cannot lie: it is keyed on the cache file's content, stored
as JSON, and a corrupted cache file is rebuilt from the source or refused: in-process through the
functions the pipeline calls (obtain_data, the prepare-data task), and as `mnistops run`'s one-line
refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nn_core.config import DataConfig
from stores import home_with_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]



def _corrupt(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def _states(data_dir: Path, source: str | None) -> tuple[str, object]:
    from flows.training import prepare_data

    state = prepare_data(DataConfig("mnist", source, str(data_dir)), return_state=True)
    return state.name, state.result(raise_on_failure=False)


def test_cache_is_keyed_on_content_stored_as_json_and_healed(prefect_api, tmp_path, mnist, mnist_source):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.training import obtain_data

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cache = data_dir / mnist.cache_path.name
    shutil.copy(mnist.cache_path, cache)
    good = cache.read_bytes()
    results = tmp_path / "prefect-results"  # this test's own: no answer kept by an earlier test in this process

    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(results)}):
        assert _states(data_dir, None)[0] == "Completed"  # verified, then kept under this content
        name, cached = _states(data_dir, None)
        assert name == "Cached" and cached.reused_cache
        # The stored answer is JSON (data, not a pickle), and says what it is.
        stored = [json.loads(p.read_text()) for p in results.iterdir() if p.is_file()]
        assert any("nn_core.data.PreparedDataset" in json.dumps(s) for s in stored)

        # Corrupted: a different key, so the file is checked again; without a source it is refused...
        _corrupt(cache)
        name, error = _states(data_dir, str(tmp_path / "nowhere"))
        assert name == "Failed" and str(cache) in str(error) and "rebuilding it from the source failed" in str(error)
        # ... with one, rebuilt.
        healed = obtain_data(DataConfig("mnist", str(mnist_source), str(data_dir)))
        assert cache.read_bytes() == good and healed.digest == mnist.digest

        # The very same corruption again: the answer kept under that content came from a rebuild, so it
        # is not trusted; the file is verified and rebuilt once more.
        _corrupt(cache)
        healed = obtain_data(DataConfig("mnist", str(mnist_source), str(data_dir)))
        assert cache.read_bytes() == good and healed.digest == mnist.digest


def test_run_with_a_corrupt_cache_is_refused_in_one_line(prefect_env, tmp_path, mnist):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cache = data_dir / mnist.cache_path.name
    shutil.copy(mnist.cache_path, cache)
    _corrupt(cache)
    (tmp_path / "empty").mkdir()
    home = home_with_store(tmp_path / "home")  # a first command's store: a new home is not the subject
    env = {**os.environ, "MNISTOPS_HOME": str(home), "MNISTOPS_DATA_DIR": str(data_dir),
           "MNISTOPS_DATA_SOURCE": str(tmp_path / "empty")}
    for key in ("MLFLOW_TRACKING_URI", "MNISTOPS_ARTIFACT_ROOT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--epochs", "1", "--no-inference", "--threshold", "0"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"mnistops run: error: {cache}: ") and "rebuilding it from the source failed" in last
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line or "error:" in line]
    assert errors == [last]  # Prefect's own failure reports do not repeat it
    assert not (tmp_path / "home" / "runs").exists()  # refused before any training started
    # Task results stay in the home, as JSON.
    assert not any((tmp_path / "home" / "prefect-results").glob("*")) or all(
        json.loads(p.read_text()) for p in (tmp_path / "home" / "prefect-results").glob("*"))
    # With a source the same file is rebuilt: obtain_data, which `mnistops run` calls, heals it in
    # test_cache_is_keyed_on_content_stored_as_json_and_healed. (This test ran a whole second
    # `mnistops run` for that: a training, an export and a registration besides.)
