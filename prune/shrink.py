"""Physical shrink: remove pruned units from the weights, merging any LoRA adapter first.

For each layer, q/k/v keep the rows of the kept KV groups and o_proj the matching input columns;
gate/up keep the rows of the kept channels and down_proj the matching columns. A ``LoRALinear`` over
a dense base is merged (W0 + s B A, sliced the same way: slicing rows of the merge equals merging
the sliced B). The masked model and the shrunk model compute the same function: a masked KV group
has zero queries, keys and values, so it adds nothing to o_proj; a masked channel is silu(0) * 0.

When every layer ends with the same widths the model's config is updated (heads, KV heads,
intermediate size, explicit head_dim), so the result is a standard checkpoint; otherwise the
per-layer widths travel with the model (``layer_widths``) and only the native format can hold it.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.lowrank import LoRALinear, set_module

from .units import ATTENTION, MLP, LayerUnits, decoder_layers, head_geometry, layer_shapes, layer_units


def _dense(module: nn.Module) -> nn.Linear:
    if isinstance(module, LoRALinear):
        if not isinstance(module.base_layer, nn.Linear):
            raise ValueError(f"cannot shrink a {type(module.base_layer).__name__} base: prune before quantizing")
        return module.merged_linear(module.base_layer.weight.dtype)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"cannot shrink a {type(module).__name__}: prune before quantizing")
    return module


def sliced_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the selected rows (outputs) and columns (inputs) of ``module``, on
    its device (the indices go there, wherever they were computed)."""
    dense = _dense(module)
    weight = dense.weight.detach()
    rows = rows.to(weight.device) if rows is not None else None
    cols = cols.to(weight.device) if cols is not None else None
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = dense.bias.detach() if dense.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows]
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def shrink_layer(model: nn.Module, unit: LayerUnits, groups: torch.Tensor, channels: torch.Tensor) -> None:
    """Keep the KV groups and MLP channels marked True (boolean vectors) in one decoder layer."""
    if not bool(groups.any()) or not bool(channels.any()):
        raise ValueError(f"{unit.prefix}: cannot remove every KV group or every channel")
    kept_groups = torch.nonzero(groups).flatten()
    q_rows, kv_rows = unit.q_rows(kept_groups), unit.kv_rows(kept_groups)
    kept_channels = torch.nonzero(channels).flatten()
    plan = {"q_proj": (q_rows, None), "k_proj": (kv_rows, None), "v_proj": (kv_rows, None),
            "o_proj": (None, q_rows), "gate_proj": (kept_channels, None), "up_proj": (kept_channels, None),
            "down_proj": (None, kept_channels)}
    for leaf in ATTENTION + MLP:
        name = unit.module(leaf)
        set_module(model, name, sliced_linear(model.get_submodule(name), *plan[leaf]))


def layer_widths(model: nn.Module) -> dict[int, dict[str, int]]:
    """{layer: {"kv_groups", "channels"}} of the layers whose widths differ from the config's."""
    config = model.config
    widths = {}
    for unit in layer_units(model):
        if unit.kv_groups != config.num_key_value_heads or unit.channels != config.intermediate_size:
            widths[unit.index] = {"kv_groups": unit.kv_groups, "channels": unit.channels}
    return widths


def update_config(model: nn.Module) -> bool:
    """Write uniform widths into the config; returns False (config unchanged) when layers differ."""
    units = layer_units(model)
    if len({(u.kv_groups, u.channels) for u in units}) != 1:
        return False
    config, unit = model.config, units[0]
    config.head_dim = unit.head_dim
    config.num_key_value_heads = unit.kv_groups
    config.num_attention_heads = unit.kv_groups * unit.group_heads
    config.intermediate_size = unit.channels
    _, layers = decoder_layers(model)
    for layer in layers:  # keep module attributes derived from the config consistent
        layer.self_attn.config = config
        layer.mlp.intermediate_size = unit.channels
    return True


def resize_layers(model: nn.Module, widths: dict) -> None:
    """Give the dense linears of the listed layers their pruned shapes (on the meta device), so that a
    checkpoint of a non-uniformly pruned model loads into a model built from the original config."""
    head_dim, group_heads = head_geometry(model.config)
    prefix, _ = decoder_layers(model)
    for index, width in widths.items():
        shapes = layer_shapes(model.config.hidden_size, head_dim, group_heads, width["kv_groups"], width["channels"])
        for leaf, (out_features, in_features) in shapes.items():
            name = f"{prefix}.{index}.{'self_attn' if leaf in ATTENTION else 'mlp'}.{leaf}"
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear):
                set_module(model, name, nn.Linear(in_features, out_features, bias=module.bias is not None,
                                                  device="meta", dtype=module.weight.dtype))
