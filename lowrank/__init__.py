"""Low-rank parts: the LoRA wrapper, its initializers, and LQ-LoRA's quantized + low-rank decomposition.

(Fisher estimation, the ILP allocator and the stages arrive with the rest of the LQ-LoRA issue.)"""

from .decompose import Decomposition, lq_decompose
from .init import init_default, init_from_factors
from .lora import LoRALinear

__all__ = ["Decomposition", "LoRALinear", "init_default", "init_from_factors", "lq_decompose"]
