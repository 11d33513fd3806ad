"""Structured pruning (LoRAPrune): units of Llama layers (KV groups, MLP channels) and their shapes,
importance criteria, the cubic schedule, output masks during training (as training-loop hooks, see
``hooks``), and the physical shrink."""

from .hooks import StepHooks
from .importance import CRITERIA, ImportanceAverage, lora_weight_gradient, weight_importance
from .loraprune import PruningHooks, kept_count
from .masks import OutputMasks
from .schedule import cubic_ratio, prune_events
from .shrink import layer_widths, resize_layers, shrink_layer, update_config
from .units import LayerUnits, layer_shapes, layer_units, prunable_layers

__all__ = ["CRITERIA", "ImportanceAverage", "LayerUnits", "OutputMasks", "PruningHooks", "StepHooks", "cubic_ratio",
           "kept_count", "layer_shapes", "layer_units", "layer_widths", "lora_weight_gradient", "prunable_layers",
           "prune_events", "resize_layers", "shrink_layer", "update_config", "weight_importance"]
