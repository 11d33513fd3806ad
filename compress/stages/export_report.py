"""What export's report says beyond the file sizes: which engines load the checkpoint (and how to
serve it), and the bits per parameter with the adapters as stored."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from compress.lowrank import NF8_BITS

from ..checkpoint.tensors import read_header
from ..checkpoint.write import adapter_modules
from ..dtypes import code_bytes
from .report import StageReport

log = logging.getLogger(__name__)


def _stored_adapter_bytes(directories: list[Path]) -> int:
    """Bytes of every LoRA tensor (``.lora_A.`` / ``.lora_B.``) in the directories' safetensors files."""
    total = 0
    for directory in directories:
        for file in sorted(directory.glob("*.safetensors")):
            header, _ = read_header(file)
            total += sum(math.prod(entry["shape"]) * code_bytes(entry["dtype"]) for key, entry in header.items()
                         if ".lora_A." in key or ".lora_B." in key)
    return total


def adapter_bits(ctx, report: StageReport, directories: list[Path], quantized_params: int) -> None:
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


def engine_notes(report: StageReport, engines: dict, target: Path) -> None:
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
