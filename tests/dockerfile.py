"""Run what a Dockerfile describes, without a container engine (CI has none): its COPY lines build the
image's folder from the repository, its `pip`/`python` RUN lines run in a fresh venv of the base
image's Python, and its ENTRYPOINT + CMD run there too.

What cannot run without an engine is said, not hidden: RUN lines that manage the system's users
and folders (useradd, chown) are returned as `skipped`, and the caller decides whether that is
acceptable; USER is recorded, not switched to. Absolute paths (WORKDIR, COPY destinations) are mapped
into a private root folder. Build-time ENV is applied, except that pip keeps its cache (the image's
PIP_NO_CACHE_DIR only keeps the layer small) and skips compiling bytecode (PIP_NO_COMPILE).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# RUN lines a venv can do for real. Anything else is system administration that needs an engine.
RUNNABLE = re.compile(r"^(pip|python)\b")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class Instruction:
    word: str
    rest: str


def instructions(path: Path) -> list[Instruction]:
    text = re.sub(r"\\\n", " ", path.read_text())  # continuation lines are one instruction
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append(Instruction(word.upper(), rest.strip()))
    return out


def _ignored(patterns: list[str], rel: str) -> bool:
    for p in patterns:
        p = p.rstrip("/")
        if fnmatch.fnmatch(rel, p):
            return True
        if p.startswith("**/") and any(fnmatch.fnmatch(part, p[3:]) for part in rel.split("/")):
            return True
    return False


def dockerignore(context: Path) -> list[str]:
    f = context / ".dockerignore"
    if not f.exists():
        return []
    return [line.strip() for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")]


@dataclass
class Image:
    """The result of `build`: where the image's files are and how to run its entrypoint."""
    root: Path          # the private root that absolute image paths map into
    venv: Path
    env: dict[str, str]
    workdir: Path
    entrypoint: list[str]
    cmd: list[str]
    copied: list[str] = field(default_factory=list)  # image paths COPY wrote
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    user: str | None = None

    def run(self, args: list[str] | None = None, *, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """`docker run IMAGE [args]`: ENTRYPOINT + (args or CMD), in the last WORKDIR."""
        argv = self.entrypoint + (self.cmd if args is None else list(args))
        return subprocess.run(argv, cwd=cwd or self.workdir, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "python"), "-c", code], cwd=self.workdir,
                              env=self.env, capture_output=True, text=True, **kw)


def _mapped(root: Path, image_path: str, workdir: Path) -> Path:
    return root / image_path.lstrip("/") if image_path.startswith("/") else workdir / image_path


def _expand(text: str, values: dict[str, str]) -> str:
    return VAR.sub(lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def _env_pairs(rest: str) -> dict[str, str]:
    words = shlex.split(rest)
    if len(words) >= 2 and "=" not in words[0]:  # legacy form: ENV KEY value
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def build(dockerfile: Path, context: Path, dest: Path, *, python: str, build_args: dict[str, str] | None = None,
          timeout: float = 900) -> Image:
    """Run `dockerfile`'s steps with the build context `context`, into the folder `dest`."""
    root = dest / "root"
    venv_dir = dest / "venv"
    # A fresh venv of the base image's Python (the caller maps FROM python:X.Y-slim to pythonX.Y).
    subprocess.run([python, "-m", "venv", str(venv_dir)], check=True, capture_output=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_NO_CACHE"))}
    env.update(PATH=f"{venv_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv_dir),
               HOME=os.environ.get("HOME", str(dest)),
               # The same packages without pip compiling every module to bytecode first (a cache,
               # and most of an install's CPU time here); the image sets PYTHONDONTWRITEBYTECODE anyway.
               PIP_NO_COMPILE="1")
    args: dict[str, str] = {}
    ignore = dockerignore(context)
    workdir = root
    workdir.mkdir(parents=True)
    image = Image(root=root, venv=venv_dir, env=env, workdir=workdir, entrypoint=[], cmd=[])
    for ins in instructions(dockerfile):
        # The builder expands variables in every instruction but RUN, whose shell reads them itself.
        rest = ins.rest if ins.word == "RUN" else _expand(ins.rest, {**args, **image.env})
        if ins.word == "FROM":
            continue  # the base is the venv's Python; the caller chose it to match
        if ins.word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = (build_args or {}).get(name, default)
        elif ins.word == "ENV":
            pairs = _env_pairs(rest)
            pairs.pop("PIP_NO_CACHE_DIR", None)  # see the module docstring
            image.env.update(pairs)
        elif ins.word == "WORKDIR":
            image.workdir = _mapped(root, rest, image.workdir)
            image.workdir.mkdir(parents=True, exist_ok=True)
        elif ins.word in ("COPY", "ADD"):
            words = shlex.split(rest)
            if any(w.startswith("--") for w in words):
                raise NotImplementedError(f"{dockerfile.name}: COPY flags are not supported here: {rest}")
            *sources, target = words
            to = _mapped(root, target, image.workdir)
            for src in sources:
                s = context / src
                if not s.exists():
                    raise FileNotFoundError(f"{dockerfile.name}: COPY source {src} is not in the build context")
                if s.is_dir():
                    shutil.copytree(s, to, dirs_exist_ok=True, ignore=lambda d, names, s=s: [
                        n for n in names if _ignored(ignore, str((Path(d) / n).relative_to(context)))])
                else:
                    dst = to / s.name if (target.endswith("/") or to.is_dir()) else to
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(s, dst)
                image.copied.append(src)
        elif ins.word == "RUN":
            if not RUNNABLE.match(rest):
                image.skipped.append(rest)
                continue
            done = subprocess.run(["/bin/sh", "-c", rest], cwd=image.workdir, env={**image.env, **args}, capture_output=True,
                                  text=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"{dockerfile.name}: RUN {rest!r} exited {done.returncode}:\n"
                                   f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            image.ran.append(rest)
        elif ins.word == "USER":
            image.user = rest
        elif ins.word in ("ENTRYPOINT", "CMD"):
            argv = json.loads(rest)  # exec form only: a shell form would hide the real process
            if argv and argv[0] == "python":
                argv[0] = str(venv_dir / "bin" / "python")
            if ins.word == "ENTRYPOINT":
                image.entrypoint = argv
            else:
                image.cmd = argv
        elif ins.word in ("LABEL", "EXPOSE", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "SHELL"):
            continue  # metadata: nothing to run
        else:
            raise NotImplementedError(f"{dockerfile.name}: instruction {ins.word} is not supported here")
    return image


def base_python(dockerfile: Path) -> str:
    """The interpreter that stands in for `FROM python:X.Y[-variant]`."""
    (base,) = [i.rest for i in instructions(dockerfile) if i.word == "FROM"]
    m = re.fullmatch(r"python:(\d+\.\d+)(?:[.\d]*)(?:-\S+)?", base)
    if not m:
        raise ValueError(f"{dockerfile.name}: base image {base!r} is not an official python image")
    return f"python{m.group(1)}"
