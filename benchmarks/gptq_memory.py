"""GPTQ's peak memory and wall time, ours against GPTQModel's, each in memory and offloaded.

    .venv/bin/python benchmarks/gptq_memory.py [--out out/bench/gptq_memory]   # needs `make interop-venv`

Int4 g64 asymmetric, damp 0.01, no act order, on the peers benchmark's 32 x 512 calibration windows
(``peers.py``), every tool loading the same fp32 safetensors directory (SmolLM2-135M), one process
per point, all in one run:

- ``ours``: ``quantize: {method: gptq}`` with the whole model in memory;
- ``ours-streamed``: the same recipe with ``streaming: true`` (weights stay in their files, one
  decoder layer in memory at a time);
- ``gptqmodel``: GPTQModel 7.6.0 as it ships, ``offload_to_disk=True`` (modules read from the
  checkpoint when needed, finished ones offloaded to disk);
- ``gptqmodel-in-memory``: GPTQModel with ``offload_to_disk=False``.

Wall seconds are the quantization alone (our stage's seconds; GPTQModel's ``quantize()`` call).
Peak RSS is the process's maximum resident set up to the end of quantization, loading included.
Both of our points also export a GPTQ checkpoint; the two must hold identical tensors (checked).
Reruns skip finished points (``results.jsonl``); writes ``results.md`` under ``--out``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from child import bench_args, child_result, run_child
from peers import DATA, GROUP, dense_model_dir, gptqmodel_quantize, windows_file

POINTS = ("ours", "ours-streamed", "gptqmodel", "gptqmodel-in-memory")
log = logging.getLogger("gptq_memory")


def run_ours(out: Path, point: Path, streaming: bool) -> dict:
    from compress import run_recipe
    from compress.run.recipe import parse_recipe

    quantize = {"method": "gptq", "config": {"type": "uniform", "bits": 4, "group_size": GROUP}}
    recipe = parse_recipe({"model": str(dense_model_dir(out)), "dtype": "float32", "data": DATA, "seed": 0,
                           "streaming": streaming, "stages": [{"quantize": quantize}, {"export": {"format": "gptq"}}],
                           "output": str(point)})
    report = next(r for r in run_recipe(recipe, overwrite=True).reports if r.name.startswith("quantize"))
    return {"seconds": report.seconds, "peak_rss_mib": report.peak_rss_mib}


def run_gptqmodel(out: Path, point: Path, offload: bool) -> dict:
    return gptqmodel_quantize(out, point, 4, windows_file(out), f"gptqmodel int4 (offload_to_disk={offload})",
                              offload_to_disk=offload)


def same_tensors(first: Path, second: Path) -> bool:
    """Whether two checkpoint directories hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    def tensors(directory: Path) -> dict:
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    a, b = tensors(first), tensors(second)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def markdown(rows: list[dict], identical: bool | None) -> str:
    base = next((r for r in rows if r["point"] == "gptqmodel"), None)
    lines = ["| point | wall s | peak RSS MiB | RSS / gptqmodel | wall / gptqmodel |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        ratios = (f"{row['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | {row['seconds'] / base['seconds']:.2f}x"
                  if base else "- | -")
        lines.append(f"| {row['point']} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} | {ratios} |")
    if identical is not None:
        lines.append(f"\nOur in-memory and streamed GPTQ checkpoints hold identical tensors: {identical}")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = bench_args(__doc__.splitlines()[0], "out/bench/gptq_memory")
    out = args.out
    if args.point:
        if args.point not in POINTS:
            log.error("--point: one of %s, not %r", ", ".join(POINTS), args.point)
            raise SystemExit(2)
        point = out / "points" / args.point
        row = (run_ours(out, point, args.point == "ours-streamed") if args.point.startswith("ours")
               else run_gptqmodel(out, point, args.point == "gptqmodel"))
        print(child_result({"point": args.point, **row}))
        return
    windows_file(out)
    dense_model_dir(out)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    for name in POINTS:
        if any(r["point"] == name for r in rows):
            continue
        log.info("point %s", name)
        rows.append(run_child(__file__, ["--out", str(out), "--point", name], name))
        results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    checkpoints = [out / "points" / name / "checkpoint" for name in ("ours", "ours-streamed")]
    identical = same_tensors(*checkpoints) if all(c.is_dir() for c in checkpoints) else None
    (out / "results.md").write_text(markdown(rows, identical))
    print(markdown(rows, identical))


if __name__ == "__main__":
    main()
