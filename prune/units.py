"""Structural units of Llama-family decoder layers, the things structured pruning removes whole.

- Attention: a **KV group**, one key/value head with the ``G = heads / kv_heads`` query heads that
  read it, and the o_proj input columns those query heads write. Removing whole groups keeps the
  query-to-KV ratio, so grouped-query attention stays consistent (the upstream LoRAPrune code prunes
  K/V in chunks unrelated to heads under GQA; see algorithms.md §3.4). With MHA a group is one head.
- MLP: an intermediate **channel**, one row of gate_proj and up_proj and one column of down_proj.

Widths are read from the modules themselves, so a layer that is already narrower than the config
says (after a shrink) is described correctly. ``layer_shapes`` gives the projections' shapes of a
layer at any widths from the config's numbers alone (the memory planner's counts use it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
COLUMN_LEAVES = ("o_proj", "down_proj")  # their units are input columns; the others' are output rows


@dataclass(frozen=True)
class LayerUnits:
    """The units of one decoder layer: ``kv_groups`` groups of ``group_heads`` query heads of
    ``head_dim`` each, and ``channels`` MLP channels."""

    index: int
    prefix: str  # e.g. model.layers.3
    kv_groups: int
    group_heads: int
    head_dim: int
    channels: int

    def module(self, leaf: str) -> str:
        return f"{self.prefix}.{'self_attn' if leaf in ATTENTION else 'mlp'}.{leaf}"

    def q_rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Rows of q_proj (and columns of o_proj) that belong to ``groups``, on their device."""
        width = self.group_heads * self.head_dim
        return (groups.view(-1, 1) * width + torch.arange(width, device=groups.device)).flatten()

    def kv_rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Rows of k_proj and v_proj that belong to ``groups``, on their device."""
        return (groups.view(-1, 1) * self.head_dim + torch.arange(self.head_dim, device=groups.device)).flatten()


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name prefix, the decoder layer list) of a Llama-family causal LM."""
    for prefix in ("model.layers", "model.decoder.layers", "transformer.h"):
        try:
            layers = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return prefix, layers
    raise ValueError(f"{type(model).__name__}: no decoder layer list (model.layers) to prune")


def layer_shapes(hidden: int, head_dim: int, group_heads: int, kv_groups: int,
                 channels: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the seven projections of a layer of ``kv_groups`` KV groups of
    ``group_heads`` query heads of ``head_dim`` each and ``channels`` MLP channels, in ATTENTION + MLP
    order."""
    q_width, kv_width = kv_groups * group_heads * head_dim, kv_groups * head_dim
    return {"q_proj": (q_width, hidden), "k_proj": (kv_width, hidden), "v_proj": (kv_width, hidden),
            "o_proj": (hidden, q_width), "gate_proj": (channels, hidden), "up_proj": (channels, hidden),
            "down_proj": (hidden, channels)}


def head_geometry(config) -> tuple[int, int]:
    """(head_dim, query heads per KV head) of a transformers config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim, config.num_attention_heads // config.num_key_value_heads


def _out_in(module: nn.Module) -> tuple[int, int]:
    return module.out_features, module.in_features


def layer_units(model: nn.Module) -> list[LayerUnits]:
    """The units of every decoder layer, from the modules' shapes and the config's head_dim."""
    head_dim, group_heads = head_geometry(model.config)
    prefix, layers = decoder_layers(model)
    units = []
    for index, layer in enumerate(layers):
        q_out, _ = _out_in(layer.self_attn.q_proj)
        k_out, _ = _out_in(layer.self_attn.k_proj)
        if q_out != k_out * group_heads or k_out % head_dim:
            raise ValueError(f"{prefix}.{index}.self_attn: q_proj has {q_out} rows and k_proj {k_out}, "
                             f"not {group_heads} query heads per KV head of size {head_dim}")
        channels, _ = _out_in(layer.mlp.gate_proj)
        units.append(LayerUnits(index, f"{prefix}.{index}", k_out // head_dim, group_heads, head_dim, channels))
    return units


def prunable_layers(num_layers: int, skip_first: float = 0.1, skip_last: int = 1) -> list[int]:
    """Layers that may be pruned: not the first ``floor(skip_first * L)`` nor the last ``skip_last``
    (LoRAPrune's defaults: 10 % and 1)."""
    first = int(skip_first * num_layers)
    return list(range(first, max(first, num_layers - skip_last)))


def attention_unit_scores(units: LayerUnits, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-KV-group totals [kv_groups] of element scores [out, in] of q/k/v (rows) and o (columns);
    each module's vector is L2-normalized before they are summed."""
    groups = units.kv_groups
    parts = []
    for leaf, score in scores.items():
        if leaf in ("q_proj", "k_proj", "v_proj"):
            parts.append(score.reshape(groups, -1).sum(dim=1))
        elif leaf == "o_proj":
            parts.append(score.reshape(score.shape[0], groups, -1).sum(dim=(0, 2)))
    return _normalized_sum(parts, groups)


def mlp_unit_scores(units: LayerUnits, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-channel totals [channels] of gate/up rows and down columns, each L2-normalized."""
    parts = [score.sum(dim=0) if leaf == "down_proj" else score.sum(dim=1)
             for leaf, score in scores.items() if leaf in MLP]
    return _normalized_sum(parts, units.channels)


def _normalized_sum(parts: list[torch.Tensor], size: int) -> torch.Tensor:
    """Sum of the L2-normalized ``parts`` in float64, on their device (the CPU when there are none)."""
    device = parts[0].device if parts else torch.device("cpu")
    total = torch.zeros(size, dtype=torch.float64, device=device)
    for part in parts:
        part = part.double()
        total += part / (torch.linalg.norm(part) + 1e-8)
    return total
