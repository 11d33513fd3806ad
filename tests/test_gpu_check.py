"""The prepared GPU check runs here as its CPU dry run (``benchmarks/gpu_check.sh --dry-run``): the
same steps as on a lent GPU (four recipes on the device and on the CPU, compared; the streamed
synthetic GPTQ; the kernel benchmark; the device tests), with ``device: cpu`` and the tiny model.
On the CPU both sides of each comparison compute the same operations, so every check must hold
exactly (codes equal, perplexity ratio 1)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_passes(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=1800)
    steps = (tmp_path / "steps.txt").read_text()
    assert done.returncode == 0, steps + done.stderr[-2000:] + (tmp_path / "recipes.log").read_text()[-3000:]
    assert [line.split(":")[0] for line in steps.splitlines()] == ["recipes", "kernel_speed", "tests"]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["recipe"]: row for row in result["recipes"]}
    assert sorted(rows) == ["gptq", "l4q", "lq_lora", "quickstart"]
    assert rows["quickstart"]["ok"] and rows["quickstart"]["tensors_differing"] == 0
    for name in ("gptq", "lq_lora", "l4q"):
        assert rows[name]["perplexity_ratio"] == 1.0, rows[name]  # the same operations on the same device
    assert result["synthetic_gptq"]["seconds"] > 0 and result["synthetic_gptq"]["plan_mib"] > 0
    assert "| quickstart |" in (tmp_path / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "kernel_speed.json").read_text())
