"""Checkpoints: write (gptq | native | hf), load, inspect; atomic and checksummed."""

from .inspect import inspect_checkpoint
from .load import load_checkpoint, read_layout
from .write import FORMATS, WRITERS, model_state, quantized_modules, write_gptq, write_hf, write_native

__all__ = ["FORMATS", "WRITERS", "inspect_checkpoint", "load_checkpoint", "model_state", "quantized_modules",
           "read_layout", "write_gptq", "write_hf", "write_native"]
