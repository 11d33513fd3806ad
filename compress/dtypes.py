"""The dtype names that recipes, ``compress.load`` and streaming accept, and the torch dtypes they mean.

A module of its own, importing nothing of ``compress``, so that model loading (``compress.models``)
and checkpoint loading (``compress.checkpoint.load``) can both use it without importing each other
both ways.
"""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
