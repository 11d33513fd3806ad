"""The one safetensors reader and writer (compress.checkpoint.tensors) against the safetensors
library: files we write are byte for byte the library's ``save_file`` of the same tensors, files it
writes read back through ours (cast to a wider dtype slice by slice equals ``.to``), whole sharded
directories round-trip, and a damaged file (truncated, bad header, offsets that do not fill the file)
fails with a message naming it."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.checkpoint import tensors as shards
from compress.dtypes import TABLE
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


@pytest.mark.parametrize("seed", range(4))
def test_written_bytes_are_the_librarys(tmp_path, seed):
    """Every dtype we store, several tensors per dtype, names in no particular order: the same bytes
    as ``save_file`` (its order: widest dtype first, then name). One metadata key only: the library
    writes several in hash order, which changes from process to process."""
    generator = torch.Generator().manual_seed(seed)
    dtypes = [d.torch for d in TABLE]  # every dtype of the one table
    tensors = {}
    for i in range(12):
        dtype = dtypes[int(torch.randint(len(dtypes), (1,), generator=generator))]
        shape = tuple(int(d) for d in torch.randint(1, 6, (int(torch.randint(0, 3, (1,), generator=generator)),),
                                                    generator=generator))
        tensors[f"m{(i * 7919) % 13}.{dtype}".replace("torch.", "")] = (torch.randn(shape, generator=generator) * 50).to(dtype)
    for ours, theirs in ((None, {"format": "pt"}), ({"note": "x"}, {"note": "x"}), ({}, None)):
        shards.write_safetensors(tmp_path / "ours.safetensors", tensors, ours)
        save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=theirs)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_sharded_directory_round_trips(tmp_path):
    names = shards.save_tensors(TENSORS, tmp_path, max_shard_bytes=100)
    assert names[-1] == shards.INDEX and len(names) > 2
    loaded = shards.load_tensors(tmp_path)
    assert sorted(loaded) == sorted(TENSORS)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in TENSORS.items())
    for file in names[:-1]:  # each shard alone is the library's file
        assert sorted(load_file(str(tmp_path / file))) == sorted(shards.read_safetensors(tmp_path / file))


def test_offsets_that_do_not_fill_the_file_are_refused(tmp_path):
    import json
    import struct

    path = tmp_path / "model.safetensors"
    shards.write_safetensors(path, {"a": torch.zeros(4), "b": torch.zeros(4)})
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["b"]["data_offsets"] = [0, 16]  # overlaps a: still inside the file
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file.*data_offsets"):
        shards.TensorSource(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_file_names_itself(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    shards.write_safetensors(path, TENSORS)
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        shards.TensorSource(tmp_path).read(list(TENSORS))
