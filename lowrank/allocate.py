"""Mixed-configuration allocation under a storage budget: a multiple-choice knapsack solved as an ILP.

Given, for every matrix i and candidate config c, an error ``cost[i][c]`` and its storage
``bits[i][c]`` (exact, ``QuantConfig.storage_bits``), choose one config per matrix:

    minimize   sum_i sum_c cost[i,c] x[i,c]
    subject to sum_c x[i,c] = 1                      for every matrix i
               sum_i sum_c bits[i,c] x[i,c] <= budget (total bits)
               x[i,c] = x[j,c]                       for i, j in one tied group (fused q/k/v, gate/up)
               x binary

Tied matrices share one set of variables (their costs and bits add up). Configs that another config
of the same group beats on both cost and bits are dropped first (they are never optimal), which
shrinks LQ-LoRA's 432-config NF grid to its Pareto front. Costs are rescaled to a sum
of about 1e3; storage stays in raw bits (exact integers in float64), so the solver's absolute
feasibility tolerance cannot buy a visible overrun, and the returned choice is checked exactly
against the budget. Solved with PuLP: HiGHS when installed, else CBC; both are exact branch-and-bound, so the
result is optimal within ``gap`` (relative, default 0).

A budget below the cheapest possible assignment raises ``InfeasibleBudget`` naming that minimum.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

import pulp

log = logging.getLogger(__name__)
GIB_BITS = 8 * 2**30


class InfeasibleBudget(ValueError):
    """The budget is below the cheapest assignment (``minimum_bits`` is the smallest feasible one)."""

    def __init__(self, budget_bits: float, minimum_bits: float, params: int):
        self.minimum_bits = minimum_bits
        super().__init__(f"budget {budget_bits / params:.4f} bits/param ({budget_bits / GIB_BITS:.4f} GiB) is "
                         f"infeasible: the smallest feasible budget is {minimum_bits / params:.4f} bits/param "
                         f"({minimum_bits / GIB_BITS:.4f} GiB)")


@dataclass
class Allocation:
    choice: dict[str, str]  # matrix -> config name
    cost: float  # total cost of the choice (unscaled)
    bits: int  # total storage bits of the choice
    solver: str


def _groups(matrices: list[str], ties: list[list[str]]) -> list[list[str]]:
    """Partition the matrices into tied groups (singletons for untied matrices), checking the ties."""
    seen: dict[str, int] = {}
    groups: list[list[str]] = []
    for group in ties:
        members = [m for m in group if m in matrices]
        if len(members) < 2:
            continue
        if any(m in seen for m in members):
            raise ValueError(f"matrix in two tied groups: {members}")
        for m in members:
            seen[m] = len(groups)
        groups.append(members)
    return groups + [[m] for m in matrices if m not in seen]


def _group_tables(groups, cost, bits):
    """Per group: {config: (summed cost, summed bits)} over configs every member has."""
    tables = []
    for group in groups:
        shared = set.intersection(*(set(cost[m]) for m in group))
        if not shared:
            raise ValueError(f"tied matrices {group} have no config in common")
        tables.append({c: (sum(cost[m][c] for m in group), sum(bits[m][c] for m in group)) for c in sorted(shared)})
    return tables


def pareto(table: dict[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
    """The configs no other config beats on both cost and bits (dropping the rest keeps the optimum)."""
    kept, best_cost = {}, float("inf")
    for config, (cost, bits) in sorted(table.items(), key=lambda item: (item[1][1], item[1][0], item[0])):
        if cost < best_cost:
            kept[config], best_cost = (cost, bits), cost
    return kept


def minimum_bits(bits: dict[str, dict[str, int]], ties: list[list[str]] = ()) -> int:
    """The smallest total storage any assignment can have (tied groups share one config)."""
    tables = _group_tables(_groups(sorted(bits), list(ties)), bits, bits)  # bits stand in for the costs
    return sum(min(b for _, b in table.values()) for table in tables)


def solver_for(name: str | None = None, gap: float = 0.0, time_limit: float | None = None):
    available = pulp.listSolvers(onlyAvailable=True)
    name = name or ("HiGHS" if "HiGHS" in available else "PULP_CBC_CMD")
    if name not in available:
        raise ValueError(f"ILP solver {name!r} is not available (have: {', '.join(available)})")
    return pulp.getSolver(name, msg=False, gapRel=gap, timeLimit=time_limit)


def allocate(cost: dict[str, dict[str, float]], bits: dict[str, dict[str, int]], numel: dict[str, int],
             budget_bits: float, ties: list[list[str]] = (), solver: str | None = None, gap: float = 0.0,
             time_limit: float | None = None) -> Allocation:
    """The minimum-cost choice of one config per matrix within ``budget_bits`` total storage
    (``numel``: parameters per matrix, for messages and ``budget_bits_for``)."""
    matrices = sorted(cost)
    groups = _groups(matrices, list(ties))
    minimum = minimum_bits(bits, list(ties))
    params = sum(numel[m] for m in matrices)
    if minimum > budget_bits:
        raise InfeasibleBudget(budget_bits, minimum, params)
    tables = [pareto(table) for table in _group_tables(groups, cost, bits)]
    scale = 1e3 / max(sum(max(c for c, _ in table.values()) for table in tables), 1e-30)
    engine = solver_for(solver, gap, time_limit)
    limit = float(budget_bits)
    for _ in range(3):  # a solver's feasibility tolerance may overrun by a few bits: tighten and re-solve
        choice = _solve(tables, groups, scale, limit, engine)
        total_bits = sum(bits[m][choice[m]] for m in matrices)
        if total_bits <= budget_bits:
            break
        limit -= total_bits - budget_bits
    else:
        raise RuntimeError(f"ILP solution uses {total_bits} bits, over the budget of {budget_bits:.0f}")
    return Allocation(choice, sum(cost[m][choice[m]] for m in matrices), total_bits, engine.name)


def _solve(tables, groups, scale: float, limit: float, engine) -> dict[str, str]:
    """One ILP solve: group variables, one config per group, raw storage bits <= limit."""
    problem = pulp.LpProblem("allocation", pulp.LpMinimize)
    choose = [{c: pulp.LpVariable(f"x_{g}_{k}", cat="Binary") for k, c in enumerate(table)}
              for g, table in enumerate(tables)]
    problem += pulp.lpSum(scale * table[c][0] * choose[g][c] for g, table in enumerate(tables) for c in table)
    for options in choose:
        problem += pulp.lpSum(options.values()) == 1
    problem += pulp.lpSum(table[c][1] * choose[g][c] for g, table in enumerate(tables) for c in table) <= limit
    with _silenced_stdout():  # HiGHS prints a banner from C++ even with msg=False
        problem.solve(engine)
    status = pulp.LpStatus[problem.status]
    if status != "Optimal":
        raise RuntimeError(f"ILP solver {engine.name} ended with status {status}")
    choice = {}
    for g, group in enumerate(groups):
        picked = max(choose[g], key=lambda c: choose[g][c].value() or 0.0)
        choice.update({m: picked for m in group})
    return choice


@contextlib.contextmanager
def _silenced_stdout():
    """Point file descriptor 1 at /dev/null for the duration (catches output from C libraries)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def budget_bits_for(numel: dict[str, int], bits_per_param: float | None = None,
                    gib: float | None = None) -> float:
    """Total bit budget from bits per parameter (over these matrices) or from GiB of storage."""
    if (bits_per_param is None) == (gib is None):
        raise ValueError("give exactly one of bits_per_param and gib")
    return bits_per_param * sum(numel.values()) if gib is None else gib * GIB_BITS
