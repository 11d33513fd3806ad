"""Iterative structured pruning inside LoRA training (LoRAPrune's Algorithm 1), as training hooks.

After every step's backward (gradients clipped, before the optimizer step) each prunable layer's
element importance is computed by the chosen criterion, summed per unit (KV groups, channels; each
module's vector L2-normalized) and blended into a moving average (0.9). At each pruning event the
lowest-scoring units of every prunable layer are masked until the layer reaches the event's ratio;
already-masked units score zero, so they stay masked. Kept widths are rounded up so that they stay
multiples of ``round_to`` (channels; for heads the q width), so packing and kernels still apply.

With ``score_columns=False`` only the modules whose units are output rows are scored (q/k/v for KV
groups, gate/up for channels), not o_proj/down_proj, whose units are input columns. That is the
default for ``loraprune``: its estimate of a column, Ĝ[:, j] = G_W AᵀA[:, j] (+ B Bᵀ G_W[:, j]), mixes
every input column through the rank-r projection AᵀA, so it carries almost nothing of column j's own
gradient while B is small (Spearman ≈ 0.0 against the true per-column scores on SmolLM2-135M, against
0.8-0.97 for rows; BENCHMARKS.md). The upstream code sums the columns in anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .hooks import StepHooks
from .importance import ImportanceAverage, weight_importance
from .masks import OutputMasks
from .units import ATTENTION, COLUMN_LEAVES, MLP, LayerUnits, attention_unit_scores, mlp_unit_scores


def kept_count(total: int, ratio: float, width: int = 1, round_to: int = 1) -> int:
    """How many of ``total`` units (each ``width`` wide) to keep at pruning ``ratio``: at least one,
    and the smallest count >= total - floor(ratio * total) whose width is a multiple of ``round_to``."""
    keep = max(1, total - math.floor(ratio * total + 1e-9))
    while keep < total and (keep * width) % round_to:
        keep += 1
    return keep


def highest_kept(scores: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """A boolean mask, on the scores' device, keeping the ``keep`` highest-scoring units; masked units
    score zero first."""
    mask = mask.to(scores.device)
    masked_scores = torch.where(mask, scores, torch.full_like(scores, -math.inf))
    order = torch.argsort(masked_scores, descending=True, stable=True)
    kept = torch.zeros_like(mask)
    kept[order[:keep]] = True
    return kept


class PruningHooks(StepHooks):
    def __init__(self, model: nn.Module, units: list[LayerUnits], criterion: str, events: dict[int, float],
                 prune_heads: bool = True, prune_channels: bool = True, round_to: int = 32, seed: int = 0,
                 score_columns: bool = True):
        self.model, self.units, self.criterion, self.events = model, units, criterion, events
        self.scored = [leaf for leaf in ATTENTION + MLP if score_columns or leaf not in COLUMN_LEAVES]
        self.prune_heads, self.prune_channels, self.round_to = prune_heads, prune_channels, round_to
        self.masks = OutputMasks(model, units)
        self.average = ImportanceAverage(0.9)
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict] = []

    def after_backward(self, step: int) -> None:
        for unit in self.units:
            scores = {leaf: weight_importance(self.model.get_submodule(unit.module(leaf)), self.criterion,
                                              self.generator) for leaf in self.scored}
            if self.prune_heads:
                self.average.update(f"{unit.index}.heads", attention_unit_scores(unit, scores))
            if self.prune_channels:
                self.average.update(f"{unit.index}.channels", mlp_unit_scores(unit, scores))

    def after_step(self, step: int) -> None:
        if step in self.events:
            self.prune_to(self.events[step])
            self.history.append({"step": step, "ratio": self.events[step]})

    def prune_to(self, ratio: float) -> None:
        for unit in self.units:
            groups, channels = self.masks.kept[unit.index]
            if self.prune_heads and f"{unit.index}.heads" in self.average.values:
                keep = kept_count(unit.kv_groups, ratio, unit.group_heads * unit.head_dim, self.round_to)
                groups = highest_kept(self.average.values[f"{unit.index}.heads"], groups, keep)
            if self.prune_channels and f"{unit.index}.channels" in self.average.values:
                keep = kept_count(unit.channels, ratio, 1, self.round_to)
                channels = highest_kept(self.average.values[f"{unit.index}.channels"], channels, keep)
            self.masks.set(unit.index, groups, channels)

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "average": self.average.state_dict(),
                "generator": self.generator.get_state(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.average.load_state_dict(state["average"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
