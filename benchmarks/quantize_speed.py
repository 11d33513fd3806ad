"""Quantize time of one 4096x4096 fp32 matrix: ours vs bitsandbytes' ``quantize_4bit``, same run.

    python benchmarks/quantize_speed.py [--size 4096] [--repeats 7] [--json out.json]

Every method quantizes the same Gaussian matrix (std 0.02); the table gives the median and best of
``repeats`` timed calls after one warm-up, the ratio to bitsandbytes NF4 (median / median), and the
relative reconstruction error so that speed is not bought with quality. Threads: torch's default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from compress.quant import QuantConfig, QuantizedWeight


def timed(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def ours(config: QuantConfig):
    def run(weight):
        quantized = QuantizedWeight.quantize(weight, config)
        return lambda: quantized.dequantize()

    return run


def bnb(double_quant: bool):
    def run(weight):
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        return lambda: F.dequantize_4bit(packed, state)

    return run


METHODS = {
    "bitsandbytes NF4 b64 (fp32 absmax)": (bnb(False), 4.5),
    "bitsandbytes NF4 b64 + double quant": (bnb(True), 4.127),
    "ours NF4 b64, 8-bit scales / 256 fp32 (LQ-LoRA double quant)": (ours(QuantConfig.nf(4)), 4.127),
    "ours RTN int4 g64 asym (GPTQ layout)": (ours(QuantConfig.uniform(4, 64)), 4.3125),
    "ours RTN int4 g128 sym (GPTQ layout)": (ours(QuantConfig.uniform(4, 128, sym=True)), 4.125),
    "ours RTN int3 g128 asym (GPTQ layout)": (ours(QuantConfig.uniform(3, 128)), 3.15625),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    weight = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 0.02
    rows = []
    for name, (method, bits) in METHODS.items():
        dequantizer = method(weight)
        error = float((dequantizer().float() - weight).norm() / weight.norm())
        times = timed(lambda: method(weight), args.repeats)
        rows.append({"method": name, "median_s": statistics.median(times), "best_s": min(times),
                     "bits_per_param": bits, "rel_error": error})
    baseline = rows[0]["median_s"]
    print(f"{args.size}x{args.size} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats\n")
    print("| method | bits/param | median s | best s | median vs bnb NF4 | rel. error |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['bits_per_param']:.4g} | {row['median_s']:.3f} | {row['best_s']:.3f} "
              f"| {row['median_s'] / baseline:.2f}x | {row['rel_error']:.4f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
