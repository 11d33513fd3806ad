"""torch.distributed launched by torchrun (gloo, 2 CPU processes) against the same recipe in one process.

The output directory of a single-process run is moved aside, the 2-process run writes the same
path, and every file of the exported checkpoint (tensors, config.json with its quantization_config,
the manifest with its sha256s) must be byte-identical. Both runs use one thread per process
(torchrun's default): CPU matrix products split their sums differently over different numbers of
threads, so a 2-thread process rounds differently from a 1-thread one, distributed or not. Recipes: GPTQ in memory; GPTQ streamed
(rank 0 writes each layer's shard after the ranks exchanged that layer's matrices); LQ-LoRA rank 8
with Fisher weighting (cost table, Fisher windows and decompositions shared out; rank 0 solves the ILP),
in memory and streamed (there with GPTQ as its quantizer and the adapter exported as PEFT).

The ranks are driven apart on purpose: in every 2-process run one rank sleeps before each unit of
work (``COMPRESS_RANK_DELAY``), so that the other has finished (and cached) its share of a unit before
the late one starts it. Results must not depend on the ranks staying in step. And a shared-out list
that differs between ranks fails on every rank at once with one message instead of leaving a unit
to nobody.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, file_hashes, write_recipe

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason=f"torchrun missing at {TORCHRUN}")

HEAD = """model: {model}
streaming: {streaming}
data:
  calibration: {{source: stdlib, split: train, samples: 6, seq_len: 64}}
stages:
{stages}
output: {output}
"""
RECIPES = {
    "gptq": ("false", "  - quantize: {method: gptq, config: {bits: 4, group_size: 64}}\n  - export: {format: gptq}"),
    "gptq-streamed": ("true", "  - quantize: {method: gptq, config: {bits: 3, group_size: 64}}\n  - export: {format: gptq}"),
    "lq-lora-fisher": ("false", "  - lq_lora: {rank: 8, budget_bits: 3.5, fisher: true, iterations: 2, group_sizes: [64]}\n"
                                "  - export: {format: native, adapters: embed}"),
    "lq-lora-fisher-streamed": ("true", "  - lq_lora: {rank: 8, budget_bits: 3.5, fisher: true, iterations: 2, "
                                        "group_sizes: [64], quantizer: gptq}\n  - export: {format: native}"),
}


DELAY_SECONDS = 0.4


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_two_processes_write_the_bytes_of_one(sharded_tiny, tmp_path, name):
    streaming, stages = RECIPES[name]
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", HEAD.format(model=sharded_tiny, streaming=streaming, stages=stages,
                                                                output=out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "compress.entry.cli", "run", str(recipe), "--quiet"],
                            capture_output=True, text=True, timeout=900, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = file_hashes(out / "checkpoint")
    shutil.move(out, tmp_path / "single")
    late = 1 - sorted(RECIPES).index(name) % 2  # rank 1 lags in half of the recipes, rank 0 in the others
    launched = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "compress.entry.cli",
                               "run", str(recipe), "--quiet"], capture_output=True, text=True, timeout=900, cwd=ROOT,
                              env=dict(env, COMPRESS_RANK_DELAY=f"{late}:{DELAY_SECONDS}"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert file_hashes(out / "checkpoint") == expected
    if (tmp_path / "single" / "checkpoint-adapter").is_dir():
        assert file_hashes(out / "checkpoint-adapter") == file_hashes(tmp_path / "single" / "checkpoint-adapter")
    assert json.loads((out / "report.json").read_text())["header"]["ranks"] == 2
    assert json.loads((tmp_path / "single" / "report.json").read_text())["header"]["ranks"] == 1


DISAGREE = """
import torch
from compress.execution.distributed import RankDisagreement, init_ranks, shutdown
ranks = init_ranks()
try:
    ranks.share(["a", "b", "c"] if ranks.rank == 0 else ["b", "c"])
except RankDisagreement as err:
    print(f"rank {ranks.rank}: {err}")
windows = torch.zeros(2, 2048, dtype=torch.long)  # differ in one token, far past what repr shows
windows[1, 1000] = ranks.rank
try:
    ranks.share(list(windows))
except RankDisagreement as err:
    print(f"rank {ranks.rank} windows: {err}")
shutdown()
"""


def test_ranks_that_disagree_on_a_shared_list_fail_together(tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(DISAGREE)
    launched = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: ranks disagree on the units they share out (rank 0: 3 items" in launched.stdout, \
            launched.stdout
        assert f"rank {rank} windows: ranks disagree" in launched.stdout, launched.stdout
