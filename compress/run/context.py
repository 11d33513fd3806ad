"""The one object passed to every stage. No global state: everything a stage reads or leaves for
later stages is here, and ``saved()`` / ``restore()`` carry it across ``--resume``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..execution.distributed import Ranks
from ..execution.walker import ResidentModel
from ..model_state import ModelState
from ..models.data import token_windows
from ..models.sources import ModelSource
from ..stages.report import StageReport
from .progress import ProgressBars
from .recipe import Recipe


@dataclass
class Context:
    recipe: Recipe
    source: ModelSource
    model: nn.Module
    tokenizer: Any
    out_dir: Path
    progress: ProgressBars
    state: ModelState = field(default_factory=ModelState)  # what the stages made of the model (configs, pruning)
    metrics: dict = field(default_factory=dict)  # run-level results, e.g. the baseline perplexity
    reports: list[StageReport] = field(default_factory=list)
    entry: Any = None  # the StageEntry being run
    resume: bool = False  # continue interrupted work (e.g. mid-training checkpoints) rather than redo it
    stream: Any = None  # a streaming.StreamedModel when the recipe streams (``model`` is its skeleton)
    ranks: Ranks = field(default_factory=Ranks)  # this process's place in a torchrun launch (0 of 1 alone)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where stages compute
    _windows: dict = field(default_factory=dict, repr=False)

    @property
    def units(self):
        """The model as a source of units (``compress.execution.walker``): the stream, or the resident model."""
        return self.stream if self.stream is not None else ResidentModel(self.model, self.device)

    def windows(self, role: str) -> torch.Tensor:
        """Token windows [samples, seq_len] of ``data.calibration`` or ``data.eval`` (cached)."""
        if role not in self._windows:
            spec = getattr(self.recipe.spec.data, role)
            self._windows[role] = token_windows(self.tokenizer, spec.text_source(role), spec.samples, spec.seq_len)
        return self._windows[role]

    def track(self, items, description: str, total: int | None = None):
        """``items`` with a progress display; each is a unit of work (``Ranks.pace``)."""
        return self.ranks.pace(self.progress.track(items, description, total))

    def saved(self) -> dict:
        """JSON-able state (the model is saved separately)."""
        return {**self.state.saved(), "metrics": self.metrics, "reports": [r.to_dict() for r in self.reports]}

    def restore(self, saved: dict) -> None:
        """A saved state (``saved()``) on the reloaded model's (``--resume``)."""
        self.state = self.state.restored(saved)
        self.metrics = saved["metrics"]
        self.reports = [StageReport.from_dict(r) for r in saved["reports"]]
