"""What the GEMV and GEMM kernels do per packed word, read from their PTX for sm_90: no GPU needed.

    python benchmarks/kernel_static.py [--json out.json] [--markdown out.md]

Every variant of the current kernels (``compress.kernels.triton_compile.variants``: GEMV at M = 1 and 4
on CUDA cores and M = 16 through ``tl.dot``, GEMM; uniform 2/3/4/8-bit symmetric and with folded zeros,
NF 2/3/4; fp16 and bf16 activations) and of the kernels at the start of issue 39 (``legacy_kernels.py``,
same formats and dtypes) is compiled for sm_90 by Triton's compiler and bundled ptxas, specialized as a
real launch is (16-byte aligned pointers, sizes divisible by 16). From the PTX of the part that runs once
per tile (the K loop's body; the whole kernel when it has no loop) it counts, per thread:

- ``loads/word``: global load instructions whose address derives from the codes planes, over the
  packed 32-bit words the thread covers per tile (all planes: a 3-bit tile reads 3 words per 32 rows),
  and their widths;
- ``meta/(group, col)``: scale and zero elements a program loads per group and column it covers (a
  load inside a branch of the loop, the GEMM's group-start reload, counts once per group; an
  unconditional one once per tile of the group the program visits);
- ``ALU/weight``: arithmetic PTX instructions (integer, float, conversions; not moves, loads, stores,
  predicates, branches) per weight the thread dequantizes, and of them the int-to-float conversions;
- registers and spill bytes from ``ptxas -v``.
Attribution: every register is traced, through the instructions that define it, to the kernel
parameters its value derives from; a load belongs to the pointer parameter its address derives from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

from compress.kernels import triton_compile as tc  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import legacy_kernels  # noqa: E402

NOT_ALU = ("mov", "ld", "st", "bra", "ret", "red", "atom", "bar", "setp", "selp", "cp", "fence", "membar", "shfl",
           "cvta", "and.pred", "or.pred", "not.pred", "xor.pred")
I2F = re.compile(r"^cvt\.rn\.(f16|f32|bf16)(x2)?\.[su](8|16|32|64)$")
CODES = ("codes_ptr", "codes_hi_ptr")
SCALES = ("scales_ptr", "scale_codes_ptr")  # the old NF kernels read double-quantized scale codes...
ZEROS = ("zeros_ptr", "scale_scales_ptr")  # ...and their second-level scales, the zeros' counterpart


@dataclass
class Line:
    label: str
    opcode: str
    operands: list
    target: str  # branch target label
    address: str = ""  # the global-memory register inside [ ] of a load, store or async copy
    size: int = 0  # bytes of an async copy


def parse(ptx: str) -> list[Line]:
    lines = []
    for raw in ptx.splitlines():
        text = raw.split("//")[0].strip()
        if not text or text.startswith((".", "{", "}", ")")):
            continue
        if text.endswith(":"):
            lines.append(Line(text[:-1], "", [], ""))
            continue
        text = re.sub(r"^@!?%p\d+\s+", "", text).rstrip(";")
        opcode, _, rest = text.partition(" ")
        target = rest.strip() if opcode.startswith("bra") else ""
        address = re.search(r"\[\s*(%rd\d+)", rest)
        size = re.search(r"\],\s*(0x[0-9a-f]+|\d+)", rest) if opcode.startswith("cp.async") else None
        lines.append(Line("", opcode, re.findall(r"%[a-z]+\d+|\w+_param_\d+", rest), target,
                          address.group(1) if address else "", int(size.group(1), 0) if size else 0))
    return lines


def taints(lines: list[Line]) -> dict[str, set[int]]:
    """register -> indices of the kernel parameters its value derives from."""
    taint: dict[str, set[int]] = defaultdict(set)
    for line in lines:
        if not line.opcode or not line.operands or line.opcode.startswith(("st.", "red.", "atom.", "bra")):
            continue
        params = {int(o.rsplit("_", 1)[1]) for o in line.operands if "_param_" in o}
        dst, sources = line.operands[0], line.operands[1:]
        taint[dst] |= params.union(*(taint[s] for s in sources if s.startswith("%")))
    return taint


def spans(lines: list[Line]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The innermost loop (from its head to its last back edge; the whole kernel when there is none)
    and the conditional spans inside it: forward-branch spans, and the out-of-line blocks placed after
    the loop's first back edge (the compiler's home for a branch taken now and then)."""
    labels = {line.label: i for i, line in enumerate(lines) if line.label}
    back_edges, skips = defaultdict(list), []
    for i, line in enumerate(lines):
        if line.target in labels:
            target = labels[line.target]
            if target < i:
                back_edges[target].append(i)
            else:
                skips.append((i, target))
    if not back_edges:
        return (0, len(lines)), []
    head = min(back_edges, key=lambda h: max(back_edges[h]) - h)
    latch, end = min(back_edges[head]), max(back_edges[head])
    return (head, end + 1), skips + [(latch, end + 1)]


def registers(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True).stderr
    used = re.search(r"Used (\d+) registers", log)
    return (int(used.group(1)) if used else -1), sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def width(opcode: str) -> int:
    vector = re.search(r"\.v(\d)", opcode)
    return int(vector.group(1)) if vector else 1


def load_bytes(line: Line) -> int:
    """Bytes one thread's load (or cp.async copy) moves."""
    if line.opcode.startswith("cp.async"):
        return int(line.size)
    bits = re.search(r"\.[bufs](8|16|32|64)$", line.opcode)
    return width(line.opcode) * int(bits.group(1)) // 8


ELEMENT_BYTES = {"*fp16": 2, "*bf16": 2, "*fp32": 4, "*i32": 4, "*u8": 1}


def analyze(variant: tc.Variant, tiles_per_group: int, weights_per_tile: int) -> dict:
    """The counts of the module docstring for one compiled variant."""
    compiled = tc.compile_variant(variant, 90)
    ptx, threads = compiled.asm["ptx"], 32 * variant.options["num_warps"]
    fn = getattr(variant.kernel, "fn", variant.kernel)
    names = [n for n in fn.arg_names if n not in variant.constexprs]  # PTX parameters in order
    lines = parse(ptx)
    taint = taints(lines)
    (start, stop), skips = spans(lines)
    loads = defaultdict(list)  # pointer name -> [(opcode, conditional)]
    alu = i2f = 0
    for i in range(start, stop):
        line = lines[i]
        if line.opcode.startswith("ld.global") or (line.opcode.startswith("cp.async") and line.size):
            pointers = [names[p] for p in taint.get(line.address, set()) if p < len(names) and names[p].endswith("_ptr")]
            conditional = any(a < i < b for a, b in skips)
            for name in pointers or ["?"]:
                loads[name].append((line, conditional))
        elif line.opcode and not line.opcode.startswith(NOT_ALU):
            alu += 1
            i2f += bool(I2F.match(line.opcode))
    code_loads = [line for name in CODES for line, _ in loads[name]]
    words = variant.words_per_program / threads
    def per_group_column(names):  # elements one program loads per (group, column)
        return sum(load_bytes(line) / ELEMENT_BYTES[variant.types[name]] * (1 if conditional else tiles_per_group)
                   for name in names for line, conditional in loads[name]) * threads / variant.columns

    regs, spills = registers(ptx)
    per_weight = threads / weights_per_tile
    return {"variant": variant.name, "loads_per_word": len(code_loads) / words,
            "load_widths": sorted({f"{load_bytes(line)} B" for line in code_loads}),
            "scales_per_group_column": per_group_column(SCALES), "zeros_per_group_column": per_group_column(ZEROS),
            "alu_per_weight": alu * per_weight, "i2f_per_weight": i2f * per_weight, "registers": regs, "spills": spills}


def legacy_variant(label: str, dtype: str, block_m: int | None) -> tc.Variant:
    """The old kernel of the same family, format and dtype, at the old quick space's common tile."""
    meta, group = tc.FORMATS[label]
    nf = meta["FORMAT"] == 1
    zero_mode = 2 if meta["BITS"] == 3 and meta["FOLDED"] else int(meta["FOLDED"])
    types = dict(tc.POINTERS, **tc.INTEGERS, zeros_ptr="*u8" if zero_mode == 2 else "*i32", scale_codes_ptr="*u8",
                 scale_scales_ptr="*fp32", offset_ptr="*fp32", x_ptr=f"*{dtype}", out_ptr="*fp32" if block_m else f"*{dtype}")
    block_k, block_n = (64, 128) if block_m else (64, 128)
    constexprs = dict(FORMAT=meta["FORMAT"], BITS=meta["BITS"], ZERO_MODE=zero_mode, USE_GIDX=False,
                      GROUP_ALIGNED=group % block_k == 0, LEVELS=255 if nf else 1, NF_BLOCK=64 if nf else 1,
                      SCALE_BLOCK=256 if nf else 1, BLOCK_N=block_n, BLOCK_K=block_k)
    if block_m:
        kernel, options = legacy_kernels.legacy_gemv_kernel, {"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True}
        constexprs.update(BLOCK_M=block_m, SPLIT_K=1)
        name = f"old gemv {label} {dtype} M={block_m}"
    else:
        kernel, options = legacy_kernels.legacy_gemm_kernel, {"num_warps": 8, "num_stages": 3, "enable_fp_fusion": True}
        constexprs.update(BLOCK_M=128, GROUP_M=8, DOT_FP32=False)
        name = f"old gemm {label} {dtype}"
    return tc.Variant(name, kernel, types, constexprs, options, tc._words(meta["BITS"], block_k, block_n), block_n)


def pairs(formats, dtypes, block_ms):
    """(family, format, dtype, new variant, its tiles per group, old variant, its tiles per group)."""
    for label in formats:
        group = tc.FORMATS[label][1]
        for dtype in dtypes:
            for block_m in (*block_ms, None):
                new = tc.gemv_variant(label, dtype, block_m) if block_m else tc.gemm_variant(label, dtype)
                old = legacy_variant(label, dtype, block_m)
                family = f"GEMV M={block_m}" if block_m else "GEMM"
                yield family, label, dtype, new, 1 if block_m else group // new.constexprs["BLOCK_K"], old, group // 64


def measure(formats=tuple(tc.FORMATS), dtypes=("fp16", "bf16"), block_ms=(1, 4, 16)) -> list[dict]:
    rows = []
    for family, label, dtype, new, new_tiles, old, old_tiles in pairs(formats, dtypes, block_ms):
        row = {"family": family, "format": label, "dtype": dtype}
        for which, variant, tiles in (("old", old, old_tiles), ("new", new, new_tiles)):
            weights = variant.constexprs["BLOCK_K"] * variant.columns
            row[which] = analyze(variant, tiles, weights)
        rows.append(row)
        print(f"{family} {label} {dtype}: loads/word {row['old']['loads_per_word']:.2f} -> {row['new']['loads_per_word']:.2f}",
              file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| kernel | format | x | loads / word (old → new) | new load width | scale loads / (group, col) (old → new) "
           "| zero loads / (group, col) (old → new) | ALU / weight (old → new) | int→float / weight (old → new) "
           "| registers (old → new) | spills (old → new) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, n = r["old"], r["new"]
        out.append(f"| {r['family']} | {r['format']} | {r['dtype']} | {o['loads_per_word']:.2f} → {n['loads_per_word']:.2f} | "
                   f"{', '.join(n['load_widths'])} | {o['scales_per_group_column']:.0f} → {n['scales_per_group_column']:.0f} | "
                   f"{o['zeros_per_group_column']:.0f} → {n['zeros_per_group_column']:.0f} | "
                   f"{o['alu_per_weight']:.2f} → {n['alu_per_weight']:.2f} | {o['i2f_per_weight']:.2f} → {n['i2f_per_weight']:.2f} | "
                   f"{o['registers']} → {n['registers']} | {o['spills']} → {n['spills']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--formats", default=",".join(tc.FORMATS))
    parser.add_argument("--dtypes", default="fp16,bf16")
    args = parser.parse_args()
    rows = measure(tuple(args.formats.split(",")), tuple(args.dtypes.split(",")))
    table = markdown(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)  # noqa: T201 - the table is the script's output


if __name__ == "__main__":
    main()
