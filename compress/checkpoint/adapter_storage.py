"""How LoRA adapter weights are stored (export's ``adapter_dtype``), so that a checkpoint's bits
per parameter count its adapters as they are on disk (issue 23).

| adapter_dtype | in memory after export      | native (``adapters: embed``)              | PEFT adapter            |
|---------------|-----------------------------|--------------------------------------------|-------------------------|
| (none)        | unchanged                   | as held (fp32)                             | as held                 |
| ``bf16``      | rounded to bfloat16 values  | bfloat16 tensors                           | bfloat16 tensors        |
| ``fp16``      | rounded to float16 values   | float16 tensors                            | float16 tensors         |
| ``nf8``       | rounded to NF8 (``NF8``)    | packed NF8: ``x.lora_A.nf8.codes`` etc.    | the NF8 values in fp32  |

NF8 is LQ-LoRA's adapter format: 8-bit NormalFloat codes in blocks of 64 with double-quantized
scales (8-bit, blocks of 256, fp32 second level): ``lowrank.NF8_BITS`` bits per weight. The
in-memory adapters are rounded first, so the reloaded checkpoint gives the in-memory logits exactly.
PEFT has no packed NF8 tensors, so a PEFT adapter holds the NF8-rounded values dequantized (fp32),
and the export report says so. Loading restores adapter weights in fp32 (``restore``).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.quant import QuantConfig, QuantizedWeight, check_tensors

from ..dtypes import SHORT
from ..errors import CheckpointError, brief

ADAPTER_DTYPES = ("nf8", *SHORT)
NF8 = QuantConfig.nf(8, block=64, scale_bits=8, scale_block=256, scale_dtype="float32")
CASTS = SHORT
LEAVES = ("lora_A", "lora_B")


def rounded(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """``weight`` as it will be stored, in its own dtype."""
    if dtype == "nf8":
        return QuantizedWeight.quantize(weight.float(), NF8).dequantize(weight.dtype)
    return weight.to(CASTS[dtype]).to(weight.dtype)


@torch.no_grad()
def round_adapters(layers: dict[str, nn.Module], dtype: str | None) -> None:
    """Round every adapter weight of ``layers`` (name -> LoRALinear) in place to ``dtype``."""
    if dtype is None:
        return
    for layer in layers.values():
        for leaf in LEAVES:
            weight = getattr(layer, leaf).weight
            weight.copy_(rounded(weight, dtype))


def stored_tensors(tensors: dict[str, torch.Tensor], dtype: str | None, peft: bool = False) -> dict:
    """A state dict with its ``*.lora_A.weight`` / ``*.lora_B.weight`` in their stored form."""
    if dtype is None:
        return tensors
    out = {}
    for key, tensor in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight" or not prefix.endswith(LEAVES):
            out[key] = tensor
        elif dtype in CASTS:
            out[key] = tensor.to(CASTS[dtype])
        elif peft:
            out[key] = tensor.float()
        else:
            packed = QuantizedWeight.quantize(tensor.float(), NF8)
            out.update({f"{prefix}.nf8.{name}": t for name, t in packed.tensors.items()})
    return out


def restore(tensors: dict[str, torch.Tensor], adapters: dict[str, dict], path) -> dict[str, torch.Tensor]:
    """The fp32 ``x.lora_A.weight`` / ``x.lora_B.weight`` of every adapter, from their stored form
    (``adapters``: the manifest's entries: ``rank``, ``in_features``, ``out_features``, ``dtype``)."""
    out = dict(tensors)
    for name, spec in adapters.items():
        shapes = {"lora_A": (int(spec["rank"]), int(spec["in_features"])),
                  "lora_B": (int(spec["out_features"]), int(spec["rank"]))} if "in_features" in spec else {}
        for leaf in LEAVES:
            prefix = f"{name}.{leaf}"
            if spec.get("dtype") == "nf8":
                packed = {k.removeprefix(f"{prefix}.nf8."): out.pop(k) for k in list(out) if k.startswith(f"{prefix}.nf8.")}
                try:
                    check_tensors(packed, NF8, shapes[leaf])
                except (ValueError, KeyError) as err:
                    raise CheckpointError(f"{path}: {prefix} (NF8 adapter): {brief(err)}") from None
                out[f"{prefix}.weight"] = QuantizedWeight(NF8, shapes[leaf], packed).dequantize(torch.float32)
            elif f"{prefix}.weight" in out:
                out[f"{prefix}.weight"] = out[f"{prefix}.weight"].float()
    return out
