"""Run inside the GPTQModel 7.6.0 side venv (by ``peers.py``, not by hand): GPTQModel's own GPTQ on
the calibration windows ``peers.py`` also gives our GPTQ, and GPTQModel loading our checkpoint.

    .venv-gptqmodel/bin/python benchmarks/gptqmodel_side.py JOB.json

JOB.json: {"action": "quantize" | "load", ...}
- quantize: {"model_dir", "windows" (safetensors with ``calibration`` and ``eval`` int64 [n, seq]),
  "out", "bits", "group_size", "sym", and optional "damp", "desc_act", "act_group_aware", "mse",
  "offload_to_disk" (each absent one at GPTQModel's own default)}: quantizes (fp32 on CPU), saves to
  ``out``; prints RESULT {"seconds" of ``quantize()`` alone, its "cpu_seconds" (all threads), "peak_rss_mib"
  of the process after it}.
- load: {"path", "windows"}: loads a GPTQ checkpoint with GPTQModel (CPU torch kernel, fp16) and
  prints RESULT {"perplexity"} on the eval windows, computed as ``compress.execution.evaluate`` does
  (exp of the mean next-token NLL over every window).
"""

import json
import math
import resource
import sys
import time

import torch
from safetensors.torch import load_file

SETTINGS = {"damp": "damp_percent", "desc_act": "desc_act", "act_group_aware": "act_group_aware", "mse": "mse",
            "offload_to_disk": "offload_to_disk"}


def quantize(job: dict) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig

    windows = load_file(job["windows"])["calibration"]
    settings = {key: job[ours] for ours, key in SETTINGS.items() if ours in job}  # absent: GPTQModel's default
    config = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], sym=job["sym"], **settings)
    model = GPTQModel.load(job["model_dir"], config, device="cpu", dtype=torch.float32)
    samples = [{"input_ids": row.view(1, -1), "attention_mask": torch.ones(1, row.numel(), dtype=torch.int64)}
               for row in windows]
    start, cpu = time.perf_counter(), time.process_time()
    model.quantize(samples, batch_size=1)
    seconds = time.perf_counter() - start  # quantization only, as our stage's seconds (loading excluded)
    cpu = time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.save(job["out"])
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak}


@torch.no_grad()
def load_and_evaluate(job: dict) -> dict:
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(job["path"], device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16).model
    model = model.to(torch.float32).eval()
    windows = load_file(job["windows"])["eval"]
    total, count = 0.0, 0
    for batch in torch.split(windows, 4):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + float(nll), count + batch[:, 1:].numel()
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    return {"perplexity": math.exp(total / count), "kernels": kernels}


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    result = quantize(job) if job["action"] == "quantize" else load_and_evaluate(job)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
