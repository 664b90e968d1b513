"""Atomic writes of the reports and plots: a reader never sees half a file, a failed write
leaves nothing behind, and the file gets the mode a plain open() would give it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def plain_mode() -> int:
    """The mode open() gives a new file under the process's umask. mkstemp's files are
    owner-only (0600), which made every JSON report, recipe and plot unreadable to other users
    (a CI job's artifact server, a container writing to a mounted folder)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # Linux shows it; setting it to read it back is process-wide, a race with any thread
    # creating a file at that moment
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file beside `path` to write: it replaces `path` when the block ends, and is
    removed when the block raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".surgeon-", suffix=suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, plain_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
