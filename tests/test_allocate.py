"""lowrank.allocate: the ILP equals brute force, honours ties and budgets, and names infeasibility."""

import itertools
import random

import pytest

from compress.lowrank.allocate import InfeasibleBudget, allocate, budget_bits_for

SOLVERS = ["PULP_CBC_CMD", "HiGHS"]


def random_instance(matrices: int, configs: int, seed: int):
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(matrices)]
    numel = {m: rng.choice([4096, 8192, 16384]) for m in names}
    bits_per = sorted(rng.uniform(2, 8.5) for _ in range(configs))
    bits = {m: {f"c{k}": int(numel[m] * b) for k, b in enumerate(bits_per)} for m in names}
    # error falls with bits, at a matrix-specific rate (sensitivity)
    cost = {m: {f"c{k}": rng.uniform(0.5, 2) * 2.0 ** (-b) * numel[m] for k, b in enumerate(bits_per)} for m in names}
    return cost, bits, numel


def brute_force(cost, bits, budget, ties=()):
    names = sorted(cost)
    configs = sorted(next(iter(cost.values())))
    best = None
    for choice in itertools.product(configs, repeat=len(names)):
        pick = dict(zip(names, choice))
        if any(len({pick[m] for m in group}) > 1 for group in ties):
            continue
        if sum(bits[m][pick[m]] for m in names) > budget:
            continue
        total = sum(cost[m][pick[m]] for m in names)
        best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", range(4))
def test_ilp_equals_brute_force(solver, seed):
    cost, bits, numel = random_instance(5, 5, seed)
    for bits_per_param in (2.6, 3.3, 4.1, 6.0):
        budget = budget_bits_for(numel, bits_per_param=bits_per_param)
        expected = brute_force(cost, bits, budget)
        if expected is None:
            with pytest.raises(InfeasibleBudget):
                allocate(cost, bits, numel, budget, solver=solver)
            continue
        result = allocate(cost, bits, numel, budget, solver=solver)
        assert result.bits <= budget
        assert result.cost == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_tied_matrices_get_one_config(solver):
    cost, bits, numel = random_instance(5, 4, seed=11)
    ties = [["m0", "m1", "m2"], ["m3", "m4"]]
    budget = budget_bits_for(numel, bits_per_param=4.0)
    result = allocate(cost, bits, numel, budget, ties=ties, solver=solver)
    assert len({result.choice[m] for m in ties[0]}) == 1 and len({result.choice[m] for m in ties[1]}) == 1
    assert result.cost == pytest.approx(brute_force(cost, bits, budget, ties), rel=1e-9)


def test_infeasible_budget_names_the_smallest_feasible_one():
    cost, bits, numel = random_instance(3, 3, seed=5)
    smallest = sum(min(b.values()) for b in bits.values())
    params = sum(numel.values())
    with pytest.raises(InfeasibleBudget, match=rf"smallest feasible budget is {smallest / params:.4f} bits/param") as err:
        allocate(cost, bits, numel, smallest - 1)
    assert err.value.minimum_bits == smallest
    assert allocate(cost, bits, numel, smallest).bits == smallest  # exactly the minimum is feasible


def test_budget_in_gib_or_bits_per_param():
    numel = {"a": 1000, "b": 3000}
    assert budget_bits_for(numel, bits_per_param=2.5) == 10000
    assert budget_bits_for(numel, gib=1.0) == 8 * 2**30
    with pytest.raises(ValueError, match="exactly one"):
        budget_bits_for(numel, bits_per_param=2.5, gib=1.0)


def test_pareto_front_drops_only_dominated_configs():
    from compress.lowrank.allocate import pareto

    table = {"a": (5.0, 100), "b": (4.0, 200), "c": (4.5, 300), "d": (1.0, 400), "e": (1.0, 400), "f": (6.0, 50)}
    assert pareto(table) == {"f": (6.0, 50), "a": (5.0, 100), "b": (4.0, 200), "d": (1.0, 400)}


def test_grids_and_matrix_costs():
    import torch

    from compress.lowrank.costs import GRIDS, matrix_costs
    from compress.lowrank.decompose import lq_decompose
    from compress.quant import QuantConfig, UniformConfig

    nf = GRIDS["nf"]()
    assert len(nf) == 432 and len({c.name for c in nf}) == 432
    assert min(c.bits_per_param for c in nf) == pytest.approx(2 + 2 / 64 + 16 / (64 * 256))
    assert len(GRIDS["gptq"]()) == 12 and all(isinstance(c, UniformConfig) and not c.sym for c in GRIDS["gptq"]())
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    configs = [QuantConfig.uniform(2, 64), QuantConfig.uniform(4, 64), QuantConfig.uniform(8, 64)]
    plain = matrix_costs(weight, configs, rank=0)
    lowrank = matrix_costs(weight, configs, rank=8, iterations=4)
    errors = [plain[c.name][0] for c in configs]
    assert errors[0] > errors[1] > errors[2]  # more bits, less error
    assert all(lowrank[c.name][0] < plain[c.name][0] for c in configs)  # the low-rank part helps
    assert lowrank["int4-g64-asym"][0] == pytest.approx(lq_decompose(weight, 8, configs[1], 4).error ** 2)
    assert plain["int4-g64-asym"][1] == configs[1].storage_bits((64, 128))
