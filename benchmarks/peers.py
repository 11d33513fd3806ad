"""Where we stand against the quantizers users already have: one table on SmolLM2-135M (issue 10).

    .venv/bin/python benchmarks/peers.py [--out out/bench/peers]

Needs the GPTQModel side venv (``make interop-venv``). Every row runs in its own process, one after
another (so its wall time and peak RSS are its own), all from one command:

- ``fp32``: the model as loaded;
- ``rtn``, ``gptq``: our round-to-nearest and our GPTQ (damp 0.01, no act order), int{4,3,2} g64 asym;
- ``gptqmodel``: GPTQModel 7.6.0's GPTQ in the side venv with the same bits, group, asym grid,
  damp 0.01, desc_act and act_group_aware off, on the same calibration windows; evaluated by
  loading its checkpoint with our loader (the same evaluation code as every other row);
- ``bnb-nf4``: bitsandbytes NF4 with double quantization (the QLoRA config) through transformers;
- ``lqlora-r0``: our LQ-LoRA ILP with rank 0 (mixed-precision per-matrix configs) at a 3.0 and 3.5
  bit budget, with GPTQ as its quantizer;
- ``lqlora-r16``: LQ-LoRA rank 16 (Q + L1 L2, the adapters counted at 16 bit), GPTQ quantizer;
- ``l4q``: our GPTQ, then L4Q from its scales and zeros at int4, int3 and int2 g64 (24 steps of
  4 x 256 tokens, l4q's defaults), packed with integer zeros, no adapter.

Calibration: 32 x 512 tokens of the stdlib train split for every calibrated method; perplexity on
32 x 512 held-out tokens. Bits per parameter: the bytes of every checkpoint tensor belonging to the
linear layers (codes, scales, zeros, g_idx, bitsandbytes' absmax and quant maps, adapters) over the
linear layers' parameter count. Size on disk: the whole checkpoint directory. Every GPTQ checkpoint
(ours and GPTQModel's) is also loaded by GPTQModel (its CPU torch kernel, fp16) and the perplexities
of the two loaders compared. Reruns skip
finished rows (``results.jsonl``); writes ``results.md`` under ``--out``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path

from child import bench_args, child_result, run_child

ROOT = Path(__file__).resolve().parent.parent
SIDE_PYTHON = Path(os.environ.get("COMPRESS_INTEROP_PYTHON", ROOT / ".venv-gptqmodel" / "bin" / "python"))
DATA = {"calibration": {"source": "stdlib", "split": "train", "samples": 32, "seq_len": 512},
        "eval": {"source": "stdlib", "split": "eval", "samples": 32, "seq_len": 512}}
GROUP = 64  # SmolLM2's 576 input features hold whole groups of 64, not of 128
ROWS = ([("fp32", None)] + [(method, bits) for bits in (4, 3, 2) for method in ("rtn", "gptq", "gptqmodel")]
        + [("bnb-nf4", 4)] + [(f"lqlora-r{rank}", budget) for rank in (0, 16) for budget in (3.5, 3.0)]
        + [("l4q", 4), ("l4q", 3), ("l4q", 2)])
log = logging.getLogger("peers")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def linear_names(model) -> dict[str, int]:
    """{name: parameter count} of the decoder's linear layers (lm_head excluded)."""
    from compress.targets import select_linears

    return {name: m.in_features * m.out_features for name, m in select_linears(model, ["Linear"], ["lm_head"])}


def linear_tensor_bits(directories: list[Path], names: dict[str, int]) -> float:
    """Bits of every stored tensor under a linear layer's name (any prefix such as PEFT's
    ``base_model.model.``), per linear parameter."""
    from safetensors import safe_open

    prefixes = tuple(f"{name}." for name in names)
    total = 0
    for directory in directories:
        for file in directory.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    if key.removeprefix("base_model.model.").startswith(prefixes):
                        tensor = handle.get_tensor(key)
                        total += tensor.numel() * tensor.element_size()
    return 8 * total / sum(names.values())


def windows_file(out: Path) -> Path:
    """The calibration and eval windows every method sees, as token ids (written once)."""
    path = out / "windows.safetensors"
    if not path.is_file():
        from safetensors.torch import save_file

        from compress.models.data import token_windows
        from compress.models.sources import load_model, resolve_model
        from compress.run.recipe import parse_recipe

        _, tokenizer = load_model(resolve_model("smollm2-135m"), "float32")
        spec = parse_recipe({"model": "smollm2-135m", "data": DATA, "stages": [{"eval": {}}], "output": "-"}).spec.data
        windows = {role: token_windows(tokenizer, getattr(spec, role).text_source(role), DATA[role]["samples"],
                                       DATA[role]["seq_len"]).contiguous() for role in DATA}
        save_file(windows, str(path))
    return path


def evaluate(model, out: Path) -> float:
    from safetensors.torch import load_file

    from compress.execution.evaluate import perplexity

    return perplexity(model, load_file(str(windows_file(out)))["eval"])


def dense_model_dir(out: Path, model_name: str = "smollm2-135m") -> Path:
    """A built-in model (SmolLM2-135M unless named) saved as a plain fp32 transformers directory
    under ``out`` (GPTQModel and bitsandbytes load it)."""
    path = out / "fp32-model"
    if not (path / "config.json").is_file():
        from compress.models.sources import load_model, resolve_model

        model, tokenizer = load_model(resolve_model(model_name), "float32")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def recipe_stages(method: str, setting: float) -> list[dict]:
    quant = {"type": "uniform", "bits": int(setting), "group_size": GROUP}
    if method in ("rtn", "gptq"):
        return [{"quantize": {"method": method, "config": quant}}]
    if method.startswith("lqlora"):
        rank = int(method.removeprefix("lqlora-r"))
        return [{"lq_lora": {"rank": rank, "alpha": 2 * rank if rank else 16, "budget_bits": setting, "grid": "gptq",
                             "quantizer": "gptq", "iterations": 10}}]
    tune = {"steps": 24, "lr": 2.0e-4, "batch_size": 4, "grad_accum": 1, "seq_len": 256, "save_every": 0}
    return [{"quantize": {"method": "gptq", "config": quant}},
            {"l4q": dict(tune, bits=int(setting), group_size=GROUP, lora={"rank": 16, "alpha": 32})}]


def run_ours(out: Path, method: str, setting: float, point: Path) -> dict:
    """One of our recipes, exported as GPTQ (+ a PEFT adapter for LQ-LoRA with rank > 0)."""
    from compress import load, run_recipe
    from compress.run.recipe import parse_recipe

    stages = recipe_stages(method, setting) + [{"eval": {"baseline": False}}, {"export": {"format": "gptq"}}]
    recipe = parse_recipe({"model": "smollm2-135m", "dtype": "float32", "data": DATA, "seed": 0, "stages": stages,
                           "output": str(point)})
    reports = run_recipe(recipe, overwrite=True).reports
    work = [r for r in reports[1:] if r.name not in ("eval", "export")]  # reports[0]: loading
    evaluation = next(r for r in reports if r.name == "eval")
    checkpoints = [point / "checkpoint"] + ([point / "checkpoint-adapter"] if method == "lqlora-r16" else [])
    names = linear_names(load(point / "checkpoint", dtype="float32"))
    return {"ppl": evaluation.metrics["perplexity"], "bits_per_param": linear_tensor_bits(checkpoints, names),
            "disk_mib": sum(directory_bytes(c) for c in checkpoints) / 2**20,
            "seconds": sum(r.seconds for r in work), "peak_rss_mib": max(r.peak_rss_mib for r in work)}


def run_fp32(out: Path, point: Path) -> dict:
    from compress.models.sources import load_model, resolve_model

    model, _ = load_model(resolve_model(str(dense_model_dir(out))), "float32")
    names = linear_names(model)
    return {"ppl": evaluate(model, out), "bits_per_param": linear_tensor_bits([dense_model_dir(out)], names),
            "disk_mib": directory_bytes(dense_model_dir(out)) / 2**20, "seconds": 0.0, "peak_rss_mib": None}


def quantize_bnb(out: Path, point: Path, model_name: str = "smollm2-135m"):
    """(model, row without perplexity) of bitsandbytes NF4 with double quantization (the QLoRA
    config) through transformers, saved under ``point``."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(dense_model_dir(out, model_name), quantization_config=config,
                                                 device_map="cpu", dtype=torch.float32)
    seconds, peak = time.perf_counter() - start, peak_rss_mib()
    model.save_pretrained(point)
    names = {n: m.in_features * m.out_features for n, m in model.named_modules()
             if type(m).__name__ == "Linear4bit"}
    return model, {"bits_per_param": linear_tensor_bits([point], names), "disk_mib": directory_bytes(point) / 2**20,
                   "seconds": seconds, "peak_rss_mib": peak}


def run_bnb(out: Path, point: Path) -> dict:
    model, row = quantize_bnb(out, point)
    return {"ppl": evaluate(model, out), **row}


def side(job: dict, what: str) -> dict:
    job_file = Path(job["job_file"])
    job_file.write_text(json.dumps(job))
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # one worker per core here (its own default would be 1)
    return run_child(str(Path(__file__).resolve().parent / "gptqmodel_side.py"), [str(job_file)], what,
                     python=str(SIDE_PYTHON), cwd=str(job_file.parent))  # GPTQModel writes logs/ into its cwd


def gptqmodel_quantize(out: Path, point: Path, bits: int, windows: Path, what: str, **options) -> dict:
    """GPTQModel's GPTQ in the side venv with our GPTQ's settings (asymmetric g64, damp 0.01, no act
    order) on ``windows``, saved under ``point / "checkpoint"``; ``options`` add job keys
    (``offload_to_disk``). Its seconds and peak RSS."""
    point.mkdir(parents=True, exist_ok=True)
    job = {"action": "quantize", "model_dir": str(dense_model_dir(out)), "windows": str(windows),
           "out": str(point / "checkpoint"), "bits": bits, "group_size": GROUP, "sym": False, "damp": 0.01,
           "desc_act": False, "act_group_aware": False, "job_file": str(point / "job.json"), **options}
    return side(job, what)


def run_gptqmodel(out: Path, bits: int, point: Path) -> dict:
    from compress import load

    result = gptqmodel_quantize(out, point, bits, windows_file(out), f"gptqmodel int{bits}")
    model = load(point / "checkpoint", dtype="float32")
    return {"ppl": evaluate(model, out), "bits_per_param": linear_tensor_bits([point / "checkpoint"], linear_names(model)),
            "disk_mib": directory_bytes(point / "checkpoint") / 2**20, "seconds": result["seconds"],
            "peak_rss_mib": result["peak_rss_mib"]}


def gptqmodel_reads_ours(out: Path, point: Path) -> float:
    job = {"action": "load", "path": str(point / "checkpoint"), "windows": str(windows_file(out)),
           "job_file": str(point / "load-job.json")}
    return side(job, f"GPTQModel loading {point}")["perplexity"]


def run_point(out: Path, method: str, setting: float | None) -> dict:
    name = method if setting is None else f"{method}-{setting:g}"
    point = out / "points" / name
    point.mkdir(parents=True, exist_ok=True)
    if method == "fp32":
        row = run_fp32(out, point)
    elif method == "bnb-nf4":
        row = run_bnb(out, point)
    elif method == "gptqmodel":
        row = run_gptqmodel(out, int(setting), point)
    else:
        row = run_ours(out, method, setting, point)
    if method in ("gptq", "gptqmodel"):  # both loaders on both tools' checkpoints
        row["ppl_in_gptqmodel"] = gptqmodel_reads_ours(out, point)
    return {"name": name, "method": method, "setting": setting, **row}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | bits or budget | perplexity | bits/param (linear, all overheads) | size on disk MiB | "
             "wall s | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        peak = f"{row['peak_rss_mib']:.0f}" if row["peak_rss_mib"] else "-"
        setting = "-" if row["setting"] is None else f"{row['setting']:g}"
        lines.append(f"| {row['method']} | {setting} | {row['ppl']:.3f} | {row['bits_per_param']:.3f} | "
                     f"{row['disk_mib']:.1f} | {row['seconds']:.0f} | {peak} |")
    loaded = [r for r in rows if "ppl_in_gptqmodel" in r]
    if loaded:
        lines += ["", "| GPTQ checkpoint written by | bits | perplexity, our loader | perplexity, GPTQModel loader |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {'compress' if r['method'] == 'gptq' else 'GPTQModel'} | int{int(r['setting'])} g{GROUP} | "
                  f"{r['ppl']:.3f} | {r['ppl_in_gptqmodel']:.3f} |" for r in loaded]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = bench_args(__doc__.splitlines()[0], "out/bench/peers", lambda parser: parser.add_argument(
        "--only", nargs="*", help="row names to run (default: every row)"))
    if args.point:  # method[,setting]
        method, _, setting = args.point.partition(",")
        print(child_result(run_point(args.out, method, float(setting) if setting else None)))
        return
    windows_file(args.out)
    dense_model_dir(args.out)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    for method, setting in ROWS:
        name = method if setting is None else f"{method}-{setting:g}"
        if any(r["name"] == name for r in rows) or (args.only and name not in args.only):
            continue
        log.info("row %s", name)
        point = method if setting is None else f"{method},{setting}"
        rows.append(run_child(__file__, ["--out", str(args.out), "--point", point], name))
        results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    order = [m if s is None else f"{m}-{s:g}" for m, s in ROWS]
    rows.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    (args.out / "results.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
