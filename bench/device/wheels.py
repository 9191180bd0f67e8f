"""On a machine with the package index: what `bench/device/gpu-check.sh` needs on an air-gapped GPU
host, which has none (bench/device/README.md), into `.whl/` (git-ignored), in pieces that fit a
transfer of 64 MiB:

    .whl/mlflow/   mlflow 3.17.2 for CPython 3.12 and what it needs that the machine's image lacks
                   (bench/device/image-packages.txt), ~35 MiB
    .whl/mnist/    the four MNIST files (~11 MiB; the ../shared beside a checkout does not travel)
    .whl/ort/      onnxruntime-gpu 1.31.0 for CPython 3.12 (~244 MiB) as part-00, part-01, ... and
                   SHA256SUMS (of the parts and of the wheel). The last part is small enough to travel
                   with .whl/mlflow and .whl/mnist in the transfer that runs the check.

    .venv/bin/python bench/device/wheels.py [--mnist ../shared/data/mnist]

It prints the transfers to make, in order.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # nn_core's dataset spec, from a checkout without installing
OUT = ROOT / ".whl"
MIB = 2**20
CALL_LIMIT = 64 * MIB  # what one transfer to the GPU host carries: the checkout and the files sent with it
MARGIN = 4 * MIB  # the repository itself travels too (~3 MiB)
MLFLOW = "mlflow==3.17.2"
ORT = "onnxruntime-gpu==1.31.0"
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[a for n in (17, 24, 27, 28, 31, 34) for a in ("--platform", f"manylinux_2_{n}_x86_64")],
            "--platform", "manylinux2014_x86_64"]


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> str:
    """The distribution a wheel file holds: 'python_dateutil-2.9.0-py2.py3-none-any.whl' -> 'python-dateutil'."""
    return normalised(filename.split("-")[0])


IMAGE_PACKAGES = Path(__file__).with_name("image-packages.txt")


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    return {normalised(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def split(wheel: Path, out: Path, last_at_most: int, part_at_most: int = CALL_LIMIT - MARGIN) -> list[Path]:
    """`wheel` as parts in `out` (part-00, ...): equal ones of at most `part_at_most` bytes, the last
    of at most `last_at_most`; SHA256SUMS lists each part and the wheel (its own name)."""
    size = wheel.stat().st_size
    if last_at_most <= 0:
        raise ValueError(f"no room for the last part of {wheel.name}: the rest of the final transfer fills it")
    head = size - min(size, last_at_most)  # what goes before the last part, in equal parts
    count = -(-head // part_at_most)
    bounds = [head * i // count for i in range(count)] + [head, size]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    parts = []
    with wheel.open("rb") as f:
        for a, b in itertools.pairwise(bounds):
            if b > a:
                parts.append(out / f"part-{len(parts):02d}")
                parts[-1].write_bytes(f.read(b - a))
    sums = [f"{sha256(p)}  {p.name}" for p in parts] + [f"{sha256(wheel)}  {wheel.name}"]
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return parts


def _download(spec: str, dest: Path, deps: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", *PLATFORM, "-d", str(dest), spec]
    subprocess.run(cmd + ([] if deps else ["--no-deps"]), check=True)


def mlflow_wheels(dest: Path) -> int:
    """mlflow's wheels less the image's packages: their total size."""
    have = image_packages()
    _download(MLFLOW, dest, deps=True)
    for w in dest.glob("*.whl"):
        if wheel_name(w.name) in have:
            w.unlink()
    return sum(w.stat().st_size for w in dest.glob("*.whl"))


def mnist_files(source: Path, dest: Path) -> int:
    """Copy MNIST's four files (gzipped or not) from `source`; ValueError naming what is missing."""
    from nn_core.datasets import MNIST

    found = [next((source / n for n in (f.filename, f.filename + ".gz") if (source / n).is_file()), None)
             for f in MNIST.files]
    if None in found:
        missing = [f.filename for f, path in zip(MNIST.files, found) if path is None]
        raise ValueError(f"--mnist {source}: expected MNIST's four IDX files (gzipped or not), missing {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copy2(f, dest / f.name)
    return sum(f.stat().st_size for f in dest.iterdir())


def build(mnist: Path, out: Path) -> list[Path]:
    """Everything into `out`, which must not exist yet: the parts of onnxruntime-gpu's wheel."""
    final = mnist_files(mnist, out / "mnist") + mlflow_wheels(out / "mlflow")
    _download(ORT, out / "ort-wheel", deps=False)
    wheel = next((out / "ort-wheel").glob("onnxruntime_gpu-*.whl"))
    parts = split(wheel, out / "ort", last_at_most=CALL_LIMIT - MARGIN - final)
    print(f"{OUT}: mlflow + MNIST {final / MIB:.1f} MiB, {wheel.name} in {len(parts)} parts")
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    a = p.parse_args(argv)
    # Built beside .whl and put in its place when complete: a failed run leaves the last good one.
    partial = Path(tempfile.mkdtemp(prefix=".whl.partial-", dir=ROOT))
    try:
        parts = build(a.mnist, partial)
    except (ValueError, subprocess.CalledProcessError, StopIteration) as e:
        shutil.rmtree(partial)
        print(f"wheels.py: {e if not isinstance(e, StopIteration) else 'pip gave no onnxruntime-gpu wheel'}",
              file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(partial)
        raise
    shutil.rmtree(OUT, ignore_errors=True)
    partial.rename(OUT)
    print("transfers to the GPU host, in order (the checkout with the files named), and what each runs there:")
    for part in parts[:-1]:
        print(f"  .whl/ort/{part.name}: bash bench/device/gpu-check.sh stage")
    print(f"  .whl/ort/{parts[-1].name} .whl/ort/SHA256SUMS .whl/mlflow .whl/mnist: bash bench/device/gpu-check.sh check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
