"""Select modules by ``targets`` / ``ignore`` lists (llm-compressor's vocabulary).

A selector is a class name (``Linear``), an exact module name (``lm_head``), or a regular
expression over module names prefixed with ``re:`` (matched from the start, ``re.match``).
``Linear`` covers both dense ``nn.Linear`` and already-quantized ``QuantLinear`` layers.
``set_module`` (replace a submodule by its dotted name) is the libraries' own, re-exported here for
the stages.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from compress.lowrank import set_module
from compress.quant import QuantLinear

LINEAR_CLASSES = (nn.Linear, QuantLinear)
BASE = ".base_layer"  # LoRALinear keeps its base here; checkpoints store the base under the layer's name
# set_module is the libraries' own, re-exported for the stages
__all__ = ["BASE", "FUSED_GROUPS", "LINEAR_CLASSES", "check_selector", "fused_group", "fused_members",
           "layer_name", "matches", "matches_any", "select_linears", "set_module", "stored_name"]


def layer_name(name: str) -> str:
    """A module's name with a LoRA adapter's base counted under its layer, as checkpoints store it."""
    return name.removesuffix(BASE)


def stored_name(name: str) -> str:
    """A tensor's name in a checkpoint: a LoRA adapter's base is stored under the layer's name
    (``x.base_layer.qweight`` as ``x.qweight``; ``x.lora_A.weight`` stays)."""
    return name.replace(BASE + ".", ".")


def check_selector(selector: str) -> str | None:
    """Why a selector is malformed (a bad regular expression), or None."""
    if selector.startswith("re:"):
        try:
            re.compile(selector[3:])
        except re.error as err:
            return f"invalid regular expression {selector[3:]!r}: {err}"
    return None


def matches(selector: str, name: str, module: nn.Module | None = None) -> bool:
    if selector.startswith("re:"):
        return re.match(selector[3:], name) is not None
    if selector == name:
        return True
    if module is None:
        return False
    if selector == "Linear":
        return isinstance(module, LINEAR_CLASSES)
    return type(module).__name__ == selector


def matches_any(selectors: Iterable[str], name: str, module: nn.Module | None = None) -> bool:
    return any(matches(s, name, module) for s in selectors)


def select_linears(model: nn.Module, targets: list[str], ignore: list[str]) -> list[tuple[str, nn.Module]]:
    """Linear layers (dense or quantized) named by ``targets`` and not by ``ignore``, in model order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LINEAR_CLASSES)
            and matches_any(targets, name, module) and not matches_any(ignore, name, module)]


# modules engines (vLLM) fuse into one, with the fused name: they must share one quant config
FUSED_GROUPS = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def fused_group(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(prefix, member names) of the engine-fused group a module belongs to (q/k/v, gate/up)."""
    prefix, _, leaf = name.rpartition(".")
    for group in FUSED_GROUPS:
        if leaf in group:
            return prefix, group
    return None


def fused_members(names: list[str]) -> list[tuple[tuple[str, ...], list[str]]]:
    """(group leaves, member names present) for each engine-fused group (q/k/v, gate/up) of which
    ``names`` holds the first member and at least one other."""
    present, found = set(names), []
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        for group in FUSED_GROUPS:
            members = [f"{prefix}.{m}" for m in group if f"{prefix}.{m}" in present]
            if leaf == group[0] and len(members) > 1:
                found.append((group, members))
    return found
