"""export's check of what it wrote: the checkpoint (and its PEFT adapter) reloaded from disk gives
the in-memory model's logits (exactly, for every format that stores the packed layers as they are),
computed the same way on both sides; its perplexity when the recipe has eval data."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import FORMATS, load_checkpoint
from ..errors import StageError
from ..execution.evaluate import hidden_by_units, perplexity, perplexity_by_units
from ..execution.placement import whole_model_on_device
from ..execution.walker import ResidentModel
from ..models.chunked_loss import last_hidden, max_abs_logit_diff
from .evaluation import eval_batch_size
from .report import StageReport

PROBE_TOKENS = 64


def _probe(ctx) -> torch.Tensor:
    vocab = ctx.model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (2, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))


def _verify_index(ctx) -> int:
    """The stage whose plan sizes the reload check on the device: the recipe's last eval (the check
    scores the same windows), else the export itself."""
    return next((e.index for e in reversed(ctx.recipe.stages) if e.name == "eval"), ctx.entry.index)


def _on_device(ctx, model, work):
    """``work(model on the device)`` when the plan says it fits there, else ``work(its units)``
    walked one layer at a time on the device (``compress.execution.placement``); the model is on the host
    after."""
    where = f"{ctx.entry.where}.verify"
    with whole_model_on_device(ctx, where, _verify_index(ctx), walk_instead=True, model=model) as whole:
        return work(model if whole else ResidentModel(model, ctx.device))


def _hidden(target, probe: torch.Tensor) -> torch.Tensor:
    """Last hidden states (after the final norm) of one probe batch, on the host, from a model on the
    device or from a source of units; the head is applied later, slice by slice (``_compare_logits``)."""
    if isinstance(target, ResidentModel):
        return hidden_by_units(target, probe)
    with torch.no_grad():
        return last_hidden(target, probe.to(next(target.parameters()).device)).cpu()


def _compare_logits(expected: tuple, got: tuple, exact: bool, where: str) -> float:
    """Max |logit difference| of two (model on the host, its probe hidden states); the heads score
    slices of positions on the host, so no [batch, positions, vocab] pair is held."""
    diff, equal = max_abs_logit_diff(*expected, *got)
    if exact and not equal:
        raise StageError(f"{where}: the reloaded checkpoint's logits differ from the in-memory model "
                         f"(max |diff| {diff:.3g}); the checkpoint does not hold the model")
    return diff


def verify(ctx, config, target: Path, layers: dict, report: StageReport) -> None:
    """Reload the checkpoint (and its PEFT adapter) from disk; its logits against the in-memory
    model's, both computed the same way (decoder on the run's device, head on the host, slice by
    slice); its perplexity when there is eval data."""
    probe = _probe(ctx)
    expected = _on_device(ctx, ctx.model, lambda model: _hidden(model, probe))
    reloaded = load_checkpoint(target, dtype=ctx.recipe.spec.dtype)
    if layers:
        from ..checkpoint.peft import load_peft_adapter

        reloaded = load_peft_adapter(reloaded, ctx.out_dir / config.adapter_dir())

    got = {}

    def check(model) -> float | None:
        got["hidden"] = _hidden(model, probe)
        if ctx.recipe.spec.data.eval is None:
            return None
        windows, batch = ctx.windows("eval"), eval_batch_size(ctx.recipe)
        if isinstance(model, ResidentModel):
            return perplexity_by_units(model, windows, batch, ctx.track)
        return perplexity(model, windows, batch, ctx.track)

    ppl = _on_device(ctx, reloaded, check)
    report.metrics["reload_max_abs_logit_diff"] = _compare_logits((ctx.model, expected), (reloaded, got["hidden"]),
                                                                  FORMATS[config.format].exact_reload, ctx.entry.where)
    if ppl is not None:
        report.metrics["perplexity"] = ppl
        report.notes.append(f"reloaded from {target}: perplexity {ppl:.3f}")
