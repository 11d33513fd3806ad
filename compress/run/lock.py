"""One run per output directory: an advisory ``flock`` on ``<output>/.lock``.

The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed run never leaves a
stale lock behind."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import CompressError, LockError


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    path = out_dir / ".lock"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # an existing file, no permission, a name too long, a read-only disk
        raise CompressError(f"output: {err.filename or out_dir}: cannot be used as the run's directory: "
                            f"{err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockError(f"{out_dir}: another compress run (pid {holder}) is using this output; "
                            "wait for it to finish or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
