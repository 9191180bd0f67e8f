"""`make setup`'s install (infra/scripts/uv_install.py): uv gets the package sources pip is configured
with, read through pip itself (`pip config list`), with pip's precedence. (The install itself is
every CI run's first step: .ci/run's `make setup` on a clean clone.)"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "scripts"))

import uv_install  # noqa: E402


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(args, args[1:]) if a.startswith("--") and not b.startswith("--")]


def test_uv_gets_the_indexes_wheels_and_constraints_pip_is_configured_with(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///mirror-a/simple file:///mirror-b/simple\n"
                    "constraint = /caps.txt\nfind-links = /wheels-global\ncert = /ca.pem\n"
                    "[install]\nfind-links = /wheels-install\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))  # read after the machine's own files: it wins
    monkeypatch.setenv("PIP_FIND_LINKS", "/wheels-env")  # and a variable over any file
    monkeypatch.delenv("PIP_CERT", raising=False)
    settings = uv_install.pip_settings(sys.executable)
    assert settings["cert"] == "/ca.pem"
    cmd = uv_install.uv_command(sys.executable, settings, ["-e", ".[train]"])
    assert cmd[:3] == [str(Path(sys.executable).with_name("uv")), "pip", "install"] and cmd[-2:] == ["-e", ".[train]"]
    pairs = _pairs(cmd)
    assert [v for f, v in pairs if f == "--extra-index-url"] == ["file:///mirror-a/simple", "file:///mirror-b/simple"]
    assert [v for f, v in pairs if f == "--find-links"] == ["/wheels-env"]
    assert [v for f, v in pairs if f == "--constraint"] == ["/caps.txt"]
    assert ("--index-strategy", "unsafe-best-match") in pairs  # pip's search: the best match over all indexes


def test_without_pip_settings_uv_uses_its_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # pip then reads no configuration file at all
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT", "PIP_CERT"):
        monkeypatch.delenv(key, raising=False)
    settings = uv_install.pip_settings(sys.executable)
    assert settings == {}
    flags = {a for a in uv_install.uv_command(sys.executable, settings, ["."]) if a.startswith("--")}
    assert not flags & {"--index-url", "--extra-index-url", "--find-links", "--constraint"}
