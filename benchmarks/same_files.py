"""Do two runs of a recipe write the same files? sha256 of every file a run leaves (exports and
saved stage models), compared between two output directories.

    python benchmarks/same_files.py digest OUT > digests.json
    python benchmarks/same_files.py compare BEFORE.json AFTER.json

Used to show that a change leaves the shipped recipes' files as they were: run each recipe with the
code before and after (``device: cpu``), digest both outputs, compare. ``report.*`` and ``state.json``
hold timings and fingerprints and are left out; in ``compress.json`` (the manifest) the recipe's
``output`` (two runs write two directories) and ``device`` (new with issue 21) are ignored, and so is
the manifest's digest of itself; the files it lists are compared directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("same_files")
SKIPPED = {"report.json", "report.md", "state.json", ".lock"}


def _manifest_digest(path: Path) -> str:
    manifest = json.loads(path.read_text())
    manifest.pop("manifest_sha256", None)
    for key in ("device", "output"):
        (manifest.get("recipe") or {}).pop(key, None)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def digests(out: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``out`` except reports, states and caches."""
    found = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if not path.is_file() or path.name in SKIPPED or relative.parts[0] == ".cache":
            continue
        if path.name == "compress.json":
            found[str(relative)] = _manifest_digest(path)
        else:
            found[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def compare(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """One line per difference (a file only on one side, or with other bytes)."""
    lines = [f"only before: {p}" for p in sorted(set(before) - set(after))]
    lines += [f"only after: {p}" for p in sorted(set(after) - set(before))]
    lines += [f"differs: {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return lines


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("digest").add_argument("out", type=Path)
    both = sub.add_parser("compare")
    both.add_argument("before", type=Path)
    both.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "digest":
        json.dump(digests(args.out), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    differences = compare(before, after)
    for line in differences:
        log.info(line)
    log.info("%d files compared, %d differences", len(set(before) | set(after)), len(differences))
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
