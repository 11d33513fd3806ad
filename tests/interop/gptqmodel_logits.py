"""Run inside the GPTQModel side venv (not by pytest): load checkpoints with third-party loaders and
write their logits for the interop tests.

    python gptqmodel_logits.py JOBS.json

Each job: {"loader": "gptqmodel" | "transformers", "path": DIR, "input_ids": FILE.safetensors,
"output": FILE.safetensors} and optionally "adapter": a PEFT adapter directory applied with
``PeftModel.from_pretrained`` over the loaded model (PEFT's own GPTQ LoRA layer). Writes ``logits`` (fp32) to ``output`` and a JSON sidecar
(``output`` + ".json") with the dtype the loader ran in, its kernel classes and each module's bits.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def load_gptqmodel(path):
    from gptqmodel import BACKEND, GPTQModel

    # GPTQModel's CPU kernel runs fp16/bf16 only; fp16 keeps the fp16 scales exact, then the whole
    # module (buffers included) is cast to fp32 so its logits compare with an fp32 reference.
    model = GPTQModel.load(path, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16).model
    return model.to(torch.float32)


def load_transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu")  # its defaults: bf16, its kernel


def describe(model):
    kernels, bits = set(), {}
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            kernels.add(type(module).__name__)
            bits[name] = int(module.bits)
    return {"kernels": sorted(kernels), "bits": bits, "dtype": str(next(model.parameters()).dtype)}


def main(jobs_file):
    for job in json.load(open(jobs_file)):
        model = (load_gptqmodel if job["loader"] == "gptqmodel" else load_transformers)(job["path"])
        if job.get("adapter"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, job["adapter"])
        input_ids = load_file(job["input_ids"])["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=input_ids).logits.float()
        save_file({"logits": logits.contiguous()}, job["output"])
        with open(job["output"] + ".json", "w") as handle:
            json.dump(describe(model), handle)


if __name__ == "__main__":
    main(sys.argv[1])
