"""One benchmark point in a fresh process (so its peak memory is its own), and its result.

The parent calls ``run_child(script, args, what)``; the child prints ``child_result(row)``, one line.
``fixed_mmap=True`` pins glibc's mmap threshold at 128 KiB in the child, so that every large tensor
is returned to the OS when freed and RSS follows the live tensors instead of the heap's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

PREFIX = "RESULT "


def child_result(row: dict) -> str:
    return PREFIX + json.dumps(row)


def run_child(script: str, args: list[str], what: str, fixed_mmap: bool = False, python: str | None = None,
              cwd: str | None = None) -> dict:
    """Run ``python script *args`` (this interpreter unless ``python`` names another, e.g. a side
    venv's; in ``cwd`` when given); its result row, or exit naming ``what`` with the child's stderr."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if fixed_mmap else None
    done = subprocess.run([python or sys.executable, script, *args], capture_output=True, text=True, env=env, cwd=cwd)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(PREFIX)), None)
    if line is None:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix(PREFIX))


def bench_args(description: str, default_out: str, extra=None) -> argparse.Namespace:
    """The command line every multi-point benchmark shares: ``--out`` (resolved, created) and the
    internal ``--point`` a child runs; ``extra(parser)`` adds a script's own options. Also sets
    offline mode and logging."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: one point in this process
    if extra:
        extra(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    return args
