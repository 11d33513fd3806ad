"""Time of one LQ-LoRA decomposition (rank 64, NF3 and int3-g64), per matrix shape.

    python benchmarks/lq_decompose_speed.py [--iterations 20] [--rank 64]

Gaussian weights (std 0.02) of SmolLM2-135M's MLP shape (1536x576) and a Llama-7B projection
(4096x4096); seconds for the whole alternating loop (it stops at the first rise of the error), the
number of iterations it ran, and the error relative to ||W|| next to plain quantization's.
"""

from __future__ import annotations

import argparse
import time

import torch

from compress.lowrank.decompose import lq_decompose
from compress.quant import QuantConfig, QuantizedWeight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()
    rows = ["| shape | config | seconds | iterations run | rel. error LQ | rel. error plain |", "|---|---|---|---|---|---|"]
    for shape in ((1536, 576), (4096, 4096)):
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
        norm = float(torch.linalg.norm(weight))
        for config in (QuantConfig.nf(3), QuantConfig.uniform(3, 64)):
            start = time.perf_counter()
            result = lq_decompose(weight, args.rank, config, args.iterations)
            seconds = time.perf_counter() - start
            plain = float(torch.linalg.norm(weight - QuantizedWeight.quantize(weight, config).dequantize()))
            rows.append(f"| {shape[0]}x{shape[1]} | {config.name} | {seconds:.2f} | {len(result.errors)} | "
                        f"{result.error / norm:.4f} | {plain / norm:.4f} |")
    print("\n".join(rows))  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
