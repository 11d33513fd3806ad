"""compress: make Hugging Face causal LMs small enough to fine-tune and serve on one GPU.

Public API (imports are deferred so ``import compress`` stays cheap):

- ``compress.load(path, dtype=None)``: a model from any checkpoint we write (gptq, native, hf), from
  a GPTQ v1 checkpoint of another tool, or from a dense Hugging Face directory.
- ``compress.load_adapter(model, path, trainable=False)``: a PEFT adapter directory applied to a model
  (ours packed or not) with ``PeftModel.from_pretrained``; returns the ``PeftModel``.
- ``compress.load_recipe(path)`` / ``compress.run_recipe(recipe, resume=False)``.
- ``compress.inspect(path)``: per-module formats and bits per parameter of a checkpoint.
"""

__version__ = "0.1.0"


def load(path, dtype: str | None = None, verify: bool = True):
    from .checkpoint.load import load_checkpoint

    return load_checkpoint(path, dtype=dtype, verify=verify)


def load_adapter(model, path, trainable: bool = False):
    from .checkpoint.peft import load_peft_adapter

    return load_peft_adapter(model, path, trainable=trainable)


def load_recipe(path):
    from .run.recipe import load_recipe as _load_recipe

    return _load_recipe(path)


def run_recipe(recipe, resume: bool = False, overwrite: bool = False, progress=None, ranks=None):
    from .run.pipeline import run_recipe as _run_recipe

    return _run_recipe(recipe, resume=resume, overwrite=overwrite, progress=progress, ranks=ranks)


def inspect(path, verify: bool = True) -> dict:
    from .checkpoint.inspect import inspect_checkpoint

    return inspect_checkpoint(path, verify=verify)


__all__ = ["__version__", "inspect", "load", "load_adapter", "load_recipe", "run_recipe"]
