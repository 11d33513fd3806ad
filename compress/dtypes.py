"""The one dtype table: each torch dtype the project stores or computes in, with its safetensors
header code, the name a recipe gives it and the short name adapter storage gives it.

A module of its own, importing nothing of ``compress``, so that model loading (``compress.models.sources``),
checkpoint reading and writing (``compress.checkpoint``) and the planner can all use it without
importing each other. Widths are ``torch.dtype.itemsize``.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dtype:
    """One dtype and its names."""

    torch: torch.dtype
    code: str  # the safetensors header's "dtype"
    recipe: str | None = None  # ``dtype:`` in a recipe, ``compress.load(dtype=...)``
    short: str | None = None  # ``adapter_dtype:`` in an export


# In the safetensors library's Dtype order, widest first: the order it writes a file's tensors in.
TABLE = (
    Dtype(torch.int64, "I64"), Dtype(torch.float64, "F64"), Dtype(torch.float32, "F32", "float32"),
    Dtype(torch.int32, "I32"), Dtype(torch.bfloat16, "BF16", "bfloat16", "bf16"),
    Dtype(torch.float16, "F16", "float16", "fp16"), Dtype(torch.int16, "I16"), Dtype(torch.int8, "I8"),
    Dtype(torch.uint8, "U8"), Dtype(torch.bool, "BOOL"),
)

DTYPES = {d.recipe: d.torch for d in TABLE if d.recipe}
"""Recipe name -> torch dtype: float32, bfloat16, float16."""
RECIPE_DTYPES = tuple(DTYPES)
SAFETENSORS = {d.code: d.torch for d in TABLE}
"""safetensors code -> torch dtype."""
CODES = {d.torch: d.code for d in TABLE}
"""torch dtype -> safetensors code."""
WRITE_RANK = {d.code: rank for rank, d in enumerate(TABLE)}
SHORT = {d.short: d.torch for d in TABLE if d.short}
"""Adapter storage's short name -> torch dtype: bf16, fp16."""
FLOAT_CODES = tuple(d.code for d in TABLE if d.torch.is_floating_point)


def code_bytes(code: str) -> int:
    """Bytes per element of a safetensors code."""
    return SAFETENSORS[code].itemsize
