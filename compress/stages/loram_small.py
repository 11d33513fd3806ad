"""loram's small-model steps around training: quantizing it (``quantize_small``: NF4 through
bitsandbytes, or any ``quantize`` config), recovering its trained adapters to the large model's
shapes (zero at removed neurons: ``prune.recover``), and the report of its memory against the large
model's."""

from __future__ import annotations

import torch

from compress.lowrank import LoRALinear
from compress.prune import layer_units
from compress.prune.recover import kept_positions, recover_factors

from ..targets import select_linears, set_module
from .quantize import QuantSpec
from .training_common import tail_mean

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # bitsandbytes NF4 with double quantization (QLoRA): 4.127


def dense_linears(model) -> dict:
    """The dense linears the small model trains on, the head left out."""
    return {n: m for n, m in select_linears(model, ["Linear"], ["lm_head"]) if isinstance(m, torch.nn.Linear)}


def quantize_small(model, spec) -> None:
    if spec is None:
        return
    for name, linear in dense_linears(model).items():
        if spec == "nf4":
            import bitsandbytes as bnb

            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=linear.weight.dtype, compress_statistics=True, quant_type="nf4")
            layer.load_state_dict(linear.state_dict())
            set_module(model, name, layer.to(linear.weight.device))
        else:
            from compress.quant import QuantLinear

            set_module(model, name, QuantLinear.quantize(linear, spec.to_config()))


def recover(small, large, removed: dict) -> int:
    """Put the small model's adapters, recovered to full shapes, on the large model; returns how many."""
    units = {u.prefix: u for u in layer_units(large)} if removed else {}  # semi/unstructured: shapes unchanged
    count = 0
    for name, layer in [(n, m) for n, m in small.named_modules() if isinstance(m, LoRALinear)]:
        target = large.get_submodule(name)
        prefix, leaf = name.rsplit(".", 2)[0], name.rsplit(".", 1)[1]
        unit = units.get(prefix)
        index = str(unit.index) if unit is not None else None
        shape = (target.out_features, target.in_features)
        if unit is not None and index in removed:
            kept = kept_positions(unit, leaf, removed[index])
        else:
            kept = torch.arange(shape[0] if leaf not in ("o_proj", "down_proj") else shape[1])
        a, b = recover_factors(leaf, layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), kept, shape)
        adapter = LoRALinear(target, layer.rank, layer.alpha)
        with torch.no_grad():
            adapter.lora_A.weight.copy_(a)
            adapter.lora_B.weight.copy_(b)
        set_module(large, name, adapter)
        count += 1
    return count


def report_sizes(report, config, result, large_params: int, small_params: int, storage: dict,
            count: int) -> None:
    """Training-time parameter memory, small vs large: measured (as run, and with dense tensors at 16
    bits, the paper's setting) and LoRAM's formula 4 x large / small parameters for a 4-bit small model."""
    bits = None if isinstance(config.quantize_small, QuantSpec) else NF4_BITS if config.quantize_small else 16.0
    report.metrics.update(
        large_params=large_params, small_params=small_params, small_storage_bytes=storage["small"],
        large_storage_bytes=storage["large"], storage_reduction_measured=storage["large"] / storage["small"],
        small_storage_bytes_16bit=storage["small_16bit"], large_storage_bytes_16bit=2 * large_params,
        storage_reduction_16bit=2 * large_params / storage["small_16bit"],
        storage_reduction_4bit_formula=4 * large_params / small_params, recovered_layers=count,
        first_loss=result.losses[0], final_loss=tail_mean(result.losses), train_seconds=result.seconds,
        train_peak_rss_mib=result.peak_rss_mib, train_rss_growth_mib=result.rss_growth_mib,
        train_model_mib=result.model_mib,
        label=f"loram {config.prune.method} {config.prune.ratio:g}" + (" q" if config.quantize_small else ""))
    if bits is not None:
        report.metrics["storage_reduction_computed"] = 16 * large_params / (bits * small_params)
    report.notes.append(f"small model {small_params:,} params, {storage['small_16bit'] / 2**20:.1f} MiB with dense "
                        f"tensors at 16 bits, vs large {large_params:,} params, {2 * large_params / 2**20:.1f} MiB: "
                        f"{2 * large_params / storage['small_16bit']:.2f}x less parameter memory; {count} adapters "
                        f"recovered ({config.output})")
