"""What a stage is: a name, a strict config model, a run function, and what it needs and does.

Stage files in ``compress/stages/`` are thin adapters (config -> library calls -> report); each
module docstring holds a sample YAML that the tests parse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict


# every recipe mapping: unknown keys are errors, values are immutable, inf and nan are not numbers
STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StageConfig(BaseModel):
    """Base of every stage config (``STRICT``)."""

    model_config = STRICT


@dataclass(frozen=True)
class Stage:
    """A registered stage.

    ``run(ctx, config, report)`` does the work and fills the report; ``check(ctx_like)`` validates
    the config against the model's structure (meta device, no weights) before anything runs;
    ``effect(entry, skeleton, state)`` says what it makes of the model (quantized modules, widths),
    for the export formats to judge before anything runs;
    ``leaves_adapters(config)`` says whether the stage leaves LoRA adapters in the model."""

    name: str
    config: type[StageConfig]
    run: Callable
    modifies_model: bool
    quantizes: bool = False
    needs_data: tuple[str, ...] = ()
    check: Callable | None = None
    # (entry, skeleton, ModelState) -> the ModelState it leaves (``compress.model_state``); None: unchanged
    effect: Callable | None = None
    # (arch, config, stage_memory.PlanState) -> [(row label, memory parts)] as ``compress plan`` counts
    # them, updating the plan state with what it leaves; None: the model as held
    memory: Callable | None = None
    leaves_adapters: Callable | None = None  # config -> whether the model carries LoRA adapters after it
    streaming: Callable | None = None  # config -> None if it runs in a streaming recipe, else why not
    # config -> [(key of the rank in the config, rank, targets, ignore)] for each adapter it attaches
    low_rank: Callable | None = None
