"""LQ-LoRA's cost table in one process and in two (torchrun, gloo) on the same machine (issue 11).

    .venv/bin/python benchmarks/distributed_costs.py [--out out/bench/distributed]

Recipe: SmolLM2-135M, ``lq_lora {rank: 16, budget_bits: 3.5, group_sizes: [64], iterations: 5}`` (4
configs x 210 matrices), exported native. Points, one after another on an otherwise idle machine:

- ``1 process``: ``compress run`` (torch's default threads: one per core);
- ``1 process, 1 thread``: the same with ``OMP_NUM_THREADS=1``;
- ``2 processes``: ``torchrun --standalone --nproc-per-node 2`` (torchrun gives each 1 thread).

Reported: the stage's ``cost_table_seconds`` and ``seconds`` from ``report.json``, the speedup over
the 1-process run, and whether the checkpoint's files are byte-identical to the 1-thread 1-process
run's (torchrun gives each process one thread; a 2-thread product rounds differently).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = """model: smollm2-135m
data:
  calibration: {{source: stdlib, split: train, samples: 8, seq_len: 256}}
stages:
  - lq_lora: {{rank: 16, budget_bits: 3.5, group_sizes: [64], iterations: 5}}
  - export: {{format: native, adapters: embed, verify: false}}
output: {output}
"""
POINTS = {"1 process": ([], {}), "1 process, 1 thread": ([], {"OMP_NUM_THREADS": "1"}),
          "2 processes": (["torchrun", "--standalone", "--nproc-per-node", "2"], {})}


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
            and p.name != "compress.json"}


def run_point(out: Path, name: str) -> dict:
    launcher, env = POINTS[name]
    output = out / "run"
    shutil.rmtree(output, ignore_errors=True)  # the same path each time: the manifest records it
    recipe = out / "recipe.yaml"
    recipe.write_text(RECIPE.format(output=output))
    command = ([str(Path(sys.executable).parent / launcher[0]), *launcher[1:], "-m", "compress.entry.cli"] if launcher
               else [sys.executable, "-m", "compress.entry.cli"])
    done = subprocess.run([*command, "run", str(recipe), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    stage = next(s for s in json.loads((output / "report.json").read_text())["stages"] if s["name"] == "lq_lora")
    return {"name": name, "cost_table_seconds": stage["metrics"]["cost_table_seconds"], "seconds": stage["seconds"],
            "files": hashes(output / "checkpoint")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/distributed"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_point(out, name) for name in POINTS]
    base, same_threads = rows[0], rows[1]
    lines = ["| run | cost table s | speedup | lq_lora stage s | speedup | bytes = 1 process, 1 thread |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['cost_table_seconds']:.1f} | "
                     f"{base['cost_table_seconds'] / row['cost_table_seconds']:.2f}x | {row['seconds']:.1f} | "
                     f"{base['seconds'] / row['seconds']:.2f}x | {'yes' if row['files'] == same_threads['files'] else 'NO'} |")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
