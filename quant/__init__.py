"""Quantizers, packing and storage accounting: tensors in, tensors out. Never imports orchestration;
of kernels only the one declared type (``KernelWeight``, built here) and the matmul a layer calls."""

from .config import SUPPORTED_BITS, NFConfig, QuantConfig, UniformConfig
from .linear import QuantLinear
from .normalfloat import nf_codebook, quantize_nf, dequantize_nf
from .packing import pack_codes, unpack_codes
from .qweight import QuantizedWeight, check_tensors
from .uniform import quantize_rtn, dequantize_gptq

__all__ = [
    "SUPPORTED_BITS", "NFConfig", "QuantConfig", "QuantizedWeight", "QuantLinear", "UniformConfig", "check_tensors",
    "dequantize_gptq", "dequantize_nf", "nf_codebook", "pack_codes", "quantize_nf", "quantize_rtn",
    "unpack_codes",
]
