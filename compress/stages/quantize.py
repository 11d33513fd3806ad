"""quantize: replace linear layers by packed low-bit ``QuantLinear`` layers, no training.

```yaml
- quantize: {method: rtn, config: {type: uniform, bits: 4, group_size: 64, sym: false},
             overrides: {"re:.*down_proj$": {bits: 8}}, ignore: [lm_head]}
- quantize: {method: gptq, config: {bits: 3, group_size: 128}, damp: 0.05, damp_increment: 0.01, block: 128,
             order: group_aware, mse_norm: 0.0, refine_rounds: 1}
- quantize: {method: awq, then: gptq, config: {bits: 4, group_size: 128}, grid: 20, duo_scaling: true}
```

``method`` names a quantizer of the registry (``quant.quantizers``), whose settings are this
stage's fields (``quantize_spec``). The stage walks the model unit by unit on the run's device
(``replace_layers``) and gives each quantizer what it declares it needs: ``rtn`` (nothing) rounds
each weight to its group's grid; ``gptq`` (uniform configs only; Hessians) carries
``data.calibration``'s activations through the decoder layer by layer (``compress.execution.layerwise``) and
quantizes each group of linears reading one input with that input's Hessian (``quant.gptq``:
``damp`` fraction of mean diag(H), raised by ``damp_increment`` while H is not positive definite,
lazy ``block`` columns, ``order`` natural / activation / group_aware, ``mse_norm`` > 0 for the
per-group scale search, ``refine_rounds`` of code and scale refinement), the layer's outputs with
its quantized linears feeding the next layer; linears that read one input and share a config
(q/k/v, gate/up) run as one stacked GPTQ. GPTQ's defaults are GPTQModel's and were chosen on
held-out text (python-doc, SmolLM2-135M, int4 g64 sym: perplexity 12.369 against 13.901 with natural
order and damp 0.01, 12.773 for GPTQModel 7.6.0 at its defaults; one refinement round: int3 g64 sym
24.82 → 19.34); ``benchmarks/heldout.py`` measures the whole grid (BENCHMARKS.md). A transform
(``awq``: activation statistics) first changes each float decoder layer (``quant.awq``: per-channel
scales folded into the norms), then the quantizer it names in ``then`` rounds it. Selected linears
outside the decoder layers (an lm_head that is not ignored) are rounded with RTN, and the report says so.

With ``torchrun`` the matrices (of each input group) are shared out over the ranks
(``compress.execution.distributed``). ``config`` is the default for every selected layer
(``targets`` minus ``ignore``: class names, exact module names, or ``re:`` regexes). ``overrides`` maps a selector to fields that replace the
default's; every matching override applies, in order. ``type: nf`` selects NormalFloat codes with
double-quantized block scales (``bits, block, scale_bits, scale_block, scale_dtype``); ``uniform``
selects group-wise affine integers (``bits, group_size, sym``). When the recipe later exports GPTQ,
q/k/v and gate/up of a layer are given one config (the most precise of theirs), as engines fuse them
(``ModelState.fuse_ties``);
every such change is listed in the report.
"""

from __future__ import annotations

import time

import torch

from compress.quant import QuantConfig, QuantLinear
from compress.quant.quantizers import QUANTIZERS

from ..errors import RecipeError, StageError
from ..execution.replace_layers import Replacement, replace_layers
from ..model_state import ModelState, ModuleQuant
from ..planning.stage_memory import PlanState, calibration, held, quantized
from ..stage import Stage
from .quantize_spec import QuantizeConfig, QuantSpec, plan_modules  # noqa: F401  (QuantSpec: imported by others)

def check(recipe, entry, model) -> None:
    config: QuantizeConfig = entry.config
    plan, _, shapes = plan_modules(model, config, tie_fused=False)
    if not plan:
        raise RecipeError(f"{entry.where}.targets: selects no linear layer (targets {config.targets}, "
                          f"ignore {config.ignore})")
    for name, qconfig in plan.items():
        problem = qconfig.shape_problem(shapes[name])
        if problem:
            raise RecipeError(f"{entry.where}: {problem} ({name})")
    _check_method(entry, config, plan)


def effect(entry, model, state: ModelState) -> ModelState:
    """Every selected linear quantized with its config (fused groups tied when ``state.fuse_ties``)."""
    plan, _, _ = plan_modules(model, entry.config, state.fuse_ties)
    return state.quantized({name: ModuleQuant(config, by=entry.where) for name, config in plan.items()})


def _check_method(entry, config: QuantizeConfig, plan: dict[str, QuantConfig]) -> None:
    for quantizer in dict.fromkeys([QUANTIZERS[config.method], config.rounding()]):
        for name, qconfig in plan.items():
            if not isinstance(qconfig, quantizer.configs):
                raise RecipeError(f"{entry.where}: {quantizer.name} quantizes to {quantizer.configs.kind} configs; "
                                  f"{name} would get {qconfig.name}")


def _dense_modules(ctx, modules: dict, report) -> dict[str, torch.nn.Module]:
    """The dense ones of a unit's selected ``modules`` (those already quantized are reported)."""
    dense = {}
    for name, module in modules.items():
        if isinstance(module, QuantLinear):
            report.skip(name, f"already quantized ({module.config.name})")
            continue
        if not torch.isfinite(module.weight).all():
            raise StageError(f"{ctx.entry.where}: {name} has non-finite weights; cannot quantize")
        dense[name] = module
    return dense


def _stacks(group: dict, stats: dict | None, plan: dict, stacked: bool) -> list[list[str]]:
    """``group``'s names bucketed by (shared statistics, config): each bucket is one quantizer call
    (q/k/v or gate/up: one stacked GPTQ column loop). Unstacked: one name per call (with ranks, each
    matrix is a unit of work of its own)."""
    if not stacked:
        return [[name] for name in group]
    buckets: dict[tuple[int, QuantConfig], list[str]] = {}
    for name in group:
        buckets.setdefault((id(stats[name]), plan[name]), []).append(name)
    return list(buckets.values())


def _replacement(module, quantized, seconds: float, extra: dict) -> Replacement:
    weight = module.weight.detach()
    error = quantized.squared_error(weight) ** 0.5 / max(float(weight.float().norm()), 1e-30)
    return Replacement(QuantLinear.from_weight(quantized, module.bias), quantized.config,
                       {"config": quantized.config.name, "rel_error": float(error), "seconds": seconds, **extra})


def _maker(ctx, config: QuantizeConfig, plan: dict):
    """``make(group, stats)`` for ``replace_layers``: the stage's rounding quantizer on each bucket
    of the group (its fallback where it needs statistics and got none: outside the decoder layers)."""
    chosen = config.rounding()
    settings = chosen.settings_from(config)

    def make(group: dict, stats: dict | None) -> dict[str, Replacement]:
        quantizer = chosen.given(stats)
        made = {}
        for names in _stacks(group, stats, plan, stacked=stats is not None and not ctx.ranks.distributed):
            start = time.perf_counter()
            results = quantizer.quantize([group[n].weight for n in names], stats[names[0]] if stats else None,
                                         plan[names[0]], settings)
            seconds = (time.perf_counter() - start) / len(names)
            made.update({n: _replacement(group[n], q, seconds, extra) for n, (q, extra) in zip(names, results)})
        return made
    return make


def _quantize_units(ctx, config: QuantizeConfig, plan: dict, report) -> dict[str, tuple[int, int]]:
    """Unit by unit on the compute device (``replace_layers``): RTN rounds every unit's linears;
    a quantizer that needs statistics (GPTQ: Hessians) gets them layer by layer from the
    calibration activations, and the linears outside the decoder layers are rounded with RTN.
    Returns the quantized shapes."""
    shapes, method, needs = {}, QUANTIZERS[config.method], config.rounding().needs
    settings = method.settings_from(config)
    prepare = (lambda layer, groups: method.prepare(layer, groups, plan, settings)) if method.prepare else None  # noqa: E731

    def pick(modules: dict) -> dict:
        dense = _dense_modules(ctx, modules, report)
        shapes.update({n: (m.out_features, m.in_features) for n, m in dense.items()})
        return dense

    start = time.perf_counter()
    description = "quantize units" if needs == "nothing" and not prepare else f"{config.method} units"
    outer = replace_layers(ctx, report, list(plan), _maker(ctx, config, plan), needs, description, pick, prepare)
    if needs != "nothing" or prepare:
        report.metrics[f"{config.method}_seconds"] = time.perf_counter() - start
    if outer:
        fallback = config.rounding().given(None).name.upper()
        report.notes.append(f"outside the decoder layers, rounded with {fallback}: {', '.join(outer)}")
    return shapes


def run(ctx, config: QuantizeConfig, report) -> None:
    plan, changes, _ = plan_modules(ctx.model, config, ctx.state.fuse_ties)
    for name, reason in changes:
        report.notes.append(f"{name}: {reason}")
    shapes = _quantize_units(ctx, config, plan, report)
    params = sum(o * i for o, i in shapes.values())
    bits = sum(plan[name].storage_bits(shape) for name, shape in shapes.items())
    label = config.config.to_config().name
    report.metrics.update(quantized_params=params, label=label if config.method == "rtn" else f"{config.method} {label}",
                          bits_per_param=bits / params if params else None)


def memory(arch, config: QuantizeConfig, state: PlanState) -> list[tuple[str, dict]]:
    """The model it reads, and a calibrated method's layer-by-layer walk (GPTQ, AWQ); the base is
    packed after."""
    before = held(arch, state)
    quantized(state, config.config.to_config(), config.config.to_config().name)
    if QUANTIZERS[config.method].needs != "nothing" or config.rounding().needs != "nothing":
        return [(f"quantize ({config.method})", {**before, **calibration(arch, state)})]
    return [("quantize", before)]


STAGE = Stage(name="quantize", config=QuantizeConfig, run=run, modifies_model=True, quantizes=True,
              check=check, effect=effect, memory=memory,
              streaming=lambda config: None)
