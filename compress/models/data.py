"""Text sources turned into fixed-length token windows.

Sources (a recipe's ``data.calibration`` / ``data.eval``):

- ``{source: stdlib, split: train|eval}``: the Python standard library's own ``.py`` files (present on
  every machine). Each file belongs to one split by a hash of its relative path (1 in 8 to ``eval``),
  so the two splits are disjoint modules; files are read in hash order, which mixes packages.
- ``{path: FILE, field: text}``: a local ``.txt`` (one document per file), ``.jsonl`` or ``.parquet``
  file read through ``datasets``.
- ``{hub: NAME, name: CONFIG, split: SPLIT}``: a Hub dataset (only when online).

Documents are tokenized, joined with the EOS token and cut into non-overlapping windows of
``seq_len`` tokens; the first ``samples`` windows are used. Deterministic for a given tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import DataError, brief

log = logging.getLogger(__name__)

EVAL_FRACTION = 8  # one stdlib file in 8 is held out for evaluation
SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
FILE_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextSource:
    """One resolved source: ``kind`` is stdlib | file | hub."""

    kind: str
    split: str
    path: str | None = None
    field: str = "text"
    hub_config: str | None = None

    def describe(self) -> str:
        if self.kind == "stdlib":
            return f"stdlib:{self.split}"
        if self.kind == "file":
            return str(self.path)
        return f"hub:{self.path}:{self.hub_config or ''}:{self.split}"


def parse_source_string(text: str) -> TextSource:
    """``stdlib:train|eval``, ``hub:NAME[:CONFIG[:SPLIT]]`` or a file path (CLI form)."""
    if text == "stdlib" or text.startswith("stdlib:"):
        split = text.partition(":")[2] or "eval"
        if split not in ("train", "eval"):
            raise DataError(f"--data {text}: stdlib split must be train or eval")
        return TextSource("stdlib", split)
    if text.startswith("hub:"):
        parts = text.split(":")[1:] + [None, None]
        return TextSource("hub", parts[2] or "test", path=parts[0], hub_config=parts[1])
    return TextSource("file", "all", path=text)


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a data file (None: it can)."""
    if path.is_dir():
        return "is a directory, not a file (name one .txt, .jsonl or .parquet file)"
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file"
    return None


def stdlib_files(split: str) -> list[Path]:
    """The standard library's .py files of one split, in a fixed hash order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if SKIPPED_STDLIB_DIRS.intersection(relative.parts[:-1]):
            continue
        digest = hashlib.sha256(relative.as_posix().encode()).hexdigest()
        is_eval = int(digest, 16) % EVAL_FRACTION == 0
        if is_eval == (split == "eval"):
            chosen.append((digest, path))
    return [path for _, path in sorted(chosen)]


def iter_documents(source: TextSource) -> Iterator[str]:
    if source.kind == "stdlib":
        for path in stdlib_files(source.split):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        return
    yield from _iter_dataset(source)


def _iter_dataset(source: TextSource) -> Iterator[str]:
    import datasets

    try:
        if source.kind == "file":
            path = Path(source.path)
            problem = file_problem(path)
            if problem:
                raise DataError(f"data file {path} {problem}")
            builder = FILE_SUFFIXES.get(path.suffix)
            if builder is None:
                raise DataError(f"data file {path}: unsupported suffix {path.suffix!r} "
                                f"(use one of {', '.join(FILE_SUFFIXES)})")
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        else:
            dataset = datasets.load_dataset(source.path, source.hub_config, split=source.split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable or unreachable data
        raise DataError(f"data {source.describe()}: {type(err).__name__}: {brief(err)}") from None
    if source.field not in dataset.column_names:
        raise DataError(f"data {source.describe()}: no field {source.field!r} "
                        f"(fields: {', '.join(dataset.column_names)})")
    for row in dataset:
        text = row[source.field]
        if isinstance(text, str) and text.strip():
            yield text


def token_windows(tokenizer, source: TextSource, samples: int, seq_len: int, at_least: int | None = None) -> torch.Tensor:
    """[samples, seq_len] int64 token ids cut from the source's documents; with ``at_least``, a
    shorter source gives as many windows as it holds, provided that is at least that many."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    needed = samples * seq_len
    buffer: list[int] = []
    for text in iter_documents(source):
        buffer.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        buffer.append(eos)
        if len(buffer) >= needed:
            break
    have = len(buffer) // seq_len
    if at_least is not None and have >= at_least:
        needed = min(needed, have * seq_len)
    if len(buffer) < needed:
        raise DataError(f"data {source.describe()}: only {have} windows of {seq_len} tokens "
                        f"(asked for {samples}); lower samples or seq_len")
    return torch.tensor(buffer[:needed], dtype=torch.int64).view(-1, seq_len)
