"""One SmolLM2-135M plan in three checkpoint formats: size on disk and load time (issue 22).

    .venv/bin/python benchmarks/format_sizes.py [--out out/bench/formats] [--repeats 3]

The plan: RTN, 3-bit symmetric group 64 with every self_attn module at 2 bits and down_proj at 4
(a mixed plan; the same codes in every format), exported as gptq, compressed-tensors and native in
one run. Each load is ``compress.load`` in its own fresh process (files in the page cache after a
first warm-up read; the best of ``--repeats``), and its logits on one probe batch must equal the
in-memory model's (the formats hold the same model). Also says, per format, which engines the
verdict lets load it. Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child import bench_args, child_result, run_child  # noqa: E402

FORMATS = ("gptq", "compressed-tensors", "native")
PLAN = {"method": "rtn", "config": {"bits": 3, "group_size": 64, "sym": True},
        "overrides": {"re:.*self_attn.*": {"bits": 2}, "re:.*down_proj$": {"bits": 4}}, "ignore": ["lm_head"]}


def export_all(out: Path) -> None:
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    stages = [{"quantize": PLAN}] + [{"export": {"format": f, "path": f, "verify": False}} for f in FORMATS]
    run_recipe(parse_recipe({"model": "smollm2-135m", "stages": stages, "output": str(out / "run"),
                             "device": "cpu"}), overwrite=True)


def time_load(out: Path, fmt: str) -> dict:
    import torch

    import compress

    path = out / "run" / fmt
    for file in path.iterdir():  # warm the page cache: the figure is the loader, not the disk
        file.read_bytes()
    start = time.perf_counter()
    model = compress.load(path, dtype="float32")
    seconds = time.perf_counter() - start
    probe = torch.arange(64).view(1, 64)
    with torch.no_grad():
        logits = model(input_ids=probe, use_cache=False).logits
    return {"seconds": seconds, "logits_sum": float(logits.double().sum()),
            "logits_first": [float(v) for v in logits[0, 0, :4]]}


def row_for(out: Path, fmt: str, repeats: int) -> dict:
    from compress import inspect

    loads = [run_child(__file__, ["--out", str(out), "--point", fmt], f"load {fmt}") for _ in range(repeats)]
    info = inspect(out / "run" / fmt)
    size = sum(p.stat().st_size for p in (out / "run" / fmt).rglob("*") if p.is_file())
    return {"format": fmt, "bytes": size, "bits_per_param": info["bits_per_param"],
            "load_seconds": min(r["seconds"] for r in loads), "logits": loads[0]["logits_first"],
            "logits_sum": loads[0]["logits_sum"],
            "engines": {name: v["loads"] for name, v in info["engines"].items()},
            "vllm_kernel": info["engines"]["vllm"]["kernel"], "vllm_stops": info["engines"]["vllm"]["reason"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| format | size on disk MiB | bits/param (linear) | compress.load s (best) | vLLM | GPTQModel | "
             "transformers |", "|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        vllm = f"yes ({r['vllm_kernel']})" if r["engines"]["vllm"] else "no"
        lines.append(f"| {r['format']} | {r['bytes'] / 2**20:.1f} | {r['bits_per_param']:.3f} | {r['load_seconds']:.2f} "
                     f"| {vllm} | {'yes' if r['engines']['gptqmodel'] else 'no'} | "
                     f"{'yes' if r['engines']['transformers'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = bench_args(__doc__.splitlines()[0], "out/bench/formats",
                      lambda parser: parser.add_argument("--repeats", type=int, default=3))
    if args.point:
        print(child_result(time_load(args.out, args.point)))  # noqa: T201 - the child's result line
        return
    if not all((args.out / "run" / f / "compress.json").is_file() for f in FORMATS):
        export_all(args.out)
    rows = [row_for(args.out, fmt, args.repeats) for fmt in FORMATS]
    if len({r["logits_sum"] for r in rows}) != 1:
        raise SystemExit(f"the formats do not hold the same model: {[r['logits_sum'] for r in rows]}")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "results.md").write_text(markdown(rows))
    print(markdown(rows))  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
