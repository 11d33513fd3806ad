"""Run a recipe: check it, lock the output, load the model (or resume), run the stages in order,
save the state after each one, and write ``report.json`` / ``report.md``.

State after stage N lives in ``<output>/.stages/NN-name/``: ``state.json`` (the recipe fingerprint of
stages 0..N, the plan, metrics and reports) and, for stages that change the model, ``model/`` (a
native checkpoint). Each is written atomically, so a run killed at any point leaves only complete
states. ``resume`` continues after the last stage whose recipe prefix is unchanged. The model is a
source of units (``compress.execution.walker``): resident in host memory, saved after each stage that changes
it; or with ``streaming: true`` a skeleton (``compress.execution.streaming``) whose stages write their
``model/`` unit by unit, the checkpoint the next stage reads its weights from.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.atomic import atomic_write_text
from ..checkpoint.formats import fuses_projections
from ..errors import CompressError, StageError
from ..execution.device import describe, resolve_device
from ..execution.distributed import Ranks, init_ranks
from ..execution.memory import PeakMemory
from ..execution.streaming import open_source
from ..model_state import ModelState
from ..models.sources import resolve_model
from ..stages.evaluation import linear_bits_per_param, score, wants_baseline
from ..stages.report import StageReport, write_reports
from .context import Context
from .lock import output_lock
from .progress import ProgressBars
from .recipe import Recipe, StageEntry
from .validate import check_recipe

log = logging.getLogger(__name__)
STATE_DIR = ".stages"


@dataclass
class RunResult:
    out_dir: Path
    reports: list[StageReport]
    report_json: Path
    report_md: Path
    resumed_after: int | None


class StageStates:
    """The saved state after each completed stage of one output directory."""

    def __init__(self, root: Path, recipe: Recipe):
        self.root, self.recipe = root, recipe

    def path(self, entry: StageEntry) -> Path:
        return self.root / f"{entry.index:02d}-{entry.name}"

    def exist(self) -> bool:
        return self.root.is_dir() and any(self.root.iterdir())

    def completed(self) -> list[StageEntry]:
        """The longest prefix of stages whose saved state matches this recipe."""
        done = []
        for entry in self.recipe.stages:
            state_file = self.path(entry) / "state.json"
            try:
                saved = json.loads(state_file.read_text())["fingerprint"]
            except (OSError, ValueError, KeyError):
                break
            if saved != self.recipe.fingerprint(entry.index):
                break
            done.append(entry)
        return done

    def discard_after(self, keep: int) -> None:
        """Remove every saved state except those of the first ``keep`` stages. A state's
        ``state.json`` goes first, so a run killed halfway through the removal leaves no state that
        counts as completed with part of its model gone."""
        wanted = {self.path(e).name for e in self.recipe.stages[:keep]}
        for child in self.root.iterdir() if self.root.is_dir() else []:
            if child.name not in wanted:
                if child.is_dir():
                    (child / "state.json").unlink(missing_ok=True)
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()

    def save(self, entry: StageEntry, ctx: Context) -> None:
        """The model (when the stage changed it) and then ``state.json``, each written atomically:
        a state counts only once its ``state.json`` is there."""
        state = dict(ctx.saved(), fingerprint=self.recipe.fingerprint(entry.index), stage=entry.name)
        self.path(entry).mkdir(parents=True, exist_ok=True)
        if entry.stage.modifies_model:
            ctx.units.save(self.path(entry) / "model")
        atomic_write_text(self.path(entry) / "state.json", json.dumps(state, indent=2, sort_keys=True) + "\n")

    def load(self, entry: StageEntry) -> dict:
        return json.loads((self.path(entry) / "state.json").read_text())

    def latest_model(self, done: list[StageEntry]) -> Path | None:
        for entry in reversed(done):
            if entry.stage.modifies_model and (self.path(entry) / "model").is_dir():
                return self.path(entry) / "model"
        return None


def _open_context(recipe: Recipe, model_dir: Path | None, progress: ProgressBars, device: torch.device) -> Context:
    """The run's context over the model of ``model_dir`` (a saved stage's) or else the recipe's."""
    source = resolve_model(recipe.spec.model)
    model, tokenizer, stream = open_source(recipe, source, model_dir, device)
    return Context(recipe, source, model, tokenizer, recipe.output, progress, stream=stream, device=device,
                   state=ModelState.of_skeleton(model, fuses_projections(recipe)))


def _fresh_context(recipe: Recipe, progress: ProgressBars, device: torch.device) -> Context:
    report = StageReport("load", -1, device=describe(device))
    start = time.perf_counter()
    with PeakMemory(device) as peak:
        ctx = _open_context(recipe, None, progress, device)
        if not ctx.units.holds_model:
            report.notes.append("streaming: the model's weights stay in its files, read one layer at a time")
        report.metrics.update(label=recipe.spec.dtype, bits_per_param=linear_bits_per_param(ctx.model),
                              params=sum(p.numel() for p in ctx.model.parameters()))
        report.notes.extend(ctx.source.caveats)
        baseline = wants_baseline(recipe)
        if baseline is not None:
            score(ctx, baseline.config.batch_size, report, baseline.index)
            ctx.metrics["baseline_perplexity"] = report.metrics["perplexity"]
    report.seconds, report.peak_rss_mib, report.peak_cuda_mib = time.perf_counter() - start, peak.rss_mib, peak.cuda_mib
    ctx.reports.append(report)
    return ctx


def _resumed_context(recipe: Recipe, states: StageStates, done: list[StageEntry],
                     progress: ProgressBars, device: torch.device) -> Context:
    ctx = _open_context(recipe, states.latest_model(done), progress, device)
    ctx.restore(states.load(done[-1]))
    return ctx


def _run_stage(ctx: Context, entry: StageEntry) -> StageReport:
    report = StageReport(entry.name, entry.index, device=describe(ctx.device))
    log.info("stage %d/%d: %s on %s", entry.index + 1, len(ctx.recipe.stages), entry.name, report.device)
    ctx.entry = entry
    start = time.perf_counter()
    with PeakMemory(ctx.device) as peak, _os_errors_say_where(entry.where):
        entry.stage.run(ctx, entry.config, report)
    report.seconds, report.peak_rss_mib, report.peak_cuda_mib = time.perf_counter() - start, peak.rss_mib, peak.cuda_mib
    report.metrics["rss_growth_mib"] = peak.rss_mib - peak.start_rss_mib
    return report


@contextmanager
def _os_errors_say_where(where: str):
    """A failed read or write (a full disk, a file size limit, a vanished file) ends the run with one
    line naming the stage and the file; atomic writes leave the earlier state as it was."""
    try:
        yield
    except OSError as err:
        target = f" {err.filename}:" if err.filename else ""
        raise StageError(f"{where}:{target} {err.strerror or err} (nothing of this stage was kept; earlier "
                         "stages' state is intact: free the space and --resume)") from None


def report_header(ctx: Context) -> dict:
    from .. import __version__
    from ..dtypes import DTYPES
    from ..kernels import select_backend

    kernel = select_backend(ctx.device, DTYPES[ctx.recipe.spec.dtype])[0]
    return {"output": str(ctx.out_dir), "model": ctx.recipe.spec.model, "dtype": ctx.recipe.spec.dtype,
            "device": describe(ctx.device), "kernel": kernel, "compress": __version__,
            "seed": ctx.recipe.spec.seed,
            "ranks": ctx.ranks.world}


def _stages_to_keep(states: StageStates, resume: bool, overwrite: bool) -> int:
    """How many saved stages this run continues after (the others are removed later, once the run's
    inputs have been read: a model that fails to load must not cost the earlier run its stages)."""
    if states.exist() and not (resume or overwrite):
        raise CompressError(f"{states.root.parent}: holds the saved stages of an earlier run; pass --resume to "
                            "continue it or --overwrite to start over")
    return len(states.completed()) if resume else 0


def _agreed_start(states: StageStates, resume: bool, overwrite: bool, ranks: Ranks) -> int:
    """Rank 0 decides where the run starts (or why it cannot); every rank gets the same answer."""
    try:
        start: int | str = _stages_to_keep(states, resume, overwrite) if ranks.main else 0
    except CompressError as err:
        start = str(err)
    start = ranks.broadcast(start)
    if isinstance(start, str):
        raise CompressError(start)
    return start


def _run_stages(ctx: Context, states: StageStates, pending: tuple[StageEntry, ...]) -> None:
    for entry in ctx.track(pending, "stages"):
        if not ctx.ranks.main and not entry.stage.modifies_model:
            continue  # eval and export only report and write: rank 0's work
        if entry.stage.modifies_model:
            ctx.units.begin_stage(states.path(entry) / "model")
        ctx.reports.append(_run_stage(ctx, entry))
        if ctx.ranks.main:
            with _os_errors_say_where(f"{entry.where} (saving its state)"):
                states.save(entry, ctx)
        if entry.stage.modifies_model:
            ctx.ranks.barrier()  # a streaming stage's output is complete before any rank reads it
            ctx.units.end_stage()


def run_recipe(recipe: Recipe, resume: bool = False, overwrite: bool = False,
               progress: ProgressBars | None = None, ranks: Ranks | None = None) -> RunResult:
    """Run every stage of ``recipe`` not already completed; see the module docstring. Under
    ``torchrun`` every rank runs it (``compress.execution.distributed``); rank 0 alone locks and writes."""
    progress = progress or ProgressBars(enabled=False)
    ranks = ranks or init_ranks()
    check_recipe(recipe)
    out_dir = recipe.output
    from ..kernels import preferring

    with output_lock(out_dir) if ranks.main else nullcontext(), preferring(recipe.spec.kernel):
        states = StageStates(out_dir / STATE_DIR, recipe)
        kept = _agreed_start(states, resume, overwrite, ranks)
        done = list(recipe.stages[:kept])
        with progress.session():
            device = resolve_device(recipe.spec.device)
            if done:
                log.info("resuming after stage %d (%s)", done[-1].index, done[-1].name)
                ctx = _resumed_context(recipe, states, done, progress, device)
            else:
                ctx = _fresh_context(recipe, progress, device)
            if ranks.main:
                states.discard_after(kept)  # the inputs are read: the earlier run's later stages can go
            ctx.resume, ctx.ranks = resume, ranks
            _run_stages(ctx, states, recipe.stages[kept:])
        if ranks.main:
            report_json, report_md = write_reports(out_dir, ctx.reports, report_header(ctx))
        else:
            report_json, report_md = out_dir / "report.json", out_dir / "report.md"
        ranks.barrier()  # every rank leaves once rank 0 has written everything
    return RunResult(out_dir, ctx.reports, report_json, report_md, done[-1].index if done else None)
