"""The compute device of a run: the recipe's ``device`` resolved against this machine.

```yaml
device: auto     # auto | cpu | cuda | cuda:N
```

``auto`` is the GPU when there is one (``cuda:LOCAL_RANK`` under ``torchrun``, each rank its own,
else ``cuda:0``) and the CPU otherwise. ``cuda`` is the same GPU, but a machine without one is an
error rather than a fallback; ``cuda:N`` names the GPU (under ``torchrun`` every rank would share
it, so ``cuda`` is the setting there). The model's weights live in host memory (or in their files
when streaming); each stage moves what it computes on to this device and back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from ..errors import RecipeError

DEVICE_SETTING = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(setting: str, env: Mapping[str, str] | None = None, cuda_count: int | None = None) -> torch.device:
    """The torch device that ``setting`` means here; ``env`` (default ``os.environ``, for
    ``LOCAL_RANK``) and ``cuda_count`` (default: the GPUs torch sees) are for tests."""
    env = os.environ if env is None else env
    count = device_count() if cuda_count is None else cuda_count
    if not DEVICE_SETTING.fullmatch(setting):
        raise RecipeError(f"device: {setting!r} is not one of auto, cpu, cuda, cuda:N")
    if setting == "cpu" or (setting == "auto" and count == 0):
        return torch.device("cpu")
    if count == 0:
        raise RecipeError(f"device: {setting}: this machine has no CUDA device (torch {torch.__version__}"
                          f"{'' if torch.version.cuda else ', a CPU-only build'}); use device: cpu or auto")
    index = int(setting.partition(":")[2]) if ":" in setting else _local_rank(env)
    if index >= count:
        where = "" if ":" in setting else f" (LOCAL_RANK={index})"
        raise RecipeError(f"device: {setting}{where}: this machine has {count} CUDA device"
                          f"{'s' if count != 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return torch.device("cuda", index)


def device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_rank(env: Mapping[str, str]) -> int:
    """This process's GPU under ``torchrun`` (its LOCAL_RANK), 0 when not launched by it."""
    value = env.get("LOCAL_RANK", "0")
    if not value.isdigit():
        raise RecipeError(f"LOCAL_RANK={value!r}: expected a non-negative integer (set by torchrun)")
    return int(value)


def describe(device: torch.device) -> str:
    """The device as reports name it: ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"
