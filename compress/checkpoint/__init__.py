"""Checkpoints: one class per format in ``formats/`` (gptq | native | hf | compressed-tensors), one
registry ``FORMATS``; load, inspect; atomic and checksummed; where a run may write (output_paths).
Imports only the root foundations and the libraries."""

from .formats import FORMAT_NAMES, FORMATS
from .inspect import inspect_checkpoint
from .load import load_checkpoint, read_layout
from .write import model_state, quantized_modules

write_gptq = FORMATS["gptq"].write
write_native = FORMATS["native"].write
write_hf = FORMATS["hf"].write
write_compressed_tensors = FORMATS["compressed-tensors"].write

__all__ = ["FORMATS", "FORMAT_NAMES", "inspect_checkpoint", "load_checkpoint", "model_state", "quantized_modules",
           "read_layout", "write_compressed_tensors", "write_gptq", "write_hf", "write_native"]
