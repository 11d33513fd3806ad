"""What a stage holds in memory as ``compress plan`` counts it: the plan state that the stages so far
leave (the frozen base's format, LQ-LoRA's bit budget, adapters, a pruned width), and the pieces
each stage's ``memory(arch, config, state)`` builds its rows from. Nothing is loaded but the config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .plan import Architecture, calibration_breakdown
from .plan_training import TrainingSetup, training_breakdown


@dataclass
class PlanState:
    """What the stages so far leave: the frozen base's format, adapters, pruning."""

    setup: TrainingSetup
    base_label: str = "dense"
    rank: int = 0
    eval_seq: int = 512
    calibration: tuple[int, int] = (128, 512)  # data.calibration (samples, seq_len)


def held(arch: Architecture, state: PlanState) -> dict[str, int]:
    """The model as the stages so far leave it: its frozen base and its trainable adapters."""
    parts = training_breakdown(arch, replace(state.setup, method="lora", rank=state.rank, batch=1, seq=1))
    return {"frozen_base": parts["frozen_base"], "trainable": parts["trainable"]}


def training_setup(setup: TrainingSetup, config, method: str, rank: int) -> TrainingSetup:
    """``setup`` for a training stage's config (batch, sequence, optimizer, checkpointing, distillation)."""
    distill = getattr(config, "distill", None)
    return replace(setup, method=method, rank=rank, batch=config.batch_size, seq=config.seq_len,
                   optimizer=config.optimizer, checkpointing=config.gradient_checkpointing,
                   distill_top_k=distill.top_k if distill else 0)


def prune_range(arch: Architecture, config) -> tuple[int, int]:
    """The layers a prune config prunes: [start, end)."""
    if config.uniform:
        return 0, arch.layers
    return int(config.skip_first * arch.layers), arch.layers - config.skip_last


def quantized(state: PlanState, config, label: str) -> None:
    """The base is now packed with ``config``."""
    state.setup = replace(state.setup, base=config, base_bits=None)
    state.base_label = label


def calibration(arch: Architecture, state: PlanState) -> dict[str, int]:
    """A layer-by-layer calibration walk's activations and transients (GPTQ, AWQ, output objectives)."""
    return calibration_breakdown(arch, *state.calibration, state.setup.compute_bytes)
