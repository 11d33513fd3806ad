"""lq_lora's cost table: {matrix: {config: (squared error, bits)}}, and the allocation ILP over it (``solve``).

Two objectives (``lq_lora``'s ``objective``):

- ``weight``: each matrix's (Fisher-weighted) Frobenius error of its RTN decomposition, matrix by
  matrix, unit by unit, from the weights alone (``workers`` processes).
- ``output``: each matrix's output error of its decomposition with the stage's own quantizer (RTN or
  GPTQ on the layer's input Hessian; ``lowrank.costs``), rows weighted by the Fisher when there is
  one. The Hessians come from one calibration walk over the unquantized model: each decoder layer's
  input groups get their Hessians from the float activations (``compress.execution.layerwise``), their costs
  are computed, and the float layer's outputs feed the next layer; nothing is replaced.

Entries are cached per matrix under ``OUTPUT/.cache/lq_lora/`` as each is done, keyed by the
weight's hash, the Fisher's and the Hessian's when used, and the settings, so a killed run recomputes
only what is missing. With torchrun the matrices are shared out and each rank reads the cache for its
own share only (what another rank has cached meanwhile cannot change who computes what); every rank
makes the calibration walk.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch

from compress.lowrank import InfeasibleBudget, allocate, budget_bits_for, matrix_costs
from compress.quant.gptq import GPTQSettings

from ..checkpoint.atomic import atomic_write_text
from ..errors import StageError
from ..execution.layerwise import calibration_step
from ..execution.parallel import parallel_map
from ..execution.walker import visit_units
from ..training.fisher_by_layer import load_layer_fisher
from .lq_lora_spec import ties


def _digest(tensor: torch.Tensor) -> bytes:
    return tensor.detach().float().contiguous().cpu().numpy().tobytes()


def cache_key(weight: torch.Tensor, fisher: torch.Tensor | None, configs: list, settings: list,
              hessian: torch.Tensor | None = None) -> str:
    digest = hashlib.sha256(_digest(weight))
    for extra in (fisher, hessian):
        if extra is not None:
            digest.update(_digest(extra))
    digest.update(json.dumps(settings + [c.name for c in configs]).encode())
    return digest.hexdigest()[:24]


def gptq_settings(config) -> GPTQSettings | None:
    """LQ-LoRA's GPTQ: its damp; refined at rank 0 only (at rank > 0 it runs for every iteration)."""
    if config.quantizer != "gptq":
        return None
    return GPTQSettings(damp=config.damp, refine_rounds=config.refine_rounds if config.rank == 0 else 0)


def cost_entries(ctx, config, grid_for, modules: dict, fisher: dict, hessians: dict | None = None) -> dict:
    """{name: entries} of ``modules`` (this rank's share, from the cache where it has them);
    output-aware when ``hessians`` ({name: H}) are given."""
    cache = ctx.out_dir / ".cache" / "lq_lora"
    cache.mkdir(parents=True, exist_ok=True)
    local, paths, jobs = {}, {}, {}
    settings = [config.rank, config.iterations, config.seed]
    if hessians is not None:
        refined = gptq_settings(config).refine_rounds if config.quantizer == "gptq" else 0
        settings += ["output", config.quantizer, config.damp] + ([refined] if refined else [])
    for name in ctx.ranks.share(list(modules)):
        weight = modules[name].weight.detach().float()
        configs, hessian = grid_for(config, tuple(weight.shape)), (hessians or {}).get(name)
        paths[name] = cache / f"{cache_key(weight, fisher.get(name), configs, settings, hessian)}.json"
        if paths[name].is_file():
            local[name] = {k: tuple(v) for k, v in json.loads(paths[name].read_text()).items()}
        elif hessian is None:
            jobs[name] = (weight, configs, config.rank, config.iterations, fisher.get(name), config.seed)
        else:
            jobs[name] = (weight, configs, config.rank, config.iterations, fisher.get(name), config.seed, hessian,
                          gptq_settings(config))
    workers = config.workers if hessians is None else 1  # Hessians stay in this process
    for name, entries in ctx.track(parallel_map(matrix_costs, jobs, workers), "lq_lora cost entries", len(jobs)):
        local[name] = {k: tuple(v) for k, v in entries.items()}
        atomic_write_text(paths[name], json.dumps(entries))
    return local


def weight_cost_table(ctx, config, grid_for, shapes: dict, fisher_dir) -> dict:
    """The ``weight`` objective's table, unit by unit from the weights."""
    units, local = ctx.units, {}

    def work(prefix, unit):
        modules = {n: ctx.model.get_submodule(n) for n in shapes if units.owns(prefix, n)}
        local.update(cost_entries(ctx, config, grid_for, modules, load_layer_fisher(fisher_dir, prefix, ctx.device)))

    visit_units(ctx, "lq_lora cost units", work, [p for p in units.units if any(units.owns(p, n) for n in shapes)])
    table = ctx.ranks.gather(local)
    return {name: table[name] for name in shapes}


def output_cost_table(ctx, config, grid_for, shapes: dict, fisher_dir, seen=None) -> dict:
    """The ``output`` objective's table: one calibration walk over the float model (module docstring);
    ``seen.add(members, hessians, fisher)`` is also called for each input group when given
    (``lq_lora_measured.References``)."""
    units, local = ctx.units, {}
    windows = ctx.windows("calibration")
    carried = None
    with units.walk():
        for prefix in ctx.track(units.units, "lq_lora cost units"):
            with units.unit(prefix) as unit:
                modules = {n: ctx.model.get_submodule(n) for n in shapes if units.owns(prefix, n)}
                fisher = load_layer_fisher(fisher_dir, prefix, ctx.device)

                def costs(members, hessians, fisher=fisher):
                    plain = {n: h.hessian for n, h in hessians.items()}
                    local.update(cost_entries(ctx, config, grid_for, members, fisher, plain))
                    if seen is not None:
                        seen.add(members, plain, fisher)

                carried = calibration_step(units, prefix, unit, carried, modules, costs, windows)
    table = ctx.ranks.gather(local)
    return {name: table[name] for name in shapes}


def solve(ctx, config, table: dict, numel: dict, report):
    """The ILP's choice on rank 0, broadcast; an impossible budget ends the stage."""
    budget = budget_bits_for(numel, config.budget_bits, config.budget_gib)
    start = time.perf_counter()
    result = ctx.ranks.broadcast(_allocate(config, table, numel, budget, list(numel)) if ctx.ranks.main else None)
    if isinstance(result, InfeasibleBudget):
        raise StageError(f"{ctx.entry.where}: {result}")
    report.metrics.update(ilp_seconds=time.perf_counter() - start, ilp_solver=result.solver)
    return result


def _allocate(config, table: dict, numel: dict, budget: float, names: list[str]):
    """The ILP's result, or the InfeasibleBudget that says why there is none (rank 0 solves it)."""
    try:
        return allocate({n: {c: e[0] for c, e in t.items()} for n, t in table.items()},
                        {n: {c: e[1] for c, e in t.items()} for n, t in table.items()},
                        numel, budget, ties(names, config.grid), config.solver)
    except InfeasibleBudget as err:
        return err
