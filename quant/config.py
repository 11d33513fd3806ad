"""Quantization configurations and their exact storage cost.

Two families, one frozen dataclass:

- ``uniform``: group-wise affine integers along the input dimension (GPTQ layout): ``bits`` in
  {2, 3, 4, 8}, ``group_size`` weights per fp16 scale (``-1`` = one group per output channel),
  ``sym`` (symmetric: the zero point is the constant 2^(bits-1) and is not counted as storage),
  ``float_zero`` (asymmetric with an fp16 zero point per group instead of a packed integer one: what
  L4Q learns; the ``native`` format only, since GPTQ stores integer zeros).
- ``nf``: NormalFloat codebook (QLoRA / LQ-LoRA) over row-major blocks of ``block`` weights, with
  the per-block absmax scales themselves quantized to ``scale_bits`` unsigned integers in groups of
  ``scale_block``, whose scales are stored in ``scale_dtype`` (double quantization).

Bits per parameter, as the papers count them (codes + scales + zeros):

    uniform: bits + 16 / group + (bits / group if asym)      int4 g128 asym = 4.15625
             (16 / group for an fp16 zero instead)           int4 g128 float zero = 4.25
    nf:      bits + scale_bits / block + dtype_bits / (block * scale_block)
             NF4, 8-bit scales over 64, fp32 over 256 = 4.127
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = {"float16": 16, "bfloat16": 16, "float32": 32}
UNIFORM_SCALE_BITS = 16  # GPTQ stores fp16 scales
PACK_WORD_CODES = 32  # codes are bit-stream packed in runs of 32 (b int32 words per run)


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class QuantConfig:
    """One matrix's quantization configuration. Build with ``uniform(...)`` or ``nf(...)``."""

    kind: str
    bits: int
    group_size: int = 128
    sym: bool = False
    float_zero: bool = False
    block: int = 64
    scale_bits: int = 8
    scale_block: int = 256
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "nf"):
            raise ValueError(f"kind: {self.kind!r} is not one of uniform, nf")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits: {self.bits} is not one of 2, 3, 4, 8")
        if self.kind == "uniform":
            if self.group_size != -1 and self.group_size < 1:
                raise ValueError(f"group_size: {self.group_size} must be -1 (per channel) or positive")
            if self.float_zero and self.sym:
                raise ValueError("float_zero: a symmetric config has no zero point to store")
        else:
            if self.float_zero:
                raise ValueError("float_zero: only uniform configs have zero points")
            if self.block < 1 or self.scale_block < 1:
                raise ValueError("block and scale_block must be positive")
            if self.scale_bits not in SUPPORTED_BITS:
                raise ValueError(f"scale_bits: {self.scale_bits} is not one of 2, 3, 4, 8")
            if self.scale_dtype not in SCALE_DTYPES:
                raise ValueError(f"scale_dtype: {self.scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}")

    # construction -------------------------------------------------------------------------
    @classmethod
    def uniform(cls, bits: int, group_size: int = 128, sym: bool = False, float_zero: bool = False) -> "QuantConfig":
        return cls(kind="uniform", bits=bits, group_size=group_size, sym=sym, float_zero=float_zero)

    @classmethod
    def nf(cls, bits: int, block: int = 64, scale_bits: int = 8, scale_block: int = 256,
           scale_dtype: str = "float32") -> "QuantConfig":
        return cls(kind="nf", bits=bits, block=block, scale_bits=scale_bits,
                   scale_block=scale_block, scale_dtype=scale_dtype)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        kind = d.pop("type", d.pop("kind", "uniform"))
        if kind == "uniform":
            return cls.uniform(**d)
        return cls.nf(**d)

    def to_dict(self) -> dict:
        if self.kind == "uniform":
            fields = {"type": "uniform", "bits": self.bits, "group_size": self.group_size, "sym": self.sym}
            return {**fields, "float_zero": True} if self.float_zero else fields
        return {"type": "nf", "bits": self.bits, "block": self.block, "scale_bits": self.scale_bits,
                "scale_block": self.scale_block, "scale_dtype": self.scale_dtype}

    def replace(self, **changes) -> "QuantConfig":
        d = asdict(self)
        d.update(changes)
        return QuantConfig(**d)

    @property
    def name(self) -> str:
        if self.kind == "uniform":
            group = "ch" if self.group_size == -1 else f"g{self.group_size}"
            return f"int{self.bits}-{group}-{'sym' if self.sym else 'fzero' if self.float_zero else 'asym'}"
        return f"nf{self.bits}-b{self.block}-s{self.scale_bits}x{self.scale_block}-{self.scale_dtype}"

    # storage --------------------------------------------------------------------------------
    @property
    def _zero_bits(self) -> int:
        return UNIFORM_SCALE_BITS if self.float_zero else self.bits

    def groups(self, in_features: int) -> int:
        """Number of scale groups along the input dimension (uniform)."""
        size = in_features if self.group_size == -1 else self.group_size
        return -(-in_features // size)

    @property
    def bits_per_param(self) -> float:
        """Nominal bits per weight for shapes that divide evenly. Per-channel scales cost
        16 / in_features, which depends on the shape: use ``storage_bits`` for a real matrix."""
        if self.kind == "uniform":
            if self.group_size == -1:
                return float(self.bits)
            zeros = 0.0 if self.sym else self._zero_bits / self.group_size
            return self.bits + UNIFORM_SCALE_BITS / self.group_size + zeros
        return (self.bits + self.scale_bits / self.block
                + SCALE_DTYPES[self.scale_dtype] / (self.block * self.scale_block))

    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Exact bits stored for an (out_features, in_features) matrix, padding included:
        codes + scales + zeros (asym) for uniform; codes + scale codes + second-level scales +
        the fp32 offset for nf. Equal to the bytes of the packed tensors times 8."""
        out_features, in_features = shape
        if self.kind == "uniform":
            groups = self.groups(in_features)
            codes = _padded(in_features, PACK_WORD_CODES) * self.bits * out_features
            scales = groups * out_features * UNIFORM_SCALE_BITS
            if self.float_zero:
                return codes + scales + groups * out_features * UNIFORM_SCALE_BITS
            zeros = 0 if self.sym else groups * _padded(out_features, PACK_WORD_CODES) * self.bits
            return codes + scales + zeros
        numel = out_features * in_features
        blocks = -(-numel // self.block)
        scale_groups = -(-blocks // self.scale_block)
        return (_padded(numel, PACK_WORD_CODES) * self.bits
                + _padded(blocks, PACK_WORD_CODES) * self.scale_bits
                + scale_groups * SCALE_DTYPES[self.scale_dtype] + 32)


def fits_gptq(shape: tuple[int, int]) -> str | None:
    """Why an (out, in) matrix cannot be held by the GPTQ layout, or None if it can."""
    out_features, in_features = shape
    bad = [f"{name}={n} is not a multiple of 32" for name, n in
           (("in_features", in_features), ("out_features", out_features)) if n % 32]
    return "; ".join(bad) or None


def effective_group(config: QuantConfig, in_features: int) -> int:
    return in_features if config.group_size == -1 else config.group_size
