"""One L4Q run at int3 g64 on SmolLM2-135M with a chosen quant_lr and start (issue 8 probe).

    .venv/bin/python benchmarks/l4q_probe.py QUANT_LR rtn|minmax

Same data, steps (24), LoRA and eval as ``l4q_bits.py``; ``rtn`` starts step/offset from an RTN
quantize stage's scales and zeros, ``minmax`` from each group's range. Prints the perplexity.
"""

import sys, json
from compress import run_recipe
from compress.recipe import parse_recipe
qlr = float(sys.argv[1]); init = sys.argv[2] == "rtn"
DATA = {"calibration": {"source": "stdlib", "split": "train", "samples": 16, "seq_len": 256},
        "eval": {"source": "stdlib", "split": "eval", "samples": 32, "seq_len": 512}}
stages = ([{"quantize": {"method": "rtn", "config": {"type": "uniform", "bits": 3, "group_size": 64}}}] if init else []) + [
    {"l4q": {"steps": 24, "lr": 2e-4, "batch_size": 4, "grad_accum": 1, "seq_len": 256, "save_every": 0, "bits": 3,
             "group_size": 64, "quant_lr": qlr, "lora": {"rank": 16, "alpha": 32}}}, {"eval": {"baseline": False}}]
r = run_recipe(parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "seed": 0, "stages": stages,
                             "output": f"out/bench/l4q_probe/{qlr}-{sys.argv[2]}"}), overwrite=True)
print("RESULT", qlr, init, r.reports[-1].metrics["perplexity"])
