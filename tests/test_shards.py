"""Streaming's own safetensors reader and writer (compress.checkpoint.shards) against the safetensors
library: files we write load with ``safetensors.torch.load_file`` bit for bit, files it writes read
back through ours (cast to a wider dtype slice by slice equals ``.to``), and a damaged file fails with
a message naming it."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.checkpoint import shards
from compress.errors import CheckpointError

TENSORS = {"b.weight": torch.randn(300, 70).to(torch.bfloat16), "a.qweight": torch.randint(-2**31, 2**31 - 1, (5, 9), dtype=torch.int32),
           "a.scales": torch.rand(3, 9).half(), "c.bias": torch.randn(7), "d.flags": torch.tensor([True, False])}


def test_written_files_load_with_safetensors(tmp_path):
    shards.write_safetensors(tmp_path / "x.safetensors", TENSORS)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert sorted(loaded) == sorted(TENSORS)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_reads_safetensors_files_with_casts(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_BYTES", 1000)  # many slices per tensor
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    source = shards.TensorSource(tmp_path)
    assert source.shape("b.weight") == (300, 70)
    as_stored = source.read(list(TENSORS))
    assert all(torch.equal(as_stored[k], v) and as_stored[k].dtype == v.dtype for k, v in TENSORS.items())
    widened = source.read(["b.weight"], lambda name, stored: torch.float32)["b.weight"]
    assert widened.dtype == torch.float32 and torch.equal(widened, TENSORS["b.weight"].float())


def test_shard_writer_index_is_read_back(tmp_path):
    writer = shards.ShardWriter(tmp_path, 2)
    writer.write({"b.weight": TENSORS["b.weight"]})
    writer.write({"c.bias": TENSORS["c.bias"]})
    writer.finish()
    source = shards.TensorSource(tmp_path)
    assert sorted(source.names()) == ["b.weight", "c.bias"]
    assert torch.equal(source.read(["c.bias"])["c.bias"], TENSORS["c.bias"])


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_file_names_itself(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    shards.write_safetensors(path, TENSORS)
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        shards.TensorSource(tmp_path).read(list(TENSORS))
