"""export: write the model as a checkpoint, then reload it and check it.

```yaml
- export: {format: gptq, path: checkpoint, verify: true, adapters: peft, adapter_path: checkpoint-adapter}
```

Formats: ``gptq`` (GPTQ v1 with per-module ``dynamic`` bits: GPTQModel; current vLLM only at 4/8-bit
symmetric; transformers when every module has the same bits), ``compressed-tensors`` (pack-quantized:
vLLM at 2-8 bits, transformers for symmetric schemes), ``native`` (anything, NF codebooks included;
read with ``compress.load``), ``hf`` (dense: every quantized layer dequantized): one class each in
``checkpoint/formats/``. The report says which engines load the result (``compress inspect``'s
verdict), and a checkpoint current vLLM refuses is said in one line. ``path`` is relative to
the recipe's output directory. With ``verify`` the checkpoint is loaded back from disk: its logits
must equal the in-memory model's, and its perplexity is measured when the recipe has eval data.

LoRA adapters (from ``lq_lora``, ``finetune``): ``adapters: peft`` (default) writes the base alone in
``format`` and the adapters as a standard PEFT adapter in ``adapter_path`` (default ``PATH-adapter``),
verified by reloading the base and applying the adapter with PEFT; ``embed`` keeps them inside a
``native`` checkpoint; ``merge`` folds them into a dense ``hf`` checkpoint. Both paths stay inside
output and replace only what compress wrote there (``compress.checkpoint.output_paths``). ``adapter_dtype``
(``nf8`` | ``bf16`` | ``fp16``; default: as held, fp32) rounds the adapters to that storage and writes
them so (``checkpoint/adapter_storage.py``: packed NF8 in a native checkpoint; a PEFT adapter holds
NF8's values dequantized, and the report says so). The report gives bits per parameter without and
with the adapters as stored (and, for comparison, in 16-bit and in NF8 as LQ-LoRA counts them).

```yaml
- export: {format: native, adapters: embed, adapter_dtype: nf8}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..checkpoint import FORMAT_NAMES, FORMATS, inspect_checkpoint
from ..checkpoint.adapter_storage import ADAPTER_DTYPES, round_adapters
from ..checkpoint.output_paths import export_target, guard_before_write
from ..checkpoint.write import adapter_modules
from ..errors import StageError
from ..stage import Stage, StageConfig
from .export_report import adapter_bits, engine_notes
from .export_verify import verify as verify_reload
from .report import StageReport

WHY_NOT = {"merge": "merging into a packed {format} base would quantize the update away"}  # else "got FORMAT"


class ExportConfig(StageConfig):
    format: Literal[FORMAT_NAMES] = "gptq"
    path: str = Field("checkpoint", min_length=1)
    verify: bool = True
    max_shard_mib: int = Field(2048, ge=1)
    adapters: Literal["peft", "embed", "merge"] = "peft"
    adapter_path: str | None = Field(None, min_length=1)
    adapter_dtype: Literal[ADAPTER_DTYPES] | None = None

    @model_validator(mode="after")
    def _adapter_mode_fits_format(self) -> "ExportConfig":
        if self.adapter_dtype and self.adapters == "merge":
            raise ValueError("adapter_dtype: only for adapters peft or embed (merge folds them into the base)")
        if self.adapters not in FORMATS[self.format].adapter_modes:
            holders = ", ".join(name for name, fmt in FORMATS.items() if self.adapters in fmt.adapter_modes)
            why = WHY_NOT.get(self.adapters, "got {format}").format(format=self.format)
            raise ValueError(f"adapters: {self.adapters} needs format {holders} ({why})")
        return self

    def adapter_dir(self) -> str:
        return self.adapter_path or f"{self.path.rstrip('/')}-adapter"


def _write(ctx, config: ExportConfig, target, report: StageReport) -> dict:
    """Write the checkpoint (and the PEFT adapter beside it) from the model's source of units: a
    resident model's state as a whole, a streamed one's units as they are read (adapter tensors set
    aside as they pass). Returns the adapter layers written."""
    from ..checkpoint.peft import adapters_detached, write_peft_adapter

    split = config.adapters == "peft" and bool(adapter_modules(ctx.model))
    shards, adapter_tensors = ctx.units.export_shards(ctx, f"export {config.format}", split)
    kwargs = dict(tokenizer=ctx.tokenizer, recipe=ctx.recipe.to_dict(), max_shard_bytes=config.max_shard_mib << 20)
    kwargs.update({"shards": shards} if shards is not None else {})
    write = FORMATS[config.format].write
    if ctx.units.holds_model:  # a streamed model's adapters are rounded as they are written
        round_adapters(adapter_modules(ctx.model), config.adapter_dtype)
    if not split:
        write(ctx.model, target, **kwargs, **({"adapter_dtype": config.adapter_dtype} if config.adapter_dtype else {}))
        return {}
    with adapters_detached(ctx.model) as layers:
        write(ctx.model, target, **kwargs)
    for name, layer in layers.items() if adapter_tensors else ():  # a skeleton's adapters, now read
        for leaf in ("lora_A", "lora_B"):
            weight = adapter_tensors[f"{name}.{leaf}.weight"].to(ctx.units.dtype)
            getattr(layer, leaf).weight = torch.nn.Parameter(weight, requires_grad=False)
    adapter_dir = write_peft_adapter(layers, adapter_target(ctx, config), base_model=str(target),
                                     adapter_dtype=config.adapter_dtype)
    report.metrics["adapter_path"] = str(adapter_dir)
    report.notes.append(f"PEFT adapter ({len(layers)} layers) in {adapter_dir}")
    if config.adapter_dtype == "nf8":
        report.notes.append("PEFT has no packed NF8 tensors: the adapter holds the NF8-rounded values in fp32 "
                            "(export native with adapters: embed to store them packed)")
    return layers


def streams(config: ExportConfig) -> str | None:
    """Why this export cannot run in a streaming recipe (None: it can)."""
    return FORMATS[config.format].stream_refusal


def adapter_target(ctx, config: ExportConfig) -> Path:
    """Where the PEFT adapter goes, checked as the base's path is (inside output, free or ours)."""
    target = export_target(ctx.out_dir, config.adapter_dir(), f"{ctx.entry.where}.adapter_path")
    guard_before_write(target, f"{ctx.entry.where}.adapter_path")
    return target


def run(ctx, config: ExportConfig, report: StageReport) -> None:
    refusal = FORMATS[config.format].refusal(ctx.state.reshaped(ctx.model), ctx.entry.where)
    if refusal:  # the run's own configs (validate judged the recipe's): refused before anything is written
        raise StageError(refusal)
    target = export_target(ctx.out_dir, config.path, f"{ctx.entry.where}.path")
    guard_before_write(target, f"{ctx.entry.where}.path")
    if config.adapters == "peft" and adapter_modules(ctx.model):
        adapter_target(ctx, config)  # refused before the base is written, not after
    layers = _write(ctx, config, target, report)
    info = inspect_checkpoint(target, verify=False)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    report.metrics.update(path=str(target), format=config.format, size_bytes=size, label=config.format,
                          bits_per_param=info["bits_per_param"], bits_per_param_total=info["bits_per_param_total"],
                          kernel=info["kernel"])
    written = [target] + ([Path(report.metrics["adapter_path"])] if "adapter_path" in report.metrics else [])
    adapter_bits(ctx, report, written, info.get("quantized_params") or 0)
    engine_notes(report, info["engines"], target)
    if config.verify and not ctx.units.holds_model:
        inspect_checkpoint(target, verify=True)
        report.notes.append(f"streaming: every file of {target} checked against its manifest sha256; the reload "
                            "and logits check needs the whole model in memory and was not run")
    if config.verify and ctx.units.holds_model:
        verify_reload(ctx, config, target, layers, report)


STAGE = Stage(name="export", config=ExportConfig, run=run, modifies_model=False, streaming=streams)
