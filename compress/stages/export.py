"""export: write the model as a checkpoint, then reload it and check it.

```yaml
- export: {format: gptq, path: checkpoint, verify: true}
```

Formats: ``gptq`` (GPTQ v1 with per-module ``dynamic`` bits: GPTQModel, vLLM, and transformers
when every module has the same bits), ``native`` (anything, NF codebooks included; read with
``compress.load``), ``hf`` (dense: every quantized layer dequantized). ``path`` is relative to
the recipe's output directory. With ``verify`` the checkpoint is loaded back from disk: its logits
must equal the in-memory model's, and its perplexity is measured when the recipe has eval data.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..checkpoint import WRITERS, inspect_checkpoint, load_checkpoint
from ..errors import StageError
from ..evaluate import perplexity
from ..report import StageReport
from ..stage import Stage, StageConfig
from .evaluation import eval_batch_size

PROBE_TOKENS = 64


class ExportConfig(StageConfig):
    format: Literal["gptq", "native", "hf"] = "gptq"
    path: str = Field("checkpoint", min_length=1)
    verify: bool = True
    max_shard_mib: int = Field(2048, ge=1)


def _compare_logits(ctx, reloaded, exact: bool, where: str) -> float:
    vocab = ctx.model.get_input_embeddings().num_embeddings
    probe = torch.randint(0, vocab, (2, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ctx.model(input_ids=probe, use_cache=False).logits
        got = reloaded(input_ids=probe, use_cache=False).logits
    diff = float((expected - got).abs().max())
    if exact and not torch.equal(expected, got):
        raise StageError(f"{where}: the reloaded checkpoint's logits differ from the in-memory model "
                         f"(max |diff| {diff:.3g}); the checkpoint does not hold the model")
    return diff


def run(ctx, config: ExportConfig, report: StageReport) -> None:
    target = ctx.out_dir / config.path
    WRITERS[config.format](ctx.model, target, tokenizer=ctx.tokenizer, recipe=ctx.recipe.to_dict(),
                           max_shard_bytes=config.max_shard_mib << 20)
    info = inspect_checkpoint(target, verify=False)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    report.metrics.update(path=str(target), format=config.format, size_bytes=size, label=config.format,
                          bits_per_param=info["bits_per_param"], bits_per_param_total=info["bits_per_param_total"],
                          kernel=info["kernel"])
    if not config.verify:
        return
    reloaded = load_checkpoint(target, dtype=ctx.recipe.spec.dtype)
    report.metrics["reload_max_abs_logit_diff"] = _compare_logits(
        ctx, reloaded, exact=config.format != "hf", where=ctx.entry.where)
    if ctx.recipe.spec.data.eval is not None:
        batch_size = eval_batch_size(ctx.recipe)
        report.metrics["perplexity"] = perplexity(reloaded, ctx.windows("eval"), batch_size, ctx.track)
        report.notes.append(f"reloaded from {target}: perplexity {report.metrics['perplexity']:.3f}")


STAGE = Stage(name="export", config=ExportConfig, run=run, modifies_model=False)
