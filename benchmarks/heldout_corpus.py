"""The held-out benchmark's text: the Python 3.11 documentation as reST, from Debian's
``python3.11-doc`` package, split into train and eval documents (issue 23).

    python benchmarks/heldout_corpus.py [--out out/bench/heldout/corpus]

Setup step, run once per machine: ``apt-get download python3.11-doc`` and ``dpkg-deb -x`` into
``--out`` (nothing is committed), then every ``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``
becomes one document of ``train.jsonl`` or ``eval.jsonl``: 1 in 8 files to eval by a hash of the
file's relative path (as the stdlib source does), both in hash order, so the two splits are disjoint
documents of one domain (English technical prose with reST markup and code samples). A recipe reads
them as ``{path: .../train.jsonl, field: text}``. Reruns reuse what is there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("heldout_corpus")
PACKAGE = "python3.11-doc"
SOURCES = Path("usr/share/doc/python3.11/html/_sources")
EVAL_FRACTION = 8


def _path_hash(relative: str) -> int:
    return int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16)


def extract_package(out: Path) -> Path:
    """The package's files under ``out/root`` (downloaded and unpacked unless already there)."""
    root = out / "root"
    if (root / SOURCES).is_dir():
        return root
    out.mkdir(parents=True, exist_ok=True)
    debs = sorted(out.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=out, check=True)
        debs = sorted(out.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return root


def build_corpus(out: Path) -> dict[str, Path]:
    """{split: jsonl path} of the train and eval documents (written unless already there)."""
    paths = {split: out / f"{split}.jsonl" for split in ("train", "eval")}
    if all(p.is_file() for p in paths.values()):
        return paths
    sources = extract_package(out) / SOURCES
    files = sorted(sources.rglob("*.rst.txt"), key=lambda f: _path_hash(str(f.relative_to(sources))))
    counts = {"train": 0, "eval": 0}
    handles = {split: (p.with_suffix(".partial")).open("w") for split, p in paths.items()}
    for file in files:
        relative = str(file.relative_to(sources))
        split = "eval" if _path_hash(relative) % EVAL_FRACTION == 0 else "train"
        text = file.read_text(errors="replace")
        if text.strip():
            handles[split].write(json.dumps({"text": text, "path": relative}) + "\n")
            counts[split] += 1
    for split, handle in handles.items():
        handle.close()
        paths[split].with_suffix(".partial").rename(paths[split])
    log.info("corpus: %d train and %d eval documents under %s", counts["train"], counts["eval"], out)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/heldout/corpus"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for split, path in build_corpus(args.out).items():
        log.info("%s: %s", split, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
