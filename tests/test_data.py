"""Text sources: the stdlib splits are disjoint and deterministic; files load through datasets."""

import json

import pytest
import torch

from compress.errors import DataError
from compress.models.data import TextSource, parse_source_string, stdlib_files, token_windows


def test_stdlib_splits_are_disjoint_and_stable():
    train, evaluation = stdlib_files("train"), stdlib_files("eval")
    assert len(train) > 300 and len(evaluation) > 40
    assert not set(train) & set(evaluation)
    assert stdlib_files("eval") == evaluation
    assert not any("test" in p.parts for p in train + evaluation)


def test_windows_are_deterministic(tokenizer):
    source = TextSource("stdlib", "eval")
    first = token_windows(tokenizer, source, 3, 64)
    assert first.shape == (3, 64) and first.dtype == torch.int64
    assert torch.equal(first, token_windows(tokenizer, source, 3, 64))
    assert not torch.equal(first, token_windows(tokenizer, TextSource("stdlib", "train"), 3, 64))


def test_file_sources(tmp_path, tokenizer):
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert token_windows(tokenizer, TextSource("file", "all", path=str(text)), 2, 32).shape == (2, 32)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": f"line {i} " * 20}) for i in range(20)))
    assert token_windows(tokenizer, TextSource("file", "all", path=str(rows), field="body"), 2, 32).shape == (2, 32)
    with pytest.raises(DataError, match="no field 'text'"):
        token_windows(tokenizer, TextSource("file", "all", path=str(rows)), 2, 32)
    with pytest.raises(DataError, match="only 0 windows"):
        token_windows(tokenizer, TextSource("file", "all", path=str(text)), 50, 4096)
    with pytest.raises(DataError, match="does not exist"):
        token_windows(tokenizer, TextSource("file", "all", path=str(tmp_path / "missing.txt")), 1, 8)


def test_source_strings():
    assert parse_source_string("stdlib:train") == TextSource("stdlib", "train")
    assert parse_source_string("hub:wikitext:wikitext-2-raw-v1:test").hub_config == "wikitext-2-raw-v1"
    assert parse_source_string("data/x.txt").kind == "file"
    with pytest.raises(DataError):
        parse_source_string("stdlib:validation")
