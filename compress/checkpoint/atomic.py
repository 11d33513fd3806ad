"""Atomic, durable writes: build in a temporary sibling, fsync, then rename into place.

A crash leaves either the old content or the new, never a half-written file or directory
(temporary ``.tmp-*`` siblings of a crashed write are removed by the next write of that target)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` and give them the usual permissions
    (temporary directories and some writers create them private)."""
    mask = _umask()
    for directory, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(directory) / name, 0o666 & ~mask)
            fsync_path(Path(directory) / name)
        os.chmod(directory, 0o777 & ~mask)
        fsync_path(Path(directory))


def _remove_stale(target: Path) -> None:
    """Remove what a crashed write of ``target`` left: exactly the names this module makes."""
    ours = re.compile(rf"\.(tmp|old)-{re.escape(target.name)}-[a-z0-9_]{{8}}")
    for stale in target.parent.iterdir() if target.parent.is_dir() else []:
        if ours.fullmatch(stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging)
        if target.exists():
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
        fsync_path(path.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
