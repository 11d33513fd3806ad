"""LoRAM's recovery: LoRA factors trained on a pruned model, scattered back to the original shapes.

A factor has a pruned axis only where the module's pruned dimension is: rows of ``lora_B`` for
q/k/v (the kept KV groups' rows) and gate/up (kept channels), columns of ``lora_A`` for o_proj and
down_proj (their inputs). Those are zero-filled at the removed positions; the other factor is
copied. So the recovered update s B A is exactly zero on removed neurons and equals the trained
update on kept ones (LoRAM's default ``zeroA`` recovery).
"""

from __future__ import annotations

import torch

from .units import LayerUnits

ROW_PRUNED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # lora_B rows
COLUMN_PRUNED = ("o_proj", "down_proj")  # lora_A columns


def kept_positions(unit: LayerUnits, leaf: str, removed: dict,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices, in the original layer, of the rows (q/k/v/gate/up) or columns (o/down) that were kept,
    on ``device``. ``removed`` is {"kv_groups": [...], "channels": [...]} of the original ``unit``."""
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        gone = set(removed.get("channels", []))
        return torch.tensor([c for c in range(unit.channels) if c not in gone], dtype=torch.long, device=device)
    gone = set(removed.get("kv_groups", []))
    groups = torch.tensor([g for g in range(unit.kv_groups) if g not in gone], dtype=torch.long, device=device)
    return unit.kv_rows(groups) if leaf in ("k_proj", "v_proj") else unit.q_rows(groups)


def recover_factors(leaf: str, lora_a: torch.Tensor, lora_b: torch.Tensor, kept: torch.Tensor,
                    shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of the original ``shape`` [out, in] from the small model's factors, on
    their device (``kept`` goes there too)."""
    out_features, in_features = shape
    rank = lora_a.shape[0]
    if leaf in ROW_PRUNED:
        if lora_b.shape[0] != kept.numel() or lora_a.shape[1] != in_features:
            raise ValueError(f"{leaf}: factors {list(lora_b.shape)} x {list(lora_a.shape)} do not match "
                             f"{kept.numel()} kept rows of [{out_features}x{in_features}]")
        full_b = torch.zeros(out_features, rank, dtype=lora_b.dtype, device=lora_b.device)
        full_b[kept.to(lora_b.device)] = lora_b
        return lora_a.clone(), full_b
    if leaf in COLUMN_PRUNED:
        if lora_a.shape[1] != kept.numel() or lora_b.shape[0] != out_features:
            raise ValueError(f"{leaf}: factors {list(lora_b.shape)} x {list(lora_a.shape)} do not match "
                             f"{kept.numel()} kept columns of [{out_features}x{in_features}]")
        full_a = torch.zeros(rank, in_features, dtype=lora_a.dtype, device=lora_a.device)
        full_a[:, kept.to(lora_a.device)] = lora_a
        return full_a, lora_b.clone()
    return lora_a.clone(), lora_b.clone()  # an unpruned module (lm_head): unchanged
