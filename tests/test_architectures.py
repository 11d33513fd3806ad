"""The architectures users bring (compress.models.architectures), each as a tiny random model saved as a
Hugging Face directory, through every method: GPTQ with both packed exports reloaded (the export
stage's reload check: logits bit-equal to the in-memory model), LQ-LoRA + finetune, prune, L4Q and
LoRAM. Phi-3's fused projections are quantized and exported fused; structured pruning refuses them at
validate (exit 2, one line) and LoRAM's shape-keeping 2:4 pruning runs. Unsupported architectures are
refused at validate."""

import math

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, OPTConfig,
                          Phi3Config, Qwen2Config, Qwen3Config)

import compress
from compress.quant import QuantLinear
from conftest import run_cli, write_recipe

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
CONFIGS = {
    "llama": lambda v: LlamaConfig(vocab_size=v, head_dim=16, tie_word_embeddings=True, **COMMON),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, tie_word_embeddings=True, **COMMON),  # biases on q/k/v
    "qwen3": lambda v: Qwen3Config(vocab_size=v, head_dim=16, tie_word_embeddings=True, **COMMON),  # q/k norms
    "mistral": lambda v: MistralConfig(vocab_size=v, head_dim=16, tie_word_embeddings=False, **COMMON),
    "gemma3": lambda v: Gemma3TextConfig(vocab_size=v, head_dim=16, sliding_window=32, **COMMON),
    "phi3": lambda v: Phi3Config(vocab_size=v, tie_word_embeddings=False, **COMMON),  # fused qkv_proj, gate_up_proj
}
DATA = """data:
  calibration: {source: stdlib, split: train, samples: 8, seq_len: 64}
  eval: {source: stdlib, split: eval, samples: 4, seq_len: 64}"""
METHODS = {
    "gptq": """  - quantize: {method: gptq, config: {type: uniform, bits: 4, group_size: 32, sym: true}, ignore: [lm_head]}
  - export: {format: gptq, path: gptq}
  - export: {format: compressed-tensors, path: ct}""",
    "lq_lora+finetune": """  - lq_lora: {rank: 4, budget_bits: 3.5, iterations: 2, ignore: [lm_head]}
  - finetune: {steps: 2, batch_size: 2, grad_accum: 1, seq_len: 64}
  - export: {format: native}""",
    "prune": """  - prune: {method: loraprune, ratio: 0.5, steps: 4, every: 1, uniform: true, lora: {rank: 4, alpha: 8}}
  - export: {format: hf}""",
    "l4q": """  - l4q: {bits: 4, group_size: 32, steps: 2, lora: {rank: 4, alpha: 8}, ignore: [lm_head]}
  - export: {format: gptq}""",
    "loram": """  - loram: {prune: {method: magnitude, ratio: 0.5, uniform: true, steps: 2, every: 1},
             train: {steps: 2, lora: {rank: 4, alpha: 8}}}
  - export: {format: native, adapters: peft}""",
}
PRUNING = ("prune", "loram")
# Phi-3 x structured pruning: refused at validate (test_phi3_pruning_is_refused_at_validate_and_2_4_loram_runs)
CASES = [(arch, method) for arch in sorted(CONFIGS) for method in sorted(METHODS)
         if not (arch == "phi3" and method in PRUNING)]


def _save(config, directory, tokenizer):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_pair):
    tokenizer = tiny_pair[1]
    root = tmp_path_factory.mktemp("architectures")
    return {name: _save(make(len(tokenizer)), root / name, tokenizer) for name, make in CONFIGS.items()}


def _recipe(tmp_path, model, stages):
    return write_recipe(tmp_path / "recipe.yaml", f"model: {model}\n{DATA}\nstages:\n{stages}\noutput: {tmp_path / 'out'}\n")


@pytest.mark.slow
@pytest.mark.parametrize("arch, method", CASES)
def test_every_method_runs_on_every_architecture(arch, method, models, tmp_path):
    result = compress.run_recipe(compress.load_recipe(_recipe(tmp_path, models[arch], METHODS[method])))
    reports = {r.name: r for r in result.reports}
    exports = [r for r in result.reports if r.name == "export"]
    assert exports and all(math.isfinite(r.metrics["perplexity"]) for r in exports)
    if method in ("gptq", "l4q"):  # packed formats reload bit-exactly (the export stage raises otherwise)
        assert all(r.metrics["reload_max_abs_logit_diff"] == 0.0 for r in exports)
        reloaded = compress.load(result.out_dir / exports[0].metrics["path"])
        packed = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
        assert len(packed) == (4 if arch == "phi3" else 7) * 2  # Phi-3: qkv, o, gate_up, down per layer
    if method == "prune":
        assert reports["prune"].metrics["params_after"] < reports["prune"].metrics["params_before"]
    if method == "lq_lora+finetune":
        assert math.isfinite(reports["finetune"].metrics["final_loss"])
    if method == "loram":
        assert (result.out_dir / "checkpoint-adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_phi3_pruning_is_refused_at_validate_and_2_4_loram_runs(models, tmp_path):
    for stages in (METHODS["prune"], METHODS["loram"]):
        done = run_cli("validate", _recipe(tmp_path, models["phi3"], stages))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.count("\n") == 1 and "fuses q_proj, k_proj, v_proj into qkv_proj" in done.stderr
    semi = """  - loram: {prune: {method: semi}, train: {steps: 2, lora: {rank: 4, alpha: 8}}}
  - export: {format: native, adapters: peft}"""
    result = compress.run_recipe(compress.load_recipe(_recipe(tmp_path, models["phi3"], semi)))
    assert math.isfinite(result.reports[-1].metrics["perplexity"])


@pytest.mark.slow
def test_a_single_kv_head_keeps_attention_and_says_so(tmp_path, tiny_pair):
    config = Gemma3TextConfig(vocab_size=len(tiny_pair[1]), head_dim=16, sliding_window=32,
                              **{**COMMON, "num_key_value_heads": 1})
    model = _save(config, tmp_path / "gemma3-kv1", tiny_pair[1])
    result = compress.run_recipe(compress.load_recipe(_recipe(tmp_path, model, METHODS["prune"])))
    prune = result.reports[1]
    assert any("every head is kept, only MLP channels were pruned" in note for note in prune.notes)
    reloaded = compress.load(result.out_dir / "checkpoint")
    assert reloaded.config.num_attention_heads == 4 and reloaded.config.intermediate_size == 64


@pytest.mark.parametrize("name, config", [
    ("gpt2", lambda v: GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4)),
    ("opt", lambda v: OPTConfig(vocab_size=v, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                word_embed_proj_dim=64))])
def test_unsupported_architectures_fail_at_validate(name, config, tmp_path, tiny_pair):
    model = _save(config(len(tiny_pair[1])), tmp_path / name, tiny_pair[1])
    done = run_cli("validate", _recipe(tmp_path, model, METHODS["gptq"]))
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert f"model_type '{name}'" in done.stderr and "is not supported; supported: llama" in done.stderr
