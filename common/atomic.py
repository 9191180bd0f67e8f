"""Atomic files: write under a temporary name beside the target, rename into place on success.

Readers see the old file or the new one, never half of one; a failure leaves no temporary file.
No torch here, so every package may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only be read
    by setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on a clean exit it is synced and renamed to `path`.
    `suffix` keeps writers that insist on an extension (np.save, exporters) from renaming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    # mkstemp makes the file 0600; the finished file gets what open() would have given it (the
    # user's umask), so a shared model folder or output stays readable by whom the user intends.
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
