"""Low-rank parts: the LoRA wrapper and its initializers, LQ-LoRA's quantized + low-rank decomposition,
the diagonal empirical Fisher, and the ILP that allocates configs under a storage budget; also
``set_module``, the submodule swap that every library and ``compress.targets`` share.

The cached, resumable cost table over a model and the ``lq_lora`` / ``finetune`` stages live in
``compress/stages``; PEFT adapter files in ``compress/checkpoint/peft.py``."""

from .allocate import Allocation, InfeasibleBudget, allocate, budget_bits_for, minimum_bits
from .costs import GRIDS, matrix_costs
from .decompose import Decomposition, lq_decompose
from .fisher import empirical_fisher
from .init import init_default, init_from_factors
from .lora import NF8_BITS, LoRALinear, merge_adapters, set_module

__all__ = ["GRIDS", "NF8_BITS", "Allocation", "Decomposition", "InfeasibleBudget", "LoRALinear", "allocate",
           "budget_bits_for", "empirical_fisher", "init_default", "init_from_factors", "lq_decompose", "matrix_costs",
           "merge_adapters", "minimum_bits", "set_module"]
