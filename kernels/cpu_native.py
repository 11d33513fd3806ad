"""The CPU fast path: our AVX512-BF16 / AMX kernel (``csrc/cpu_woq.cpp``), built on first use.

Which formats: uniform grids of at most 16 levels (2, 3 and 4 bits, symmetric, integer or float
zeros, act order included: rows are sorted by group once and x is gathered) and NF codebooks of 2, 3
and 4 bits, through a table of their values; uniform 8-bit as signed 8-bit codes. 2-bit codes are
stored at 2 bits, 3- and 4-bit codes at 4 (a 3-bit layout measured slower: ``csrc/cpu_woq_expand.h``).
Groups must be whole load units (4 rows at 2 bits, 2 otherwise; NF: blocks that tile the rows,
``K % block == 0``).

Numerics, stated once: activations are rounded to bf16 (a no-op for bf16 input); each product of a
bf16 activation and a table value is exact in fp32 and summed in fp32 over a group, then scaled by the
fp32 group scale and shifted by the folded zero ``zs = -(z - z0) * s`` times the group's sum of x.
For uniform codes the table holds the integers ``q - z0`` exactly, so the only rounding besides fp32
summation is the activations' own (none for bf16); NF codebook values are rounded to bf16 (2^-9
relative), as a bf16 model's weights are. The output is rounded to x's dtype.

Layout (built once per matrix by ``native_layout`` and cached on the ``KernelWeight``; the packed
checkpoint tensors stay as they are): codes in column blocks of 64 outputs ``[N/64, units, 64 or
128]`` (the table of layouts is in ``csrc/cpu_woq_expand.h``); scales and zero points in the same
column blocks ``[N/64, G, 64]``, so that a block is one stream of codes and one of metadata. N is
padded to 64 and K to whole groups with zero codes (padded x is zero). Per matrix this adds the
repacked codes (one more copy of the packed weight, 3-bit codes at 4 bits) and 2-6 bytes per group and
column.

Building: ``c++`` (``$CXX``) compiles the source against the installed torch into
``$COMPRESS_CACHE/kernels`` (default ``~/.cache/compress/kernels``), keyed by the source, the torch
version and the flags; a few seconds, once per machine. No compiler, or a CPU without AVX512-BF16:
the dispatcher says so and uses the next path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .layout import KernelWeight, nf_block_scales, row_groups

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_woq.cpp"
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("cpu_features.h", "cpu_woq_expand.h"))
BLOCK_N = 64
STORED_BITS = {2: 2, 3: 4, 4: 4, 8: 8}  # code width -> width stored (3-bit as 4: see csrc/cpu_woq_expand.h)
UNIT_PAIRS = {2: 2, 4: 1, 8: 1}  # row pairs per load unit, by stored width
TILE_K = 32


class NativeUnavailable(RuntimeError):
    """The native CPU kernel cannot be built or run here (the message says why)."""


@dataclass
class NativeLayout:
    codes: torch.Tensor  # uint8 [N/64, units, 64 or 128] (csrc/cpu_woq_expand.h)
    scales: torch.Tensor  # [N/64, G, 64]: fp16 (uniform, as stored) or fp32 (NF block scales, double quantization undone)
    zeros: torch.Tensor | None  # fp16 [N/64, G, 64] zero points (integers are exact), None when every zero is z0
    z0: float  # the zero the table subtracts: 2^(b-1) (uniform), 0 (nf)
    lut: torch.Tensor  # int16 [32]: bf16 bits of the 16 table values, twice
    perm: torch.Tensor | None  # int64 [K]: x's columns in the codes' row order (act order)
    bits: int  # 2, 4 or 8: width of the stored codes
    group: int
    out_features: int


def cache_root() -> Path:
    root = os.environ.get("COMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "compress")
    return Path(root) / "kernels"


def _compile_command(output: Path) -> list[str]:
    from torch.utils import cpp_extension

    libdir = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    return [os.environ.get("CXX", "c++"), "-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *includes, str(SOURCE), f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}", "-o", str(output)]


def build() -> Path:
    """The compiled library, built now if the cache has no copy for this source and torch."""
    key = hashlib.sha256(SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS) + torch.__version__.encode() + " ".join(
        _compile_command(Path("x"))).encode()).hexdigest()[:16]
    target = cache_root() / f"cpu_woq-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    log.info("building the native CPU kernel (%s): a few seconds, once", SOURCE.name)
    try:
        result = subprocess.run(_compile_command(Path(staging)), capture_output=True, text=True)
    except OSError as err:
        Path(staging).unlink(missing_ok=True)
        raise NativeUnavailable(f"no C++ compiler ({err.strerror}: {os.environ.get('CXX', 'c++')})") from None
    if result.returncode:
        Path(staging).unlink(missing_ok=True)
        raise NativeUnavailable("the native CPU kernel did not compile: " + result.stderr.strip()[-400:])
    os.replace(staging, target)  # atomic: a concurrent build writes the same bytes
    return target


@functools.lru_cache(maxsize=1)  # one load per process: the library registers the compress_cpu ops
def load() -> tuple[bool, bool]:
    """(AVX512-BF16, AMX) of this CPU, after loading the library; NativeUnavailable if it cannot be."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        raise NativeUnavailable(f"the native CPU kernel is for x86-64 Linux, not {sys.platform}/{os.uname().machine}")
    torch.ops.load_library(str(build()))
    torch.library.register_fake("compress_cpu::woq_linear")(_fake_woq_linear)  # torch.compile traces through it
    avx512bf16, amx = (bool(v) for v in torch.ops.compress_cpu.cpu_features())
    return avx512bf16, amx


def _fake_woq_linear(x, codes, scales, zeros, lut, perm, bias, bits, group, z0, out_features):
    return x.new_empty(x.shape[0], out_features)


@functools.lru_cache(maxsize=1)
def availability() -> tuple[bool, str]:
    """(usable, why): whether this machine runs the native kernel, said in one line."""
    try:
        avx512bf16, amx = load()
    except NativeUnavailable as err:
        return False, str(err)
    if not avx512bf16:
        return False, "this CPU has no AVX512-BF16"
    return True, "AVX512-BF16" + (" + AMX tiles for M > 4" if amx else "")


def _bf16_bits(values: torch.Tensor) -> torch.Tensor:
    """The 32-entry table: the 2^b values repeated (VPERMW reads 5 index bits; the kernel leaves the
    neighbouring fields' bits above the field)."""
    return values.to(torch.bfloat16)[torch.arange(32) % values.numel()].view(torch.int16)


def _pad(tensor: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, columns - tensor.shape[1], 0, rows - tensor.shape[0]))


def _fields_to_runs(fields: torch.Tensor, width: int) -> torch.Tensor:
    """[NB, units, F, 32] fields of ``width`` bits -> uint8 [NB, units, 64]: word l of a unit holds
    field f at bits [width * f, width * (f + 1))."""
    words = sum(fields[:, :, f].to(torch.int32) << (width * f) for f in range(fields.shape[2]))
    words = torch.where(words >= 2**15, words - 2**16, words).to(torch.int16)
    return words.contiguous().view(torch.uint8)


def _split(codes: torch.Tensor, pairs: int) -> torch.Tensor:
    """uint8 [Kp, Np] -> [NB, units, pairs * 4, 32]: field 4u + t of word l = the code of row
    2(pairs * unit + u) + (l & 1), column 16t + (l >> 1) of the block (cpu_woq_expand.h)."""
    rows, columns = codes.shape
    view = codes.view(rows // (2 * pairs), pairs, 2, columns // BLOCK_N, 4, 16)  # [unit, u, r, NB, t, c]
    return view.permute(3, 0, 1, 4, 5, 2).reshape(columns // BLOCK_N, rows // (2 * pairs), pairs * 4, 32)


def _block_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [Kp, Np] codes -> the kernel's column blocks at ``bits`` stored bits."""
    rows, columns = codes.shape
    if bits in (2, 4):
        return _fields_to_runs(_split(codes, UNIT_PAIRS[bits]), bits)
    signed = torch.stack([codes[0::2], codes[1::2]], dim=2).view(torch.int8) ^ -128  # code - 128 of both rows
    pairs = signed.view(torch.uint8).reshape(rows // 2, columns // BLOCK_N, 2 * BLOCK_N)
    return pairs.permute(1, 0, 2).contiguous()


def _block_meta(meta: torch.Tensor, padded_n: int) -> torch.Tensor:
    """[G, N] -> [N/64, G, 64]: a column block's scales (or zeros) contiguous, read as one stream."""
    groups = meta.shape[0]
    return _pad(meta, groups, padded_n).view(groups, padded_n // BLOCK_N, BLOCK_N).permute(1, 0, 2).contiguous()


def native_layout(weight: KernelWeight) -> NativeLayout | str:
    """The kernel layout of a packed matrix, or why the kernel cannot take it."""
    from .reference import _zeros, unpack_rows

    load()  # the kernel's ops exist once a layout does
    out_features, in_features = weight.shape
    if weight.codebook:
        if weight.bits > 4:
            return f"nf{weight.bits}: the table path takes up to 16 codebook values"
        if in_features % weight.block or weight.block % 2:
            return f"nf blocks of {weight.block} do not tile rows of {in_features}"
        group, order, z0 = weight.block, None, 0.0
        blocks = (torch.arange(out_features).view(1, -1) * (in_features // group)
                  + torch.arange(in_features // group).view(-1, 1))
        scales, zeros, table = nf_block_scales(weight, blocks.to(weight.device)), None, weight.lut
    else:
        found = row_groups(weight, TILE_K)
        if isinstance(found, str):
            return found
        group, order = found
        z0 = float(2 ** (weight.bits - 1))
        scales = weight.scales if weight.scales.dtype == torch.float16 else weight.scales.float()  # bf16 after model.to
        zeros = None if weight.zero_mode == 0 else _zeros(weight, slice(None)).half()  # exact: integers <= 256 or fp16
        table = torch.arange(2**weight.bits, dtype=torch.float32) - z0 if weight.bits < 8 else torch.zeros(1)
    bits = STORED_BITS[weight.bits]
    if group % (2 * UNIT_PAIRS[bits]):
        return f"groups of {group} rows: {bits}-bit codes load {2 * UNIT_PAIRS[bits]} rows at a time"
    codes = unpack_rows(weight, 0, in_features)
    if order is not None:
        codes = codes[order]
    padded_k = scales.shape[0] * group
    padded_n = -(-out_features // BLOCK_N) * BLOCK_N
    return NativeLayout(
        codes=_block_codes(_pad(codes, padded_k, padded_n), bits), scales=_block_meta(scales, padded_n),
        zeros=None if zeros is None else _block_meta(zeros, padded_n), z0=z0,
        lut=_bf16_bits(table.cpu()), perm=order, bits=bits, group=group, out_features=out_features)


def matmul(x: torch.Tensor, layout: NativeLayout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for x [..., K] (bf16, fp16 or fp32) in x's dtype (no autograd)."""
    flat = x.reshape(-1, x.shape[-1])
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.ops.compress_cpu.woq_linear(flat, layout.codes, layout.scales, layout.zeros, layout.lut, layout.perm,
                                            None if bias is None else bias.float(), layout.bits, layout.group,
                                            layout.z0, layout.out_features)
    return out.view(*x.shape[:-1], layout.out_features)
