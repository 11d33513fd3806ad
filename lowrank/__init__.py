"""Low-rank parts: the LoRA wrapper and its initializers, LQ-LoRA's quantized + low-rank decomposition,
the diagonal empirical Fisher, and the ILP that allocates configs under a storage budget.

(The cached, resumable cost table over a model, the ``lq_lora`` / ``finetune`` stages and PEFT export arrive with the rest of the
LQ-LoRA issue.)"""

from .allocate import Allocation, InfeasibleBudget, allocate, budget_bits_for, minimum_bits
from .costs import GRIDS, matrix_costs
from .decompose import Decomposition, lq_decompose
from .fisher import empirical_fisher
from .init import init_default, init_from_factors
from .lora import LoRALinear

__all__ = ["GRIDS", "Allocation", "Decomposition", "InfeasibleBudget", "LoRALinear", "allocate", "budget_bits_for",
           "empirical_fisher", "init_default", "init_from_factors", "lq_decompose", "matrix_costs", "minimum_bits"]
