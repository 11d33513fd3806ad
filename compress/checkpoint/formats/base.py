"""What every checkpoint format is: one class with its writer, its reader's format-specific parts,
its checks of stored tensors and its engine verdicts. The defaults are those of a format that
stores our own tensors (qweight, qzeros, scales, g_idx; NF codes) under each module's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from compress.quant import QuantConfig

from ...dtypes import CODES
from ...errors import CheckpointError
from ...model_state import ModelState, Problem
from ..engines import Verdict
from ..tensors import DEFAULT_SHARD_BYTES, TensorSource

UNEVEN = ("decoder layers of different widths (uniform: false); config.json cannot describe them: export "
          "native, or prune with uniform: true")
TensorMeta = dict[str, tuple[str, tuple[int, ...]]]  # leaf -> (safetensors code, shape), from headers


class Format(ABC):
    """One checkpoint format (``export: {format: NAME}``, ``compress.json``'s ``format``)."""

    name: ClassVar[str]
    quant_method: ClassVar[str | None] = None  # config.json quantization_config.quant_method read without a manifest
    fuses_projections: ClassVar[bool] = False  # engines fuse q/k/v and gate/up: they need one config each
    adapter_modes: ClassVar[tuple[str, ...]] = ("peft",)  # export's ``adapters:`` it takes
    exact_reload: ClassVar[bool] = True  # the reload gives the in-memory model's logits exactly
    stream_refusal: ClassVar[str | None] = None  # why a streamed model cannot be exported so
    stream_source_refusal: ClassVar[str | None] = None  # why a streamed run cannot read it as its model
    validate_with_skeleton: ClassVar[bool] = True  # a source checkpoint is checked against its built skeleton

    @abstractmethod
    def write(self, model: nn.Module, directory: Path, tokenizer=None, recipe: dict | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, shards=None, adapter_dtype: str | None = None) -> dict:
        """Write ``model`` (or a streamed model's ``shards``) atomically into ``directory``; returns
        the manifest."""

    def module_problems(self, configs: dict[str, QuantConfig], shapes: dict[str, tuple[int, int]],
                        pending: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        """(module, why) for each quantized module of these configs and shapes this format cannot
        hold (``pending``: uniform configs a stage picks at run time); none: it holds them all."""
        return []

    def problems(self, state: ModelState) -> list[Problem]:
        """What in the model, as a recipe leaves it (``compress.model_state``), this format cannot
        hold, each with the recipe entry that caused it."""
        return []

    def refusal(self, state: ModelState, where: str) -> str | None:
        """One line on why the export at ``where`` cannot hold ``state`` (naming the stage that made
        it so), or None."""
        problems = self.problems(state)
        if not problems:
            return None
        first, more = problems[0], f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{first.by or where}: cannot be exported as {self.name} ({where}): {first.text}{more}"

    def read_modules(self, quant: dict, names, path: Path) -> dict[str, tuple[QuantConfig, None]]:
        """{module: (config, None)} from a config.json ``quantization_config`` alone (no manifest);
        ``names()`` lists the stored tensors."""
        raise CheckpointError(f"{path}: {self.name} checkpoints are read through their compress.json")

    def to_ours(self, tensors: dict[str, torch.Tensor], configs: dict[str, QuantConfig], where: str) -> dict:
        """The stored tensors in our layout (the format's own layout converted, module by module)."""
        return tensors

    def stored_shape(self, name: str, tensors: TensorMeta, source: TensorSource) -> tuple[int, int]:
        """A module's (out, in) from its stored tensors, when the manifest does not give it."""
        if "scales" not in tensors or "g_idx" not in tensors:
            raise CheckpointError(f"{name}: packed weights without scales and g_idx")
        return (tensors["scales"][1][1], tensors["g_idx"][1][0])

    def check_stored(self, name: str, config: QuantConfig, shape, tensors: TensorMeta) -> None:
        """The stored tensors are what ``config`` says (a checkpoint without its manifest is
        described by its config.json alone, which may be wrong): the answer comes from the tensors,
        or there is none."""
        for leaf, (dtype, expected) in config.tensor_specs(shape).items():
            got = tensors.get(leaf)
            if got is None:
                raise CheckpointError(f"{name}: missing tensor {leaf} for {config.name} {list(shape)}")
            if got[0] != CODES[dtype] or got[1] != expected:
                raise CheckpointError(f"{name}.{leaf} is {got[0]} {list(got[1])}, but {config.name} {list(shape)} "
                                      f"stores {CODES[dtype]} {list(expected)}: the tensors do not hold what the "
                                      "checkpoint's config says")

    def counted(self, config: QuantConfig, tensors: TensorMeta) -> list[str]:
        """The stored leaves that count toward bits per parameter (``inspect``)."""
        return [leaf for leaf in config.counted_tensors if leaf in tensors]

    @abstractmethod
    def verdicts(self, rows: list[dict]) -> list[Verdict]:
        """One verdict per engine of ``engines.ENGINES``, in that order, from ``inspect``'s rows
        (test_engines holds every format to it)."""

    def engines(self, rows: list[dict]) -> dict[str, dict]:
        """{engine: verdict} for a checkpoint of this format whose modules ``inspect`` described."""
        return {v.engine: v.to_dict() for v in self.verdicts(rows)}
