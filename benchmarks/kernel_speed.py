"""Dequant-matmul speed: our kernels against dense matmul and bitsandbytes, measured in one run.

    python benchmarks/kernel_speed.py [--device cpu|cuda] [--shapes 4096x4096,...] [--batches 1,16]
                                 [--formats int4-g128,...] [--json out.json]

CPU (the tiled pure-torch path): median milliseconds of ``y = x @ W^T`` for x [M, K], next to dense
``F.linear`` (fp32 and bf16 weights) and bitsandbytes' ``Linear4bit`` NF4 with double quantization
(fp32 and bf16 compute), all on the same matrix and input and timed round-robin (one call of each
method per round) so that load drift hits every method alike. bitsandbytes runs in eval mode (its
inference path: on AVX512-BF16 CPUs the weight is repacked on the first call for a native bf16 GEMV
kernel) and in train mode (the generic dequantize-then-matmul path). The ratio is the fastest
bitsandbytes time over the row's.

CUDA (the Triton kernels): median microseconds from ``triton.testing.do_bench`` with the weight
buffers rotated (a fresh copy per call, so L2 holds none of them) and CUDA graphs for small shapes;
achieved GB/s over the bytes the call must move (packed weight + scales + zeros + x + y); that as a
percentage of the bandwidth floor, the peak HBM bandwidth measured in the same run by a large
device-to-device copy; and the speedup over ``torch.matmul`` in fp16.

(Not ``benchmarks/kernels.py``: run as a script, that name would shadow Hugging Face's ``kernels``
package, which bitsandbytes tries to import.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from compress.kernels import dequant_matmul, layout, reference
from compress.quant import QuantConfig, QuantizedWeight

log = logging.getLogger("benchmarks.kernels")

FORMATS = {
    "int4-g128": QuantConfig.uniform(4, 128), "int4-g128-sym": QuantConfig.uniform(4, 128, sym=True),
    "int3-g128": QuantConfig.uniform(3, 128), "int2-g64": QuantConfig.uniform(2, 64),
    "int8-g128": QuantConfig.uniform(8, 128), "nf4": QuantConfig.nf(4), "nf3": QuantConfig.nf(3),
}
CPU_SHAPES = ["4096x4096", "4096x14336"]
CUDA_SHAPES = ["8192x28672", "4096x4096", "4096x14336", "14336x4096"]  # the goals' shape first


def weight_matrix(out_features: int, in_features: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.02


def bnb_linear(weight: torch.Tensor, compute_dtype: torch.dtype):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=compute_dtype,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """Median seconds per callable, timed round-robin so that drift in machine load hits all alike."""
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_calls(weight: torch.Tensor, x: torch.Tensor, formats: list[str]) -> tuple[dict, dict]:
    """(name -> callable, name -> bytes of the weight it reads) for every CPU method."""
    calls, sizes = {}, {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        dense, xd = weight.to(dtype), x.to(dtype)
        calls[f"dense F.linear {name}"] = lambda xd=xd, dense=dense: torch.nn.functional.linear(xd, dense)
        sizes[f"dense F.linear {name}"] = dense.numel() * dense.element_size()
    for (dtype, name), mode in itertools.product(((torch.float32, "fp32"), (torch.bfloat16, "bf16")), ("eval", "train")):
        try:
            layer = bnb_linear(weight, dtype).train(mode == "train")
        except Exception as err:  # noqa: BLE001 - report why a baseline is missing, keep measuring
            log.warning("bitsandbytes unavailable: %s", err)
            break
        calls[f"bitsandbytes Linear4bit nf4+dq, {name} compute, {mode} mode"] = lambda layer=layer, xd=x.to(dtype): layer(xd)
    for label in formats:
        prepared = layout.prepare(QuantizedWeight.quantize(weight, FORMATS[label]))
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            key = f"ours {label} reference path, {name} x"
            calls[key] = lambda xd=x.to(dtype), prepared=prepared: reference.dequant_matmul(xd, prepared)
            sizes[key] = FORMATS[label].storage_bits(tuple(weight.shape)) // 8
    return calls, sizes


def cpu_rows(shape: tuple[int, int], batch: int, formats: list[str], repeats: int) -> list[dict]:
    """One row per method for one shape and batch, on CPU, all timed in one interleaved loop."""
    out_features, in_features = shape
    weight = weight_matrix(out_features, in_features)
    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        calls, sizes = cpu_calls(weight, x, formats)
        seconds = interleaved_medians(calls, repeats)
    best_bnb = min((t for name, t in seconds.items() if name.startswith("bitsandbytes")), default=None)
    return [{"method": name, "seconds": t, "bytes": sizes.get(name), "shape": f"{out_features}x{in_features}",
             "batch": batch, "vs_bnb": (best_bnb / t) if best_bnb else None} for name, t in seconds.items()]


def peak_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=500)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def rotated(tensors: list, fn_of):
    """A callable that uses a different copy of the weight on each call (defeats L2 reuse)."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(tensors)
        return fn_of(tensors[state["i"]])

    return call


def cuda_time_us(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3
    except Exception:  # noqa: BLE001 - graphs fail for some launch paths; plain timing still counts
        return triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3


def cuda_rows(shape: tuple[int, int], batch: int, formats: list[str], peak: float) -> list[dict]:
    out_features, in_features = shape
    device = torch.device("cuda")
    weight = weight_matrix(out_features, in_features)
    x = torch.randn(batch, in_features, device=device, dtype=torch.float16)
    copies = max(2, int((256 << 20) // (weight.numel() * 2)) + 1)  # > 256 MiB of weights in rotation
    dense = [weight.to(device, torch.float16).t().contiguous() for _ in range(min(copies, 4))]
    fp16_us = cuda_time_us(rotated(dense, lambda w: torch.matmul(x, w)))
    rows = [{"method": "torch.matmul fp16", "us": fp16_us, "bytes": weight.numel() * 2}]
    for label in formats:  # quantized on the GPU (device-generic quant/): seconds, not minutes, at 8192x28672
        prepared = layout.prepare(QuantizedWeight.quantize(weight.to(device), FORMATS[label]))
        weights = []
        for _ in range(copies):
            copy = layout.KernelWeight(**vars(prepared))
            for name, value in vars(prepared).items():
                if isinstance(value, torch.Tensor):
                    setattr(copy, name, value.to(device, copy=True))
            weights.append(copy)
        moved = FORMATS[label].storage_bits(shape) // 8 + 2 * batch * (in_features + out_features)
        us = cuda_time_us(rotated(weights, lambda w: dequant_matmul(x, w, backend="triton")))
        rows.append({"method": f"ours {label} triton", "us": us, "bytes": moved})
    for row in rows:
        row.update(shape=f"{out_features}x{in_features}", batch=batch, gbps=row["bytes"] / (row["us"] * 1e-6) / 1e9,
                   floor_pct=100 * (row["bytes"] / peak) / (row["us"] * 1e-6), speedup_vs_fp16=fp16_us / row["us"])
    return rows


def markdown(rows: list[dict], device: str) -> str:
    if device == "cpu":
        lines = ["| shape | M | method | median ms | bnb best / this |", "|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['vs_bnb']:.2f}x" if r["vs_bnb"] else "-"
            lines.append(f"| {r['shape']} | {r['batch']} | {r['method']} | {1e3 * r['seconds']:.2f} | {ratio} |")
    else:
        lines = ["| shape | M | method | median us | GB/s | % of floor | vs fp16 |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['method']} | {r['us']:.1f} | {r['gbps']:.0f} | "
                         f"{r['floor_pct']:.0f}% | {r['speedup_vs_fp16']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", help="comma-separated NxK (out x in)")
    parser.add_argument("--batches", help="comma-separated M")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = (args.shapes or ",".join(CPU_SHAPES if args.device == "cpu" else CUDA_SHAPES)).split(",")
    batches = [int(b) for b in (args.batches or ("1,16" if args.device == "cpu" else "1,16,64")).split(",")]
    formats = args.formats.split(",")
    peak = peak_bandwidth(torch.device("cuda")) if args.device == "cuda" else None
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads" if args.device == "cpu"
              else f"{torch.cuda.get_device_name()}, measured copy bandwidth {peak / 1e9:.0f} GB/s, "
                   f"GEMV autotuning space {os.environ.get('COMPRESS_TRITON_TUNE', 'full')}")
    rows = []
    for shape in shapes:
        out_features, in_features = (int(v) for v in shape.split("x"))
        for batch in batches:
            log.info("%s M=%d", shape, batch)
            if args.device == "cpu":
                rows += cpu_rows((out_features, in_features), batch, formats, args.repeats)
            else:
                rows += cuda_rows((out_features, in_features), batch, formats, peak)
            if args.json:  # after every shape and batch: a run stopped at its time limit keeps what it measured
                Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    print(header + "\n\n" + markdown(rows, args.device))  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
