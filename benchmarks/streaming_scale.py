"""Streaming at scale (issue 11): peak memory and wall time of quantize + GPTQ export against model size.

    .venv/bin/python benchmarks/streaming_scale.py [--out out/bench/streaming] [--method rtn|gptq]

Synthetic Llama models (``compress.models.synthetic``: random bf16 weights, one shard per layer) run the
recipe ``quantize {method, int4 g128} -> export gptq`` in fp32, each point in a fresh process through
``tests/tools/peak_rss.py`` (peak RSS from the kernel's high-water mark VmHWM, exact, minus the RSS
once torch, transformers and compress are imported). Points:

- the presets 0.1b, 0.5b, 1.5b, streamed, and the same recipe in memory (``streaming: false``) side by
  side as the baseline;
- a depth sweep at the 1.5b width (4, 11, 22 layers), streamed: the same layer, more of them.

``seconds`` is the quantize and export stages' own time from ``report.json`` (model writing and
imports excluded). GPTQ calibrates on 16 x 256 tokens. Reruns skip finished points (``results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
log = logging.getLogger("streaming_scale")
POINTS = ([(preset, None, streaming) for preset in ("0.1b", "0.5b", "1.5b") for streaming in (True, False)]
          + [("1.5b", layers, True) for layers in (4, 11)])


def model_dir(out: Path, preset: str, layers: int | None) -> Path:
    from compress.models.synthetic import write_synthetic_llama

    path = out / "models" / (preset + (f"-{layers}l" if layers else ""))
    if not (path / "config.json").is_file():
        write_synthetic_llama(path, preset, layers=layers)
    return path


def run_point(out: Path, preset: str, layers: int | None, streaming: bool, method: str) -> dict:
    from compress.models.synthetic import layer_shapes, llama_config, parameter_count

    config = llama_config(preset, layers)
    name = f"{preset}{f'-{layers}l' if layers else ''}-{'streamed' if streaming else 'in-memory'}-{method}"
    point = out / "points" / name
    point.mkdir(parents=True, exist_ok=True)
    calibration = "data: {calibration: {source: stdlib, split: train, samples: 16, seq_len: 256}}\n" if method == "gptq" else ""
    recipe = point / "recipe.yaml"
    recipe.write_text(f"model: {model_dir(out, preset, layers)}\nstreaming: {str(streaming).lower()}\ndtype: float32\n"
                      f"{calibration}stages:\n  - quantize: {{method: {method}, config: {{bits: 4, group_size: 128}}}}\n"
                      f"  - export: {{format: gptq}}\noutput: {point / 'out'}\n")
    measured = point / "rss.json"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "peak_rss.py"), str(measured), "run",
                           str(recipe), "--quiet", "--overwrite"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rss = json.loads(measured.read_text())
    stages = json.loads((point / "out" / "report.json").read_text())["stages"]
    layer_mib = 4 * sum(_numel(s) for s in layer_shapes(config).values()) / 2**20
    return {"name": name, "preset": preset, "layers": config["num_hidden_layers"], "streaming": streaming,
            "method": method, "params": parameter_count(config), "layer_fp32_mib": layer_mib,
            "peak_growth_mib": rss["peak_mib"] - rss["baseline_mib"], "baseline_mib": rss["baseline_mib"],
            "seconds": sum(s["seconds"] for s in stages if s["name"] in ("quantize", "export"))}


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def markdown(rows: list[dict]) -> str:
    lines = ["| model | layers | params (B) | mode | peak RSS growth MiB | / one fp32 layer | / fp32 model | seconds | "
             "s per B params |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        model_mib = 4 * r["params"] / 2**20
        lines.append(f"| {r['preset']} | {r['layers']} | {r['params'] / 1e9:.3f} | "
                     f"{'streamed' if r['streaming'] else 'in memory'} {r['method']} | {r['peak_growth_mib']:.0f} | "
                     f"{r['peak_growth_mib'] / r['layer_fp32_mib']:.2f} | {r['peak_growth_mib'] / model_mib:.3f} | "
                     f"{r['seconds']:.1f} | {r['seconds'] / (r['params'] / 1e9):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench/streaming"))
    parser.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    for preset, layers, streaming in POINTS:
        name = f"{preset}{f'-{layers}l' if layers else ''}-{'streamed' if streaming else 'in-memory'}-{args.method}"
        if any(r["name"] == name for r in rows):
            continue
        log.info("point %s", name)
        rows.append(run_point(out, preset, layers, streaming, args.method))
        results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    rows.sort(key=lambda r: (r["method"], not r["streaming"], r["params"]))
    (out / f"results-{args.method}.md").write_text(markdown([r for r in rows if r["method"] == args.method]))
    print(markdown([r for r in rows if r["method"] == args.method]))


if __name__ == "__main__":
    main()
