"""Output masks during pruning-aware training: a pruned unit's outputs are multiplied by zero.

As in LoRAPrune, the masks sit on the outputs of q/k/v (whole KV groups) and gate/up (channels); the
o_proj and down_proj inputs that those outputs feed are then zero as well, so their masks are not
needed. The base weights stay in place until ``shrink``; training with the masks on lets the
adapters compensate. Masks are forward hooks (the modules are not replaced) and a plain
``{layer: (kept groups, kept channels)}`` state that checkpoints and ``--resume`` carry. The masks
live on the device of their layer's q_proj (a state loaded on the host moves there), and each hook
scales an output with its vector on the output's device.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.lowrank.lora import module_device

from .units import LayerUnits


class OutputMasks:
    def __init__(self, model: nn.Module, units: list[LayerUnits]):
        self.model = model
        self.units = {u.index: u for u in units}
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for u in units:
            device = self._device(u)
            self.kept[u.index] = (torch.ones(u.kv_groups, dtype=torch.bool, device=device),
                                  torch.ones(u.channels, dtype=torch.bool, device=device))
        self._vectors: dict[str, torch.Tensor] = {}
        self._handles = []
        for unit in units:
            for leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                module = model.get_submodule(unit.module(leaf))
                self._handles.append(module.register_forward_hook(self._hook(unit.module(leaf))))

    def _device(self, unit: LayerUnits) -> torch.device:
        """The device of the layer's q_proj (where its masks live; the CPU for a module without tensors)."""
        return module_device(self.model.get_submodule(unit.module("q_proj"))) or torch.device("cpu")

    def _hook(self, name: str):
        def apply(module, inputs, output):
            vector = self._vectors.get(name)
            return output if vector is None else output * vector.to(device=output.device, dtype=output.dtype)
        return apply

    def set(self, index: int, groups: torch.Tensor, channels: torch.Tensor) -> None:
        """Keep the groups and channels marked True in layer ``index`` (boolean vectors, on any device:
        they are moved to the layer's)."""
        unit = self.units[index]
        whole_groups, whole_channels = bool(groups.all()), bool(channels.all())
        device = self._device(unit)
        groups, channels = groups.to(device), channels.to(device)
        self.kept[index] = (groups.bool().clone(), channels.bool().clone())
        per_head = groups.repeat_interleave(unit.group_heads * unit.head_dim).float()
        per_kv = groups.repeat_interleave(unit.head_dim).float()
        for leaf, vector, whole in (("q_proj", per_head, whole_groups), ("k_proj", per_kv, whole_groups),
                                    ("v_proj", per_kv, whole_groups), ("gate_proj", channels.float(), whole_channels),
                                    ("up_proj", channels.float(), whole_channels)):
            self._vectors[unit.module(leaf)] = None if whole else vector

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_dict(self) -> dict:
        return {str(i): {"groups": g, "channels": c} for i, (g, c) in self.kept.items()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            self.set(int(key), value["groups"], value["channels"])
